"""vLLM's FP8 block-scale driver (``tests/controls/gpu/vllm_triton.py``) on the CPU, its kernel
emulated as the suite emulates it, at the GPU gates' settings: every row family (tiny rows
included), ``N`` derandomised examples per mode; the same with the activation quantiser's two
divisions done as a GPU may do them (``σ = amax·fl(1/448)``, ``q = a·fl(1/σ)``: the profile's
``div_ulps``); the three planted bugs in both modes, shrunk. Prints pass / caught and seconds.

    PYTHONPATH=$PWD python benchmarks/vllm_fp8_cpu.py [N]      # N: 300 by default
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from controls.gpu import test_gpu_controls as t  # noqa: E402
from controls.gpu import vllm_triton as v  # noqa: E402
from controls.gpu.common import PLANTED, plant  # noqa: E402

import oracle  # noqa: E402
from oracle.adapters.torch_io import implementation  # noqa: E402

MODES = ("faithful", "ideal")


def reciprocal_quantise(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`vllm_triton.group_quantise`'s formula with both divisions as reciprocal products."""
    rows, cols = a.shape
    groups = -(-cols // v.FP8_BLOCK)
    g = torch.zeros((rows, groups, v.FP8_BLOCK), dtype=torch.float32)
    g.view(rows, groups * v.FP8_BLOCK)[:, :cols] = a.float()
    sigma = g.abs().amax(dim=2).clamp_min(1e-10) * torch.tensor(1 / v.FP8_MAX)
    q = (g * (1 / sigma)[..., None]).clamp(-v.FP8_MAX, v.FP8_MAX).to(v.FP8)
    return q.view(rows, groups * v.FP8_BLOCK), sigma


def gate(driver, numerics: str, examples: int) -> tuple[bool, float]:  # type: ignore[no-untyped-def]
    """(conforms, seconds) of ``driver`` in the vllm-triton-fp8 gate, in this process."""
    start = time.perf_counter()
    try:
        t._gate(implementation(driver, device="cpu", scales="float32"), t.FP8[0], numerics,
                examples, t.FP8[1], isolate=False)
    except oracle.ConformanceError:
        return False, time.perf_counter() - start
    return True, time.perf_counter() - start


def main() -> None:
    examples = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    v._gemm = t._emulated_gemm
    exact = v.group_quantise
    print("driver | mode | examples | verdict | s")
    quantisers = (("exact divisions", exact), ("reciprocal products", reciprocal_quantise))
    for name, quantiser in quantisers:
        v.group_quantise = quantiser
        for numerics in MODES:
            ok, seconds = gate(v.moe, numerics, examples)
            print(f"{name} | {numerics} | {examples} | {'pass' if ok else 'FAIL'} | {seconds:.1f}")
    v.group_quantise = exact
    for bug in PLANTED:
        for numerics in MODES:
            ok, seconds = gate(plant(v.moe, bug), numerics, 200)
            print(f"planted {bug} | {numerics} | <= 200 | {'NOT CAUGHT' if ok else 'caught'} | "
                  f"{seconds:.1f}")


if __name__ == "__main__":
    main()
