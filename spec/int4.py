"""W4A8's packed int4 weights and their compensation bias (``docs/contract/variants.md``,
section W4A8 [code]).

The operator takes signed int4 weights eight to an int32 word, little-endian nibbles: element
``n`` of a row sits in bits ``4·(n mod 8)`` of word ``n // 8``. The cube unit multiplies int4 by
int4, so the kernel splits each int8 activation ``q = 16·hi + lo + 8`` (``hi = floor(q/16)``,
``lo = (q & 0xF) − 8``, both int4) and the caller supplies the missing ``8·Σ_k W[k, n]·s[n]``
as a float32 bias (``bias1`` for weight1, ``bias2`` for weight2).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "INT4_MAX",
    "INT4_MIN",
    "PER_WORD",
    "compensation_bias",
    "pack_int4",
    "split_activation",
    "unpack_int4",
]

Array = np.ndarray[Any, Any]
INT4_MIN, INT4_MAX = -8, 7
#: int4 elements per int32 word.
PER_WORD = 8
_SHIFTS = np.arange(PER_WORD, dtype=np.uint32) * 4


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
    array([8., 8., 8.], dtype=float32)
    """
    column_sums = w.astype(np.int64).sum(axis=-2).astype(np.float64)
    return np.asarray(8 * column_sums * scale.astype(np.float64), dtype=np.float32)
