"""NVFP4 weights (Blackwell; ``docs/contract/formats.md``, section NVFP4 [code]): e2m1 values,
one e4m3 scale per 16 elements along the reduction and one float32 global scale per expert.

As vLLM's reference (``tests/kernels/quantization/nvfp4_utils.py``, formats.md) defines it:
``global_scale = 448·6 / amax`` over an expert's whole weight; per block of 16, ``scale =
e4m3(global_scale · amax_block / 6)`` (saturating); the elements ``clamp(w · (1 / (scale /
global_scale)), ±6)`` rounded to e2m1 (half to even); the dequantised weight is ``e2m1 ·
(scale / global_scale)`` in float32, then rounded to the activations' dtype. This project keeps
the logical values (``ml_dtypes.float4_e2m1fn``, one per byte: packing two to a byte is a
layout) in the weights' ``(K, N)`` / ``(I, K)`` orientation, the block scales
``(ceil(K/16), N)`` / ``(ceil(I/16), K)`` and one global scale ``(1,)`` per expert.

>>> q, s, g = quantise_nv(np.array([[6.0], [-3.0]] + [[0.0]] * 14))
>>> g.tolist(), s.astype(np.float32).tolist(), dequantise_nv(q, s, g, np.float32)[:2].tolist()
([448.0], [[448.0]], [[6.0], [-3.0]])
"""

from __future__ import annotations

from typing import Any

import numpy as np

from spec.fp8 import E4M3_MAX, Array, blocks, to_e4m3
from spec.mxfp4 import E2M1, E2M1_MAX

__all__ = ["NV_BLOCK", "dequantise_nv", "global_scale", "quantise_nv", "tensor_global_scale"]

#: Elements per e4m3 scale along the reduction.
NV_BLOCK = 16


def global_scale(amax: Array) -> Array:
    """``448·6 / amax`` in float32 (vLLM's reference); an all-zero tensor gets 1."""
    a = np.asarray(amax, np.float32)
    with np.errstate(divide="ignore"):
        return np.asarray(np.where(a > 0, np.float32(E4M3_MAX * E2M1_MAX) / a, np.float32(1)),
                          np.float32)


def tensor_global_scale(w: Array) -> Array:
    """The global scale (:func:`global_scale`) of each tensor (the last two axes) of float
    weights ``w``: shape ``(…, 1)``."""
    return global_scale(np.abs(np.asarray(w, np.float32)).max(axis=(-2, -1), initial=0)[..., None])


def _block_multiplier(scale: Array, gscale: Array, rows: int) -> Array:
    """``scale / global_scale`` in float32 per row (the global scale ``(…, 1)`` per tensor)."""
    per_block = scale.astype(np.float32) / np.asarray(gscale, np.float32)[..., None]
    return np.asarray(np.repeat(per_block, NV_BLOCK, axis=-2)[..., :rows, :])


def dequantise_nv(q: Array, scale: Array, gscale: Array, dtype: Any) -> Array:
    """NVFP4 weights ``(…, R, C)`` in ``dtype``: ``e2m1 · (scale / global_scale)`` in float32,
    rounded once to ``dtype`` (the order of vLLM's ``dequantize_nvfp4_to_dtype``)."""
    with np.errstate(over="ignore", under="ignore"):
        values = q.astype(np.float32) * _block_multiplier(scale, gscale, q.shape[-2])
        return np.asarray(values.astype(dtype))


def quantise_nv(w: Array, gscale: Array | None = None) -> tuple[Array, Array, Array]:
    """``(q, scale, global_scale)`` of float weights ``w`` (…, R, C), the global scale per
    tensor (the last two axes; shape ``(…, 1)``), the e4m3 scales per column and 16 rows (a
    partial block as if zero-padded). ``gscale`` (``(…, 1)`` float32): a given global scale
    instead of the tensor's own (NVFP4 activations: a static calibrated scale per expert,
    vLLM's ``scaled_fp4_experts_quant``); values beyond it saturate at 448 and 6."""
    w32 = np.asarray(w, dtype=np.float32)
    rows, cols = w32.shape[-2:]
    gs = tensor_global_scale(w32) if gscale is None else np.asarray(gscale, np.float32)
    rb = blocks(rows, NV_BLOCK)
    padded = np.zeros((*w32.shape[:-2], rb * NV_BLOCK, cols), np.float32)
    padded[..., :rows, :] = np.abs(w32)
    amax = padded.reshape(*w32.shape[:-2], rb, NV_BLOCK, cols).max(axis=-2)
    scale = to_e4m3(gs[..., None] * (amax * np.float32(1 / E2M1_MAX)))
    mult = _block_multiplier(scale, gs, rows)
    with np.errstate(divide="ignore"):
        inverse = np.where(mult > 0, np.float32(1) / mult, np.float32(0))
    q = np.clip(w32 * inverse, -E2M1_MAX, E2M1_MAX).astype(E2M1)
    return q, scale, gs
