"""Power and false alarms of both judges on the W4A16 formats of issue 25: int4 with group-128
scales and zero points (vllm-marlin-w4a16) and NVFP4 weights (vllm-nvfp4-w4a16). Both judges
read the dequantised float-weight problem, so their noise model is the float path's; this
measures that it holds for these formats' weights.

Writes ``benchmarks/W4A16_POWER.md``. Run from the repository root:
``python benchmarks/w4a16_power.py`` (``--quick``: fewer pairs, no production shapes). Not a
timed test.

Power: at K = 7168 with I = 2048 and I = 160 (a shard not a multiple of 128), EP=1, E=2,
top_k=2, 4 tokens, bf16 x: the format's real-bug mutants of ``tests/test_w4a16.py`` and
``tests/test_nvfp4.py`` and the profile's own output. False alarms: the profile's output at
random small shapes (K, I not multiples of 16 or 128 included), judged by the ideal judge and
by the profile.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import oracle
from oracle.judge.rowtest import row_thresholds
from oracle.model.kernels import VLLM_MARLIN_W4A16, VLLM_NVFP4_W4A16, KernelProfile
from spec import OpConfig, Problem

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1] / "tests")]
from ideal_power import drawn_problem, problem_with  # noqa: E402
from test_nvfp4 import applied_twice, first_expert_s, ignored  # noqa: E402
from test_w4a16 import _groups_of_64, _no_zero_points, dequantising_with  # noqa: E402

Array = np.ndarray[Any, Any]
Impl = Callable[[Problem], list[tuple[Array, Array]]]
OUT = Path(__file__).with_name("W4A16_POWER.md")
#: Per format: weight dtype, profile, mutants.
FORMATS: dict[str, tuple[str, KernelProfile, dict[str, Impl]]] = {
    "int4_w4a16": ("uint4", VLLM_MARLIN_W4A16, {
        "zero points not subtracted": dequantising_with(_no_zero_points),
        "scales read per 64 rows": dequantising_with(_groups_of_64)}),
    "nvfp4_w4a16": ("float4_e2m1fn", VLLM_NVFP4_W4A16, {
        "global scale ignored": ignored, "global scale applied twice": applied_twice,
        "expert 0's global scale for all (sglang #36597)": first_expert_s}),
}


def verdicts(problem: Problem, outs: list[tuple[Array, Array]], profile: KernelProfile,
             ideal: oracle.Result) -> tuple[str, str, float]:
    """(ideal judge, profile judge, row |s|/T under the ideal judge's assumptions)."""
    by_ideal = oracle.compare(problem, outs, numerics="ideal")
    by_profile = oracle.compare(problem, outs, numerics=oracle.Numerics(kernel=profile))
    ratio = row_thresholds(problem, ideal).judge([o for o, _ in outs]).ratio
    return (("passes" if by_ideal.ok else f"caught: {by_ideal.stage}"),
            ("passes" if by_profile.ok else f"caught: {by_profile.stage}"), ratio)


def own(problem: Problem, profile: KernelProfile) -> list[tuple[Array, Array]]:
    run = oracle.run(problem, numerics=oracle.Numerics(kernel=profile))
    return [(r.out, r.expert_token_nums) for r in run.ranks]


def power() -> list[str]:
    lines = ["| format | K | I | output | ideal judge | profile judge | row \\|s\\|/T |",
             "|---|---|---|---|---|---|---|"]
    for name, (w_dtype, profile, mutants) in FORMATS.items():
        for k_len, i_len in ((7168, 2048), (7168, 160)):
            cfg = OpConfig(ep_size=1, experts_per_rank=2, top_k=2, hidden=k_len,
                           intermediate=i_len, tokens_per_rank=(4,), weight_dtype=w_dtype)
            problem = problem_with(cfg, 0)
            ideal = oracle.run(problem, numerics="ideal")
            cases = {"(legitimate: the profile's model)": own(problem, profile)}
            cases.update((m, impl(problem)) for m, impl in mutants.items())
            for case, outs in cases.items():
                a, b, r = verdicts(problem, outs, profile, ideal)
                lines.append(f"| {name} | {k_len} | {i_len} | {case} | {a} | {b} | {r:.3g} |")
            print(f"power {name} K={k_len} I={i_len} done", flush=True)
    return lines


def false_alarms(name: str, pairs: int, seed: int = 25) -> list[str]:
    w_dtype, profile, _ = FORMATS[name]
    rng = np.random.default_rng(seed)
    worst, where_worst, rejected = 0.0, "", []
    t0 = time.perf_counter()
    for _ in range(pairs):
        problem = drawn_problem(rng, [16, 32, 40, 64, 128, 160, 200, 320],
                                [8, 16, 24, 72, 136, 160], lambda _: w_dtype)
        cfg = problem.config
        k_len, i_len, top_k, x_dtype = cfg.hidden, cfg.intermediate, cfg.top_k, cfg.x_dtype
        ideal = oracle.run(problem, numerics="ideal")
        a, b, r = verdicts(problem, own(problem, profile), profile, ideal)
        where = f"K={k_len} I={i_len} top_k={top_k} {x_dtype}"
        if r >= worst:
            worst, where_worst = r, where
        if a != "passes" or b != "passes":
            rejected.append(f"{where}: ideal {a}, profile {b}")
    seconds = time.perf_counter() - t0
    lines = [
        f"### {name} ({profile.name})", "",
        f"{pairs} legitimate (problem, output) pairs in {seconds:.0f} s (K in 16–320, I in "
        "8–160, EP 1–2, E 1–4, top_k 1–8, 1–4 tokens per rank; 20 % fp16 x), each judged by "
        "the ideal judge and by the profile.", "",
        f"- rejected calls: **{len(rejected)}** of {pairs}",
        f"- largest row |s|/T observed: **{worst:.3g}** ({where_worst}); margin to the "
        f"threshold {1 / max(worst, 1e-12):.1f}x",
    ]
    return lines + [f"- rejected: {w}" for w in rejected[:20]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    body = ["# W4A16 formats (int4, NVFP4): power and false alarms of both judges", "",
            f"`python benchmarks/w4a16_power.py{' --quick' if args.quick else ''}` on "
            f"{platform.machine()}, Python {platform.python_version()}, NumPy {np.__version__}.",
            ""]
    if not args.quick:
        body += ["## Power", "", *power(), ""]
    body += ["## False alarms", ""]
    for name in FORMATS:
        body += [*false_alarms(name, 200 if args.quick else 2_000), ""]
    OUT.write_text("\n".join(body))
    print("\n".join(body))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
