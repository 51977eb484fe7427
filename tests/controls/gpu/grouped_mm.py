"""A torchtitan-style MoE on torch's grouped GEMM, ``torch._grouped_mm`` (a CUTLASS BF16
grouped GEMM on Hopper), gated in the ``torch-grouped-mm`` profile.

As torchtitan's ``GroupedExperts`` with ``score_before_experts=False``: the slots sorted by
expert (stable), ``offs`` the cumulative counts, ``h = _grouped_mm(x, w1)``,
``a = silu(gate) * up`` on x-dtype tensors, ``y = _grouped_mm(a, w2)``, the routed weight
applied to ``y`` in float32 and rounded to x's dtype. One change: the tokens' sum of their
slots is a float32 ``index_add_`` rounded once, where torchtitan's ``scatter_add`` adds in
x's dtype in an atomic order no profile models.

``_grouped_mm`` needs 16-byte-aligned rows, so K and I are zero-padded to multiples of 8
(zeros add nothing to any sum; silu(0)·0 = 0), and the weights are passed column-major as
torchtitan passes them (``w.transpose(-2, -1)`` of an (G, N, K) tensor).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from oracle.adapters.torch_io import TorchRankInputs, implementation

from .common import PLANTED, Call, plant

DEVICE = "cuda"
_ALIGN = 8  # elements of a 2-byte dtype in 16 bytes


def _padded(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _column_major(w: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``w`` (G, r, c) zero-padded to (G, rows, cols), stored column-major per expert."""
    out = torch.zeros((w.shape[0], cols, rows), dtype=w.dtype, device=w.device)
    out[:, :w.shape[2], :w.shape[1]] = w.transpose(-2, -1)
    return out.transpose(-2, -1)


def moe(ranks: list[TorchRankInputs]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every rank of one call through two grouped GEMMs (see the module docstring)."""
    call = Call.of(ranks)
    x = call.x
    k = x.shape[1]
    i = call.w2.shape[1]
    kp, ip = _padded(k), _padded(i)
    order, token, offs = call.by_expert()  # masked tokens' slots left out

    xs = torch.zeros((len(order), kp), dtype=x.dtype, device=x.device)
    xs[:, :k] = x[token]
    w1 = torch.cat([_column_major(call.w1[..., :i], kp, ip),
                    _column_major(call.w1[..., i:], kp, ip)], dim=2)
    h = torch._grouped_mm(xs, w1, offs=offs)
    a = F.silu(h[:, :ip]) * h[:, ip:]
    y = torch._grouped_mm(a, _column_major(call.w2, ip, kp), offs=offs)[:, :k]
    return call.combine(y, order, token)


dispatch_ffn_combine = implementation(moe, device=DEVICE)
# The planted bugs of .common.PLANTED, each importable by name (the gate's child process).
routed_weight_twice, expert_offset, dropped_slot = (
    implementation(plant(moe, bug), device=DEVICE) for bug in PLANTED)
