"""Kernel numerics profiles: one frozen record per real kernel pipeline.

A :class:`KernelProfile` is data. It names a pipeline (``shared/reference/kernels.md``: the
table of knobs on which real kernels differ) and composes it from one step object per §6 step
of ``shared/reference/dispatch_ffn_combine.md``:

==========  =====================================================================
step        record field (step object)
==========  =====================================================================
1           ``quantise`` (:class:`Quantiser`): scale formula, tie rule, ``amax`` floor
2–3         ``gemm1`` (:class:`IntGemm`): accumulation and the dequant epilogue
4           ``swiglu`` (:class:`Swiglu`): silu evaluation, stored dtypes, gate/up order
5           ``requantise`` (:class:`Quantiser`)
6–7         ``gemm2`` (:class:`IntGemm`), where the routed weight may be applied
8           ``combine`` (:class:`Combine`): where the routed weight is applied, dtype, order
float path  ``float_gemm1``/``float_swiglu``/``float_gemm2`` for BF16/FP16 weights
W4A8        ``split_gemm1``/``split_gemm2`` (:class:`SplitGemm`) for GMM1/GMM2, else as W8A8
==========  =====================================================================

plus the kernel's **freedoms** (what it does not promise: a float32 sum order, an ``exp`` or a
division within some ulps) and its **shape domain** (:class:`spec.limits.ShapeDomain`).

Every step computes on :class:`Env` values: the model's value (``mid``, one legitimate
evaluation, pinned to NumPy float32 operations) and, when asked for, an envelope ``[lo, hi]``
that contains every value a kernel with this profile may compute, whatever it does with its
freedoms. The envelope is exact interval arithmetic: every step is monotone in each input
(roundings are monotone, products are bounded by their corners, silu is handled by its one
minimum), and a freedom widens the envelope by exactly its bound. Where a profile has no
freedom, ``lo = hi = mid`` and the judge's comparison is bitwise; a flip of one stored
intermediate, or of one int8 value after a requantisation, shows up as a nonzero envelope on
exactly the values it can reach.

Adding a profile is one record (see :data:`PROFILES`), at most plus one new step class.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from oracle.numerics import exact_int_matmul, exact_int_matmuls, round_half_away
from spec import DTYPES
from spec.config import OpConfig
from spec.int4 import split_activation
from spec.limits import A3_DOMAIN, CONTRACT_DOMAIN, VLLM_DOMAIN, ShapeDomain

__all__ = [
    "ASCEND_A3",
    "DEFAULT_KERNEL",
    "PROFILES",
    "VLLM_TRITON",
    "Combine",
    "Env",
    "FloatGemm",
    "IntGemm",
    "KernelProfile",
    "Quantiser",
    "SplitGemm",
    "Swiglu",
    "get_kernel",
    "profile_from_dict",
    "register",
]

if TYPE_CHECKING:
    from oracle.rowtest import IdealAssumptions

Array = np.ndarray[Any, Any]
#: One rounding point of a pipeline: (§6 step, name, value with its envelope).
RoundingPoint = tuple[str, str, "Env"]
F32 = np.float32
_U32 = 2.0**-24  # float32 unit roundoff
_TINY32 = float(np.finfo(F32).smallest_subnormal)
#: silu's one minimum: silu'(x*) = 0 at x* = −1.2784645…, silu(x*) = −0.2784645…
_SILU_ARGMIN = -1.2784645427610738
_SILU_MIN = -0.27846454276107380


# ---------------------------------------------------------------- values with envelopes


@dataclass(frozen=True)
class Env:
    """A value computed by the model (``mid``) and, optionally, the envelope ``[lo, hi]`` of
    every value a kernel of the profile may compute there. ``lo is None``: no envelope asked
    for (the fast path of :func:`oracle.run`)."""

    mid: Array
    lo: Array | None = None
    hi: Array | None = None

    def take(self, index: Any) -> Env:
        if self.lo is None or self.hi is None:
            return Env(self.mid[index])
        return Env(self.mid[index], self.lo[index], self.hi[index])

    def columns(self, cols: slice) -> Env:
        return self.take((slice(None), cols))

    def radius(self) -> Array:
        """``max(hi − mid, mid − lo)``: 0 where the value is pinned."""
        assert self.lo is not None and self.hi is not None
        return np.asarray(np.maximum(self.hi - self.mid, self.mid - self.lo))


def _monotone(f: Callable[[Array], Array], v: Env) -> Env:
    """Apply an elementwise map that is monotone (either direction) on each element."""
    mid = f(v.mid)
    if v.lo is None or v.hi is None:
        return Env(mid)
    a, b = f(v.lo), f(v.hi)
    return Env(mid, np.minimum(a, b), np.maximum(a, b))


def _product(a: Env, b: Env, rnd: Callable[[Array], Array]) -> Env:
    """``rnd(a · b)`` with both factors in envelopes: the exact product's range is spanned by
    the four corners, and a monotone rounding keeps the order."""
    mid = rnd(a.mid * b.mid)
    if a.lo is None or a.hi is None or b.lo is None or b.hi is None:
        return Env(mid)
    with np.errstate(invalid="ignore", over="ignore"):
        corners = [rnd(x * y) for x in (a.lo, a.hi) for y in (b.lo, b.hi)]
    lo = np.minimum(np.minimum(corners[0], corners[1]), np.minimum(corners[2], corners[3]))
    hi = np.maximum(np.maximum(corners[0], corners[1]), np.maximum(corners[2], corners[3]))
    return Env(mid, lo, hi)


def to_f32(a: Array) -> Array:
    with np.errstate(over="ignore"):
        return a.astype(F32, copy=False)


def cast(dtype: Any, ties: str = "even") -> Callable[[Array], Array]:
    """Rounding of float32/float64 values to ``dtype`` (returned as float32 holding them):
    round to nearest, ties to even (NumPy's cast) or ties away from zero."""

    def even(a: Array) -> Array:
        with np.errstate(over="ignore"):
            return a.astype(dtype).astype(F32)

    if ties == "even":
        return even
    if ties != "away":
        raise ValueError(f"ties {ties!r} is not 'even' or 'away'")

    def away(a: Array) -> Array:
        r = even(a)
        a64 = a.astype(np.float64)
        # A tie rounded to even that lost magnitude moves one step away from zero.
        step = _next_away(r, dtype)
        tie = (np.abs(step) > np.abs(r)) & (a64 - r == (step.astype(np.float64) - r) / 2)
        return np.asarray(np.where(tie & np.isfinite(a64), step, r))

    return away


def _next_away(r: Array, dtype: Any) -> Array:
    """The neighbour of each 16-bit ``dtype`` value (held in float32) one step away from zero:
    sign and magnitude, so one more in the bit pattern is one step up in magnitude."""
    v = r.astype(dtype)
    nxt = (v.view(np.uint16) + np.uint16(1)).view(dtype)
    return np.asarray(np.where(np.isinf(v) | np.isnan(v), v, nxt).astype(F32))


def _round_to_int(ties: str) -> Callable[[Array], Array]:
    if ties == "even":
        return np.rint
    if ties == "away":
        return round_half_away
    raise ValueError(f"ties {ties!r} is not 'even' or 'away'")


# ---------------------------------------------------------------- steps


@dataclass(frozen=True)
class Quantiser:
    """Per-token symmetric int8 quantisation (§6 steps 1 and 5; kernels.md, first row).

    ``scale="divide"``: ``σ = fl(amax/127)``, ``q = R(fl(a/σ))``; ``"reciprocal"``:
    ``q = R(fl(a · fl(127/amax)))`` with ``σ = fl(amax/127)`` for the dequant. ``ties``: the
    rounding ``R`` to integers. ``amax_floor``: ``amax = max(amax, floor)`` (vLLM's Triton
    quantiser, 1e-10), which also makes a zero row quantise to 0. ``div_ulps``: how many ulps
    the kernel's float32 divisions may be off (0: correctly rounded, the model's own).
    """

    scale: str = "divide"
    ties: str = "away"
    amax_floor: float | None = None
    div_ulps: int = 0

    def __post_init__(self) -> None:
        if self.scale not in ("divide", "reciprocal"):
            raise ValueError(f"scale {self.scale!r} is not 'divide' or 'reciprocal'")
        _round_to_int(self.ties)

    def describe(self) -> str:
        formula = "a / fl(amax/127)" if self.scale == "divide" else "a · fl(127/amax)"
        floor = f", amax floored at {self.amax_floor:g}" if self.amax_floor else ""
        return f"int8 of {formula}, ties {self.ties}{floor}"

    def __call__(self, a: Env, zero_rows: str) -> tuple[Env, Env, Array]:
        """``(q, σ, degenerate)``: integers (float32), the dequant scale (float32, one per row)
        and the rows whose quantisation is degenerate (amax 0, or 127/amax overflowing)."""
        rnd = _round_to_int(self.ties)
        rows = a.mid.shape[0]
        cols = a.mid.shape[1] if a.mid.ndim > 1 else 0
        amax = np.abs(a.mid).max(axis=1) if cols else np.zeros(rows, F32)
        if self.amax_floor is not None:
            amax = np.maximum(amax, F32(self.amax_floor))
        sigma = amax / F32(127)
        zero = amax == 0
        tiny = np.zeros(rows, dtype=bool)
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            if self.scale == "divide":
                safe = np.where(sigma == 0, F32(1), sigma)
                q = rnd(a.mid / safe[:, None])
            else:
                inv = np.where(zero, F32(0), F32(127) / amax)
                # 127/amax overflows float32 below about 3.7e-37: the kernel computes inf·a
                # there; the "zero" policy takes the mathematical value instead.
                tiny = np.isinf(inv)
                q = rnd(a.mid * inv[:, None])
                if tiny.any():
                    scale64 = 127.0 / amax[tiny, None].astype(np.float64)
                    q[tiny] = rnd(a.mid[tiny].astype(np.float64) * scale64)
        if zero_rows == "nan":
            q[zero | tiny] = np.nan
        q_env, s_env = Env(q), Env(sigma)
        if a.lo is not None and a.hi is not None:
            q_env, s_env = self._envelope(a, q, sigma, rnd)
        return q_env, s_env, zero | tiny

    def _envelope(
        self, a: Env, q: Array, sigma: Array, rnd: Callable[[Array], Array]
    ) -> tuple[Env, Env]:
        """Every ``(q, σ)`` a kernel may compute from any ``a`` in its envelope. Roundings of
        float32 operands are computed in float64 and rounded once to float32, which is the
        correctly rounded float32 result (53 >= 2·24 + 2: double rounding is innocuous)."""
        assert a.lo is not None and a.hi is not None
        if a.mid.shape[1] == 0:
            return Env(q, q, q), Env(sigma, sigma, sigma)
        straddle = (a.lo <= 0) & (a.hi >= 0)
        abs_lo = np.where(straddle, 0, np.minimum(np.abs(a.lo), np.abs(a.hi)))
        abs_hi = np.maximum(np.abs(a.lo), np.abs(a.hi))
        amax_lo = abs_lo.max(axis=1).astype(np.float64)
        amax_hi = abs_hi.max(axis=1).astype(np.float64)
        if self.amax_floor is not None:
            amax_lo = np.maximum(amax_lo, float(F32(self.amax_floor)))
            amax_hi = np.maximum(amax_hi, float(F32(self.amax_floor)))
        d = self.div_ulps * 2 * _U32  # d ulps of a float32 value are at most 2d·u relative
        s_lo = to_f32(amax_lo / 127).astype(np.float64) * (1 - d)
        s_hi = to_f32(amax_hi / 127).astype(np.float64) * (1 + d)
        sigma_env = Env(sigma, np.minimum(s_lo, sigma), np.maximum(s_hi, sigma))
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            if self.scale == "divide":  # t = fl(a / σ): quotient corners, then the division
                f_lo, f_hi, widen = 1 / s_hi, 1 / s_lo, d
            else:  # t = fl(a · fl(127/amax)): the reciprocal's envelope, then the product
                f_lo = to_f32(127 / amax_hi).astype(np.float64) * (1 - d)
                f_hi = to_f32(127 / amax_lo).astype(np.float64) * (1 + d)
                widen = 0.0
            corners = np.stack([
                x.astype(np.float64) * f[:, None] for x in (a.lo, a.hi) for f in (f_lo, f_hi)
            ])
            corners = np.where(np.isnan(corners), np.inf, corners)  # 0·inf: anything
            t_lo = to_f32(corners.min(0))
            t_hi = to_f32(corners.max(0))
            t_lo = to_f32(t_lo - widen * np.abs(t_lo.astype(np.float64)))
            t_hi = to_f32(t_hi + widen * np.abs(t_hi.astype(np.float64)))
            # The kernel's |q| never exceeds 127: its own amax maps to 127·(1 ± 2u).
            q_lo = np.clip(rnd(t_lo), -127, 127).astype(F32)
            q_hi = np.clip(rnd(t_hi), -127, 127).astype(F32)
            q_lo = np.where(np.isinf(corners).any(0), F32(-127), q_lo)
            q_hi = np.where(np.isinf(corners).any(0), F32(127), q_hi)
        finite = np.isfinite(q)
        q_lo = np.where(finite, np.minimum(q_lo, q), q)
        q_hi = np.where(finite, np.maximum(q_hi, q), q)
        return Env(q, q_lo, q_hi), sigma_env


#: Epilogue operations, applied in order to the float32 accumulator (kernels.md rows 3, 6):
#: ``"col"`` × the per-channel weight scale, ``"row"`` × the per-token activation scale,
#: ``"slot"`` × the routed weight, ``"fp16"`` / ``"x"`` a cast to float16 / x's dtype
#: (ties to even), ``"x_away"`` a cast to x's dtype with ties away from zero.
EPILOGUE_OPS = ("col", "row", "slot", "fp16", "x", "x_away")


def _store(name: str, x_dtype: Any) -> Callable[[Array], Array]:
    """The cast that stores a value as ``"fp16"``, ``"x"`` (x's dtype, ties to even) or
    ``"x_away"`` (x's dtype, ties away from zero)."""
    if name == "fp16":
        return cast(np.float16)
    if name in ("x", "x_away"):
        return cast(x_dtype, "away" if name == "x_away" else "even")
    raise ValueError(f"store {name!r} is not one of 'fp16', 'x', 'x_away'")


def _scaled_by(factor: Array) -> Callable[[Array], Array]:
    """Multiplication by a fixed float32 factor (any sign), rounded to float32."""

    def scaled(a: Array) -> Array:
        with np.errstate(over="ignore", invalid="ignore"):
            return to_f32(a * factor)

    return scaled


def _apply_epilogue(
    ops: tuple[str, ...], v: Env, *, col: Array | None, row: Env | None, slot: Array | None,
    x_dtype: Any,
) -> Env:
    for op in ops:
        if op == "col":
            assert col is not None
            v = _monotone(_scaled_by(col), v)
        elif op == "row":
            assert row is not None
            v = _product(v, row.take((slice(None), None)), to_f32)
        elif op == "slot":
            assert slot is not None
            v = _monotone(_scaled_by(slot[:, None].astype(F32)), v)
        elif op in EPILOGUE_OPS:
            v = _monotone(_store(op, x_dtype), v)
        else:
            raise ValueError(f"epilogue op {op!r} is not one of {EPILOGUE_OPS}")
    return v


@dataclass(frozen=True)
class IntGemm:
    """An int8 GEMM and its epilogue (§6 steps 2–3 and 6–7; kernels.md rows 2, 3, 6).

    ``accumulate``: ``"int32"`` (exact), or ``"f32_blocks"`` (int32 dots per K block, the
    blocks summed in a float32 accumulator: exact while partial sums stay below 2^24, i.e. for
    reduction lengths up to 1032; beyond, any blocking is a freedom bounded by
    ``γ_{nblocks}·Σ|partial sums|``). ``epilogue``: :data:`EPILOGUE_OPS` applied in order.
    """

    accumulate: str = "int32"
    epilogue: tuple[str, ...] = ("col", "fp16", "row")
    block: int = 32

    def describe(self) -> str:
        acc = ("exact int32" if self.accumulate == "int32"
               else f"int32 per {self.block}-wide K block, blocks summed in float32")
        return f"{acc}; epilogue {' -> '.join(self.epilogue)}"

    def __call__(
        self, q: Env, w: Array, col: Array, row: Env, slot: Array | None, x_dtype: Any
    ) -> Env:
        if q.lo is None or q.hi is None:
            acc = Env(to_f32(exact_int_matmul(q.mid, w)))
        else:
            # The model's sum, and the envelope's |w| products, from one pass over w.
            q_rad = q.radius()
            flipped = np.flatnonzero((q_rad > 0).any(axis=1) | ~np.isfinite(q_rad).all(axis=1))
            reach = np.nan_to_num(q_rad[flipped], nan=np.inf)
            finite = np.isfinite(reach).all(axis=1)
            n = q.mid.shape[1]
            blocked = self.accumulate == "f32_blocks" and 127 * 128 * n >= 2**24
            operands = [(q.mid, False, 127)]
            if finite.any():
                operands.append((reach[finite], True, max(int(reach[finite].max(initial=0)), 1)))
            if blocked:
                q_abs = np.maximum(np.abs(q.lo), np.abs(q.hi))
                operands.append((np.nan_to_num(q_abs, nan=127.0), True, 127))
            products = iter(exact_int_matmuls(w, *operands))
            acc_mid = next(products)
            rad = np.zeros(acc_mid.shape, dtype=np.float64)
            if finite.any():
                rad[flipped[finite]] = next(products)
            if not finite.all():  # a NaN q: the float64 product itself (inf·0 is NaN there)
                with np.errstate(invalid="ignore"):
                    rad[flipped[~finite]] = reach[~finite].astype(np.float64) @ np.abs(
                        w.astype(np.float64))
            if blocked:
                blocks = -(-n // self.block)
                gamma = blocks * _U32 / (1 - blocks * _U32)
                rad = rad + gamma * next(products).astype(np.float64)
            acc64 = acc_mid.astype(np.float64)
            acc = Env(to_f32(acc_mid), to_f32(acc64 - rad), to_f32(acc64 + rad))
        return _apply_epilogue(self.epilogue, acc, col=col, row=row, slot=slot, x_dtype=x_dtype)


@dataclass(frozen=True)
class SplitGemm:
    """W4A8's GEMM and epilogue (variants.md, W4A8 [code]; the epilogues of
    ``dispatch_ffn_combine_w4_a8`` at 182b75ea): the int8 activation splits into
    ``q = 16·hi + lo + 8`` (:func:`spec.int4.split_activation`); the cube gives
    ``C_hi = fp16(Σ hi·W · s)`` and ``C_lo = fp16(Σ lo·W · s)`` (exact int32 sums, the
    per-channel dequant as W8A8's); the vector unit computes ``fl(fl(16·C_hi + C_lo) + b)``,
    times the per-token scale, in float32, then ``store`` (``None``: stays float32, GMM1;
    ``"x"``: x's dtype, GMM2).

    No freedom: with its inputs pinned the value is pinned. Where ``q``'s envelope is not
    pinned (a requantisation that may flip), the envelope is the exact value's range widened
    by the roundings' bound: each fp16 store within ``2^-11`` relative plus half its smallest
    subnormal, the two float32 sums within ``2^-24`` relative each.
    """

    store: str | None = None

    def describe(self) -> str:
        stored = "float32" if self.store is None else self.store
        return ("q = 16·hi + lo + 8; C_hi, C_lo = fp16(int4 GEMM · s); "
                f"fl(fl(16·C_hi + C_lo) + bias) · σ, stored as {stored}")

    def __call__(
        self, q: Env, w: Array, col: Array, bias: Array, row: Env, x_dtype: Any
    ) -> Env:
        hi, lo = split_activation(q.mid)
        fp16 = _store("fp16", x_dtype)
        with np.errstate(over="ignore", invalid="ignore"):
            c_hi = fp16(to_f32(exact_int_matmul(hi, w)) * col)
            c_lo = fp16(to_f32(exact_int_matmul(lo, w)) * col)
            t = to_f32(to_f32(F32(16) * c_hi + c_lo) + bias)
        acc = Env(t)
        if q.lo is not None and q.hi is not None:
            acc = Env(t, t, t)
            q_rad = q.radius()
            moved = np.flatnonzero((q_rad > 0).any(axis=1) | ~np.isfinite(q_rad).all(axis=1))
            if moved.size:
                w_abs = np.abs(w.astype(np.float64))
                s_abs = np.abs(col.astype(np.float64))
                with np.errstate(invalid="ignore"):
                    reach = (np.nan_to_num(q_rad[moved], nan=np.inf) @ w_abs) * s_abs
                # |hi|, |lo| <= 8: each C is at most 8·Σ|W|·|s|.
                c_max = 8 * w_abs.sum(axis=0) * s_abs
                t_max = 17 * c_max + np.abs(bias.astype(np.float64))
                err = 17 * (c_max * 2.0**-11 + 2.0**-25) + 2 * t_max * _U32
                # The kernel's value for any q in the envelope and the model's own lie within
                # err of their exact values, which differ by at most reach.
                wide = reach + 2 * err
                t64 = t[moved].astype(np.float64)
                lo_t, hi_t = t.copy(), t.copy()
                lo_t[moved] = np.nextafter(to_f32(t64 - wide), F32(-np.inf))
                hi_t[moved] = np.nextafter(to_f32(t64 + wide), F32(np.inf))
                acc = Env(t, lo_t, hi_t)
        ops = ("row",) if self.store is None else ("row", self.store)
        return _apply_epilogue(ops, acc, col=None, row=row, slot=None, x_dtype=x_dtype)


@dataclass(frozen=True)
class FloatGemm:
    """A BF16/FP16-weight GEMM: exact products, a float32 accumulator in an order the kernel
    does not promise (tensor cores, BLAS blocking), then ``epilogue``.

    The model's value is the exact sum rounded once to float32; the envelope holds every
    order: ``|fl32 sum − exact| <= γ_n·Σ|terms|`` (Higham, *Accuracy and Stability of Numerical
    Algorithms*, §4.2), widened by the float64 evaluation's own ``γ_n`` bound.
    """

    epilogue: tuple[str, ...] = ("x",)

    def describe(self) -> str:
        return f"float32 accumulation in any order; epilogue {' -> '.join(self.epilogue)}"

    def __call__(self, a: Env, w: Array, slot: Array | None, x_dtype: Any) -> Env:
        w64 = w.astype(np.float64)
        s = a.mid.astype(np.float64) @ w64
        if a.lo is None or a.hi is None:
            acc = Env(to_f32(s))
        else:
            n = a.mid.shape[1]
            g32, g64 = n * _U32 / (1 - n * _U32), n * 2.0**-53 / (1 - n * 2.0**-53)
            a_abs = np.maximum(np.abs(a.lo), np.abs(a.hi)).astype(np.float64)
            rad_in = a.radius().astype(np.float64)
            with np.errstate(invalid="ignore"):
                w_abs = np.abs(w64)
                mag = a_abs @ w_abs
                rad = (g32 + g64) * mag * (1 + 1e-12)
                spread = np.flatnonzero((rad_in > 0).any(axis=1))
                if spread.size:
                    rad[spread] += rad_in[spread] @ w_abs
            acc = Env(to_f32(s), to_f32(s - rad), to_f32(s + rad))
        return _apply_epilogue(self.epilogue, acc, col=None, row=None, slot=slot,
                               x_dtype=x_dtype)


@dataclass(frozen=True)
class Swiglu:
    """SwiGLU on the GEMM1 output (§6 step 4; kernels.md row 4).

    ``a = store(silu_store(fl(g / fl(1 + exp(−g)))) · u)`` in float32, where ``silu_store`` and
    ``store`` are casts (``None``: stays float32; ``"x"``: x's dtype, ties to even; ``"x_away"``:
    ties away from zero). ``gate_first``: the gate is the first ``I`` columns. ``exp_ulps`` /
    ``div_ulps``: how far the kernel's ``exp`` and division may lie from correctly rounded
    (freedoms). The clamp (``swiglu_limit``) is the contract's: ``min(·, L)`` on both halves,
    ``max(·, −L)`` on the up half only, in both modes (variants.md, SwigluOAI; at HEAD
    ``block_epilogue_pertoken_swiglu.hpp`` runs ``ClampMax`` on the whole row, then ``ClampMin``
    on the up half [code], although PR #11916's description calls standard mode's up clamp
    one-sided).

    SwigluOAI (``cfg.oai_alpha`` not ``None``, open PR #11916): ``exp(−fl(α·g))`` in place of
    ``exp(−g)`` and ``fl(u + 1)`` in place of ``u``, the same roundings otherwise; the order
    of the PR's float32 operations is not pinned by a source [inferred].
    """

    silu_store: str | None = None
    store: str | None = None
    gate_first: bool = True
    exp_ulps: int = 0
    div_ulps: int = 0

    def describe(self) -> str:
        names = {None: "float32", "x": "x dtype", "x_away": "x dtype (ties away)"}
        order = "gate first" if self.gate_first else "up first"
        return (f"silu in float32 stored as {names[self.silu_store]}, product stored as "
                f"{names[self.store]}; {order}; exp within {self.exp_ulps} ulp")

    def __call__(self, h: Env, cfg: OpConfig, x_dtype: Any) -> Env:
        i = cfg.intermediate
        first, second = slice(0, i), slice(i, 2 * i)
        gate_cols, up_cols = (first, second) if self.gate_first else (second, first)
        if cfg.swiglu_limit is not None:
            limit = F32(cfg.swiglu_limit)
            h = _monotone(lambda a: np.minimum(a, limit), h)
            up = _monotone(lambda a: np.maximum(a, -limit), h.columns(up_cols))
        else:
            up = h.columns(up_cols)
        gate = h.columns(gate_cols)
        alpha = cfg.oai_alpha
        arg = gate.mid
        if alpha is not None:
            arg = gate.mid * F32(alpha)
            up = _monotone(lambda a: to_f32(a + F32(1)), up)
        with np.errstate(over="ignore"):
            silu_mid = gate.mid / (F32(1) + np.exp(-arg))
        silu = Env(silu_mid)
        if gate.lo is not None and gate.hi is not None:
            silu = self._silu_envelope(gate, silu_mid, 1.0 if alpha is None else alpha)
        if self.silu_store is not None:
            silu = _monotone(_store(self.silu_store, x_dtype), silu)
        a = _product(silu, up, to_f32)
        if self.store is not None:
            a = _monotone(_store(self.store, x_dtype), a)
        return a

    def _silu_envelope(self, gate: Env, silu_mid: Array, alpha: float) -> Env:
        """The range of ``silu_α(g) = g/(1 + exp(−α·g))`` (``α = 1``: silu; its one minimum
        is silu's scaled by ``1/α``) over ``[g_lo, g_hi]`` (float64), widened by the float32
        evaluation's relative error ``ρ = (1 + u_q)/((1 − ε_e)(1 − u)) − 1`` (``ε_e`` the
        ``exp`` error, plus ``exp(|αg|·u) − 1`` for the rounding of ``α·g`` where ``α ≠ 1``;
        ``u_q`` the division's); exact where nothing is free."""
        assert gate.lo is not None and gate.hi is not None
        g_lo, g_hi = gate.lo.astype(np.float64), gate.hi.astype(np.float64)
        with np.errstate(over="ignore"):
            s_lo = g_lo / (1 + np.exp(-alpha * g_lo))
            s_hi = g_hi / (1 + np.exp(-alpha * g_hi))
        argmin = _SILU_ARGMIN / alpha
        lo = np.minimum(s_lo, s_hi)
        lo = np.where((g_lo < argmin) & (g_hi > argmin), _SILU_MIN / alpha, lo)
        hi = np.maximum(s_lo, s_hi)
        eps_e: Any = 2 * self.exp_ulps * _U32
        margin = 1.0  # the relative rounding of α·g (none for α = 1)
        if alpha != 1.0:
            eps_e = eps_e + 1.01 * alpha * np.maximum(np.abs(g_lo), np.abs(g_hi)) * _U32
            margin += 2.0**-20
        u_q = _U32 * (1 + 2 * self.div_ulps)
        rho = (1 + u_q) / ((1 - eps_e) * (1 - _U32)) - 1 + 4 * 2.0**-53
        # exp(−α·g) overflows float32 below α·g ≈ −88.7: the kernel's silu is then ±0.
        huge = alpha * g_lo * margin < -math.log(float(np.finfo(F32).max))
        lo = np.where(huge, np.minimum(lo, 0), lo)
        hi = np.where(huge, np.maximum(hi, 0), hi)
        lo = lo - rho * np.abs(lo) - 2 * _TINY32
        hi = hi + rho * np.abs(hi) + 2 * _TINY32
        pinned = (gate.lo == gate.hi) & (self.exp_ulps == 0) & (self.div_ulps == 0)
        lo32 = np.where(pinned, silu_mid, np.minimum(to_f32(lo), silu_mid))
        hi32 = np.where(pinned, silu_mid, np.maximum(to_f32(hi), silu_mid))
        # float32 rounding of the float64 bound may land inside: step outward.
        lo32 = np.where(pinned, lo32, np.nextafter(lo32, F32(-np.inf)))
        hi32 = np.where(pinned, hi32, np.nextafter(hi32, F32(np.inf)))
        # α·gate >= 17: exp(−α·g) < 2^-24 even a few ulps off, so fl(1 + exp(−α·g)) = 1 and an
        # exact division returns g itself: silu is the gate's own envelope, no rounding slack.
        if self.div_ulps == 0:
            big = alpha * gate.lo.astype(np.float64) >= 17 * margin
            lo32 = np.where(big, gate.lo, lo32)
            hi32 = np.where(big, gate.hi, hi32)
        return Env(silu_mid, lo32.astype(F32), hi32.astype(F32))


@dataclass(frozen=True)
class Combine:
    """The weighted sum over a token's slots (§6 step 8; kernels.md rows 7, 8).

    ``weight``: ``"combine"`` (``y_k · p_k`` here, float32) or ``"gemm2"`` (already in ``y``).
    ``sum``: ``"f32_seq"`` (float32, sequentially in k order, one cast), ``"moe_sum"`` (vLLM:
    for top_k in ``x_dtype_topk`` a rounding to x's dtype after every add, otherwise float32
    in an order not promised, one cast).
    """

    weight: str = "combine"
    sum: str = "f32_seq"
    x_dtype_topk: tuple[int, ...] = ()

    def describe(self) -> str:
        where = "routed weight here" if self.weight == "combine" else "routed weight in GEMM2"
        if self.sum == "f32_seq":
            return f"{where}; float32, sequential in k order, one cast"
        return (f"{where}; top_k in {list(self.x_dtype_topk)}: x dtype after every add, "
                "else float32 in any order")

    def __call__(self, y: Env, probs: Array, x_dtype: Any) -> Env:
        """``y``: (tokens, top_k, K) float32; returns the sum before the final cast to x's
        dtype (float32; already x-dtype values where the profile sums in x's dtype)."""
        top_k = y.mid.shape[1]
        terms = [y.take((slice(None), k)) for k in range(top_k)]
        if self.weight == "combine":
            terms = [_monotone(_scaled_by(probs[:, k, None].astype(F32)), t)
                     for k, t in enumerate(terms)]
        to_x = cast(x_dtype)
        in_x = self.sum == "moe_sum" and top_k in self.x_dtype_topk
        rnd = (lambda a: to_x(to_f32(a))) if in_x else to_f32
        acc = terms[0]
        for t in terms[1:]:
            acc = _sum(acc, t, rnd)
        if self.sum != "f32_seq" and not in_x and top_k > 2 and acc.lo is not None:
            acc = _any_order(acc, terms)
        return acc


def _any_order(acc: Env, terms: list[Env]) -> Env:
    """Widen a sequential float32 sum's envelope to every summation order:
    ``|fl sum − exact| <= γ_{n−1}·Σ|terms|`` (Higham §4.2)."""
    assert acc.lo is not None and acc.hi is not None
    lo = np.zeros(acc.mid.shape)
    hi = np.zeros(acc.mid.shape)
    mag = np.zeros(acc.mid.shape)
    for t in terms:
        assert t.lo is not None and t.hi is not None
        lo += t.lo
        hi += t.hi
        mag += np.maximum(np.abs(t.lo), np.abs(t.hi))
    n = len(terms) - 1
    g = n * _U32 / (1 - n * _U32)
    return Env(acc.mid, np.minimum(acc.lo, to_f32(lo - g * mag)),
               np.maximum(acc.hi, to_f32(hi + g * mag)))


def _sum(a: Env, b: Env, rnd: Callable[[Array], Array]) -> Env:
    with np.errstate(invalid="ignore", over="ignore"):
        mid = rnd(a.mid + b.mid)
        if a.lo is None or a.hi is None or b.lo is None or b.hi is None:
            return Env(mid)
        return Env(mid, rnd(a.lo + b.lo), rnd(a.hi + b.hi))


# ---------------------------------------------------------------- the record


@dataclass(frozen=True)
class KernelProfile:
    """One real kernel pipeline as data: its steps, freedoms and shape domain."""

    name: str
    summary: str
    sources: str
    quantise: Quantiser
    gemm1: IntGemm
    swiglu: Swiglu
    requantise: Quantiser
    gemm2: IntGemm
    float_gemm1: FloatGemm
    float_swiglu: Swiglu
    float_gemm2: FloatGemm
    combine: Combine
    domain: ShapeDomain = field(default_factory=lambda: CONTRACT_DOMAIN)
    #: W4A8's GMM1 and GMM2 (``None``: the kernel has no W4A8 path).
    split_gemm1: SplitGemm | None = None
    split_gemm2: SplitGemm | None = None

    @property
    def freedoms(self) -> tuple[str, ...]:
        """What the kernel does not promise; each widens the judge's envelope by its bound."""
        found = ["float32 GEMM accumulation order (BF16/FP16 weights)"]
        if "f32_blocks" in (self.gemm1.accumulate, self.gemm2.accumulate):
            found.append("int8 K-block size (blocks summed in float32)")
        for label, s in (("W8A8", self.swiglu), ("float", self.float_swiglu)):
            if s.exp_ulps or s.div_ulps:
                found.append(f"{label} SwiGLU exp within {s.exp_ulps} ulp, division within "
                             f"{s.div_ulps} ulp")
        for label, qz in (("quantisation", self.quantise), ("requantisation", self.requantise)):
            if qz.div_ulps:
                found.append(f"{label} division within {qz.div_ulps} ulp")
        if self.combine.sum == "moe_sum":
            found.append("float32 top-k sum order (top_k outside "
                         f"{list(self.combine.x_dtype_topk)})")
        return tuple(found)

    def describe(self) -> str:
        """Every knob, one line each."""
        lines = [f"{self.name}: {self.summary}", f"  sources: {self.sources}"]
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if hasattr(value, "describe") and f.name != "domain":
                lines.append(f"  {f.name}: {value.describe()}")
        lines.append(f"  domain: {self.domain.describe()}")
        lines.append("  freedoms: " + ("; ".join(self.freedoms) or "none (bitwise)"))
        return "\n".join(lines)

    def int8_stages(
        self, q: Env, sigma1: Env, w1: Array, s1: Array, w2: Array, s2: Array,
        slot_p: Array, cfg: OpConfig, zero_rows: str,
    ) -> tuple[RoundingPoint, ...]:
        """§6 steps 2–7 for the rows of one expert, from quantised tokens ``q`` with their
        scales: each rounding point as ``(step, name, value)``, in pipeline order, ending with
        ``y`` (float32 holding x-dtype values; routed weight included if the profile applies
        it in GEMM2)."""
        x_dtype = DTYPES[cfg.x_dtype]
        return self._quantised_stages(
            lambda: self.gemm1(q, w1, s1, sigma1, slot_p, x_dtype),
            lambda q2, sigma2: self.gemm2(q2, w2, s2, sigma2, slot_p, x_dtype), cfg, zero_rows)

    def _quantised_stages(
        self, gemm1: Callable[[], Env], gemm2: Callable[[Env, Env], Env], cfg: OpConfig,
        zero_rows: str,
    ) -> tuple[RoundingPoint, ...]:
        """``gemm1``, the clamp and SwiGLU, the requantisation, then ``gemm2`` of the
        requantised rows and their scales: the rounding points W8A8 and W4A8 share."""
        h = gemm1()
        a = self.swiglu(h, cfg, DTYPES[cfg.x_dtype])
        q2, sigma2, _ = self.requantise(a, zero_rows)
        y = gemm2(q2, sigma2)
        return (("2-3", "h", h), ("4", "a", a), ("5", "q2", q2), ("5", "sigma2", sigma2),
                ("6-7", "y", y))

    def int8_ffn(
        self, q: Env, sigma1: Env, w1: Array, s1: Array, w2: Array, s2: Array,
        slot_p: Array, cfg: OpConfig, zero_rows: str,
    ) -> Env:
        """``y`` of :meth:`int8_stages`."""
        return self.int8_stages(q, sigma1, w1, s1, w2, s2, slot_p, cfg, zero_rows)[-1][2]

    def w4a8_stages(
        self, q: Env, sigma1: Env, weights: dict[str, Array], cfg: OpConfig, zero_rows: str,
    ) -> tuple[RoundingPoint, ...]:
        """W4A8 (variants.md) for the rows of one expert, each rounding point as in
        :meth:`int8_stages`: ``weights`` holds the unpacked int4 ``w1``/``w2`` (int8 values),
        ``scale1``/``scale2`` and ``bias1``/``bias2``; clamp, SwiGLU and requantisation are the
        W8A8 steps."""
        if self.split_gemm1 is None or self.split_gemm2 is None:
            raise ValueError(f"kernel profile {self.name!r} has no W4A8 path; use ascend-a3")
        gemm1, gemm2, x_dtype = self.split_gemm1, self.split_gemm2, DTYPES[cfg.x_dtype]
        return self._quantised_stages(
            lambda: gemm1(q, weights["w1"], weights["scale1"], weights["bias1"], sigma1, x_dtype),
            lambda q2, sigma2: gemm2(q2, weights["w2"], weights["scale2"], weights["bias2"],
                                     sigma2, x_dtype), cfg, zero_rows)

    def float_stages(
        self, x: Env, w1: Array, w2: Array, slot_p: Array, cfg: OpConfig
    ) -> tuple[RoundingPoint, ...]:
        """The BF16/FP16-weight path for the rows of one expert, each rounding point as in
        :meth:`int8_stages`."""
        x_dtype = DTYPES[cfg.x_dtype]
        h = self.float_gemm1(x, w1, slot_p, x_dtype)
        a = self.float_swiglu(h, cfg, x_dtype)
        y = self.float_gemm2(a, w2, slot_p, x_dtype)
        return (("2-3", "h", h), ("4", "a", a), ("6-7", "y", y))

    def float_ffn(self, x: Env, w1: Array, w2: Array, slot_p: Array, cfg: OpConfig) -> Env:
        """``y`` of :meth:`float_stages`."""
        return self.float_stages(x, w1, w2, slot_p, cfg)[-1][2]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def ideal_assumptions(self, x_dtype: str) -> IdealAssumptions:
        """What the ideal judge's row test may assume of this kernel (``oracle.rowtest``): its
        coarsest stored dtype (every profile stores ``y`` in x's dtype; the Ascend GEMM
        intermediates are float16, finer than bfloat16), its quantisers' tie rules and ``amax``
        floor, and where its combine sums in x's dtype."""
        from oracle.rowtest import IdealAssumptions

        in_x = self.combine.x_dtype_topk if self.combine.sum == "moe_sum" else ()
        return IdealAssumptions(
            stored_dtype=x_dtype,
            ties=tuple(sorted({self.quantise.ties, self.requantise.ties})),
            amax_floor=self.quantise.amax_floor,
            x_dtype_combine_topk=tuple(in_x),
        )


_STEP_TYPES: dict[str, type] = {
    "quantise": Quantiser, "requantise": Quantiser, "gemm1": IntGemm, "gemm2": IntGemm,
    "swiglu": Swiglu, "float_swiglu": Swiglu, "float_gemm1": FloatGemm,
    "float_gemm2": FloatGemm, "combine": Combine, "domain": ShapeDomain,
    "split_gemm1": SplitGemm, "split_gemm2": SplitGemm,
}
#: Fields older files (and profiles without the step) may leave out or set to None.
_OPTIONAL = ("domain", "split_gemm1", "split_gemm2")


def profile_from_dict(data: dict[str, Any]) -> KernelProfile:
    """Rebuild a profile from :meth:`KernelProfile.to_dict` (a counterexample's manifest).
    Raises ``ValueError`` (``TypeError`` for a wrong field) on anything else."""
    if not isinstance(data, dict):
        raise ValueError("a kernel profile must be a JSON object")
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(KernelProfile):
        if f.name not in data or (f.name in _OPTIONAL and data[f.name] is None):
            if f.name in _OPTIONAL:
                continue
            raise ValueError(f"kernel profile: missing field {f.name!r}")
        value = data[f.name]
        step = _STEP_TYPES.get(f.name)
        if step is not None:
            if not isinstance(value, dict):
                raise ValueError(f"kernel profile: {f.name} must be an object")
            value = step(**{k: tuple(v) if isinstance(v, list) else v for k, v in value.items()})
        elif not isinstance(value, str):
            raise ValueError(f"kernel profile: {f.name} must be a string")
        kwargs[f.name] = value
    return KernelProfile(**kwargs)


# ---------------------------------------------------------------- the profiles

#: The Ascend operator (§6), unchanged bit for bit for W8A8; its BF16/FP16-weight path as
#: ``variants.md`` reads the kernel (float32 accumulation in any order, GMM1 output in x's
#: dtype, SwiGLU cast to x's dtype with ties away from zero). The vector unit's ``exp`` is not
#: documented: allowed 3 ulp, NumPy's own test tolerance for float32 ``exp`` [inferred];
#: divisions are IEEE float32 [inferred].
ASCEND_A3 = KernelProfile(
    name="ascend-a3",
    summary="vllm-ascend dispatch_ffn_combine on Atlas A3 (W8A8 §6; BF16/FP16 per variants.md)",
    sources="dispatch_ffn_combine.md §6 [code]; variants.md 'BF16 / FP16 weights' [code]; "
            "exp accuracy [inferred]",
    quantise=Quantiser(scale="divide", ties="away"),
    gemm1=IntGemm("int32", ("col", "fp16", "row")),
    swiglu=Swiglu(exp_ulps=3),
    requantise=Quantiser(scale="reciprocal", ties="even"),
    gemm2=IntGemm("int32", ("col", "fp16", "row", "x")),
    float_gemm1=FloatGemm(("x",)),
    float_swiglu=Swiglu(store="x_away", exp_ulps=3),
    float_gemm2=FloatGemm(("x",)),
    combine=Combine("combine", "f32_seq"),
    domain=A3_DOMAIN,
    split_gemm1=SplitGemm(),
    split_gemm2=SplitGemm("x"),
)

#: vLLM's Triton fused_moe (kernels.md, both vLLM columns): the CUDA quantiser
#: ``scaled_int8_quant`` (reciprocal multiply, half to even, no floor) by default; int32 dots per
#: K block summed in float32; GEMM outputs in x's dtype; ``silu_and_mul`` rounds silu to x's
#: dtype, multiplies in float32 and rounds again; the routed weight in GEMM2's epilogue;
#: ``moe_sum`` in x's dtype for top_k 2–4. CUDA's ``expf`` is within 2 ulp (CUDA C
#: Programming Guide, accuracy tables); divisions IEEE (no fast-math) [inferred].
VLLM_TRITON = KernelProfile(
    name="vllm-triton",
    summary="vLLM Triton fused_moe (int8 W8A8 per-token, and BF16/FP16 weights)",
    sources="kernels.md [code]: fused_moe.py, moe_align_sum_kernels.cu, int8_quant_kernels.cu; "
            "expf accuracy [doc]; no fast-math [inferred]",
    quantise=Quantiser(scale="reciprocal", ties="even"),
    gemm1=IntGemm("f32_blocks", ("row", "col", "x")),
    swiglu=Swiglu(silu_store="x", store="x", exp_ulps=2),
    requantise=Quantiser(scale="reciprocal", ties="even"),
    gemm2=IntGemm("f32_blocks", ("slot", "row", "col", "x")),
    float_gemm1=FloatGemm(("x",)),
    float_swiglu=Swiglu(silu_store="x", store="x", exp_ulps=2),
    float_gemm2=FloatGemm(("slot", "x")),
    combine=Combine("gemm2", "moe_sum", (2, 3, 4)),
    domain=VLLM_DOMAIN,
)

PROFILES: dict[str, KernelProfile] = {p.name: p for p in (ASCEND_A3, VLLM_TRITON)}
DEFAULT_KERNEL = ASCEND_A3.name


def register(profile: KernelProfile) -> KernelProfile:
    """Make ``profile`` known by name (``oracle.run(p, numerics=profile.name)``, the CLI)."""
    PROFILES[profile.name] = profile
    return profile


def get_kernel(kernel: str | KernelProfile) -> KernelProfile:
    """A profile by name (or the profile itself); ``ValueError`` names the known ones."""
    if isinstance(kernel, KernelProfile):
        return kernel
    try:
        return PROFILES[kernel]
    except KeyError:
        raise ValueError(
            f"unknown kernel profile {kernel!r}; known: {', '.join(PROFILES)}"
        ) from None

