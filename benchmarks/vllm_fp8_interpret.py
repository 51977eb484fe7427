"""vLLM's carried ``fused_moe_kernel`` on FP8 block scale, run by Triton's interpreter on the CPU,
against the CPU emulation the suite uses (``tests/controls/gpu/test_gpu_controls.py``).

The suite's CPU tests replace the kernel by an emulation; this checks that emulation and the
driver's launch (pointers, strides, ``group_n``/``group_k``, flags, vLLM's block
configuration) against the kernel's own code without a GPU. For each call below, GEMM1 and
GEMM2 run once through the driver's ``_gemm`` (the real kernel, interpreted) and once through
the emulation, both into NaN-poisoned outputs; reported: the largest relative difference (the
interpreter's bfloat16 store and e4m3 conversions are not round-to-nearest, so one bfloat16 ulp,
2^-7 relative, is the expected ceiling), NaNs left (a row never written), and the same launch
with the weights' block scales read with swapped strides (a layout bug: must be far off). The
carried quantiser's scales are compared with its torch twin's, bit for bit.

Needs triton (``pip install triton==3.6.0``; no GPU) and the carried kernel source
(``tests/controls/gpu/vllm_triton.py``). Run from the repository root::

    TRITON_INTERPRET=1 PYTHONPATH=$PWD python benchmarks/vllm_fp8_interpret.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from controls.gpu import test_gpu_controls as emulation  # noqa: E402
from controls.gpu import vllm_triton as v  # noqa: E402
from controls.gpu.common import Call  # noqa: E402

from oracle.adapters.torch_io import to_torch  # noqa: E402
from spec import OpConfig, random_problem  # noqa: E402

#: (EP, E, top_k, K, I, tokens per rank): partial groups and blocks (160, 272), several experts.
CALLS = ((1, 2, 2, 160, 160, (3,)), (2, 2, 2, 272, 128, (2, 5)), (1, 3, 1, 384, 256, (7,)))


def _numpy_scalars() -> None:
    """Triton 3.6's interpreter turns a one-element array into an index with ``int(array)``,
    which NumPy 2.5 refuses for arrays of one dimension: take the element instead."""
    from triton.runtime import interpreter

    patch = interpreter._patch_lang_tensor

    def patched(tensor, scope):  # type: ignore[no-untyped-def]
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched


def _run(gemm, a, w, w_scale, shape, aligned, probs, routed: bool, top_k: int):  # type: ignore[no-untyped-def]
    c = torch.full(shape, float("nan"), dtype=torch.bfloat16)
    gemm(a[0], w, c, probs, aligned, routed=routed, top_k=top_k, scales=(a[1], w_scale),
         config=v.FP8_CONFIG)
    return c.float()


def _rel(got: torch.Tensor, model: torch.Tensor) -> float:
    return float(((got - model).abs() / model.abs().clamp_min(1e-30)).max())


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("set TRITON_INTERPRET=1 (Triton's interpreter runs the kernel on the CPU)")
    _numpy_scalars()
    if v.quant_kernel() is None:
        sys.exit(f"vLLM's quantiser is not carried at {v.QUANT_SOURCE}")
    print("call (EP, E, top_k, K, I, M) | GEMM | max rel. diff | NaN left | swapped strides")
    for ep, e, top_k, k, i, m in CALLS:
        config = OpConfig(ep_size=ep, experts_per_rank=e, top_k=top_k, hidden=k, intermediate=i,
                          tokens_per_rank=m, weight_dtype="float8_e4m3fn", x_dtype="bfloat16",
                          scale_dims=2)
        call = Call.of([to_torch(r, scales="float32") for r in random_problem(config).ranks])
        assert call.scale1 is not None and call.scale2 is not None
        aligned = v.align(call, v.FP8_CONFIG["BLOCK_SIZE_M"])
        # the carried quantiser (interpreted) against its torch twin: the same scale per
        # (row, group) shows its launch (rows, groups, strides, eps); its e4m3 values do not
        # (the interpreter's cast is wrong), so only their agreement is counted
        q_kernel, s_kernel = v.group_quantise(call.x, triton=True)
        q_torch, s_torch = v.group_quantise(call.x, triton=False)
        print(f"{(ep, e, top_k, k, i, m)} | quantiser | scales equal: "
              f"{bool(torch.equal(s_kernel, s_torch))} {tuple(s_kernel.shape)} | e4m3 values "
              f"equal: {float((q_kernel.float() == q_torch.float()).float().mean()):.1%}")
        tokens = call.x.shape[0]
        act = torch.randn((tokens * top_k, i), generator=torch.Generator().manual_seed(0))
        gemms = ((1, v.group_quantise(call.x), call.w1, call.scale1, (tokens, top_k, 2 * i),
                  False, top_k),
                 (2, v.group_quantise(act.bfloat16()), call.w2, call.scale2, (tokens, top_k, k),
                  True, 1))
        for which, a, w, scale, shape, routed, kk in gemms:
            # as the driver lays them out: (G, N, K) and (G, N/128, K/128), K contiguous
            b = w.transpose(1, 2).contiguous()
            b_scale = scale.transpose(1, 2).contiguous().transpose(1, 2)
            args = (a, b, b_scale, shape, aligned, call.probs, routed, kk)
            kernel = _run(v._gemm, *args)
            model = _run(emulation._emulated_gemm, *args)
            swapped = _run(v._gemm, a, b, b_scale.transpose(1, 2), *args[3:])
            print(f"{(ep, e, top_k, k, i, m)} | {which} | {_rel(kernel, model):.3g} | "
                  f"{int(kernel.isnan().sum())} | {_rel(swapped, model):.3g}")


if __name__ == "__main__":
    main()
