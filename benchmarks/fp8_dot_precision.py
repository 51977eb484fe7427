"""How precisely a GPU accumulates FP8 dots: the knob ``FP8_DOT_BITS`` of
``oracle/model/kernels.py`` (``BlockGemm.dot_bits``), measured instead of inferred.

Runs on a CUDA machine with torch (and triton, if installed). For tiles of 128 e4m3 × e4m3
products it compares the GPU's float32 result (Triton's ``tl.dot`` with a float32 accumulator,
as vLLM's ``fused_moe_kernel`` calls it, and ``torch._scaled_mm`` with unit scales) with the
exact sum (float64: the products of e4m3 values are exact and 128 of them fit 53 bits), and
reports the largest error relative to ``Σ|a_j·b_j|``; ``dot_bits`` is the largest ``b`` with
``error <= 128·2^-b·Σ|terms|`` (the model's bound), and ``ulp bits`` the same against
``2^-b·|exact|``. Inputs: normal values, and an adversarial family (one large product then
many small ones, which a truncating accumulator loses).

Usage: ``python benchmarks/fp8_dot_precision.py [--out FILE.json]``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any


def _families(torch: Any, m: int, k: int, n: int, seed: int) -> dict[str, tuple[Any, Any]]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    a = torch.randn(m, k, generator=g)
    b = torch.randn(k, n, generator=g)
    big_a = a.clone()
    big_a[:, 0] = 448.0  # one product of 448·|b| ahead of 127 small ones
    small = torch.randn(m, k, generator=g) * 2.0**-6
    small[:, 0] = 448.0
    return {"normal": (a, b), "one large term": (big_a, b), "large then tiny": (small, b)}


def _report(name: str, got: Any, exact: Any, mag: Any) -> dict[str, float]:
    err = (got.double() - exact).abs()
    rel_terms = float((err / mag.clamp_min(1e-300)).max())
    rel_value = float((err / exact.abs().clamp_min(1e-300)).max())
    k = 128
    bits = math.floor(-math.log2(rel_terms / k)) if rel_terms > 0 else 99
    ulp_bits = math.floor(-math.log2(rel_value)) if rel_value > 0 else 99
    return {"max err / sum|terms|": rel_terms, "max err / |exact|": rel_value,
            "dot_bits (model bound holds)": bits, "ulp bits": ulp_bits}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    import torch

    results: dict[str, Any] = {"torch": torch.__version__,
                               "device": torch.cuda.get_device_name(0)}
    f8 = torch.float8_e4m3fn
    m, k, n = 256, 128, 256
    kernels: dict[str, Any] = {}

    def scaled_mm(a: Any, b: Any) -> Any:
        one = torch.ones((), device="cuda")
        return torch._scaled_mm(a, b.t().contiguous().t(), scale_a=one, scale_b=one,
                                out_dtype=torch.float32)

    kernels["torch._scaled_mm"] = scaled_mm
    try:
        import triton
        import triton.language as tl

        @triton.jit
        def dot_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr,  # type: ignore[no-untyped-def]
                       K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
            # no annotations naming globals: Triton resolves them inside a JIT function
            pm, pn = tl.program_id(0), tl.program_id(1)
            rm = pm * BM + tl.arange(0, BM)
            rn = pn * BN + tl.arange(0, BN)
            rk = tl.arange(0, K)
            a = tl.load(a_ptr + rm[:, None] * K + rk[None, :])
            b = tl.load(b_ptr + rk[:, None] * N + rn[None, :])
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            acc += tl.dot(a, b)  # as fused_moe_kernel's block path: a fresh dot per K tile
            tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc)

        def triton_dot(a: Any, b: Any) -> Any:
            c = torch.empty(a.shape[0], b.shape[1], device="cuda", dtype=torch.float32)
            dot_kernel[(a.shape[0] // 64, b.shape[1] // 64)](
                a, b.contiguous(), c, a.shape[0], b.shape[1], a.shape[1], 64, 64)
            return c

        kernels["triton tl.dot"] = triton_dot
        results["triton"] = triton.__version__
    except Exception as exc:  # no triton on the machine: report, measure torch alone
        results["triton"] = f"unavailable: {type(exc).__name__}: {exc}"
    for seed in range(4):
        for family, (a, b) in _families(torch, m, k, n, seed).items():
            a8, b8 = a.to(f8), b.to(f8)
            a64, b64 = a8.double(), b8.double()
            exact = a64 @ b64
            mag = a64.abs() @ b64.abs()
            for name, fn in kernels.items():
                try:
                    got = fn(a8.cuda(), b8.cuda()).cpu()
                except Exception as exc:
                    results.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"
                    continue
                key = f"{name}, {family}"
                row = _report(key, got, exact, mag)
                old = results.setdefault("measured", {}).get(key)
                if old is None or row["max err / sum|terms|"] > old["max err / sum|terms|"]:
                    results["measured"][key] = row
    text = json.dumps(results, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
