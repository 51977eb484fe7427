"""The floor of the model: float formats, rounding and exact GEMM primitives.

Every layer above (steps, profiles, the reference model, the bounds, the row test, the judge)
describes a float format by the one record :class:`FloatFormat` from :data:`FORMATS`, and
rounds with the functions here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import ml_dtypes
import numpy as np

__all__ = [
    "FORMATS",
    "Array",
    "FloatFormat",
    "exact_int_matmul",
    "exact_int_matmuls",
    "glu64",
    "round_half_away",
    "truncate_scale_bits",
    "weight_chunks",
]

Array = np.ndarray[Any, Any]
F32 = np.float32

_finfo: Callable[[Any], Any] = ml_dtypes.finfo  # ml_dtypes' finfo also knows bfloat16


@dataclass(frozen=True)
class FloatFormat:
    """A binary float format as the bounds and the judge need it."""

    name: str
    unit: float  # unit roundoff u = 2^-digits
    tiny: float  # underflow error η: half the smallest subnormal
    max: float
    digits: int  # significand bits, the implicit one included
    emin: int  # exponent of the smallest normal value

    @classmethod
    def of(cls, dtype: Any) -> FloatFormat:
        info = _finfo(dtype)
        return cls(np.dtype(dtype).name, float(info.eps) / 2,
                   float(info.smallest_subnormal) / 2, float(info.max), int(info.nmant) + 1,
                   int(info.minexp))

    def flushing(self) -> FloatFormat:
        """This format as a kernel that flushes float32 subnormals to zero rounds into it: the
        underflow error grows to float32's smallest normal, 2^-126, for float32 and bfloat16
        (whose subnormals are float32's); float16's subnormals lie far above that range and
        float64 is never a kernel's, so those are returned unchanged."""
        return replace(self, tiny=2.0**-126) if self.emin == -126 else self

    def gamma(self, n: int) -> float:
        """Higham's γ_n = n·u / (1 − n·u): the relative error of an n-term sum in any order."""
        return n * self.unit / (1 - n * self.unit)


#: Every float format the model stores or outputs, by NumPy dtype name.
FORMATS: dict[str, FloatFormat] = {
    f.name: f for f in (FloatFormat.of(d) for d in
                        (np.float16, ml_dtypes.bfloat16, np.float32, np.float64))
}


def round_half_away(v: Array) -> Array:
    """Round float32 values to integers, ties away from zero (§6 step 1).

    Computed in float64, where ``|v| + 0.5`` is exact for every float32 ``v``; the float32
    expression ``floor(v + 0.5)`` would round 0.49999997 up.
    """
    a = np.abs(v.astype(np.float64))
    return (np.sign(v) * np.floor(a + 0.5)).astype(F32)


def truncate_scale_bits(scale: Array) -> Array:
    """Keep the top 19 bits of float32 scales (``bits & 0xFFFFE000``) [inferred]."""
    bits = np.ascontiguousarray(scale, dtype=F32).view(np.uint32) & np.uint32(0xFFFFE000)
    return bits.view(F32)


# Partial sums of an int8 × int8 GEMM are integers bounded by 127·128·L (activations are
# quantised to [-127, 127], weights span [-128, 127]). BLAS computes them exactly while that
# bound stays below the float type's integer range: 2**24 for float32 (L <= 1032), 2**53 for
# float64. Any order of summation is then exact, so BLAS equals int32 accumulation.
_INT8_PRODUCT_BOUND = 127 * 128
#: Rows of ``w`` converted to float32 at a time by :func:`exact_int_matmul`: a buffer that
#: stays in cache while BLAS reads it (256 x 4096 float32 is 4 MiB).
_CHUNK = 256


def exact_int_matmul(q: Array, w: Array, *, absolute: bool = False, q_max: int = 127) -> Array:
    """``q @ w`` (``q @ |w|`` with ``absolute``) for integer-valued ``q`` (|q| <= ``q_max``,
    NaN allowed) and int8 ``w``, exactly, on float32 BLAS.

    Returns float32 when every partial sum is below 2**24, else float64 (exact below 2**53;
    asserted). The result holds exact integers, so it equals any exact evaluation bit for bit
    (an exact sum that is 0 is +0 here as in BLAS: its accumulators start at +0).
    """
    return exact_int_matmuls(w, (q, absolute, q_max))[0]


def exact_int_matmuls(w: Array, *operands: tuple[Array, bool, int]) -> list[Array]:
    """:func:`exact_int_matmul` of every ``(q, absolute, q_max)`` in ``operands`` with the same
    int8 ``w``, converting ``w`` once. Longer reductions run as blocks short enough to be exact
    in float32, summed in float64; ``w`` is converted a few hundred rows at a time into one
    reused buffer, never whole: at 16 rows per expert the int8-to-float conversion, not the
    arithmetic, is the cost (issue 26)."""
    n = w.shape[0]
    bounds = [q_max * 128 for _, _, q_max in operands]
    small = [b * n < 2**24 for b in bounds]
    if all(small):
        wf = w.astype(F32)
        wa = np.abs(wf) if any(a for _, a, _ in operands) else wf
        return [np.asarray(np.matmul(q.astype(F32, copy=False), wa if a else wf))
                for q, a, _ in operands]
    assert max(bounds) * n < 2**53, f"int GEMM of reduction length {n} is not exact in float64"
    block = max((2**24 - 1) // max(bounds) // _CHUNK, 1) * _CHUNK
    qs = [q.astype(F32) for q, _, _ in operands]  # integers below 2**24: exact
    outs = [np.zeros((q.shape[0], w.shape[1]), np.float64) for q in qs]
    parts = [np.empty((q.shape[0], w.shape[1]), F32) for q in qs]
    prods = [np.empty_like(part) for part in parts]
    buf = np.empty((_CHUNK, w.shape[1]), F32)
    abs_buf = np.empty_like(buf) if any(a for _, a, _ in operands) else buf
    for start in range(0, n, block):
        for part in parts:
            part[...] = 0
        for c in range(start, min(start + block, n), _CHUNK):
            rows = min(c + _CHUNK, start + block, n) - c
            wc, wa = buf[:rows], abs_buf[:rows]
            np.copyto(wc, w[c:c + rows], casting="unsafe")
            if abs_buf is not buf:
                np.abs(wc, out=wa)
            for q32, (_, absolute, _), part, prod in zip(qs, operands, parts, prods):
                np.matmul(q32[:, c:c + rows], wa if absolute else wc, out=prod)
                part += prod  # below 2**24 within a block: exact
        for out, part in zip(outs, parts):
            out += part  # below 2**53: exact
    return [out.astype(F32) if s else out for out, s in zip(outs, small)]


def weight_chunks(w: Array, dtype: Any = F32) -> Iterator[tuple[int, Array]]:
    """``(start, chunk)``: ``w``'s rows ``start`` onwards, a few MiB at a time (as
    :func:`exact_int_matmuls`' 256 x 4096 float32), converted to ``dtype`` into one reused
    buffer (the next chunk overwrites it). A consumer that takes every product it needs of a
    weight from each chunk reads the weight once and never holds a converted copy of it: at
    16 rows per expert the conversion, not the arithmetic, is the cost (issue 26). Any layout
    of ``w``; int8 and 16-bit values convert exactly to float32 and float64."""
    n = w.shape[0]
    row_bytes = max(int(np.prod(w.shape[1:])) * np.dtype(dtype).itemsize, 1)
    rows = max(_CHUNK * 4096 * 4 // row_bytes, 16)
    buf = np.empty((min(rows, n), *w.shape[1:]), dtype)
    for start in range(0, n, rows):
        chunk = buf[:min(rows, n - start)]
        np.copyto(chunk, w[start:start + chunk.shape[0]], casting="unsafe")
        yield start, chunk


def glu64(gate: Array, up: Array, alpha: float | None) -> tuple[Array, Array, Array]:
    """The call's gated activation in float64 (§6 step 4) on clamped halves: ``(arg, silu,
    factor)`` with ``a = silu·factor``. SwiGLU (``alpha`` ``None``): ``arg = g``,
    ``silu = g/(1 + exp(−g))``, ``factor = u``; SwigluOAI (``alpha``:
    :attr:`spec.OpConfig.oai_alpha`, open PR #11916): ``arg = α·g``,
    ``silu = g/(1 + exp(−α·g))``, ``factor = u + 1``. ``arg`` is the sigmoid's argument, for
    the derivatives: ``d silu/dg = σ(arg)·(1 + arg·(1 − σ(arg)))``."""
    arg = gate if alpha is None else alpha * gate
    with np.errstate(over="ignore"):
        silu = gate / (1.0 + np.exp(-arg))
    return arg, silu, up if alpha is None else up + 1.0
