"""Power and false alarms of the ideal-mode judge (issue 11): the sound bound and the row test.

Writes ``benchmarks/IDEAL_POWER.md``. Run from the repository root:
``python benchmarks/ideal_power.py`` (``--quick``: fewer shapes and pairs). Not a timed test.

Power: at K in {256, 1024, 2048, 4096, 7168} with the realistic I of ``spec.limits.REAL_MODELS``
(EP=2, E=4, top_k=8, 16 tokens per rank, bf16 x, int8 weights), the outputs of seven bugs,
each judged as ``oracle.judge.verdict.compare(..., numerics="ideal")`` does (sound bound, then the
row test), with the row test's worst ``|s|/T``. False alarms: legitimate (problem, output) pairs
(the Ascend-faithful model, the vLLM Triton profile with bf16 intermediates and half-even ties,
both on BF16 weights too: float32 accumulation) over generated and realistic shapes.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import oracle
from oracle.judge.bounds import ideal_tolerance
from oracle.judge.rowtest import row_thresholds
from oracle.model import kernels
from oracle.model.kernels import Env, IdealAssumptions, Quantiser
from spec import OpConfig, Problem, random_problem
from spec.synth import normal_tokens, softmax_probs, uniform_routing

Array = np.ndarray[Any, Any]
OUT = Path(__file__).with_name("IDEAL_POWER.md")
SHAPES = {256: 128, 1024: 512, 2048: 768, 4096: 1536, 7168: 2048}  # K: I (models.md)


@dataclasses.dataclass(frozen=True)
class PerTensorQuantiser(Quantiser):
    """The bug: one activation scale for the whole call (max over every token) instead of
    one per token."""

    def __call__(self, a: Env, zero_rows: str) -> tuple[Env, Env, Array]:
        amax = np.float32(np.abs(a.mid).max(initial=0.0))
        sigma = np.full(a.mid.shape[0], amax / np.float32(127), np.float32)
        safe = sigma if amax > 0 else np.ones_like(sigma)
        q = np.sign(a.mid) * np.floor(np.abs(a.mid / safe[:, None]).astype(np.float64) + 0.5)
        return Env(q.astype(np.float32)), Env(sigma), np.zeros(a.mid.shape[0], bool)


def swapped(profile: kernels.KernelProfile) -> kernels.KernelProfile:
    """The bug: gate and up halves of W1 exchanged."""
    return dataclasses.replace(
        profile.map_steps("swiglu", lambda s: dataclasses.replace(s, gate_first=False)),
        name="bug-swapped")


PER_TENSOR = dataclasses.replace(
    kernels.ASCEND_A3.with_steps(quantise=PerTensorQuantiser(scale="divide", ties="away")),
    name="bug-per-tensor")


def problem_with(cfg: OpConfig, seed: int, spread: float = 0.0, tiles: bool = False,
                 **change: Any) -> Problem:
    """A random problem whose token arrays are drawn here (so that changing one keeps the
    weights); ``spread``: token RMS log2-uniform in ±spread (real activations vary by token);
    ``tiles``: tile-tagged weights (``spec.synth.tile_tag``)."""
    rng = np.random.default_rng(seed + 1000)
    arrays: dict[str, list[Array]] = {"x": [], "expert_idx": [], "probs": []}
    for m in cfg.tokens_per_rank:
        x = normal_tokens(cfg, rng, m)
        if spread:
            x = (x.astype(np.float32) * 2.0 ** rng.uniform(-spread, spread, (m, 1))).astype(
                x.dtype)
        arrays["x"].append(x)
        arrays["expert_idx"].append(uniform_routing(cfg, rng, m))
        arrays["probs"].append(softmax_probs(rng, m, cfg.top_k))
    for key, f in change.items():
        arrays[key] = [f(a) for a in arrays[key]]
    return random_problem(cfg, seed=seed, tiles=tiles, **arrays)


def drawn_problem(rng: np.random.Generator, hidden: Sequence[int],
                  intermediate: Sequence[int], weights: Callable[[str], str],
                  shape: tuple[int, int, int, int, int, tuple[int, ...]] | None = None,
                  ) -> Problem:
    """One problem of a false-alarm loop, drawn from ``rng`` in the order every such loop of
    these scripts draws: unless ``shape`` (K, I, EP, E, top_k, tokens per rank) is given, K
    and I from the choices, EP 1–2, E 1–4, top_k 1–8 and 1–4 tokens a rank; then x's dtype
    (80 % bf16), the weight dtype ``weights(x's dtype)`` and the problem's seed."""
    if shape is None:
        k_len = int(rng.choice(hidden))
        i_len = int(rng.choice(intermediate))
        ep, e = int(rng.integers(1, 3)), int(rng.integers(1, 5))
        top_k = int(rng.choice([1, 2, 4, 8]))
        tokens = tuple(int(t) for t in rng.integers(1, 5, ep))
    else:
        k_len, i_len, ep, e, top_k, tokens = shape
    x_dtype = "bfloat16" if rng.random() < 0.8 else "float16"
    cfg = OpConfig(ep_size=ep, experts_per_rank=e, top_k=top_k, hidden=k_len,
                   intermediate=i_len, tokens_per_rank=tokens, x_dtype=x_dtype,
                   weight_dtype=weights(x_dtype))
    return problem_with(cfg, int(rng.integers(1 << 30)))


def outs_of(result: oracle.Result) -> list[Array]:
    return [r.out for r in result.ranks]


def bug_outputs(cfg: OpConfig, seed: int,
                profile: kernels.KernelProfile = kernels.ASCEND_A3) -> dict[str, list[Array]]:
    """Six gross bugs of a kernel with ``profile``'s pipeline (and, for W8A8 on Ascend, a
    per-tensor activation scale)."""
    base = problem_with(cfg, seed)
    right = oracle.run(base, numerics=profile)

    def run_on(**change: Any) -> list[Array]:
        return outs_of(oracle.run(problem_with(cfg, seed, **change), numerics=profile))

    n = cfg.num_experts
    bugs = {
        "all zeros": [o * 0 for o in outs_of(right)],
        "gate/up swapped": outs_of(oracle.run(base, numerics=swapped(profile))),
        "probs ignored": run_on(probs=np.ones_like),
        "last slot dropped": run_on(probs=lambda p: np.where(
            np.arange(p.shape[1]) == p.shape[1] - 1, 0, p).astype(p.dtype)),
        "experts off by one": run_on(expert_idx=lambda e: ((e + 1) % n).astype(e.dtype)),
        "output x 1.08": [(o.astype(np.float32) * 1.08).astype(o.dtype) for o in outs_of(right)],
    }
    if profile == kernels.ASCEND_A3 and cfg.weight_dtype == "int8":
        bugs["per-tensor activation scale"] = outs_of(oracle.run(base, numerics=PER_TENSOR))
    return bugs


def judge(problem: Problem, ideal: oracle.Result, tol: tuple[Array, ...], th: Any,
          outs: list[Array]) -> tuple[str, float, float]:
    """``compare``'s ideal-mode decision: (which test caught it or "passes", worst |s|/T,
    the row statistic at that row)."""
    for out, want, t in zip(outs, ideal.ranks, tol):
        d = want.defined
        err = np.abs(out[d].astype(np.float64) - want.out[d].astype(np.float64))
        if (~np.isfinite(err) | (err > t[d])).any():
            bound = True
            break
    else:
        bound = False
    stats = th.statistics(outs)
    ratios = [np.where(np.isfinite(t), np.abs(s) / t, 0) for s, t in zip(stats, th.threshold)]
    r = int(np.argmax([x.max(initial=0) for x in ratios]))
    k = int(np.argmax(ratios[r])) if ratios[r].size else 0
    stat = float(stats[r][k]) if ratios[r].size else 0.0
    verdict = th.judge(outs)  # the worst row's projection and the rows together
    worst, row = verdict.ratio, not verdict.ok
    caught = "bound + row test" if bound and row else "bound" if bound else (
        "row test" if row else "passes")
    return caught, worst, stat


def _power_row(k_len: int, i_len: int, name: str, problem: Problem, ideal: oracle.Result,
               tol: tuple[Array, ...], th: Any, outs: list[Array]) -> str:
    caught, worst, stat = judge(problem, ideal, tol, th, outs)
    v = th.judge(outs)
    return (f"| {k_len} | {i_len} | {name} | {caught} | {worst:.3g} | {v.projection:.3g} | "
            f"{v.together:.3g} | {v.line:.3g} | {stat:+.3g} |")


def power(shapes: dict[int, int]) -> tuple[list[str], dict[str, float]]:
    lines = ["| K | I | bug | caught by | row test ratio | worst row \\|s\\|/T | rows together "
             "| rows in line | s/\\|row\\| there |", "|---|---|---|---|---|---|---|---|---|"]
    costs: dict[str, float] = {}
    for k_len, i_len in shapes.items():
        cfg = OpConfig(ep_size=2, experts_per_rank=4, top_k=8, hidden=k_len,
                       intermediate=i_len, tokens_per_rank=(16, 16), x_dtype="bfloat16",
                       weight_dtype="int8")
        problem = problem_with(cfg, 0)
        t0 = time.perf_counter()
        ideal = oracle.run(problem, numerics="ideal")
        t1 = time.perf_counter()
        tol = ideal_tolerance(problem, ideal)
        t2 = time.perf_counter()
        th = row_thresholds(problem, ideal)
        t3 = time.perf_counter()
        costs[f"K={k_len} I={i_len}"] = (t1 - t0, t2 - t1, t3 - t2)  # type: ignore[assignment]
        bugs = bug_outputs(cfg, 0)
        spread_cfg = problem_with(cfg, 0, spread=2.0)
        ideal_s = oracle.run(spread_cfg, numerics="ideal")
        bugs_spread = {"per-tensor activation scale, token RMS 2^±2":
                       outs_of(oracle.run(spread_cfg, numerics=PER_TENSOR))}
        legit = {"(legitimate: Ascend faithful)": outs_of(oracle.run(problem))}
        for name, outs in {**bugs, **legit}.items():
            lines.append(_power_row(k_len, i_len, name, problem, ideal, tol, th, outs))
        tol_s = ideal_tolerance(spread_cfg, ideal_s)
        th_s = row_thresholds(spread_cfg, ideal_s)
        for name, outs in bugs_spread.items():
            lines.append(_power_row(k_len, i_len, name, spread_cfg, ideal_s, tol_s, th_s, outs))
        print(f"power K={k_len} done", flush=True)
    return lines, costs


def false_alarms(
    pairs: int, seed: int = 7,
    kernels_under_test: dict[str, kernels.KernelProfile] | None = None,
    assumptions_of: Callable[[kernels.KernelProfile, str], IdealAssumptions] = (
        lambda profile, x_dtype: IdealAssumptions()),
) -> list[str]:
    """Legitimate (problem, output) pairs judged by the row test: each kernel's outputs
    against the thresholds ``assumptions_of(its profile, x dtype)`` gives (default: the
    coarsest legitimate kernel, as ``numerics="ideal"`` assumes)."""
    rng = np.random.default_rng(seed)
    if kernels_under_test is None:
        kernels_under_test = {k: kernels.get_kernel(k) for k in ("ascend-a3", "vllm-triton")}
    worst = together = line = 0.0
    worst_where = ""
    n_pairs = n_rows = n_tested = n_rejected = 0
    by_kind: dict[str, float] = {}
    t0 = time.perf_counter()
    i = 0
    while n_pairs < pairs:
        realistic = i % 25 == 0
        i += 1
        problem = drawn_problem(
            rng, [16, 32, 64, 128, 256, 512], [8, 16, 32, 64, 128, 256],
            lambda x_dtype: "int8" if rng.random() < 0.7 else x_dtype,
            (*((1024, 512) if i % 2 else (2048, 768)), 2, 4, 8, (2, 2)) if realistic else None)
        cfg = problem.config
        k_len, i_len, top_k, x_dtype = cfg.hidden, cfg.intermediate, cfg.top_k, cfg.x_dtype
        weights = cfg.weight_dtype
        ideal = oracle.run(problem, numerics="ideal")
        thresholds: dict[IdealAssumptions, Any] = {}
        for name, profile in kernels_under_test.items():
            assumptions = assumptions_of(profile, x_dtype)
            if assumptions not in thresholds:
                thresholds[assumptions] = row_thresholds(problem, ideal, assumptions)
            th = thresholds[assumptions]
            tested = np.concatenate(th.threshold)
            outs = outs_of(oracle.run(problem, numerics=oracle.Numerics(kernel=profile)))
            verdict = th.judge(outs)
            kind = f"{name}, {'int8' if weights == 'int8' else 'float'} weights"
            by_kind[kind] = max(by_kind.get(kind, 0.0), verdict.ratio)
            together = max(together, verdict.together)
            line = max(line, verdict.line)
            if verdict.ratio > worst:
                worst = verdict.ratio
                worst_where = f"{kind}, K={k_len} I={i_len} top_k={top_k} {x_dtype}"
            n_pairs += 1
            n_rows += tested.size
            n_tested += int(np.isfinite(tested).sum())
            n_rejected += not verdict.ok
    seconds = time.perf_counter() - t0
    lines = [
        f"{n_pairs} legitimate (problem, output) pairs in {seconds:.0f} s ({i} problems; every "
        "25th at a realistic shape K=1024/I=512 or K=2048/I=768 with EP=2 E=4 top_k=8; the "
        "others random with K 16–512, I 8–256, EP 1–2, E 1–4, top_k 1–8, 1–4 tokens per rank; "
        f"70 % int8 weights, 20 % fp16 x; kernels: {', '.join(kernels_under_test)}). "
        "False-alarm probability per call: "
        f"{IdealAssumptions().false_alarm:g}.",
        "",
        f"- rejected calls: **{n_rejected}** of {n_pairs}",
        f"- token rows: {n_rows}, judged by the row test: {n_tested} "
        f"({100 * n_tested / max(n_rows, 1):.1f} %; the rest fell back to the sound bound)",
        f"- largest row test ratio observed: **{worst:.3g}** ({worst_where}); margin to the "
        f"threshold {1 / worst if worst else float('inf'):.1f}x; the rows together's largest "
        f"`sqrt(Q/q)`: {together:.3g}, the rows in line's largest `|S|/limit`: {line:.3g}",
        "",
        "| kernel | max row test ratio |", "|---|---|",
        *[f"| {k} | {v:.3g} |" for k, v in sorted(by_kind.items())],
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    start = time.perf_counter()
    shapes = {256: 128, 1024: 512} if args.quick else SHAPES
    power_lines, costs = power(shapes)
    fa_lines = false_alarms(400 if args.quick else 10_000)
    cost_lines = ["| shape | ideal run (s) | sound bound (s) | row test (s) |", "|---|---|---|---|"]
    cost_lines += [f"| {k} | {a:.2f} | {b:.2f} | {c:.2f} |" for k, (a, b, c) in costs.items()]
    text = "\n".join([
        "# Ideal-mode judge: power and false alarms",
        "",
        f"Generated by `python benchmarks/ideal_power.py` in {time.perf_counter() - start:.0f} s; "
        "do not edit by hand. Issue 11; the test is `oracle/judge/rowtest.py`, the bound "
        "`oracle/judge/bounds.py`.",
        "",
        f"- Python {platform.python_version()}, NumPy {np.__version__}, {platform.platform()}; "
        "2 cores shared with other jobs",
        "",
        "## Power at production shapes",
        "",
        "EP=2, E=4, top_k=8, 16 tokens per rank, bf16 x, int8 weights, `random_problem` values "
        "(x ~ N(0, 1)). Caught by: the sound bound (`ideal_tolerance`), the row test, both, "
        "or neither (passes). `row test ratio` (above 1 rejects): the larger of the worst "
        "row's ratio of the projection to its threshold (`|s|/T`) and the rows together's "
        "`sqrt(Q/q)` (rowtest, \"Rows together\": the sum of squared projections in units of "
        "their legitimate spread against its limit) and the rows in line's `|S|/limit` "
        "(\"Rows in line\": the same projections added with their signs); `s/|row|` the worst "
        "row's projection of "
        "the error on the ideal row, relative to the row's norm.",
        "",
        *power_lines,
        "",
        "## False alarms",
        "",
        *fa_lines,
        "",
        "## Cost",
        "",
        "Seconds for one call at the power shapes (one process, the same machine).",
        "",
        *cost_lines,
        "",
    ])
    OUT.write_text(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
