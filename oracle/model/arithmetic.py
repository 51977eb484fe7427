"""The floor of the model: float formats, rounding and exact GEMM primitives.

Every layer above (steps, profiles, the reference model, the bounds, the row test, the judge)
describes a float format by the one record :class:`FloatFormat` from :data:`FORMATS`, and
rounds with the functions here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import ml_dtypes
import numpy as np

from oracle.adapters.gemm import Product, weight_products

__all__ = [
    "FORMATS",
    "Array",
    "FloatFormat",
    "exact_int_matmul",
    "exact_int_matmuls",
    "glu64",
    "round_half_away",
    "truncate_scale_bits",
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
#: float32's exact integer range: the partial sums of one float32 chunk stay below it.
_EXACT32 = 2**24


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
    int8 ``w``, from one pass over ``w`` (:func:`oracle.adapters.gemm.weight_products`).

    Why it is exact: ``w`` is converted to float32 a chunk of at most ``c`` rows at a time,
    ``c = (2^24 − 1) // (128·max q_max)``, so every partial sum of a chunk's float32 product
    is an integer below 2^24 and BLAS computes it exactly in any order; the chunks' integer
    sums are added in float64, exact below 2^53. At 16 rows per expert the int8-to-float
    conversion, not the arithmetic, is the cost (issue 26): the chunks are a few MiB, never
    a whole converted copy. The torch backend's float64 products are exact likewise."""
    n = w.shape[0]
    bounds = [q_max * 128 for _, _, q_max in operands]
    assert max(bounds, default=0) * n < 2**53, \
        f"int GEMM of reduction length {n} is not exact in float64"
    rows = max((_EXACT32 - 1) // max(bounds, default=1), 1)
    outs = weight_products(
        w, [Product(q.astype(F32, copy=False), "abs" if absolute else "w")
            for q, absolute, _ in operands], max_rows=rows)
    return [out.astype(F32) if b * n < _EXACT32 else out for out, b in zip(outs, bounds)]


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
