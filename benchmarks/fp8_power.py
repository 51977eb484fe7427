"""Power and false alarms of both judges on FP8 block scale (issue 25): the ideal judge
(``numerics="ideal"``: sound bound, then the row test) and the vllm-triton-fp8 profile
(envelope, then the row test with the profile's assumptions).

Writes ``benchmarks/FP8_POWER.md``. Run from the repository root:
``python benchmarks/fp8_power.py`` (``--quick``: small shapes, fewer pairs). Not a timed test.

Power: at K = 7168 with I = 2048 (DeepSeek-V3) and I = 160 (a tensor-parallel shard that is
not a multiple of 128), EP=2, E=4, top_k=8, 8 tokens per rank, bf16 x, the outputs of the
gross bugs of ``ideal_power.py`` and of the format's real bugs (``tests/test_fp8.py``), and of
legitimate kernels (the profile's model, a 64-wide-tile kernel with the scale product first,
a Hopper-like kernel whose tile sums are chopped to 13 bits after every add;
for the ideal judge also UE8M0 scales and DeepGEMM's reciprocal with the 1e-4 floor). False
alarms: legitimate pairs at random small shapes (K, I not multiples of 128 included) and
every 25th at K = 1024 / I = 160 or K = 2048 / I = 768. ``--before REV``: a column with the
ideal judge's row |s|/T under ``oracle/judge/rowtest.py`` as of git revision REV, in the same
run. MXFP4 W4A16 (``vllm-mxfp4-w4a16``): the same shapes, its own mutants (nibbles swapped,
a wrong expert's scales, e8m0 read one off). FP8 per token and channel (``fp8_channel``,
``torch-scaled-grouped-mm``): the same shapes, its mutants (a per-tensor activation scale,
with and without a loud token; expert 0's scales for every expert), and its legitimate pairs
beside the block ones in the false-alarm count. ``--pairs N``: that many false-alarm pairs per
format (default 2000 block, a quarter of it channel).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import platform
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

import oracle
from oracle.judge.bounds import ideal_tolerance
from oracle.judge.rowtest import row_thresholds
from oracle.model.kernels import (
    VLLM_MXFP4,
    VLLM_TRITON_FP8,
    GroupQuantiser,
    IdealAssumptions,
    KernelProfile,
)
from spec import OpConfig, Problem

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1] / "tests")]
from ideal_power import bug_outputs, judge, outs_of, problem_with  # noqa: E402
from profile_power import envelope_only  # noqa: E402
from test_fp8 import (  # noqa: E402
    NEAREST,
    TILED,
    TRUNCATED,
    UE8M0,
    WRONG_DIM,
    UnclampedNearest,
    wrong_expert_scales,
)
from test_fp8_channel import PER_TENSOR, expert0_scales  # noqa: E402
from test_fp8_channel import PROFILE as CHANNEL  # noqa: E402
from test_mxfp4 import swapped_nibbles  # noqa: E402

Array = np.ndarray[Any, Any]
OUT = Path(__file__).with_name("FP8_POWER.md")
SHAPES = [(7168, 2048), (7168, 160)]
PROFILE = VLLM_TRITON_FP8
PIPE = PROFILE.pipeline("fp8_block")
replace = dataclasses.replace


def _with(name: str, base: KernelProfile = PROFILE, **steps: Any) -> KernelProfile:
    return replace(base.with_steps("fp8_block", **steps), name=name)


DEEPGEMM_QUANT = GroupQuantiser(scale="reciprocal", amax_floor=1e-4)
DEEPGEMM = _with("reciprocal, amax floor 1e-4 (DeepGEMM)", quantise=DEEPGEMM_QUANT,
                 requantise=DEEPGEMM_QUANT)
UNCLAMPED = _with("no clamp, UE8M0 to nearest", UE8M0,
                  quantise=UnclampedNearest(ue8m0=True), requantise=UnclampedNearest(ue8m0=True))
#: Legitimate kernels: of the profile (its freedoms), and of the format (the ideal judge).
OF_PROFILE = {"(legitimate: the profile's model)": PROFILE,
              "(legitimate: tile 64, scale product first)": TILED,
              "(legitimate: 13-bit truncating dots)": TRUNCATED}
OF_FORMAT = {"(legitimate: UE8M0 scales)": UE8M0,
             "(legitimate: reciprocal, floor 1e-4)": DEEPGEMM}


def run_outs(problem: Problem, profile: KernelProfile) -> list[Array]:
    return outs_of(oracle.run(problem, numerics=oracle.Numerics(kernel=profile)))


class Judges:
    """Both judges of one problem, each piece computed once: the ideal judge (the sound bound,
    then the row test with the default assumptions: ``compare(numerics="ideal")``) and a
    profile's (its envelope, then the row test with its assumptions: ``compare`` under
    ``--kernel``), as ``ideal_power.judge`` and ``profile_power.envelope_only`` evaluate
    them."""

    def __init__(self, problem: Problem, profile: KernelProfile = PROFILE) -> None:
        self.problem = problem
        self.ideal = oracle.run(problem, numerics="ideal")
        self.tolerance = ideal_tolerance(problem, self.ideal)
        x_dtype = problem.config.x_dtype
        self.rows = {"ideal": row_thresholds(problem, self.ideal, IdealAssumptions()),
                     "profile": row_thresholds(problem, self.ideal,
                                               profile.ideal_assumptions(x_dtype))}
        self.envelopes: dict[str, oracle.Result] = {}

    def __call__(self, outs: list[Array], profile: KernelProfile) -> tuple[str, str, float,
                                                                           float]:
        """(ideal judge, profile judge, row |s|/T under the ideal and the profile's
        assumptions); a judge's answer names the test that rejected."""
        by_ideal, r_ideal, _ = judge(self.problem, self.ideal, self.tolerance,
                                     self.rows["ideal"], outs)
        if profile.name not in self.envelopes:
            self.envelopes[profile.name] = oracle.run(
                self.problem, numerics=oracle.Numerics(kernel=profile), envelope=True)
        expected = self.envelopes[profile.name]
        r_profile = self.rows["profile"].judge(outs).ratio
        finite = all(np.isfinite(o[w.defined].astype(np.float64)).all()
                     for o, w in zip(outs, expected.ranks))
        envelope = envelope_only(expected, outs, self.problem.config.x_dtype)
        by_profile = ("caught by non-finite values" if not finite else
                      "caught by the envelope" if envelope > 1 else
                      "caught by the row test" if r_profile > 1 else "passes")
        return (by_ideal if by_ideal == "passes" else f"caught by {by_ideal}", by_profile,
                r_ideal, r_profile)


def rowtest_at(rev: str) -> Any:
    """``oracle.judge.rowtest`` as of git revision ``rev`` (for the before/after column)."""
    source = subprocess.run(["git", "show", f"{rev}:oracle/judge/rowtest.py"], check=True,
                            capture_output=True, text=True).stdout
    module = sys.modules.setdefault(f"rowtest_{rev}", types.ModuleType(f"rowtest_{rev}"))
    exec(compile(source, f"rowtest@{rev}", "exec"), module.__dict__)
    return module


Case = tuple[str, list[Array], KernelProfile]


def power_table(before: str | None, lead: list[str], named: bool,
                groups: Iterator[tuple[list[str], Judges, list[Case]]]) -> list[str]:
    """The skeleton of both FP8 power tables: per group (its leading cells, its judges, its
    cases: name, outputs, the profile judging them), each case's verdicts under both judges,
    the row test's ratio (the worst row's ``|s|/T`` and the rows together, rowtest's
    "Rows together"), and with ``before`` the ideal judge's ratio under that revision's
    rowtest. ``named``: the profile judge's cell names the profile."""
    old = rowtest_at(before) if before else None
    head = ["K", "I", *lead, "output", "ideal judge", "row ratio (ideal)",
            "of which: worst row \\|s\\|/T, rows together, rows in line",
            "profile judge (profile)" if named else "profile judge", "row ratio (profile)"]
    head += [f"row ratio (ideal) at {before}"] if old else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cells, judges, cases in groups:
        old_rows = (old.row_thresholds(judges.problem, judges.ideal, IdealAssumptions())
                    if old else None)
        for name, outs, profile in cases:
            by_ideal, by_profile, r_ideal, r_profile = judges(outs, profile)
            parts = judges.rows["ideal"].judge(outs)
            row = [*cells, name, by_ideal, f"{r_ideal:.3g}",
                   f"{parts.projection:.3g}, {parts.together:.3g}, {parts.line:.3g}",
                   f"{by_profile} ({profile.name})" if named else by_profile,
                   f"{r_profile:.3g}"]
            row += [f"{old_rows.judge(outs).ratio:.3g}"] if old_rows else []
            lines.append("| " + " | ".join(row) + " |")
    return lines


def _config(k_len: int, i_len: int, **format_: Any) -> OpConfig:
    return OpConfig(ep_size=2, experts_per_rank=4, top_k=8, hidden=k_len, intermediate=i_len,
                    tokens_per_rank=(8, 8), weight_dtype="float8_e4m3fn", **format_)


def power(shapes: list[tuple[int, int]], before: str | None) -> list[str]:
    def groups() -> Iterator[tuple[list[str], Judges, list[Case]]]:
        for (k_len, i_len), tiles in itertools.product(shapes, (False, True)):
            cfg = _config(k_len, i_len)
            problem = problem_with(cfg, 0, tiles=tiles)
            cases: list[Case] = [
                (name, outs, PROFILE) for name, outs in bug_outputs(cfg, 0, PROFILE).items()]
            cases += [
                ("block size from the wrong scale dim (vllm #47103)",
                 run_outs(problem, WRONG_DIM), PROFILE),
                ("UE8M0 rounded to nearest", run_outs(problem, NEAREST), UE8M0),
                ("no clamp, UE8M0 to nearest", run_outs(problem, UNCLAMPED), UE8M0),
                ("a wrong expert's scales (sglang #36597)",
                 [o for o, _ in wrong_expert_scales(problem)], PROFILE),
            ]
            cases += [(name, run_outs(problem, p), PROFILE) for name, p in OF_PROFILE.items()]
            cases += [(name, run_outs(problem, p), p) for name, p in OF_FORMAT.items()]
            yield ([str(k_len), str(i_len), "tile-tagged" if tiles else "normal"],
                   Judges(problem), cases)
            print(f"power K={k_len} I={i_len} tiles={tiles} done", flush=True)

    return power_table(before, ["weights"], True, groups())


#: The loud_row family's amax (spec.strategies.FP8_ROW_FAMILIES), for bf16 x.
LOUD = 2.0**21


def _loud_first(x: Array) -> Array:
    """Each rank's first token rescaled to amax :data:`LOUD` (the loud_row family)."""
    rows = x.astype(np.float32)
    rows[0] *= np.float32(LOUD / max(float(np.abs(rows[0]).max()), 1e-30))
    return rows.astype(x.dtype)


def channel_power(shapes: list[tuple[int, int]], before: str | None) -> list[str]:
    """fp8_channel at the same shapes: both judges (the profile's is torch-scaled-grouped-mm's
    envelope, then its row test) on the gross bugs, the format's mutants and its model."""
    def groups() -> Iterator[tuple[list[str], Judges, list[Case]]]:
        for k_len, i_len in shapes:
            cfg = _config(k_len, i_len, scale_dims=1)
            for tokens, change in (("normal", {}), ("first loud (2^21)", {"x": _loud_first})):
                problem = problem_with(cfg, 0, **change)
                cases = ({} if change else bug_outputs(cfg, 0, CHANNEL))
                cases |= {"per-tensor activation scale": run_outs(problem, PER_TENSOR),
                          "expert 0's scales for all": [o for o, _ in expert0_scales(problem)],
                          "(legitimate: the profile's model)": run_outs(problem, CHANNEL)}
                yield ([str(k_len), str(i_len), tokens], Judges(problem, CHANNEL),
                       [(name, outs, CHANNEL) for name, outs in cases.items()])
            print(f"channel K={k_len} I={i_len} done", flush=True)

    return power_table(before, ["tokens"], False, groups())


def _with_scales(problem: Problem, f: Any) -> list[Array]:
    """The MXFP4 profile's outputs with every rank's scale lists passed through ``f``."""
    ranks = [replace(r, scale1=f(r.scale1), scale2=f(r.scale2)) for r in problem.ranks]
    return run_outs(Problem(ranks, **problem.config.call_attributes()), VLLM_MXFP4)


def _roll(lists: Any) -> Any:
    """Local expert e's scales become expert (e + 1) mod E's."""
    return list(lists[1:]) + list(lists[:1]) if len(lists) > 1 else [
        np.roll(lists[0], -1, axis=0)]


def mx_power(shapes: list[tuple[int, int]]) -> list[str]:
    """MXFP4 W4A16 at the same shapes: the ideal judge (its row test reads the dequantised
    weights: no weight noise) and the profile's envelope, on its mutants and its model."""
    lines = ["| K | I | output | ideal judge | row ratio (ideal) | profile judge |",
             "|---|---|---|---|---|---|"]
    for k_len, i_len in shapes:
        cfg = OpConfig(ep_size=2, experts_per_rank=4, top_k=8, hidden=k_len,
                       intermediate=i_len, tokens_per_rank=(8, 8), weight_dtype="uint8")
        problem = problem_with(cfg, 0)
        ideal = oracle.run(problem, numerics="ideal")
        tolerance = ideal_tolerance(problem, ideal)
        rows = row_thresholds(problem, ideal, IdealAssumptions())
        expected = oracle.run(problem, numerics=oracle.Numerics(kernel=VLLM_MXFP4),
                              envelope=True)

        cases = {
            "nibbles swapped (vllm #54773)": [o for o, _ in swapped_nibbles(problem)],
            "a wrong expert's scales": _with_scales(problem, _roll),
            "e8m0 read one off (bias 128)": _with_scales(problem, lambda ss: [
                (s.astype(np.int16) - 1).clip(0, 254).astype(s.dtype) for s in ss]),
            "(legitimate: the profile's model)": run_outs(problem, VLLM_MXFP4),
        }
        for name, outs in cases.items():
            by_ideal, ratio, _ = judge(problem, ideal, tolerance, rows, outs)
            envelope = envelope_only(expected, outs, cfg.x_dtype)
            by_profile = ("caught by the envelope" if envelope > 1 else
                          "caught by the row test" if rows.judge(outs).ratio > 1 else "passes")
            lines.append(f"| {k_len} | {i_len} | {name} | "
                         f"{by_ideal if by_ideal == 'passes' else f'caught by {by_ideal}'} | "
                         f"{ratio:.3g} | {by_profile} |")
        print(f"mxfp4 K={k_len} I={i_len} done", flush=True)
    return lines


def _draw_config(rng: np.random.Generator, i: int, **fields: Any) -> OpConfig:
    """The ``i``-th false-alarm problem's call: every 25th at K=1024/I=160 or K=2048/I=768
    with EP=2 E=4 top_k=8, the others random small shapes; 20 % fp16 x."""
    if i % 25 == 0:
        k_len, i_len = (1024, 160) if i % 50 else (2048, 768)
        ep, e, top_k, tokens = 2, 4, 8, (2, 2)
    else:
        k_len = int(rng.choice([32, 64, 128, 160, 192, 256, 320]))
        i_len = int(rng.choice([16, 32, 96, 128, 160]))
        ep, e = int(rng.integers(1, 3)), int(rng.integers(1, 5))
        top_k = int(rng.choice([1, 2, 4, 8]))
        tokens = tuple(int(t) for t in rng.integers(1, 5, ep))
    x_dtype = "bfloat16" if rng.random() < 0.8 else "float16"
    return OpConfig(ep_size=ep, experts_per_rank=e, top_k=top_k, hidden=k_len,
                    intermediate=i_len, tokens_per_rank=tokens, x_dtype=x_dtype,
                    weight_dtype="float8_e4m3fn", **fields)


def false_alarms(pairs: int, channel: int, seed: int = 25) -> list[str]:
    """Legitimate pairs judged by both judges: the profile's kernels by the profile, the
    format's other kernels by their own profile; all of them by the ideal judge. Then
    ``channel`` fp8_channel pairs (torch-scaled-grouped-mm's model), a quarter of them with
    the first token loud (bf16 x)."""
    rng = np.random.default_rng(seed)
    kernels_under_test = {**OF_PROFILE, **OF_FORMAT}
    worst: dict[str, tuple[float, str]] = {}
    n_pairs = n_rejected = 0
    rejected_where: list[str] = []
    t0 = time.perf_counter()

    def record(name: str, where: str, verdicts: tuple[str, str, float, float]) -> None:
        nonlocal n_pairs, n_rejected
        by_ideal, by_profile, r_ideal, r_profile = verdicts
        for judge_name, ratio in (("ideal", r_ideal), ("profile", r_profile)):
            key = f"{name.strip('()').removeprefix('legitimate: ')}, {judge_name} judge"
            if ratio >= worst.get(key, (-1.0, ""))[0]:
                worst[key] = (ratio, where)
        n_pairs += 1
        if by_ideal != "passes" or by_profile != "passes":
            n_rejected += 1
            rejected_where.append(f"{name} at {where}: ideal {by_ideal}, profile {by_profile}")

    i = 0
    while n_pairs < pairs:
        i += 1
        cfg = _draw_config(rng, i)
        tiles = i % 2 == 0  # every other problem's weights tile-tagged
        judges = Judges(problem_with(cfg, int(rng.integers(1 << 30)), tiles=tiles))
        where = (f"K={cfg.hidden} I={cfg.intermediate} top_k={cfg.top_k} {cfg.x_dtype}"
                 f"{', tile-tagged' if tiles else ''}")
        for name, profile in kernels_under_test.items():
            record(name, where, judges(run_outs(judges.problem, profile),
                                       PROFILE if name in OF_PROFILE else profile))
    n_block, j = n_pairs, 0
    while n_pairs < n_block + channel:
        j += 1
        cfg = _draw_config(rng, j, scale_dims=1)
        loud = j % 4 == 0 and cfg.x_dtype == "bfloat16"
        problem = problem_with(cfg, int(rng.integers(1 << 30)),
                               **({"x": _loud_first} if loud else {}))
        where = (f"K={cfg.hidden} I={cfg.intermediate} top_k={cfg.top_k} {cfg.x_dtype}"
                 f"{', first token loud' if loud else ''}")
        judges = Judges(problem, CHANNEL)
        record("(legitimate: fp8_channel, the profile's model)", where,
               judges(run_outs(problem, CHANNEL), CHANNEL))
    seconds = time.perf_counter() - t0
    lines = [
        f"{n_pairs} legitimate (problem, output) pairs in {seconds:.0f} s: {n_block} FP8 block "
        f"({i} problems, every other one's weights tile-tagged) and {n_pairs - n_block} "
        f"fp8_channel ({j} problems, a quarter of them "
        "with the first token of each rank 2^21 loud where x is bf16); every 25th problem at "
        "K=1024/I=160 or K=2048/I=768 with EP=2 E=4 top_k=8, the others random with K in "
        "32–320, I in 16–160, EP 1–2, E 1–4, top_k 1–8, 1–4 tokens per rank; 20 % fp16 x. "
        "Each output judged by the ideal judge and by its profile; false-alarm probability per "
        "call: 1e-09.",
        "",
    ]
    return lines + alarm_summary(n_rejected, n_pairs, worst, rejected_where)


def alarm_summary(n_rejected: int, n_pairs: int, worst: dict[str, tuple[float, str]],
                  rejected_where: list[str]) -> list[str]:
    """The false-alarm section's tail (this script's and mxfp8_power.py's): the count, the
    largest ratio with its margin, the worst per kernel and judge, the first 20 rejections."""
    top = max(worst.values())
    lines = [
        f"- rejected calls: **{n_rejected}** of {n_pairs}",
        f"- largest row test ratio observed (the worst row's |s|/T, the rows together's "
        f"sqrt(Q/q) or the rows in line's |S|/limit): **{top[0]:.3g}** ({top[1]}); margin to "
        f"the threshold {1 / max(top[0], 1e-12):.1f}x",
        "",
        "| kernel, judge | max row test ratio | where |",
        "|---|---|---|",
        *(f"| {key} | {ratio:.3g} | {where} |" for key, (ratio, where) in worst.items()),
    ]
    if rejected_where:
        lines += ["", "Rejected:", *(f"- {w}" for w in rejected_where[:20])]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--before", metavar="REV", help="a git revision of rowtest.py to "
                        "compare with in the same run")
    parser.add_argument("--pairs", type=int, help="false-alarm pairs of FP8 block scale "
                        "(default 2000, --quick 200); a quarter as many fp8_channel ones")
    args = parser.parse_args(argv)
    pairs = args.pairs or (200 if args.quick else 2_000)
    start = time.perf_counter()
    shapes = [(1024, 160)] if args.quick else SHAPES
    power_lines = power(shapes, args.before)
    channel_lines = channel_power(shapes, args.before)
    mx_lines = mx_power(shapes)
    fa_lines = false_alarms(pairs, pairs // 4)
    flags = "".join([" --quick" if args.quick else "",
                     f" --before {args.before}" if args.before else "",
                     f" --pairs {args.pairs}" if args.pairs else ""])
    text = "\n".join([
        "# FP8 block scale: power and false alarms of both judges",
        "",
        f"Generated by `python benchmarks/fp8_power.py{flags}` in "
        f"{time.perf_counter() - start:.0f} s; do not edit by hand. Issue 25; the format is "
        "`spec/fp8.py`, the profile `vllm-triton-fp8` (`oracle/model/kernels.py`), the "
        "mutants `tests/test_fp8.py`.",
        "",
        f"- Python {platform.python_version()}, NumPy {np.__version__}, "
        f"{platform.platform()}; 2 cores shared with other jobs",
        "",
        "## Power at production shapes",
        "",
        "EP=2, E=4, top_k=8, 8 tokens per rank, bf16 x, `random_problem` weights (per-expert "
        "tagged scales; `tile-tagged`: also per 128 x 128 tile, `spec.synth.tile_tag`), "
        "x ~ N(0, 1). `ideal judge`: as `compare(numerics=\"ideal\")` (sound "
        "bound, then the row test with the default assumptions); `profile judge`: as "
        "`compare` with the named profile (its envelope, then the row test with its "
        "assumptions); each names the test that rejected. `row ratio`: the row test's "
        "(above 1 rejects), the larger of the worst row's ratio of projection to threshold "
        "(`|s|/T`) and the rows together's `sqrt(Q/q)` (rowtest, \"Rows together\"), both "
        "shown for the ideal judge. The UE8M0 mutants are judged by the profile with UE8M0 "
        "scales (vLLM's `use_ue8m0`).",
        "",
        *power_lines,
        "",
        "Round 4 (issue 25): the row test adds \"Rows together\" (rowtest): the sum over the "
        "call's rows of their squared projections, each in units of its legitimate spread, "
        "against a Chernoff limit for a sum of squared sub-Gaussian terms, with a quarter of "
        "the rows' false-alarm budget (the worst row's `|s|/T` is about 1 % lower for the "
        "rest); it catches an error spread over every row. The last column, where present, is "
        "the ideal judge's ratio under the rowtest of the `--before` revision, in the same "
        "run.",
        "",
        "## FP8 per token and channel: power at the same shapes",
        "",
        "`fp8_channel` (`torch-scaled-grouped-mm`: e4m3 weights with one float32 scale per "
        "output channel, activations e4m3 per token), the same calls; `first loud`: each "
        "rank's first token rescaled to amax 2^21 (the `loud_row` family of "
        "`spec.strategies.FP8_ROW_FAMILIES`), where a per-tensor activation scale crushes the "
        "other tokens of its expert's batch. With tokens of like magnitude one scale serves as "
        "well as one per token: no judge can tell the per-tensor mutant there.",
        "",
        *channel_lines,
        "",
        "## MXFP4 W4A16: power at the same shapes",
        "",
        "`vllm-mxfp4-w4a16`: e2m1 weights with e8m0 scales per 32, bf16 x. The row test reads the "
        "dequantised weights (no weight noise); the profile judge is its envelope, then the row "
        "test.",
        "",
        *mx_lines,
        "",
        "## False alarms",
        "",
        *fa_lines,
        "",
    ])
    OUT.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
