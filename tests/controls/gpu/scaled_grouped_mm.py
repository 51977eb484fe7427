"""A torchtitan-style MoE on torch's FP8 grouped GEMM, ``torch._scaled_grouped_mm`` (CUTLASS
on Hopper), in the ``fp8_channel`` variant, gated in the ``torch-scaled-grouped-mm`` profile.

As :mod:`.grouped_mm` (slots sorted by expert, ``offs`` the cumulative counts, silu on x-dtype
tensors, the routed weight after GEMM2 in float32, the top-k sum a float32 ``index_add_``),
with each GEMM's input quantised per token to e4m3 (``amax = max(max|a|, 1e-12)``,
``σ = amax/448``, ``q = e4m3(clamp(a/σ, ±448))``) and the GEMM taking row-wise float32
scales: ``σ`` per row of A, the weight's per-channel scale per column of B, output in x's
dtype [inferred from torch's rowwise-scaled ``_scaled_mm``]. FP8 rows must be 16-byte
aligned: K and I are zero-padded to multiples of 16, the padded columns' scales 1.

Without CUDA (``device="cpu"``) the GEMM is emulated with the profile's rounding points: the
exact dot rounded to float32, times σ, times the column scale, each in float32, cast to x's
dtype; so the driver's own logic is tested on any machine.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from oracle.adapters.torch_io import TorchRankInputs, implementation

from .common import PLANTED, Call, plant

DEVICE = "cuda"
_ALIGN = 16  # e4m3 elements in 16 bytes
_E4M3 = torch.float8_e4m3fn
_AMAX_FLOOR = 1e-12
#: torch on CUDA divides a tensor by a Python scalar as a product with the scalar's float32
#: reciprocal: ``amax / 448`` is ``amax·fl(1/448)``, up to 2 ulps from the IEEE quotient
#: (measured on an H100, torch 2.11: tests/data/scaled_grouped_mm_h100_sigma.npz is its output,
#: bit for bit). The CPU emulation divides the same way.
_INV_448 = torch.tensor(1 / 448, dtype=torch.float32)


def _padded(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def quantise(a: torch.Tensor, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, σ)``: ``a`` (rows, c) per token to e4m3, zero-padded to ``cols`` columns."""
    a32 = a.float()
    amax = a32.abs().amax(dim=1, keepdim=True).clamp_min(_AMAX_FLOOR)
    sigma = amax / 448.0 if a.is_cuda else amax * _INV_448.to(a.device)
    q = torch.zeros((a.shape[0], cols), dtype=_E4M3, device=a.device)
    q[:, :a.shape[1]] = (a32 / sigma).clamp(-448.0, 448.0).to(_E4M3)
    return q, sigma.reshape(-1)


def _weights(w: torch.Tensor, s: torch.Tensor, rows: int, cols: int) -> tuple[
        torch.Tensor, torch.Tensor]:
    """``w`` (G, r, c) zero-padded to (G, rows, cols), column-major per expert, and its
    per-column scales ``s`` (G, c) padded with ones."""
    out = torch.zeros((w.shape[0], cols, rows), dtype=w.dtype, device=w.device)
    out[:, :w.shape[2], :w.shape[1]] = w.transpose(-2, -1)
    scale = torch.ones((w.shape[0], cols), dtype=torch.float32, device=w.device)
    scale[:, :s.shape[1]] = s
    return out.transpose(-2, -1), scale


def scaled_gemm(q: torch.Tensor, sigma: torch.Tensor, w: torch.Tensor, sw: torch.Tensor,
                offs: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``_scaled_grouped_mm`` on CUDA; on the CPU its emulation, expert by expert."""
    if q.is_cuda:
        return torch._scaled_grouped_mm(q, w, sigma, sw, offs=offs, out_dtype=out_dtype)
    out = torch.empty((q.shape[0], w.shape[2]), dtype=out_dtype, device=q.device)
    start = 0
    for g, end in enumerate(offs.tolist()):
        p = (q[start:end].double() @ w[g].double()).float()
        out[start:end] = ((p * sigma[start:end, None]).float() * sw[g]).to(out_dtype)
        start = end
    return out


def moe(ranks: list[TorchRankInputs]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every rank of one call through two FP8 grouped GEMMs (see the module docstring)."""
    call = Call.of(ranks)
    assert call.scale1 is not None and call.scale2 is not None
    x = call.x
    k = x.shape[1]
    i = call.w2.shape[1]
    kp, ip = _padded(k), _padded(i)
    order, token, offs = call.by_expert()  # masked tokens' slots left out

    gate, gs = _weights(call.w1[..., :i], call.scale1[:, :i], kp, ip)
    up, us = _weights(call.w1[..., i:], call.scale1[:, i:], kp, ip)
    q, sigma = quantise(x[token], kp)
    # _scaled_grouped_mm takes B column-major per expert; a cat along columns is row-major
    w1 = torch.cat([gate, up], dim=2).transpose(-2, -1).contiguous().transpose(-2, -1)
    h = scaled_gemm(q, sigma, w1, torch.cat([gs, us], dim=1), offs, x.dtype)
    a = F.silu(h[:, :ip]) * h[:, ip:]
    q2, sigma2 = quantise(a, ip)
    w2, s2 = _weights(call.w2, call.scale2, ip, kp)
    y = scaled_gemm(q2, sigma2, w2, s2, offs, x.dtype)[:, :k]
    return call.combine(y, order, token)


dispatch_ffn_combine = implementation(moe, device=DEVICE)
# The planted bugs of .common.PLANTED, each importable by name (the gate's child process).
routed_weight_twice, expert_offset, dropped_slot = (
    implementation(plant(moe, bug), device=DEVICE) for bug in PLANTED)
