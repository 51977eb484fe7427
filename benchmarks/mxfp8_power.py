"""Power and false alarms of both judges on MXFP4 weights x MXFP8 activations (``mxfp4_mxfp8``,
profile ``triton-mxfp4-mxfp8``): the ideal judge (``numerics="ideal"``: sound bound, then the
row test) and the profile's (envelope, then the row test with its assumptions).

Writes ``benchmarks/MXFP8_POWER.md``. Run from the repository root:
``python benchmarks/mxfp8_power.py`` (``--quick``: a small shape, fewer pairs). Not a timed test.

Power: gpt-oss's K = 2880 with I = 2880 and with I = 720 (a tensor-parallel shard of 2880
that 32 does not divide), EP=2, E=4, top_k=4, 8 tokens per rank, bf16 x, on x ~ N(0, 1) and on
the ``scale_blocks`` token rows (``spec.strategies.BLOCK_ROW_FAMILIES``): the gross bugs of
``ideal_power.py``, the activation-scale mutants of ``tests/test_mxfp8.py``, and legitimate
kernels (the profile's model, 13-bit truncating in-block dots; for the ideal judge also
float32 scales ``amax/448``). False alarms: legitimate pairs at random small shapes (K, I not
multiples of 32 included) and every 25th at K = 2880 / I = 720.
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

from oracle.model.kernels import TRITON_MXFP4_MXFP8, KernelProfile
from spec import OpConfig, Problem
from spec.strategies import RowPlan

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1] / "tests")]
from fp8_power import Judges, alarm_summary, run_outs  # noqa: E402
from ideal_power import bug_outputs, problem_with  # noqa: E402
from test_fp8 import TruncatedDotGemm  # noqa: E402
from test_mxfp8 import FLOAT32_SCALES, NEAREST, PER_TENSOR, UNSWIZZLED  # noqa: E402

Array = np.ndarray[Any, Any]
OUT = Path(__file__).with_name("MXFP8_POWER.md")
SHAPES = [(2880, 2880), (2880, 720)]
PROFILE = TRITON_MXFP4_MXFP8
TRUNCATED = dataclasses.replace(PROFILE.with_steps(
    "mxfp4_mxfp8", gemm1=TruncatedDotGemm(("x",), block=32, dot_bits=13),
    gemm2=TruncatedDotGemm(("slot", "x"), block=32, dot_bits=13)), name="truncated")
MUTANTS = {"e8m0 scale rounded to nearest": NEAREST,
           "scale read through the swizzle (vllm #42118)": UNSWIZZLED,
           "one scale per tensor": PER_TENSOR}
PER_TENSOR_NOTE = (
    "With power-of-two scales a per-tensor scale gives the same values as per-block ones "
    "wherever `x/σ` stays in e4m3's normal range (2^-6 to 448): on N(0, 1) tokens the "
    "mutant's outputs are the model's (the same row ratio), an equivalent mutant there; the "
    "`scale_blocks` rows (rows 2^-12 apart, blocks from 2^-34 to 16x) leave the small ones "
    "subnormal or zero under the shared scale, and both judges reject it.")
#: Legitimate kernels: of the profile (its freedoms), and of the format (the ideal judge).
OF_PROFILE = {"(legitimate: the profile's model)": PROFILE,
              "(legitimate: 13-bit truncating dots)": TRUNCATED}
OF_FORMAT = {"(legitimate for ideal: float32 scales amax/448)": FLOAT32_SCALES}


def mx_problem(cfg: OpConfig, seed: int, blocks: bool) -> Problem:
    """``ideal_power.problem_with``'s problem, its rows rewritten by ``scale_blocks``."""
    if not blocks:
        return problem_with(cfg, seed)
    rng = np.random.default_rng(seed)

    def plant(x: Array) -> Array:
        rows = [x.astype(np.float64)]
        RowPlan("scale_blocks").plant(dataclasses.replace(cfg, tokens_per_rank=(len(x),),
                                                          ep_size=1), rng, rows)
        return np.asarray(rows[0]).astype(x.dtype)
    return problem_with(cfg, seed, x=plant)


def power(shapes: list[tuple[int, int]]) -> list[str]:
    lines = ["| K | I | x | output | ideal judge | row \\|s\\|/T (ideal) | profile judge "
             "| row \\|s\\|/T (profile) |", "|---|---|---|---|---|---|---|---|"]
    for k_len, i_len in shapes:
        cfg = OpConfig(ep_size=2, experts_per_rank=4, top_k=4, hidden=k_len,
                       intermediate=i_len, tokens_per_rank=(8, 8), weight_dtype="uint8",
                       act_scheme="mxfp8")
        for blocks in (False, True):
            problem = mx_problem(cfg, 0, blocks)
            judges = Judges(problem, PROFILE)
            cases: list[tuple[str, list[Array], KernelProfile]] = []
            if not blocks:
                cases += [(name, outs, PROFILE)
                          for name, outs in bug_outputs(cfg, 0, PROFILE).items()]
            cases += [(name, run_outs(problem, p), PROFILE) for name, p in MUTANTS.items()]
            cases += [(name, run_outs(problem, p), PROFILE) for name, p in OF_PROFILE.items()]
            cases += [(name, run_outs(problem, p), p) for name, p in OF_FORMAT.items()]
            family = "scale_blocks" if blocks else "N(0, 1)"
            for name, outs, profile in cases:
                by_ideal, by_profile, r_ideal, r_profile = judges(outs, profile)
                lines.append(f"| {k_len} | {i_len} | {family} | {name} | {by_ideal} | "
                             f"{r_ideal:.3g} | {by_profile} ({profile.name}) | "
                             f"{r_profile:.3g} |")
            print(f"power K={k_len} I={i_len} {family} done", flush=True)
    return lines


def false_alarms(pairs: int, seed: int = 42118) -> list[str]:
    """Legitimate pairs: the profile's kernels judged by the ideal judge and the profile, the
    float32-scale kernel by the ideal judge only (the profile pins the round-up)."""
    rng = np.random.default_rng(seed)
    worst: dict[str, tuple[float, str]] = {}
    n_pairs = n_rejected = 0
    rejected_where: list[str] = []
    t0 = time.perf_counter()
    i = 0
    while n_pairs < pairs:
        i += 1
        if i % 25 == 0:
            k_len, i_len, ep, e, top_k, tokens = 2880, 720, 2, 4, 4, (2, 2)
        else:
            k_len = int(rng.choice([32, 64, 96, 160, 224, 288, 320]))
            i_len = int(rng.choice([16, 24, 40, 48, 96, 160]))
            ep, e = int(rng.integers(1, 3)), int(rng.integers(1, 5))
            top_k = int(rng.choice([1, 2, 4]))
            tokens = tuple(int(t) for t in rng.integers(1, 5, ep))
        x_dtype = "bfloat16" if rng.random() < 0.8 else "float16"
        cfg = OpConfig(ep_size=ep, experts_per_rank=e, top_k=top_k, hidden=k_len,
                       intermediate=i_len, tokens_per_rank=tokens, x_dtype=x_dtype,
                       weight_dtype="uint8", act_scheme="mxfp8")
        blocks = bool(rng.random() < 0.5)
        judges = Judges(mx_problem(cfg, int(rng.integers(1 << 30)), blocks), PROFILE)
        where = (f"K={k_len} I={i_len} top_k={top_k} {x_dtype}"
                 f"{' scale_blocks' if blocks else ''}")
        for name, profile in {**OF_PROFILE, **OF_FORMAT}.items():
            by_ideal, by_profile, r_ideal, r_profile = judges(run_outs(judges.problem, profile),
                                                              PROFILE)
            judged = [("ideal", by_ideal, r_ideal)]
            if name in OF_PROFILE:
                judged.append(("profile", by_profile, r_profile))
            for judge_name, _, ratio in judged:
                key = f"{name.strip('()').split(': ', 1)[1]}, {judge_name} judge"
                if ratio >= worst.get(key, (-1.0, ""))[0]:
                    worst[key] = (ratio, where)
            n_pairs += 1
            failed = [f"{j} {v}" for j, v, _ in judged if v != "passes"]
            if failed:
                n_rejected += 1
                rejected_where.append(f"{name} at {where}: {', '.join(failed)}")
    seconds = time.perf_counter() - t0
    lines = [
        f"{n_pairs} legitimate (problem, output) pairs in {seconds:.0f} s ({i} "
        "problems; every 25th at K=2880/I=720 with EP=2 E=4 top_k=4; the others random with "
        "K in 32–320, I in 16–160, EP 1–2, E 1–4, top_k 1–4, 1–4 tokens per rank; 20 % fp16 "
        "x; half of them scale_blocks rows). The profile's kernels' outputs are judged by both "
        "judges, the float32-scale kernel's by the ideal judge; a pair is rejected if a judge "
        "rejects it; false-alarm probability per call: 1e-09.",
        "",
    ]
    return lines + alarm_summary(n_rejected, n_pairs, worst, rejected_where)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--pairs", type=int, default=None)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    shapes = [(320, 40)] if args.quick else SHAPES
    power_lines = power(shapes)
    fa_lines = false_alarms(args.pairs or (200 if args.quick else 2_000))
    command = " ".join(["python benchmarks/mxfp8_power.py", *(argv or sys.argv[1:])])
    text = "\n".join([
        "# MXFP4 x MXFP8: power and false alarms of both judges",
        "",
        f"Generated by `{command}` in {time.perf_counter() - start:.0f} s; do not edit by "
        "hand. The row `mxfp4_mxfp8` (`spec/fields.py`, selected by the call's "
        "`act_scheme=\"mxfp8\"`), the profile `triton-mxfp4-mxfp8` (`oracle/model/kernels.py`), "
        "the mutants `tests/test_mxfp8.py`.",
        "",
        f"- Python {platform.python_version()}, NumPy {np.__version__}, "
        f"{platform.platform()}; 2 cores shared with other jobs",
        "",
        "## Power at gpt-oss's shapes",
        "",
        "EP=2, E=4, top_k=4, 8 tokens per rank, bf16 x, `random_problem` MXFP4 weights. "
        "`ideal judge`: as `compare(numerics=\"ideal\")` (sound bound, then the row test with "
        "the default assumptions); `profile judge`: as `compare` with the named profile (its "
        "envelope, then the row test with its assumptions); each names the test that "
        "rejected. `row |s|/T`: the row test's worst ratio of projection to threshold (above "
        "1 rejects). The float32-scale kernel is judged by its own profile (the built-in one "
        "pins the round-up).",
        "",
        *power_lines,
        "",
        PER_TENSOR_NOTE,
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
