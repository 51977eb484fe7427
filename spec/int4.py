"""W4A8's packed int4 weights and their compensation bias (``docs/contract/variants.md``,
section W4A8 [code]).

The operator takes signed int4 weights eight to an int32 word, little-endian nibbles: element
``n`` of a row sits in bits ``4·(n mod 8)`` of word ``n // 8``. The cube unit multiplies int4 by
int4, so the kernel splits each int8 activation ``q = 16·hi + lo + 8`` (``hi = floor(q/16)``,
``lo = (q & 0xF) − 8``, both int4) and the caller supplies the missing ``8·Σ_k W[k, n]·s[n]``
as a float32 bias (``bias1`` for weight1, ``bias2`` for weight2).

W4A16 on GPUs (Marlin AWQ/GPTQ MoE; ``docs/contract/formats.md``, section W4A16 / W4A8 on
GPUs [code]) stores unsigned int4 values ``q`` (0..15) with one scale per group of 128 along
the reduction, in the activations' dtype, and a uint4 zero point per group: the weight is
``(q − z)·s``. Symmetric GPTQ weights have no zero points: they are ``z = 8``. This project
keeps the logical values (``ml_dtypes.uint4``, one per byte; packing eight to an int32 is a
layout) in the weights' ``(K, N)`` / ``(I, K)`` orientation, the scales and zero points
``(ceil(K/128), N)`` / ``(ceil(I/128), K)``.

>>> q, s, z = quantise_groups(np.array([[-1.5], [0.0], [6.0]]), np.float32)
>>> s.tolist(), z.tolist(), dequantise_groups(q, s, z, np.float32).ravel().tolist()
([[0.5]], [[3]], [-1.5, 0.0, 6.0])
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

from spec.fp8 import blocks

__all__ = [
    "GROUP",
    "INT4_MAX",
    "INT4_MIN",
    "PER_WORD",
    "UINT4",
    "compensation_bias",
    "dequantise_groups",
    "expand_groups",
    "pack_int4",
    "quantise_groups",
    "split_activation",
    "unpack_int4",
]

Array = np.ndarray[Any, Any]
INT4_MIN, INT4_MAX = -8, 7
#: int4 elements per int32 word.
PER_WORD = 8
_SHIFTS = np.arange(PER_WORD, dtype=np.uint32) * 4
UINT4 = np.dtype(ml_dtypes.uint4)
#: W4A16's group along the reduction (Marlin's ``group_size`` 128; formats.md [code]).
GROUP = 128


def pack_int4(values: Array) -> Array:
    """int32 words holding ``values`` (integers in -8..7, last axis a multiple of 8) as
    little-endian nibbles; the last axis shrinks eightfold.

    >>> pack_int4(np.array([1, -1, 0, 0, 0, 0, 0, 0])).tolist()
    [241]
    """
    v = np.asarray(values)
    if v.shape[-1] % PER_WORD:
        raise ValueError(f"last axis {v.shape[-1]} is not a multiple of {PER_WORD}")
    if v.size and (v.min() < INT4_MIN or v.max() > INT4_MAX):
        raise ValueError(f"values outside int4 ({INT4_MIN}..{INT4_MAX})")
    nibbles = (v.astype(np.int64) & 0xF).astype(np.uint32)
    words = nibbles.reshape(*v.shape[:-1], -1, PER_WORD) << _SHIFTS
    return np.asarray(np.bitwise_or.reduce(words, axis=-1)).view(np.int32)


def unpack_int4(words: Array) -> Array:
    """The int8 values (-8..7) packed in int32 ``words``; the last axis grows eightfold. The
    inverse of :func:`pack_int4`, for every int32 bit pattern.

    >>> unpack_int4(np.array([241], np.int32)).tolist()
    [1, -1, 0, 0, 0, 0, 0, 0]
    """
    w = np.ascontiguousarray(words, dtype=np.int32).view(np.uint32)
    nibbles = ((w[..., None] >> _SHIFTS) & 0xF).astype(np.int8)
    signed = np.where(nibbles >= 8, nibbles - 16, nibbles).astype(np.int8)
    return signed.reshape(*w.shape[:-1], w.shape[-1] * PER_WORD)


def split_activation(q: Array) -> tuple[Array, Array]:
    """``(hi, lo)`` of integer-valued activations ``q`` (-128..127): ``hi = floor(q/16)``,
    ``lo = (q & 0xF) − 8``, so that ``q = 16·hi + lo + 8`` with both in int4's range. Returned
    in ``q``'s dtype.

    >>> [v.tolist() for v in split_activation(np.array([-127.0, 0.0, 127.0]))]
    [[-8.0, 0.0, 7.0], [-7.0, -8.0, 7.0]]
    """
    hi = np.floor(q / 16)
    return hi, q - 16 * hi - 8


def compensation_bias(w: Array, scale: Array) -> Array:
    """The bias W4A8 needs, ``8·Σ_k W[k, n]·s[n]`` as float32, for unpacked int4 weights
    ``w`` (…, K, N) and per-channel scales ``s`` (…, N); computed in float64 and rounded once.

    >>> compensation_bias(np.ones((2, 1, 3), np.int8), np.full((2, 3), 0.5, np.float32))[0]
    array([4., 4., 4.], dtype=float32)
    """
    column_sums = w.astype(np.int64).sum(axis=-2).astype(np.float64)
    return np.asarray(8 * column_sums * scale.astype(np.float64), dtype=np.float32)


def expand_groups(per_group: Array, rows: int, group: int = GROUP) -> Array:
    """The per-row values of a ``(…, ceil(rows/group), C)`` per-group tensor (the last group
    may be partial)."""
    return np.asarray(np.repeat(per_group, group, axis=-2)[..., :rows, :])


def dequantise_groups(q: Array, scale: Array, zero: Array, dtype: Any) -> Array:
    """W4A16 weights ``(…, R, C)`` in ``dtype``: ``(q − z)·s`` per group of 128 rows, exact in
    float32 (a 5-bit integer times a 16-bit float) and rounded once to ``dtype``, as Marlin's
    dequantisation in registers gives them [inferred: one rounding]."""
    rows = q.shape[-2]
    centred = q.astype(np.float32) - expand_groups(zero, rows).astype(np.float32)
    with np.errstate(over="ignore"):
        return np.asarray((centred * expand_groups(scale, rows).astype(np.float32))
                          .astype(dtype))


def quantise_groups(w: Array, dtype: Any) -> tuple[Array, Array, Array]:
    """``(q, scale, zero)`` of float weights ``w`` (…, R, C), asymmetric per column and group of
    128 rows (a partial group as it stands), as AWQ makes them: ``scale = (max − min)/15`` in
    ``dtype`` (the range always holding 0), ``z = round(−min/scale)``, ``q = clamp(round(w/scale)
    + z, 0, 15)``; an all-zero group has scale 0 and ``z = 8``."""
    w32 = np.asarray(w, dtype=np.float32)
    rows, cols = w32.shape[-2:]
    g = blocks(rows, GROUP)
    padded = np.zeros((*w32.shape[:-2], g * GROUP, cols), np.float32)
    padded[..., :rows, :] = w32
    grouped = padded.reshape(*w32.shape[:-2], g, GROUP, cols)
    lo, hi = grouped.min(axis=-2), grouped.max(axis=-2)  # zero padding: 0 in the range
    scale = ((hi - lo) / np.float32(15)).astype(dtype)
    s32 = scale.astype(np.float32)
    safe = np.where(s32 > 0, s32, np.float32(1))
    zero = np.where(s32 > 0, np.clip(np.rint(-lo / safe), 0, 15), 8)
    per_row = expand_groups(safe, rows)
    q = np.clip(np.rint(w32 / per_row) + expand_groups(zero, rows), 0, 15)
    return q.astype(UINT4), scale, zero.astype(UINT4)
