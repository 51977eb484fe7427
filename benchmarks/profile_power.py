"""Power and false alarms of the profile-mode judge (the gate's default): the envelope alone,
and the envelope followed by the row test (issue 11, ``oracle/judge/verdict.py``).

Writes ``benchmarks/PROFILE_POWER.md``. Run from the repository root:
``python benchmarks/profile_power.py`` (``--quick``: two shapes, fewer pairs). Not a timed
test.

Power: at K in {256, 1024, 2048, 4096, 7168} with realistic I (EP=2, E=4, top_k=8, 8 tokens
per rank, bf16 x), for each profile on int8 and on bf16 weights, the outputs of six gross
bugs and of the one-rounding mutants of ``tests/test_kernels.py`` (a kernel that moves one
rounding point of the profile), each judged by the envelope (``compare`` before the row test
joined it) and by the whole judge. False alarms: legitimate outputs (each profile's model, and
the same pipeline with float32 BLAS order) judged by the row test with the profile's own
assumptions, as profile mode does.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import oracle
from oracle.judge.rowtest import row_thresholds
from oracle.judge.verdict import compare, envelope_ratio
from oracle.model.kernels import ASCEND_A3, VLLM_TRITON, KernelProfile
from spec import OpConfig

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1] / "tests")]
from ideal_power import bug_outputs, false_alarms, outs_of, problem_with  # noqa: E402
from test_kernels import BlasFloatGemm  # noqa: E402

Array = np.ndarray[Any, Any]
OUT = Path(__file__).with_name("PROFILE_POWER.md")
SHAPES = {256: 128, 1024: 512, 2048: 768, 4096: 1536, 7168: 2048}  # K: I (models.md)
replace = dataclasses.replace


def one_rounding_mutants(profile: KernelProfile) -> dict[str, KernelProfile]:
    """A kernel that moves one rounding point of ``profile`` (``tests/test_kernels.py``)."""
    if profile.name == ASCEND_A3.name:
        a, ai, af = profile, profile.pipeline("w8a8"), profile.pipeline("float")
        return {
            "bf16 instead of fp16 intermediates": a.with_steps(
                "w8a8", gemm1=replace(ai.gemm1, epilogue=("col", "x", "row")),
                gemm2=replace(ai.gemm2, epilogue=("col", "x", "row", "x"))),
            "SwiGLU cast ties even (float weights)": a.with_steps(
                "float", swiglu=replace(af.swiglu, store="x")),
            "SwiGLU result not rounded (float weights)": a.with_steps(
                "float", swiglu=replace(af.swiglu, store=None)),
        }
    v, vi, vf = profile, profile.pipeline("w8a8"), profile.pipeline("float")
    return {
        "fp16 for bf16 intermediates": v.with_steps(
            "w8a8", gemm1=replace(vi.gemm1, epilogue=("row", "col", "fp16"))).with_steps(
            "float", gemm1=replace(vf.gemm1, epilogue=("fp16",))),
        "silu not rounded": v.map_steps("swiglu", lambda s: replace(s, silu_store=None)),
        "routed weight in the combine": replace(v.with_steps(
            "w8a8", gemm2=replace(vi.gemm2, epilogue=("row", "col", "x"))).with_steps(
            "float", gemm2=replace(vf.gemm2, epilogue=("x",))),
            combine=replace(v.combine, weight="combine")),
    }


def blas_order(profile: KernelProfile) -> KernelProfile:
    """The same pipeline with float32 BLAS accumulation: a legitimate kernel of ``profile``."""
    float_path = profile.pipeline("float")
    return replace(profile.with_steps("float", gemm1=BlasFloatGemm(float_path.gemm1.epilogue),
                                      gemm2=BlasFloatGemm(float_path.gemm2.epilogue)),
                   name=f"{profile.name} (BLAS order)")


def envelope_only(expected: oracle.Result, outs: list[Array], x_dtype: str) -> float:
    """The worst envelope ratio over defined values (above 1: the envelope rejects)."""
    worst = 0.0
    for out, want in zip(outs, expected.ranks):
        rows = want.defined
        if rows.any():
            worst = max(worst, float(envelope_ratio(out[rows], want, rows, x_dtype, 0).max()))
    return worst


def power(shapes: dict[int, int]) -> list[str]:
    lines = ["| profile | weights | K | output | differs | envelope ratio | before | row \\|s\\|/T "
             "| after |", "|---|---|---|---|---|---|---|---|---|"]
    for k_len, i_len in shapes.items():
        for profile in (ASCEND_A3, VLLM_TRITON):
            for weights in ("int8", "bfloat16"):
                cfg = OpConfig(ep_size=2, experts_per_rank=4, top_k=8, hidden=k_len,
                               intermediate=i_len, tokens_per_rank=(8, 8),
                               x_dtype="bfloat16", weight_dtype=weights)
                problem = problem_with(cfg, 0)
                num = oracle.Numerics(kernel=profile)
                expected = oracle.run(problem, numerics=num, envelope=True)
                rows = row_thresholds(problem, oracle.run(problem, numerics="ideal"),
                                      profile.ideal_assumptions(cfg.x_dtype))
                mutants = {name: outs_of(oracle.run(problem, numerics=oracle.Numerics(
                    kernel=m))) for name, m in one_rounding_mutants(profile).items()}
                outputs = {**bug_outputs(cfg, 0, profile), **mutants,
                           "(legitimate: BLAS order)": outs_of(oracle.run(
                               problem, numerics=oracle.Numerics(kernel=blas_order(profile))))}
                for name, outs in outputs.items():
                    differs = sum(int((o.view(np.uint16) != w.out.view(np.uint16))[w.defined]
                                      .sum()) for o, w in zip(outs, expected.ranks))
                    env = envelope_only(expected, outs, cfg.x_dtype)
                    verdict = compare(problem, [(o, w.expert_token_nums) for o, w in
                                                zip(outs, expected.ranks)], numerics=num,
                                      expected=expected)
                    row = rows.judge(outs).ratio
                    before = "caught" if env > 1 else ("passes" if differs else "(identical)")
                    after = "caught" if not verdict.ok else (
                        "passes" if differs else "(identical)")
                    lines.append(f"| {profile.name} | {weights} | {k_len} | {name} | {differs} "
                                 f"| {env:.3g} | {before} | {row:.3g} | {after} |")
        print(f"power K={k_len} done", flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    start = time.perf_counter()
    shapes = {256: 128, 1024: 512} if args.quick else SHAPES
    power_lines = power(shapes)
    legit = {p.name: p for p in (ASCEND_A3, VLLM_TRITON, blas_order(ASCEND_A3),
                                 blas_order(VLLM_TRITON))}
    fa_lines = false_alarms(
        400 if args.quick else 4_000, seed=11, kernels_under_test=legit,
        assumptions_of=lambda profile, x_dtype: profile.ideal_assumptions(x_dtype))
    text = "\n".join([
        "# Profile-mode judge (the gate's default): power and false alarms",
        "",
        f"Generated by `python benchmarks/profile_power.py` in "
        f"{time.perf_counter() - start:.0f} s; do not edit by hand. Issue 11; the judge is "
        "`oracle/judge/verdict.py` (envelope, then the row test of `oracle/judge/rowtest.py`).",
        "",
        f"- Python {platform.python_version()}, NumPy {np.__version__}, "
        f"{platform.platform()}; 2 cores shared with other jobs",
        "",
        "## Power at production shapes",
        "",
        "EP=2, E=4, top_k=8, 8 tokens per rank, bf16 x, `random_problem` weights, x ~ N(0, 1). "
        "`differs`: defined output values that differ bitwise from the profile's model. "
        "`envelope ratio`: the worst error over the envelope's allowance (above 1 rejects); "
        "`before`: the verdict of the envelope alone (the judge before the row test joined "
        "it); `row |s|/T`: the row test's worst ratio of projection to threshold (above 1 "
        "rejects); "
        "`after`: the verdict of today's judge. `(identical)`: the output equals the model "
        "bit for bit (the mutant changes nothing on this path, e.g. a float-weight step on "
        "int8 weights).",
        "",
        *power_lines,
        "",
        "## False alarms",
        "",
        "Each kernel judged with its own profile's row-test assumptions (stored dtype = x's "
        "dtype, its tie rules, its top-k sums), as `compare` does under `--kernel`.",
        "",
        *fa_lines,
        "",
    ])
    OUT.write_text(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
