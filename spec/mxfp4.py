"""MXFP4 weights (OCP microscaling; gpt-oss): e2m1 elements two per byte and one e8m0 scale
per 32 elements along the reduction (``docs/contract/formats.md``, section MXFP4 [code]).

Elements are float4_e2m1 (0, ±0.5, ±1, ±1.5, ±2, ±3, ±4, ±6): a sign bit and three code bits,
the even element in the **low** nibble of its byte. A scale byte ``s`` means ``2^(s − 127)``
(255 is NaN). This project stores weights as ``(K, N)`` and ``(I, K)``, reduction first: the
packed weights are ``(K, N/2)`` and ``(I, K/2)`` bytes (two neighbouring output channels per
byte) and their scales ``(ceil(K/32), N)`` and ``(ceil(I/32), K)`` bytes. A W4A16 kernel
dequantises them to the activations' dtype and multiplies in floating point.

>>> packed, scales = quantise_mx(np.array([[3.0, -0.5]] * 32, np.float32))
>>> packed[0].tolist(), scales[0].tolist(), dequantise_mx(packed, scales, np.float32)[0].tolist()
([231], [126, 124], [3.0, -0.5])
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

from spec.fp8 import Array, blocks, ue8m0_up

__all__ = [
    "E2M1",
    "E2M1_MAX",
    "MX_BLOCK",
    "dequantise_mx",
    "e2m1_values",
    "e8m0_values",
    "pack_e2m1",
    "quantise_mx",
    "unpack_e2m1",
]

E2M1 = np.dtype(ml_dtypes.float4_e2m1fn)
E2M1_MAX = 6.0
#: Elements per e8m0 scale along the reduction (OCP MX; triton_kernels' ``mxfp.py``).
MX_BLOCK = 32


def pack_e2m1(codes: Array) -> Array:
    """Bytes holding 4-bit ``codes`` (last axis even) two by two, the even element in the low
    nibble; the last axis halves.

    >>> pack_e2m1(np.array([1, 2], np.uint8)).tolist()
    [33]
    """
    c = np.asarray(codes, np.uint8)
    if c.shape[-1] % 2:
        raise ValueError(f"last axis {c.shape[-1]} is not even: e2m1 packs two per byte")
    return np.asarray((c[..., 0::2] & 0xF) | ((c[..., 1::2] & 0xF) << 4), np.uint8)


def unpack_e2m1(packed: Array) -> Array:
    """The 4-bit codes in ``packed`` bytes, low nibble first; the inverse of
    :func:`pack_e2m1`."""
    p = np.asarray(packed, np.uint8)
    return np.stack([p & 0xF, p >> 4], axis=-1).reshape(*p.shape[:-1], 2 * p.shape[-1])


def e2m1_values(codes: Array) -> Array:
    """float32 values of 4-bit e2m1 codes (bit 3 the sign).

    >>> e2m1_values(np.arange(8, dtype=np.uint8)).tolist()
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    """
    return np.asarray(np.asarray(codes, np.uint8).view(E2M1).astype(np.float32))


def e8m0_values(scales: Array) -> Array:
    """float32 values ``2^(s − 127)`` of e8m0 scale bytes (0 is 2^-127, subnormal in float32;
    255 is NaN), by bit arithmetic.

    >>> e8m0_values(np.array([127, 128, 0, 255], np.uint8)).tolist()[:3]
    [1.0, 2.0, 5.877471754111438e-39]
    """
    s = np.asarray(scales, np.uint8).astype(np.uint32)
    bits = np.where(s == 0, np.uint32(0x00400000), s << 23)
    return np.asarray(np.where(s == 255, np.float32(np.nan), bits.view(np.float32)))


def dequantise_mx(packed: Array, scales: Array, dtype: Any) -> Array:
    """Weights ``(…, R, C)`` in ``dtype`` from packed e2m1 ``(…, R, C/2)`` and e8m0 scales
    ``(…, ceil(R/32), C)``: what a W4A16 kernel multiplies with (one rounding to ``dtype``:
    exact in bfloat16 and float32 but for results beyond their range)."""
    values = e2m1_values(unpack_e2m1(packed))
    s = np.repeat(e8m0_values(scales), MX_BLOCK, axis=-2)[..., : values.shape[-2], :]
    with np.errstate(over="ignore", under="ignore"):
        return np.asarray((values * s).astype(dtype))


def quantise_mx(w: Array) -> tuple[Array, Array]:
    """``(packed, scales)`` of float weights ``w`` (…, R, C): per column and 32 rows (a partial
    block as if zero-padded), the scale is ``amax/6`` rounded **up** to a power of two
    (triton_kernels' default, :func:`spec.fp8.ue8m0_up`), the elements ``w/scale`` rounded to
    e2m1 (nearest, ties to even) after a clamp to ±6."""
    w32 = np.asarray(w, dtype=np.float32)
    rows, cols = w32.shape[-2:]
    rb = blocks(rows, MX_BLOCK)
    padded = np.zeros((*w32.shape[:-2], rb * MX_BLOCK, cols), np.float32)
    padded[..., :rows, :] = np.abs(w32)
    amax = padded.reshape(*w32.shape[:-2], rb, MX_BLOCK, cols).max(axis=-2)
    scale = ue8m0_up((amax / np.float32(E2M1_MAX)).astype(np.float32))
    code = (scale.view(np.uint32) >> 23).astype(np.uint8)
    code = np.where(scale > 0, code, np.uint8(0))
    per_row = np.repeat(e8m0_values(code), MX_BLOCK, axis=-2)[..., :rows, :]
    q = np.clip(w32 / per_row, -E2M1_MAX, E2M1_MAX).astype(E2M1)
    return pack_e2m1(q.view(np.uint8) & 0xF), code
