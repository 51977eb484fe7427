"""Power and false alarms of the vllm-nvfp4 profile's judge on NVFP4 W4A4 (issue 25): the
envelope, then the row test with the e2m1 activation terms (ideal mode refuses the variant:
its sound bound lacks them).

Writes ``benchmarks/NVFP4_POWER.md``. Run from the repository root:
``python benchmarks/nvfp4_power.py`` (``--pairs N``: legitimate pairs at small shapes,
judged under the profile and in ideal mode, default 200; ``--seeds N``: problems per
production shape, default 3). Not a timed test.

Power: at K = 7168 with I = 2048 (DeepSeek-V3) and I = 160 (a shard not a multiple of 16·8),
EP=2, E=2, top_k=2, 2 tokens per rank, bf16 x, the outputs of the real bugs of
``tests/test_nvfp4a.py`` (expert 0's activation scale, rank 0's scales on every rank, GEMM1's
alpha unwritten). False alarms: legitimate kernels that use the profile's freedom (float32
accumulation in another order: per 16-column block, blocks added in K order; or every
product added in K order, sequentially) at those shapes and at random small shapes (K, I not
multiples of 16 included). ``|s|/T`` is the row test's worst ratio (1 rejects).
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
from oracle.judge.rowtest import row_test
from oracle.model.kernels import VLLM_NVFP4, Env, Fp4Gemm, KernelProfile, _apply_epilogue
from spec import OpConfig, Problem, random_problem
from spec.nvfp4 import dequantise_nv

sys.path[:0] = [str(Path(__file__).parents[1] / "tests")]
from test_nvfp4a import (  # noqa: E402
    ALPHA_UNWRITTEN,
    PROFILE,
    first_expert,
    model_impl,
    rank_zero,
)

Array = np.ndarray[Any, Any]
NV = "float4_e2m1fn"


@dataclasses.dataclass(frozen=True)
class BlockOrderGemm(Fp4Gemm):
    """A legitimate kernel: each ``width``-column block's products summed exactly, rounded to
    float32, the blocks added in K order in float32 (one order the profile allows; width 1:
    sequential)."""

    width: int = 16

    def apply(self, a: Env, sigma: Env | None, weights: Any, which: int, slot: Array,
              x_dtype: Any) -> Env:
        w = weights[f"w{which}"]
        wd = dequantise_nv(w, weights[f"scale{which}"], np.ones(1, np.float32), np.float32)
        qa = self.quantise(a, weights[f"a{which}_gscale"]).mid.astype(np.float64)
        acc = np.zeros((qa.shape[0], w.shape[1]), np.float32)
        step = self.width
        for b in range(0, w.shape[0], step):
            part = (qa[:, b:b + step] @ wd[b:b + step].astype(np.float64)).astype(np.float32)
            acc = (acc + part).astype(np.float32)
        alpha = self.alpha(weights[f"a{which}_gscale"], weights[f"gscale{which}"])
        return _apply_epilogue(self.epilogue, Env(acc), col=np.broadcast_to(alpha, (w.shape[1],)),
                               row=None, slot=slot, x_dtype=x_dtype, ftz=self.ftz)


def _legit(width: int) -> KernelProfile:
    pipe = VLLM_NVFP4.pipeline("nvfp4")
    steps = {g: BlockOrderGemm(getattr(pipe, g).epilogue, 2, True, width)
             for g in ("gemm1", "gemm2")}
    return dataclasses.replace(VLLM_NVFP4.with_steps("nvfp4", **steps), name=f"order-{width}")


LEGIT = {"legitimate: float32 sums per 16, in K order": model_impl(_legit(16)),
         "legitimate: sequential float32 sums": model_impl(_legit(1))}
MUTANTS = {"expert 0's activation scale": first_expert, "rank 0's scales on every rank": rank_zero,
           "GEMM1 alpha unwritten": ALPHA_UNWRITTEN}


def _problem(k: int, i: int, seed: int, ep: int = 2, e: int = 2, top_k: int = 2,
             tokens: int = 2) -> Problem:
    cfg = OpConfig(ep_size=ep, experts_per_rank=e, top_k=top_k, hidden=k, intermediate=i,
                   tokens_per_rank=(tokens,) * ep, weight_dtype=NV, activation_scales=True)
    return random_problem(cfg, seed=seed)


def _verdict(problem: Problem, impl: Any) -> tuple[Any, float]:
    """The profile's verdict, and the row test's worst ``|s|/T`` on the outputs."""
    outs = impl(problem)
    ideal = oracle.run(problem, numerics=dataclasses.replace(PROFILE, mode="ideal"))
    row = row_test(problem, ideal, [o for o, _ in outs],
                   VLLM_NVFP4.ideal_assumptions(problem.config.x_dtype))
    return oracle.compare(problem, outs, numerics=PROFILE), row.ratio


def power(seeds: int) -> list[str]:
    """The real bugs and the legitimate kernels at K = 7168, ``seeds`` problems per shape:
    one table row each (verdicts, the row test's ratio, and which outputs are bit for bit
    the legitimate kernel's: no judge can reject those)."""
    lines = []
    for k, i in ((7168, 2048), (7168, 160)):
        problems = [_problem(k, i, s) for s in range(seeds)]
        legit = [LEGIT["legitimate: float32 sums per 16, in K order"](p) for p in problems]
        for name, impl in (*LEGIT.items(), *MUTANTS.items()):
            start = time.perf_counter()
            outs = [impl(p) for p in problems]
            verdicts = [_verdict(p, lambda _, o=o: o) for p, o in zip(problems, outs)]
            bad = sum(not v.ok for v, _ in verdicts)
            same = ["" if name in LEGIT or not all(np.array_equal(a, b, equal_nan=True)
                                                   for (a, _), (b, _) in zip(o, want))
                    else " (= legitimate)" for o, want in zip(outs, legit)]
            how = ", ".join(f"{'ok' if v.ok else v.stage} {r:.3g}{m}"
                            for (v, r), m in zip(verdicts, same))
            lines.append(f"| K={k} I={i} EP=2 E=2 top_k=2 M=2/rank | {name} | {bad} | "
                         f"{len(problems)} | {how} | {time.perf_counter() - start:.1f} |")
            print(lines[-1], flush=True)
    return lines


def false_alarms(pairs: int) -> list[str]:
    """``pairs`` legitimate calls at random small shapes, under the profile and in ideal
    mode: two table rows."""
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    alarms, worst, judged, ideal_alarms = 0, 0.0, 0, 0
    for s in range(pairs):
        k, i = int(rng.choice((16, 40, 64, 200, 1024))), int(rng.choice((8, 24, 40, 160)))
        p = _problem(k, i, s, ep=int(rng.integers(1, 3)), e=int(rng.integers(1, 4)),
                     top_k=int(rng.integers(1, 3)), tokens=int(rng.integers(1, 5)))
        outs = LEGIT["legitimate: sequential float32 sums"](p)
        v, ratio = _verdict(p, lambda _, outs=outs: outs)
        ideal_alarms += not oracle.compare(p, outs, numerics="ideal").ok
        alarms += not v.ok
        judged += v.message != "outputs conform: the profile's own output, bit for bit"
        worst = max(worst, ratio)
    lines = [f"| small random (K in 16/40/64/200/1024, I in 8/24/40/160) | legitimate: "
             f"sequential float32 sums | {alarms} | {pairs} | {judged} not bitwise "
             f"the model's; worst s/T {worst:.3g} | {time.perf_counter() - start:.1f} |",
             f"| the same calls, ideal mode (sound bound, then the row test) | legitimate: "
             f"sequential float32 sums | {ideal_alarms} | {pairs} | | |"]
    print(*lines, sep="\n")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    lines = ["# NVFP4 W4A4: power and false alarms of the vllm-nvfp4 profile", "",
             f"`python benchmarks/nvfp4_power.py --pairs {args.pairs} --seeds {args.seeds}` "
             f"on {platform.machine()}, Python {platform.python_version()}; "
             "written by the script.", "",
             "| shape | implementation | rejected | of | verdicts (stage, row test's ratio s/T) "
             "| seconds |", "|---|---|---|---|---|---|"]
    lines += power(args.seeds)
    lines += false_alarms(args.pairs)
    lines += ["", "Reading. The envelope's width comes from the profile's float32 any-order "
              "freedom (γ_K·Σ|terms|, about 4% of |h| at K = 7168) meeting the e2m1 "
              "requantisation before GEMM2: an interval that straddles an e2m1 rounding "
              "boundary spans a whole e2m1 step (25–50 % of the value), and GEMM2 adds those "
              "worst cases over I. At I = 2048 the output envelope contains 0, so an all-zero "
              "output passes it; the row test (with the e2m1 activation terms) then rejects "
              "it. The row test needs the activations inside their calibration: a row whose "
              "values pass it (the e4m3 block scale saturates, a deterministic clamp) goes "
              "to the sound bound alone. The generator's calibrations cover them "
              "(spec.synth.ACT_CALIBRATION_AMAX). A wrong expert's scale off by a factor "
              "4/3 on one of two slots moves a row by about 1/6, inside the row test's "
              "threshold (about 0.29 of |row| at K = 7168: e2m1 keeps one mantissa bit). "
              "The legitimate kernels' |s|/T is their margin to a false alarm (1 rejects)."]
    Path(__file__).with_name("NVFP4_POWER.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
