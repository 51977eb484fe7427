"""FP8 block scale (DeepSeek-V3/R1, Qwen3 FP8): e4m3 values with float32 scales per block
(``docs/contract/formats.md``, section FP8 block scale [code]).

Weights carry one float32 scale per ``128 × 128`` block, the scale tensor of a ``(R, C)``
weight being ``(ceil(R/128), ceil(C/128))`` (this project stores weights as ``(K, N)`` and
``(I, K)``, reduction first, and their scales in the same orientation); activations carry one
scale per token and 128-channel group, computed by the kernel. ml_dtypes' e4m3 cast does not
saturate (500 → NaN; ``formats.md``, "What NumPy and ml_dtypes give" [run]) and its e8m0 cast
rounds to nearest: :func:`to_e4m3` clamps first, as every kernel does, and :func:`ue8m0_up`
rounds a scale up to a power of two by bit arithmetic, as DeepGEMM's ``ceil_to_ue8m0`` does.

>>> q, s = quantise_blocks(np.full((2, 3), 896.0, np.float32))
>>> q.astype(np.float32).tolist(), s.tolist()
([[448.0, 448.0, 448.0], [448.0, 448.0, 448.0]], [[2.0]])
"""

from __future__ import annotations

import math
from typing import Any

import ml_dtypes
import numpy as np

__all__ = [
    "BLOCK",
    "E4M3",
    "E4M3_MAX",
    "WEIGHT_EPS",
    "blocks",
    "channel_scale",
    "dequantise",
    "expand_scales",
    "quantise_blocks",
    "quantise_channels",
    "to_e4m3",
    "ue8m0_up",
]

Array = np.ndarray[Any, Any]
E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
#: The largest finite e4m3fn value.
E4M3_MAX = 448.0
#: The block edge of weights and the activation group width (``weight_block_size [128, 128]``
#: of the DeepSeek-V3 checkpoint config; ``formats.md`` [code]).
BLOCK = 128
#: DeepGEMM's ``per_block_cast_to_fp8`` floors each block's amax at 1e-4 (``formats.md``).
WEIGHT_EPS = 1e-4


def to_e4m3(v: Array) -> Array:
    """``v`` rounded to e4m3fn (nearest, ties to even), saturating at ±448 as the kernels'
    ``clamp(·, −448, 448)`` before the cast does; NaN stays NaN.

    >>> to_e4m3(np.array([500.0, -1e6, 0.3], np.float32)).astype(np.float32).tolist()
    [448.0, -448.0, 0.3125]
    """
    with np.errstate(invalid="ignore"):
        return np.asarray(np.clip(v, -E4M3_MAX, E4M3_MAX).astype(E4M3))


def ue8m0_up(scale: Array) -> Array:
    """Positive float32 scales rounded **up** to a power of two (UE8M0; DeepGEMM's
    ``ceil_to_ue8m0``): the exponent field, plus one where the mantissa is non-zero; 0 stays 0.
    Bit arithmetic, no ``log2`` (ml_dtypes' e8m0 cast rounds to nearest).

    >>> ue8m0_up(np.array([0.75, 1.0, 3.0, 0.0], np.float32)).tolist()
    [1.0, 1.0, 4.0, 0.0]
    """
    bits = np.ascontiguousarray(scale, dtype=np.float32).view(np.uint32)
    exponent = bits & np.uint32(0x7F800000)
    up = np.where(bits & np.uint32(0x007FFFFF), exponent + np.uint32(0x00800000), exponent)
    return np.asarray(up.astype(np.uint32).view(np.float32))


def blocks(size: int, block: int = BLOCK) -> int:
    """``ceil(size / block)``: the scale entries along an axis of ``size`` elements."""
    return -(-size // block)


def expand_scales(scale: Array, rows: int, cols: int, block: int = BLOCK) -> Array:
    """The per-element scale of a ``(…, rows, cols)`` tensor from its ``(…, ceil(rows/block),
    ceil(cols/block))`` block scales (the last block of an axis may be partial)."""
    s = np.repeat(np.repeat(scale, block, axis=-2), block, axis=-1)
    return np.asarray(s[..., :rows, :cols])


def dequantise(w: Array, scale: Array) -> Array:
    """``w`` (…, R, C) times its scales in float64: per-channel scales (…, C) broadcast over
    the rows, block scales (…, ceil(R/128), ceil(C/128)) expanded (:func:`expand_scales`)."""
    w64 = w.astype(np.float64)
    s = scale.astype(np.float64)
    if s.ndim == w64.ndim:
        s = expand_scales(s, w64.shape[-2], w64.shape[-1])
    return np.asarray(w64 * s)


def quantise_blocks(w: Array, *, eps: float = WEIGHT_EPS) -> tuple[Array, Array]:
    """``(q, scale)`` of float weights ``w`` (…, R, C) as DeepGEMM's ``per_block_cast_to_fp8``
    makes them: per 128 × 128 block (a partial block as if zero-padded), ``amax =
    max(|block|, eps)``, ``scale = fl32(amax / 448)``, ``q = e4m3(clamp(w / scale))``."""
    w32 = np.asarray(w, dtype=np.float32)
    rows, cols = w32.shape[-2:]
    rb, cb = blocks(rows), blocks(cols)
    flat = w32.reshape(math.prod(w32.shape[:-2]), rows, cols)
    q = np.empty(flat.shape, E4M3)
    scale = np.empty((flat.shape[0], rb, cb), np.float32)
    # One strip of 128 rows at a time (2 MiB at 4 096 columns): its temporaries stay in cache,
    # where whole-tensor padded and expanded copies cost most of a DeepSeek-V3 rank's draw.
    for e, b in np.ndindex(flat.shape[0], rb):
        strip = flat[e, b * BLOCK:(b + 1) * BLOCK]
        column_amax = np.zeros(cb * BLOCK, np.float32)  # a partial block as if zero-padded
        column_amax[:cols] = np.abs(strip).max(axis=0)
        amax = column_amax.reshape(cb, BLOCK).max(axis=1)
        scale[e, b] = np.maximum(amax, np.float32(eps)) / np.float32(E4M3_MAX)
        q[e, b * BLOCK:(b + 1) * BLOCK] = to_e4m3(strip / np.repeat(scale[e, b], BLOCK)[:cols])
    return q.reshape(w32.shape), scale.reshape(*w32.shape[:-2], rb, cb)


def quantise_channels(w: Array, *, eps: float = WEIGHT_EPS) -> tuple[Array, Array]:
    """``(q, scale)`` of float weights ``w`` (…, R, C) with one scale per output channel
    (column): ``amax = max(|w[:, c]|, eps)`` over the reduction, ``scale = fl32(amax / 448)``,
    ``q = e4m3(clamp(w / scale))`` (FP8 per channel; the floor as :func:`quantise_blocks`'s
    [inferred]).

    >>> q, s = quantise_channels(np.array([[896.0, 1.0], [448.0, -2.0]], np.float32))
    >>> q.astype(np.float32).tolist(), s.tolist()
    ([[448.0, 224.0], [224.0, -448.0]], [2.0, 0.004464285913854837])
    """
    w32 = np.asarray(w, dtype=np.float32)
    scale = channel_scale(np.abs(w32).max(axis=-2), eps=eps)
    return to_e4m3(w32 / scale[..., None, :]), scale


def channel_scale(amax: Array, *, eps: float = WEIGHT_EPS) -> Array:
    """:func:`quantise_channels`'s scale of a column whose ``|w|`` peaks at ``amax``:
    ``fl32(max(amax, eps) / 448)``."""
    return np.asarray((np.maximum(amax, np.float32(eps)) / np.float32(E4M3_MAX))
                      .astype(np.float32))
