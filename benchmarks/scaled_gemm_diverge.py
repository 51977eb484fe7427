"""Where ``torch._scaled_grouped_mm`` departs from the FP8 control's CPU emulation, GEMM by GEMM,
on saved calls (issue 26): runs ``tests/controls/gpu/scaled_grouped_mm.moe`` on CUDA with each
grouped GEMM also computed by the driver's CPU emulation (exact dot, float32 scales, one cast),
and prints each GEMM's largest difference and the rows that differ. From the repository root,
on a GPU machine:

    PYTHONPATH=$PWD/tests:$PWD python benchmarks/scaled_gemm_diverge.py \
        benchmarks/data/scaled_grouped_mm_h100_k16_i8.npz

Without CUDA both sides are the emulation (every difference 0): a check of the script itself.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from controls.gpu import scaled_grouped_mm as S

from oracle.adapters.torch_io import to_torch
from oracle.files.counterexample import load

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_gemm = S.scaled_gemm


def _both(q: Any, sigma: Any, w: Any, sw: Any, offs: Any, out_dtype: Any) -> Any:
    got = _gemm(q, sigma, w, sw, offs, out_dtype)
    emulated = _gemm(q.cpu(), sigma.cpu(), w.cpu(), sw.cpu(), offs.cpu(), out_dtype)
    diff = (got.cpu().float() - emulated.float()).abs()
    rows = (diff > 0).any(1).nonzero().flatten().tolist()
    print(f"  GEMM q{tuple(q.shape)} w{tuple(w.shape)} strides {w.stride()} offs "
          f"{offs.tolist()}: max |difference| {diff.max().item():.3g}, rows differing {rows}")
    if rows:
        print("    got      ", got.cpu().float()[rows[0]].tolist())
        print("    emulation", emulated.float()[rows[0]].tolist())
    return got


def main(paths: list[str]) -> None:
    torch.set_printoptions(precision=6, linewidth=200)
    S.scaled_gemm = _both
    for path in paths:
        problem = load(path).problem
        print(path, problem.config.summary().splitlines()[0], "on", DEVICE)
        S.moe([to_torch(r, device=DEVICE) for r in problem.ranks])


if __name__ == "__main__":
    main(sys.argv[1:])
