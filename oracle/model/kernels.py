"""Kernel numerics profiles: one frozen record per real kernel pipeline.

A :class:`KernelProfile` is data. It names a real kernel (``docs/contract/kernels.md``: the
table of knobs on which real kernels differ) and holds one :class:`Pipeline` per variant it
supports, keyed by the variant table :data:`spec.fields.VARIANTS` (``w8a8``, ``w4a8``,
``float``): a profile that lacks a variant says so by not having its pipeline. A pipeline is
composed from one step record per §6 step of ``docs/contract/dispatch_ffn_combine.md``:

==========  =====================================================================
step        pipeline field (step record)
==========  =====================================================================
1           ``quantise`` (:class:`Quantiser`, :class:`GroupQuantiser` for FP8; ``None``: float
            activations)
2–3         ``gemm1`` (:class:`IntGemm`, :class:`SplitGemm` for W4A8, :class:`BlockGemm` for
            FP8, :class:`FloatGemm`)
4           ``swiglu`` (:class:`Swiglu`): silu evaluation, stored dtypes, gate/up order
5           ``requantise`` (:class:`Quantiser`, :class:`GroupQuantiser`; ``None``: none)
6–7         ``gemm2``, where the routed weight may be applied
8           the profile's ``combine`` (:class:`Combine`): routed weight, dtype, order
==========  =====================================================================

plus the kernel's **freedoms** (what it does not promise: a float32 sum order, an ``exp`` or a
division within some ulps, flushing float32 subnormals to zero) and its **shape domain**
(:class:`spec.limits.ShapeDomain`).

Every step computes on :class:`Env` values: the model's value (``mid``, one legitimate
evaluation, pinned to NumPy float32 operations) and, when asked for, an envelope ``[lo, hi]``
that contains every value a kernel with this profile may compute, whatever it does with its
freedoms. The envelope is exact interval arithmetic: every step is monotone in each input
(roundings are monotone, products are bounded by their corners, silu is handled by its one
minimum), and a freedom widens the envelope by exactly its bound. Where a profile has no
freedom, ``lo = hi = mid`` and the judge's comparison is bitwise; a flip of one stored
intermediate, or of one int8 value after a requantisation, shows up as a nonzero envelope on
exactly the values it can reach.

Adding a profile is one record (see :data:`PROFILES`; :meth:`KernelProfile.with_steps` changes
steps of an existing one), at most plus one new step class. Adding a variant is a row of
:data:`spec.fields.VARIANTS` and a pipeline entry in each profile that has it
(``docs/architecture.md``, "Adding a variant").
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from oracle.adapters.gemm import Product, weight_products
from oracle.model.arithmetic import exact_int_matmul, exact_int_matmuls, round_half_away
from spec import DTYPES
from spec.config import OpConfig
from spec.fields import VARIANT_NAMES
from spec.fp8 import BLOCK, E4M3_MAX, blocks, to_e4m3, ue8m0_up
from spec.int4 import split_activation
from spec.limits import A3_DOMAIN, CONTRACT_DOMAIN, VLLM_DOMAIN, ShapeDomain
from spec.mxfp4 import E2M1, E2M1_MAX
from spec.nvfp4 import NV_BLOCK, dequantise_nv, quantise_nv

__all__ = [
    "ASCEND_A3",
    "DEEPGEMM_SM100_FP8",
    "DEFAULT_FALSE_ALARM",
    "DEFAULT_KERNEL",
    "FP8_DOT_BITS",
    "FP8_SCALE_RULES",
    "PIPELINE_STEPS",
    "PROFILES",
    "TORCH_GROUPED_MM",
    "TORCH_SCALED_GROUPED_MM",
    "VLLM_MXFP4",
    "VLLM_NVFP4",
    "VLLM_TRITON",
    "VLLM_TRITON_FP8",
    "VLLM_TRITON_TQ",
    "BlockGemm",
    "Combine",
    "Env",
    "FloatGemm",
    "Fp4Gemm",
    "GroupQuantiser",
    "IdealAssumptions",
    "IntGemm",
    "KernelProfile",
    "Pipeline",
    "Quantiser",
    "SplitGemm",
    "Swiglu",
    "get_kernel",
    "profile_from_dict",
    "register",
]

Array = np.ndarray[Any, Any]
#: One expert's tensors by field name (:data:`spec.fields.FIELDS`), packed int4 unpacked.
Weights = Mapping[str, Array]
#: One rounding point of a pipeline: (§6 step, name, value with its envelope).
RoundingPoint = tuple[str, str, "Env"]
F32 = np.float32
_U32 = 2.0**-24  # float32 unit roundoff
_TINY32 = float(np.finfo(F32).smallest_subnormal)
#: float32's smallest normal value, 2^-126. A step with ``ftz`` may read any operand and write
#: any float32 result of magnitude up to it as 0 (2^-126 itself included: hardware that detects
#: tininess before rounding flushes a result that rounds up to it).
_NORMAL32 = float(np.finfo(F32).smallest_normal)
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


def _flush(a: Array) -> Array:
    """What a flush-to-zero kernel makes of ``a``: 0 where ``|a| <= 2^-126``."""
    return np.asarray(np.where(np.abs(a) <= _NORMAL32, 0, a).astype(a.dtype, copy=False))


def _may_flush(v: Env, ftz: bool) -> Env:
    """With ``ftz``, every value of ``v``'s envelope or its flush to zero (the kernel may flush
    or not, element by element). Flushing is monotone, so the hull of both is the envelope's
    bounds each moved to 0 where flushing moves it outward: exact interval arithmetic still.
    The model's value stays the IEEE one."""
    if not ftz or v.lo is None or v.hi is None:
        return v
    return Env(v.mid, np.minimum(v.lo, _flush(v.lo)), np.maximum(v.hi, _flush(v.hi)))


def _scale(v: Env, factor: Array, ftz: bool) -> Env:
    """``fl32(v · factor)`` for a fixed float32 ``factor`` (a scale, a routed weight); with
    ``ftz``, a subnormal factor may be read as 0 and the product may flush."""
    if ftz and v.lo is not None and ((factor != 0) & (np.abs(factor) <= _NORMAL32)).any():
        wide = _may_flush(Env(factor, factor, factor), True)
        return _may_flush(_product(v, wide, to_f32), True)
    return _may_flush(_monotone(_scaled_by(factor), v), ftz)


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


def _ftz(step: Any) -> str:
    """The tail of a step's ``describe`` line that says it may flush subnormals."""
    return "; may flush float32 subnormals to zero" if step.ftz else ""


def _round_to_int(ties: str) -> Callable[[Array], Array]:
    if ties == "even":
        return np.rint
    if ties == "away":
        return round_half_away
    if ties == "trunc":  # not a rounding: a defect the diagnosis names (C's (int8_t)v)
        return np.trunc
    raise ValueError(f"ties {ties!r} is not 'even' or 'away' (or 'trunc', toward zero)")


# ---------------------------------------------------------------- steps

#: vLLM's Triton ``per_token_quant_int8`` floors ``amax`` at 1e-10 (int8_utils.py [code]).
VLLM_INT8_AMAX_FLOOR = 1e-10


@dataclass(frozen=True)
class Quantiser:
    """Per-token symmetric int8 quantisation (§6 steps 1 and 5; kernels.md, first row).

    ``scale="divide"``: ``σ = fl(amax/127)``, ``q = R(fl(a/σ))``; ``"reciprocal"``:
    ``q = R(fl(a · fl(127/amax)))`` with ``σ = fl(amax/127)`` for the dequant. ``ties``: the
    rounding ``R`` to integers. ``amax_floor``: ``amax = max(amax, floor)`` (vLLM's Triton
    quantiser, 1e-10), which also makes a zero row quantise to 0.

    Division is a freedom of its own (issue 24): ``div_ulps`` bounds how many ulps the float32
    division that forms ``q`` (the quotient ``a/σ``, or the reciprocal ``127/amax``) may lie
    from correctly rounded: Triton's ``/`` and CUDA's fast fp32 division are within 2 ulp
    (``div.full.f32``), and torch's ``127.0 / amax`` is ``reciprocal(amax)·127``, two roundings,
    also within 2 ulp. The envelope carries it to ``q ∈ {k, k + 1}`` exactly where
    ``a·127/amax`` lies that close to a tie. ``scale_ulps`` does the same for the dequant
    scale ``σ = amax/127`` (0: pinned, as the source pins it). 0 everywhere: IEEE division,
    the model's own. ``source``: the function that quantises, for ``dfc-oracle kernels -v``.
    ``ftz``: the step may flush float32 subnormals to zero, in what it reads and what it
    computes (:meth:`KernelProfile.with_ftz`): a flushed ``σ`` is 0, so a row whose
    ``amax/127`` is below 2^-126 may dequantise to 0.
    """

    scale: str = "divide"
    ties: str = "away"
    amax_floor: float | None = None
    div_ulps: int = 0
    scale_ulps: int = 0
    source: str = ""
    ftz: bool = False

    def __post_init__(self) -> None:
        if self.scale not in ("divide", "reciprocal"):
            raise ValueError(f"scale {self.scale!r} is not 'divide' or 'reciprocal'")
        _round_to_int(self.ties)
        for name in ("div_ulps", "scale_ulps"):
            ulps = getattr(self, name)
            if not isinstance(ulps, int) or isinstance(ulps, bool) or not 0 <= ulps <= 64:
                raise ValueError(f"{name} {ulps!r} is not an integer from 0 to 64; give how "
                                 "many float32 ulps the kernel's division may be off")

    def describe(self) -> str:
        formula = "a / fl(amax/127)" if self.scale == "divide" else "a · fl(127/amax)"
        floor = f", amax floored at {self.amax_floor:g}" if self.amax_floor else ""
        what = "quotient" if self.scale == "divide" else "reciprocal"
        div = (f"; {what} within {self.div_ulps} ulp" if self.div_ulps
               else f"; IEEE {what}")
        scale = (f", scale within {self.scale_ulps} ulp" if self.scale_ulps
                 else ", scale IEEE (pinned)")
        source = f" [{self.source}]" if self.source else ""
        return f"int8 of {formula}, ties {self.ties}{floor}{div}{scale}{_ftz(self)}{source}"

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
            q_env, s_env = self._envelope(_may_flush(a, self.ftz), q, sigma, rnd)
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
        # n ulps of a float32 value are at most 2n·u relative.
        d, d_s = self.div_ulps * 2 * _U32, self.scale_ulps * 2 * _U32
        s_lo = to_f32(amax_lo / 127).astype(np.float64) * (1 - d_s)
        s_hi = to_f32(amax_hi / 127).astype(np.float64) * (1 + d_s)
        sigma_env = _may_flush(Env(sigma, np.minimum(s_lo, sigma), np.maximum(s_hi, sigma)),
                               self.ftz)
        assert sigma_env.lo is not None
        s_lo = np.minimum(s_lo, sigma_env.lo)  # a flushed σ (0): the quotient is unbounded
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
EPILOGUE_OPS = ("col", "row", "slot", "slot_x", "fp16", "x", "x_away")


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
    x_dtype: Any, ftz: bool,
) -> Env:
    v = _may_flush(v, ftz)
    for op in ops:
        if op == "col":
            assert col is not None
            v = _scale(v, col, ftz)
        elif op == "row":
            assert row is not None
            v = _may_flush(_product(v, _may_flush(row, ftz).take((slice(None), None)), to_f32),
                           ftz)
        elif op in ("slot", "slot_x"):  # slot_x: the routed weight cast to x's dtype first
            assert slot is not None
            weight = cast(x_dtype)(slot) if op == "slot_x" else slot
            v = _scale(v, weight[:, None].astype(F32), ftz)
        elif op in EPILOGUE_OPS:  # a cast: a float32 normal value stays at least 2^-126
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
    ``ftz``: the epilogue may flush float32 subnormals to zero (the integer sums have none).
    """

    accumulate: str = "int32"
    epilogue: tuple[str, ...] = ("col", "fp16", "row")
    block: int = 32
    ftz: bool = False

    def describe(self) -> str:
        acc = ("exact int32" if self.accumulate == "int32"
               else f"int32 per {self.block}-wide K block, blocks summed in float32")
        return f"{acc}; epilogue {' -> '.join(self.epilogue)}{_ftz(self)}"

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
        return _apply_epilogue(self.epilogue, acc, col=col, row=row, slot=slot, x_dtype=x_dtype,
                               ftz=self.ftz)

    def apply(self, a: Env, sigma: Env | None, weights: Weights, which: int, slot: Array,
              x_dtype: Any) -> Env:
        """The pipeline's call: GEMM ``which`` (1 or 2) of one expert's ``weights``."""
        assert sigma is not None
        return self(a, weights[f"w{which}"], weights[f"scale{which}"], sigma, slot, x_dtype)


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

    ``ftz``: the step may flush float32 subnormals to zero. ``16·C_hi + C_lo`` is a multiple
    of 2^-24 (fp16 values), never subnormal, so a bias read as 0 changes ``t`` only where that
    sum is 0, and then ``t`` is the bias or its flush: the hull with 0 holds every case.
    """

    store: str | None = None
    ftz: bool = False

    def describe(self) -> str:
        stored = "float32" if self.store is None else self.store
        return ("q = 16·hi + lo + 8; C_hi, C_lo = fp16(int4 GEMM · s); "
                f"fl(fl(16·C_hi + C_lo) + bias) · σ, stored as {stored}{_ftz(self)}")

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
        return _apply_epilogue(ops, acc, col=None, row=row, slot=None, x_dtype=x_dtype,
                               ftz=self.ftz)

    def apply(self, a: Env, sigma: Env | None, weights: Weights, which: int, slot: Array,
              x_dtype: Any) -> Env:
        """The pipeline's call: GEMM ``which`` (1 or 2) of one expert's ``weights``."""
        assert sigma is not None
        return self(a, weights[f"w{which}"], weights[f"scale{which}"], weights[f"bias{which}"],
                    sigma, x_dtype)


@dataclass(frozen=True)
class FloatGemm:
    """A BF16/FP16-weight GEMM: exact products, a float32 accumulator in an order the kernel
    does not promise (tensor cores, BLAS blocking), then ``epilogue``.

    The model's value is the exact sum rounded once to float32; the envelope holds every
    order: ``|fl32 sum − exact| <= γ_n·Σ|terms|`` (Higham, *Accuracy and Stability of Numerical
    Algorithms*, §4.2), widened by the float64 evaluation's own ``γ_n`` bound.

    ``ftz``: the step may flush float32 subnormals to zero: activations and weights read as 0
    (each such term moves the sum by at most ``|a_j|·|w_jc|``), and each of the ``n``
    products and ``n − 1`` partial sums written as 0 (at most 2^-126 each).
    """

    epilogue: tuple[str, ...] = ("x",)
    ftz: bool = False

    def describe(self) -> str:
        return (f"float32 accumulation in any order; epilogue {' -> '.join(self.epilogue)}"
                f"{_ftz(self)}")

    def __call__(self, a: Env, w: Array, slot: Array | None, x_dtype: Any,
                 col: Array | None = None) -> Env:
        # every product of w in one pass, float64 chunks (oracle.adapters.gemm): never a
        # float64 copy of the whole weight (at K = 7168 that copy was the model's cost)
        mid = Product(a.mid.astype(np.float64))
        a = _may_flush(a, self.ftz)
        if a.lo is None or a.hi is None:
            s, = weight_products(w, [mid], np.float64)
            acc = Env(to_f32(s))
        else:
            n = a.mid.shape[1]
            g32, g64 = n * _U32 / (1 - n * _U32), n * 2.0**-53 / (1 - n * 2.0**-53)
            a_abs = np.maximum(np.abs(a.lo), np.abs(a.hi)).astype(np.float64)
            rad_in = a.radius().astype(np.float64)
            spread = np.flatnonzero((rad_in > 0).any(axis=1))
            products = [mid, Product(a_abs, "abs"), Product(rad_in[spread], "abs")]
            if self.ftz:
                products.append(Product(a_abs, "tiny"))
            with np.errstate(invalid="ignore"):
                s, mag, spread_in, *tiny = weight_products(w, products, np.float64)
                rad = (g32 + g64) * mag * (1 + 1e-12)
                rad[spread] += spread_in
                if self.ftz:
                    rad += tiny[0] + 2 * n * _NORMAL32
            acc = Env(to_f32(s), to_f32(s - rad), to_f32(s + rad))
        return _apply_epilogue(self.epilogue, acc, col=col, row=None, slot=slot,
                               x_dtype=x_dtype, ftz=self.ftz)

    def apply(self, a: Env, sigma: Env | None, weights: Weights, which: int, slot: Array,
              x_dtype: Any) -> Env:
        """The pipeline's call: GEMM ``which`` (1 or 2) of one expert's ``weights``."""
        return self(a, weights[f"w{which}"], slot, x_dtype)


# ---------------------------------------------------------------- FP8 block scale


#: The FP8 format's unit roundoff (3 mantissa bits: 2^-4) and its underflow error (half the
#: smallest subnormal 2^-9): ``|e4m3(t) − t| <= 2^-4·|t| + 2^-10`` below the saturation.
E4M3_UNIT, E4M3_TINY = 2.0**-4, 2.0**-10
#: Significand bits kept by Hopper's FP8 tensor-core accumulation inside one ``tl.dot`` tile:
#: "around 14 bits" (DeepSeek-V3 technical report, arXiv 2412.19437, §3.3.2 [doc]); Triton
#: accumulates fp8 dots imprecisely on sm90 unless told otherwise (``max_num_imprecise_acc``)
#: [inferred]. 13 leaves a bit of margin.
FP8_DOT_BITS = 13
#: Triton's smallest ``tl.dot`` K width: the most tiles a kernel may split K into [inferred].
_MIN_TILE_K = 16


@dataclass(frozen=True)
class GroupQuantiser:
    """Per-token, per-group e4m3 quantisation of the activations (FP8 block scale; formats.md,
    vLLM's ``per_token_group_quant_fp8`` [code]): per row and ``group`` consecutive columns
    (the last group may be partial: quantised as if zero-padded [inferred]; ``None``: the
    whole row, FP8 per token as vLLM's ``scaled_fp8_quant(use_per_token_if_dynamic=True)``),
    ``amax = max(max|a|, amax_floor)``, ``σ = fl(amax/448)`` (``ue8m0``: rounded up to a power
    of two, :func:`spec.fp8.ue8m0_up`), ``q = e4m3(clamp(fl(a/σ), ±448))`` (``scale =
    "reciprocal"``: ``fl(a·fl(448/amax))``, DeepGEMM's ``per_token_cast_to_fp8``; with
    ``ue8m0``, ``fl(a·fl(1/σ))``). ``div_ulps``: how far the kernel's float32 divisions may lie
    from correctly rounded.

    ``σ`` is one float32 per (row, group). With an envelope, ``q``'s ``[lo, hi]`` bounds the
    kernel's dequantised value ``q'·σ'`` **in units of the model's σ**, whatever σ' and q' its
    freedoms give (q and σ move together; the GEMM only reads their product).

    ``ftz``: the step may flush float32 subnormals to zero in what it reads (a subnormal
    activation quantised as 0). ``σ`` itself never flushes: ``amax_floor/448`` must then be
    normal (vLLM's 1e-10 and DeepGEMM's 1e-4 are), else ``ValueError``.
    """

    group: int | None = BLOCK
    amax_floor: float = 1e-10
    scale: str = "divide"
    ue8m0: bool = False
    div_ulps: int = 0
    ftz: bool = False

    def __post_init__(self) -> None:
        if self.scale not in ("divide", "reciprocal"):
            raise ValueError(f"scale {self.scale!r} is not 'divide' or 'reciprocal'")
        if self.ftz and self.amax_floor / E4M3_MAX < _NORMAL32:
            raise ValueError(f"amax_floor {self.amax_floor:g} with ftz: σ = amax/448 may be a "
                             f"float32 subnormal that a flushing kernel reads as 0; give a "
                             f"floor of at least {E4M3_MAX * _NORMAL32:.3g} or ftz=False")

    def describe(self) -> str:
        formula = "a / σ" if self.scale == "divide" else "a · (1/σ)"
        pow2 = ", σ rounded up to a power of two (UE8M0)" if self.ue8m0 else ""
        per = f" and {self.group} columns" if self.group else ""
        return (f"e4m3 of clamp({formula}) per token{per}, σ = "
                f"max(amax, {self.amax_floor:g})/448{pow2}{_ftz(self)}")

    def _grouped(self, a: Array) -> Array:
        """``(rows, groups, group)`` view of ``a`` zero-padded to whole groups."""
        rows, cols = a.shape
        group = self.group or max(cols, 1)
        padded = np.zeros((rows, blocks(cols, group) * group), a.dtype)
        padded[:, :cols] = a
        return padded.reshape(rows, padded.shape[1] // group, group)  # rows may be 0

    def _sigma(self, amax: Array) -> Array:
        s = to_f32(np.maximum(amax, F32(self.amax_floor)) / F32(E4M3_MAX))
        return ue8m0_up(s) if self.ue8m0 else s

    def _quotient(self, a: Array, sigma: Array, amax: Array) -> Array:
        """``fl(a/σ)`` or ``fl(a·inv)`` per element (``a``, ``σ`` grouped)."""
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            if self.scale == "divide":
                return to_f32(a / sigma[..., None])
            inv = (F32(1) / sigma if self.ue8m0
                   else F32(E4M3_MAX) / np.maximum(amax, F32(self.amax_floor)))
            return to_f32(a * to_f32(inv)[..., None])

    def __call__(self, a: Env, zero_rows: str) -> tuple[Env, Env, Array]:
        """``(q, σ, degenerate)``: e4m3 values (float32, ``(rows, K)``), the scales
        ``(rows, groups)`` and no degenerate rows (the floor keeps every σ positive)."""
        rows, cols = a.mid.shape
        g = self._grouped(a.mid)
        amax = np.abs(g).max(axis=2, initial=0).astype(F32)
        sigma = self._sigma(amax)
        flat = (rows, g.shape[1] * g.shape[2])  # named: NumPy infers no -1 at 0 rows
        q = to_e4m3(self._quotient(g, sigma, amax)).astype(F32).reshape(flat)[:, :cols]
        degenerate = np.zeros(rows, dtype=bool)
        if a.lo is None or a.hi is None:
            return Env(q), Env(sigma), degenerate
        a = _may_flush(a, self.ftz)
        assert a.lo is not None and a.hi is not None
        pinned = bool(np.all(a.lo == a.mid) and np.all(a.hi == a.mid)) and not self.div_ulps
        if pinned:
            return Env(q, q, q), Env(sigma, sigma, sigma), degenerate
        return self._envelope(a, q, sigma), Env(sigma, sigma, sigma), degenerate

    def _envelope(self, a: Env, q: Array, sigma: Array) -> Env:
        """The kernel's ``q'·σ'`` over every input in ``a``'s envelope and every division within
        ``div_ulps``, in units of the model's ``σ``: ``σ'`` spans the rounded scales of the
        group's smallest and largest possible amax, ``t' = a'/σ'`` its four corners widened by
        the division's error, and the e4m3 rounding is monotone."""
        assert a.lo is not None and a.hi is not None
        rows, cols = a.mid.shape
        lo, hi = self._grouped(a.lo), self._grouped(a.hi)
        straddle = (lo <= 0) & (hi >= 0)
        amax_lo = np.where(straddle, 0, np.minimum(np.abs(lo), np.abs(hi))).max(axis=2)
        amax_hi = np.maximum(np.abs(lo), np.abs(hi)).max(axis=2)
        d = (1 + self.div_ulps) * 2 * _U32  # both the scale's and the quotient's division
        s_lo = self._sigma(amax_lo.astype(F32)).astype(np.float64) * (1 - d)
        s_hi = self._sigma(amax_hi.astype(F32)).astype(np.float64) * (1 + d)
        with np.errstate(divide="ignore", invalid="ignore"):
            corners = np.stack([x.astype(np.float64) / s[..., None]
                                for x in (lo, hi) for s in (s_lo, s_hi)])
        t_lo = corners.min(0) - d * np.abs(corners).max(0)
        t_hi = corners.max(0) + d * np.abs(corners).max(0)
        q_lo = to_e4m3(to_f32(t_lo)).astype(np.float64)
        q_hi = to_e4m3(to_f32(t_hi)).astype(np.float64)
        # the monotone float32 rounding of t may land inside: e4m3 is coarser, one step suffices
        q_lo = np.minimum(q_lo, to_e4m3(np.nextafter(to_f32(t_lo), F32(-np.inf))).astype(float))
        q_hi = np.maximum(q_hi, to_e4m3(np.nextafter(to_f32(t_hi), F32(np.inf))).astype(float))
        s_mid = sigma.astype(np.float64)[..., None]
        v_lo = np.minimum(q_lo * s_lo[..., None], q_lo * s_hi[..., None]) / s_mid
        v_hi = np.maximum(q_hi * s_lo[..., None], q_hi * s_hi[..., None]) / s_mid
        v_lo, v_hi = (v.reshape(rows, v.shape[1] * v.shape[2])[:, :cols] for v in (v_lo, v_hi))
        return Env(q, np.minimum(v_lo, q), np.maximum(v_hi, q))


@dataclass(frozen=True)
class BlockGemm:
    """The FP8 block-scale GEMM (formats.md, FP8 block scale, "Accumulation"; vLLM's Triton
    ``fused_moe_kernel`` with ``block_shape`` [code]): per K block of ``block`` columns,
    ``P = Σ q·w`` over the block, ``acc += fl(fl(P·σ_a[row, kb])·σ_w[kb, nb])``, the blocks in
    K order into a float32 accumulator; then ``epilogue`` (:data:`EPILOGUE_OPS`; vLLM:
    the routed weight in GEMM2, the cast to x's dtype).

    The model's ``P`` is the exact block sum rounded once to float32 (exact in float64:
    e4m3 × e4m3 products span 2^-18 … 2^18, 128 of them fit 53 bits). The kernel's freedoms:
    the tile width ``BLOCK_SIZE_K`` (a divisor of the block: each tile scaled and added on its
    own), the order and precision of the in-tile sum (``dot_bits`` significand bits; float32
    is 24), and the order of the two scale products (``(a_scale·b_scale)`` first in some vLLM
    versions). The envelope is the exact value's range over the inputs' envelope, widened by
    ``(γ_dot(span) + γ32(K/16) + 3u32)·Σ|a_j·w_j|``, ``span`` the products a dot sums at
    ``dot_bits`` before its sum joins float32 (``dot_span``; ``None``: the block).

    ``block=None``: one block over all of K with per-output-channel weight scales ``(N,)``
    (FP8 per token and channel: ``fl(fl(P·σ_a[row])·σ_w[col])`` with ``P`` the whole dot).
    Weights without scales (MXFP4, dequantised exactly to float32 with their e8m0 scales,
    which are per column within a K block): ``σ_w = 1``, so each block adds ``fl(P·σ_a)``.

    ``ftz``: the step may flush float32 subnormals to zero: a subnormal scale (activation or
    weight) read as 0, which may drop its block's whole term, and each of the two scale
    products and the accumulation per block written as 0 (at most 2^-126 each); then the
    epilogue's. e4m3 products are normal (at least 2^-18), so the dots never flush.
    """

    epilogue: tuple[str, ...] = ("x",)
    block: int | None = BLOCK
    dot_bits: int = 24
    dot_span: int | None = None
    ftz: bool = False

    def describe(self) -> str:
        if self.block is None:
            return (f"one e4m3 dot over K ({self.dot_bits}-bit sums of {self.dot_span}), × the "
                    f"token's and the column's scales; epilogue {' -> '.join(self.epilogue)}"
                    f"{_ftz(self)}")
        return (f"e4m3 dots per {self.block}-wide K block ({self.dot_bits}-bit in-tile sums), "
                f"each × activation and weight block scales into a float32 accumulator; "
                f"epilogue {' -> '.join(self.epilogue)}{_ftz(self)}")

    def _width(self, k: int) -> int:
        return self.block or max(k, 1)

    def scales(self, w_scale: Array | None, k: int, n: int) -> Array:
        """The weight scale of every (K block, column): ``(ceil(K/block), n)`` (ones for
        weights without scales)."""
        if w_scale is None:
            return np.ones((blocks(k, self._width(k)), n), F32)
        if self.block is None:
            return w_scale.reshape(1, n)
        return np.repeat(w_scale, self.block, axis=1)[:, :n]

    def __call__(self, q: Env, sigma: Env, w: Array, w_scale: Array | None, slot: Array | None,
                 x_dtype: Any) -> Env:
        rows, k = q.mid.shape
        n = w.shape[1]
        w64 = w.astype(np.float64)
        sw = self.scales(w_scale, k, n)
        acc = np.zeros((rows, n), F32)
        with np.errstate(over="ignore", invalid="ignore"):
            width = self._width(k)
            for b in range(blocks(k, width)):
                cols = slice(b * width, (b + 1) * width)
                p = to_f32(q.mid[:, cols].astype(np.float64) @ w64[cols])
                acc = to_f32(acc + to_f32(to_f32(p * sigma.mid[:, b, None]) * sw[b]))
        env = Env(acc)
        if q.lo is not None and q.hi is not None:
            env = self._envelope(q, sigma, w64, w_scale, acc)
        return _apply_epilogue(self.epilogue, env, col=None, row=None, slot=slot,
                               x_dtype=x_dtype, ftz=self.ftz)

    def _envelope(self, q: Env, sigma: Env, w64: Array, w_scale: Array | None,
                  acc: Array) -> Env:
        assert q.lo is not None and q.hi is not None
        k, n = w64.shape
        width = self._width(k)
        s = np.repeat(sigma.mid.astype(np.float64), width, axis=1)[:, :k]
        lo, hi = q.lo * s, q.hi * s
        ws = self.scales(w_scale, k, n).astype(np.float64)
        wd = w64 * np.repeat(ws, width, axis=0)[:k]
        wd_abs = np.abs(wd)
        center = (lo + hi) / 2 @ wd
        mag = np.maximum(np.abs(lo), np.abs(hi)) @ wd_abs
        radius = (hi - lo) / 2 @ wd_abs
        dot = min(k, self.dot_span or width) * 2.0**-self.dot_bits
        tiles = blocks(k, _MIN_TILE_K)
        slack = (dot / (1 - dot) + tiles * _U32 / (1 - tiles * _U32) + 3 * _U32) * mag
        if self.ftz:
            slack = slack + self._flushed(np.maximum(np.abs(lo), np.abs(hi)), wd_abs,
                                          sigma.mid, w_scale)
        wide = (radius + slack) * (1 + 1e-12)
        with np.errstate(over="ignore", invalid="ignore"):
            e_lo = np.nextafter(to_f32(center - wide), F32(-np.inf))
            e_hi = np.nextafter(to_f32(center + wide), F32(np.inf))
        return Env(acc, np.minimum(e_lo, acc), np.maximum(e_hi, acc))

    def _flushed(self, a_abs: Array, wd_abs: Array, sigma: Array,
                 w_scale: Array | None) -> Array:
        """What flushing may move the accumulator by: ``3·2^-126`` per block (the two scale
        products and the sum), and the whole term of a block whose activation or weight scale
        is subnormal (read as 0)."""
        k, n = wd_abs.shape
        width = self._width(k)
        nb = blocks(k, width)
        moved = np.full((a_abs.shape[0], n), 3.0 * nb * _NORMAL32)
        sw = self.scales(w_scale, k, n).astype(np.float64)
        tiny_a = (sigma != 0) & (np.abs(sigma) <= _NORMAL32)
        tiny_w = (sw != 0) & (np.abs(sw) <= _NORMAL32)
        for b in np.flatnonzero(tiny_a.any(axis=0) | tiny_w.any(axis=1)):
            cols = slice(b * width, (b + 1) * width)
            term = a_abs[:, cols] @ wd_abs[cols]
            moved += np.where(tiny_a[:, b, None] | tiny_w[b][None, :], term, 0.0)
        return moved

    def apply(self, a: Env, sigma: Env | None, weights: Weights, which: int, slot: Array,
              x_dtype: Any) -> Env:
        """The pipeline's call: GEMM ``which`` (1 or 2) of one expert's ``weights``."""
        assert sigma is not None
        return self(a, sigma, weights[f"w{which}"], weights.get(f"scale{which}"), slot,
                    x_dtype)


# ---------------------------------------------------------------- NVFP4 W4A4


@dataclass(frozen=True)
class Fp4Gemm:
    """The NVFP4 W4A4 GEMM of one expert (formats.md, NVFP4; vLLM's ``cutlass_moe_fp4``
    [code]: ``scaled_fp4_experts_quant`` then ``cutlass_fp4_moe_mm``). The expert's rows are
    quantised per 16 columns under the expert's static activation global scale
    ``γ_a = a{which}_gscale`` (:func:`spec.nvfp4.quantise_nv`: block scale ``s =
    e4m3(γ_a·amax/6)`` clamped at 448, ``q = e2m1(clamp(a·(1/(s/γ_a)), ±6))`` ties to even);
    the block-scaled products ``q_a·s_a · q_w·s_w`` (exact in float32) summed in float32 in
    an order the kernel does not promise (:class:`FloatGemm`'s envelope) [inferred: the
    tensor core's accumulation]; then ``epilogue`` with ``"col"`` the GEMM's
    ``alpha = fl(1/fl(γ_a·γ_w))`` (vLLM's ``g1_alphas``, ``g2_alphas``).

    ``quotient_ulps``: how far the kernel's quotient ``a·(1/(s/γ_a))`` may lie from the
    reference's float32 operations (vLLM's CUDA quantiser takes approximate reciprocals
    [code]; the bound is [inferred]). With an envelope, the quantised activations' ``[lo,
    hi]`` bounds ``q'·s'`` over the input's envelope and that freedom (``s'`` spans the block
    scales of the block's smallest and largest possible amax; the e2m1 rounding is monotone).
    """

    epilogue: tuple[str, ...] = ("col", "x")
    quotient_ulps: int = 0
    ftz: bool = False

    def describe(self) -> str:
        return (f"activations to e2m1 per 16 under the expert's global scale (e4m3 block "
                f"scales), float32 accumulation in any order; epilogue "
                f"{' -> '.join(self.epilogue)} (col: alpha = 1/(γ_a·γ_w)){_ftz(self)}")

    def quantise(self, a: Env, gscale: Array) -> Env:
        """The dequantised activations ``q·s`` (float32, without ``1/γ_a``) of rows ``a``."""
        gs = np.asarray(gscale, F32).reshape(1)
        q, s, _ = quantise_nv(a.mid.T, gs)
        mid = dequantise_nv(q, s, np.ones(1, F32), F32).T
        if a.lo is None or a.hi is None:
            return Env(mid)
        pinned = bool(np.all(a.lo == a.mid) and np.all(a.hi == a.mid))
        if pinned and not self.quotient_ulps:
            return Env(mid, mid, mid)
        return self._envelope(a, mid, float(gs[0]))

    def _envelope(self, a: Env, mid: Array, gs: float) -> Env:
        assert a.lo is not None and a.hi is not None
        rows, cols = a.mid.shape
        width = blocks(cols, NV_BLOCK) * NV_BLOCK

        def grouped(v: Array) -> Array:
            padded = np.zeros((rows, width), np.float64)
            padded[:, :cols] = v
            return padded.reshape(rows, -1, NV_BLOCK)

        lo, hi = grouped(a.lo), grouped(a.hi)
        straddle = (lo <= 0) & (hi >= 0)
        amax_lo = np.where(straddle, 0, np.minimum(np.abs(lo), np.abs(hi))).max(axis=2)
        amax_hi = np.maximum(np.abs(lo), np.abs(hi)).max(axis=2)
        d = (3 + 2 * self.quotient_ulps) * _U32  # the scale's, the reciprocal's, the product's

        def scale(amax: Array) -> Array:
            return to_e4m3(to_f32(F32(gs) * to_f32(amax * F32(1 / E2M1_MAX)))).astype(
                np.float64)

        s_lo, s_hi = scale(amax_lo), scale(amax_hi)
        m_lo, m_hi = s_lo / gs * (1 - d), s_hi / gs * (1 + d)
        with np.errstate(divide="ignore", invalid="ignore"):
            corners = np.nan_to_num(np.stack([x / m[..., None] for x in (lo, hi)
                                              for m in (m_lo, m_hi)]),
                                    posinf=E2M1_MAX, neginf=-E2M1_MAX)
        t_lo = corners.min(0) - d * np.abs(corners).max(0)
        t_hi = corners.max(0) + d * np.abs(corners).max(0)

        def e2m1(t: Array) -> Array:
            return np.clip(to_f32(t), -E2M1_MAX, E2M1_MAX).astype(E2M1).astype(np.float64)

        q_lo, q_hi = e2m1(t_lo), e2m1(t_hi)
        v_lo = np.minimum(q_lo * s_lo[..., None], q_lo * s_hi[..., None])
        v_hi = np.maximum(q_hi * s_lo[..., None], q_hi * s_hi[..., None])
        v_lo, v_hi = (v.reshape(rows, -1)[:, :cols] for v in (v_lo, v_hi))
        return Env(mid, np.minimum(v_lo, mid), np.maximum(v_hi, mid))

    def alpha(self, a_gscale: Array, w_gscale: Array) -> Array:
        """``fl(1/fl(γ_a·γ_w))``, the epilogue's factor (float32, shape ``(1,)``)."""
        with np.errstate(divide="ignore", over="ignore"):
            return to_f32(F32(1) / to_f32(np.asarray(a_gscale, F32) * np.asarray(w_gscale, F32))
                          ).reshape(1)

    def apply(self, a: Env, sigma: Env | None, weights: Weights, which: int, slot: Array,
              x_dtype: Any) -> Env:
        """The pipeline's call: GEMM ``which`` (1 or 2) of one expert's ``weights``."""
        w = weights[f"w{which}"]
        wd = dequantise_nv(w, weights[f"scale{which}"], np.ones(1, F32), F32)
        qa = self.quantise(a, weights[f"a{which}_gscale"])
        alpha = self.alpha(weights[f"a{which}_gscale"], weights[f"gscale{which}"])
        col = np.broadcast_to(alpha, (w.shape[1],))
        return FloatGemm(self.epilogue, self.ftz)(qa, wd, slot, x_dtype, col=col)


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

    ``ftz``: the step may flush float32 subnormals to zero: its input, ``silu`` and the
    product (``exp(−g)`` below 2^-126 leaves ``fl(1 + exp(−g)) = 1`` either way).
    """

    silu_store: str | None = None
    store: str | None = None
    gate_first: bool = True
    exp_ulps: int = 0
    div_ulps: int = 0
    ftz: bool = False

    def describe(self) -> str:
        names = {None: "float32", "x": "x dtype", "x_away": "x dtype (ties away)"}
        order = "gate first" if self.gate_first else "up first"
        return (f"silu in float32 stored as {names[self.silu_store]}, product stored as "
                f"{names[self.store]}; {order}; exp within {self.exp_ulps} ulp{_ftz(self)}")

    def __call__(self, h: Env, cfg: OpConfig, x_dtype: Any) -> Env:
        h = _may_flush(h, self.ftz)
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
            silu = _may_flush(self._silu_envelope(gate, silu_mid, 1.0 if alpha is None
                                                  else alpha), self.ftz)
        if self.silu_store is not None:
            silu = _monotone(_store(self.silu_store, x_dtype), silu)
        a = _may_flush(_product(silu, up, to_f32), self.ftz)
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
    in an order not promised, one cast). ``ftz``: the step may flush float32 subnormals to
    zero (routed weights read, products and partial sums written).
    """

    weight: str = "combine"
    sum: str = "f32_seq"
    x_dtype_topk: tuple[int, ...] = ()
    ftz: bool = False

    def describe(self) -> str:
        where = "routed weight here" if self.weight == "combine" else "routed weight in GEMM2"
        if self.sum == "f32_seq":
            return f"{where}; float32, sequential in k order, one cast{_ftz(self)}"
        return (f"{where}; top_k in {list(self.x_dtype_topk)}: x dtype after every add, "
                f"else float32 in any order{_ftz(self)}")

    def __call__(self, y: Env, probs: Array, x_dtype: Any) -> Env:
        """``y``: (tokens, top_k, K) float32; returns the sum before the final cast to x's
        dtype (float32; already x-dtype values where the profile sums in x's dtype)."""
        top_k = y.mid.shape[1]
        terms = [_may_flush(y.take((slice(None), k)), self.ftz) for k in range(top_k)]
        if self.weight == "combine":
            terms = [_scale(t, probs[:, k, None].astype(F32), self.ftz)
                     for k, t in enumerate(terms)]
        to_x = cast(x_dtype)
        in_x = self.sum == "moe_sum" and top_k in self.x_dtype_topk
        rnd = (lambda a: to_x(to_f32(a))) if in_x else to_f32
        acc = terms[0]
        for t in terms[1:]:
            acc = _may_flush(_sum(acc, t, rnd), self.ftz)
        if self.sum != "f32_seq" and not in_x and top_k > 2 and acc.lo is not None:
            acc = _any_order(acc, terms, self.ftz)
        return acc


def _any_order(acc: Env, terms: list[Env], ftz: bool) -> Env:
    """Widen a sequential float32 sum's envelope to every summation order:
    ``|fl sum − exact| <= γ_{n−1}·Σ|terms|`` (Higham §4.2), plus 2^-126 per partial sum that
    a flushing kernel may write as 0 (``ftz``)."""
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
    flushed = n * _NORMAL32 if ftz else 0.0
    return Env(acc.mid, np.minimum(acc.lo, to_f32(lo - g * mag - flushed)),
               np.maximum(acc.hi, to_f32(hi + g * mag + flushed)))


def _sum(a: Env, b: Env, rnd: Callable[[Array], Array]) -> Env:
    with np.errstate(invalid="ignore", over="ignore"):
        mid = rnd(a.mid + b.mid)
        if a.lo is None or a.hi is None or b.lo is None or b.hi is None:
            return Env(mid)
        return Env(mid, rnd(a.lo + b.lo), rnd(a.hi + b.hi))


# ---------------------------------------------------------------- the record


#: The default probability, per call, that the row test rejects a legitimate kernel's output.
DEFAULT_FALSE_ALARM = 1e-9
#: The ways an e4m3 activation quantiser may take its scale (:class:`IdealAssumptions`).
FP8_SCALE_RULES = ("float32", "ue8m0")


@dataclass(frozen=True)
class IdealAssumptions:
    """What the row test assumes of a legitimate kernel: the only input that describes it.

    ``stored_dtype``: the coarsest format it stores an intermediate in (GEMM1 output, SwiGLU
    output, ``y`` per slot); default ``"bfloat16"``, the coarsest legitimate one
    (docs/contract/kernels.md). ``ties``: the tie rules it may use when quantising (``"away"``,
    ``"even"``). ``amax_floor``: its int8 quantisers may floor ``amax`` there (default: vLLM's
    Triton quantiser's 1e-10, the largest legitimate int8 floor known); rows below are left to
    the sound bound, which takes the floor's coarser grid (a tiny row may come out 0).
    ``div_ulps``: how far its quantisers' float32 division may lie from correctly rounded
    (:class:`Quantiser`; default 2, GPU fast division).
    ``x_dtype_combine_topk``: the top_k values for which it may sum the combine in the out
    dtype (vLLM ``moe_sum``). ``ftz``: it may flush float32 (and bfloat16) subnormals to zero
    (default: yes, as GPU kernels do); the ideal bound then takes 2^-126 as their underflow
    error and the row test leaves rows that reach that range to the bound.
    ``false_alarm``: the probability per call of rejecting a legitimate output, under the
    model of :mod:`oracle.judge.rowtest`. ``fp8_scales``: how its e4m3 activation quantisers
    may take a group's scale from its ``amax`` (:class:`GroupQuantiser`): ``"float32"``
    (``amax/448``, divided or by its reciprocal) and ``"ue8m0"`` (that rounded up to a power
    of two); default both, as the format allows (formats.md). A profile whose quantisers all
    take float32 scales pins it: rows then share an activation rounding only where their
    groups' ``amax`` agree up to a power of two (:func:`oracle.judge.rowtest._shared_rows`).
    """

    stored_dtype: str = "bfloat16"
    ties: tuple[str, ...] = ("away", "even")
    amax_floor: float | None = VLLM_INT8_AMAX_FLOOR
    div_ulps: int = 2
    x_dtype_combine_topk: tuple[int, ...] = (2, 3, 4)
    false_alarm: float = DEFAULT_FALSE_ALARM
    ftz: bool = True
    fp8_scales: tuple[str, ...] = FP8_SCALE_RULES

    def __post_init__(self) -> None:
        if self.stored_dtype not in ("bfloat16", "float16"):
            raise ValueError(f"stored_dtype {self.stored_dtype!r} is not bfloat16 or float16")
        if not set(self.ties) <= {"away", "even"} or not self.ties:
            raise ValueError(f"ties {self.ties!r}: give one or both of 'away', 'even'")
        if not 0 < self.false_alarm < 1:
            raise ValueError(f"false_alarm {self.false_alarm!r} must lie strictly between 0 "
                             "and 1")
        if not set(self.fp8_scales) <= set(FP8_SCALE_RULES) or not self.fp8_scales:
            raise ValueError(f"fp8_scales {self.fp8_scales!r}: give one or both of "
                             f"{', '.join(map(repr, FP8_SCALE_RULES))}")


GemmStep = IntGemm | SplitGemm | FloatGemm | BlockGemm | Fp4Gemm
QuantStep = Quantiser | GroupQuantiser
#: The step fields of a :class:`Pipeline`, in §6 order.
PIPELINE_STEPS = ("quantise", "gemm1", "swiglu", "requantise", "gemm2")


@dataclass(frozen=True)
class Pipeline:
    """One variant's §6 steps 1–7 in one kernel, as step records applied in order.

    ``quantise`` (step 1, ``None``: the activations stay in x's dtype) runs once on every
    token; :meth:`stages` runs the rest on one expert's rows: ``gemm1`` (steps 2–3), ``swiglu``
    (4), ``requantise`` (5, ``None``: SwiGLU's output feeds GEMM2 directly) and ``gemm2``
    (6–7). A GEMM step reads the expert's tensors it needs by field name
    (:data:`spec.fields.FIELDS`), so one pipeline class serves every variant.
    """

    gemm1: GemmStep
    swiglu: Swiglu
    gemm2: GemmStep
    quantise: QuantStep | None = None
    requantise: QuantStep | None = None

    def stages(
        self, a: Env, sigma1: Env | None, weights: Weights, slot_p: Array, cfg: OpConfig,
        zero_rows: str,
    ) -> tuple[RoundingPoint, ...]:
        """Steps 2–7 for the rows of one expert, from its inputs ``a`` (the quantised tokens
        with their scales ``sigma1``, or the tokens): each rounding point as ``(step, name,
        value)``, in pipeline order, ending with ``y`` (float32 holding x-dtype values; the
        routed weight included where the profile applies it in GEMM2)."""
        x_dtype = DTYPES[cfg.x_dtype]
        h = self.gemm1.apply(a, sigma1, weights, 1, slot_p, x_dtype)
        act = self.swiglu(h, cfg, x_dtype)
        if self.requantise is None:
            y = self.gemm2.apply(act, None, weights, 2, slot_p, x_dtype)
            return (("2-3", "h", h), ("4", "a", act), ("6-7", "y", y))
        q2, sigma2, _ = self.requantise(act, zero_rows)
        y = self.gemm2.apply(q2, sigma2, weights, 2, slot_p, x_dtype)
        return (("2-3", "h", h), ("4", "a", act), ("5", "q2", q2), ("5", "sigma2", sigma2),
                ("6-7", "y", y))

    def ffn(self, a: Env, sigma1: Env | None, weights: Weights, slot_p: Array, cfg: OpConfig,
            zero_rows: str) -> Env:
        """``y`` of :meth:`stages`."""
        return self.stages(a, sigma1, weights, slot_p, cfg, zero_rows)[-1][2]

    def steps(self) -> Iterator[tuple[str, Any]]:
        """``(field, step)`` for every step present, in §6 order."""
        for name in PIPELINE_STEPS:
            step = getattr(self, name)
            if step is not None:
                yield name, step

    def freedoms(self, variant: str) -> list[str]:
        found = []
        if any(isinstance(s, FloatGemm) for _, s in self.steps()):
            found.append(f"{variant}: float32 GEMM accumulation order")
        if any(isinstance(s, IntGemm) and s.accumulate == "f32_blocks" for _, s in self.steps()):
            found.append(f"{variant}: int8 K-block size (blocks summed in float32)")
        if any(isinstance(s, BlockGemm) for _, s in self.steps()):
            found.append(f"{variant}: FP8 K tile width, in-tile sum order and precision, "
                         "scale product order")
        if self.swiglu.exp_ulps or self.swiglu.div_ulps:
            found.append(f"{variant}: SwiGLU exp within {self.swiglu.exp_ulps} ulp, division "
                         f"within {self.swiglu.div_ulps} ulp")
        for name, s in self.steps():
            if isinstance(s, (Quantiser, GroupQuantiser)) and s.div_ulps:
                what = "quotient" if s.scale == "divide" else "reciprocal"
                found.append(f"{variant}: {name} {what} within {s.div_ulps} ulp")
            if isinstance(s, Quantiser) and s.scale_ulps:
                found.append(f"{variant}: {name} scale within {s.scale_ulps} ulp")
        flushing = [name for name, s in self.steps() if getattr(s, "ftz", False)]
        if flushing:
            found.append(f"{variant}: float32 subnormals flushed to zero or not "
                         f"({', '.join(flushing)})")
        return found


@dataclass(frozen=True)
class KernelProfile:
    """One real kernel's numerics as data: a :class:`Pipeline` per variant it supports (keyed
    by the names of :data:`spec.fields.VARIANTS`; a variant it lacks is absent), its combine,
    freedoms and shape domain.

    ``pipelines`` may be given as a mapping; it is kept as a tuple of ``(variant, pipeline)``
    pairs in the table's order, so that the record stays hashable.
    """

    name: str
    summary: str
    sources: str
    pipelines: tuple[tuple[str, Pipeline], ...]
    combine: Combine
    domain: ShapeDomain = field(default_factory=lambda: CONTRACT_DOMAIN)

    def __post_init__(self) -> None:
        pairs = tuple(dict(self.pipelines).items())
        unknown = [v for v, _ in pairs if v not in VARIANT_NAMES]
        if unknown:
            raise ValueError(f"kernel profile {self.name!r}: unknown variants {unknown}; the "
                             f"variants are {', '.join(VARIANT_NAMES)} (spec.fields.VARIANTS)")
        # in the table's order, so that equal profiles compare equal however they were built
        object.__setattr__(self, "pipelines", tuple(sorted(
            pairs, key=lambda pair: VARIANT_NAMES.index(pair[0]))))

    @property
    def variants(self) -> tuple[str, ...]:
        """The variants this kernel has a pipeline for."""
        return tuple(v for v, _ in self.pipelines)

    def pipeline(self, variant: str) -> Pipeline:
        """The pipeline of ``variant``; ``ValueError`` names the profiles that have one."""
        for name, pipe in self.pipelines:
            if name == variant:
                return pipe
        having = [p.name for p in PROFILES.values() if variant in p.variants]
        raise ValueError(f"kernel profile {self.name!r} has no {variant} pipeline (it has "
                         f"{', '.join(self.variants)}); profiles with one: "
                         f"{', '.join(having) or 'none'}")

    def map_steps(self, names: str | tuple[str, ...], change: Callable[[Any], Any],
                  variants: tuple[str, ...] | None = None) -> KernelProfile:
        """This profile with each step named in ``names`` (fields of :class:`Pipeline`)
        replaced by ``change(step)``, in the pipelines of ``variants`` (``None``: all);
        a pipeline without that step keeps it absent."""
        names = (names,) if isinstance(names, str) else names
        unknown = set(names) - set(PIPELINE_STEPS)
        if unknown:
            raise ValueError(f"unknown steps {sorted(unknown)}; a pipeline's steps are "
                             f"{', '.join(PIPELINE_STEPS)}")
        for variant in variants or ():
            self.pipeline(variant)  # raises for a variant the profile lacks
        return dataclasses.replace(self, pipelines=tuple(
            (v, dataclasses.replace(p, **{n: change(getattr(p, n)) for n in names
                                          if getattr(p, n) is not None}))
            if variants is None or v in variants else (v, p) for v, p in self.pipelines))

    def with_steps(self, variants: str | tuple[str, ...] | None = None,
                   **steps: Any) -> KernelProfile:
        """This profile with the named steps (fields of :class:`Pipeline`) replaced in the
        pipelines of ``variants`` (a name or names), or in every pipeline that has that step
        (``None``).

        >>> up_first = ASCEND_A3.with_steps(swiglu=Swiglu(gate_first=False))
        >>> [p.swiglu.gate_first for _, p in up_first.pipelines]
        [False, False, False]
        """
        profile = self
        for name, step in steps.items():
            profile = profile.map_steps(
                name, _constant(step), (variants,) if isinstance(variants, str) else variants)
        return profile

    @property
    def freedoms(self) -> tuple[str, ...]:
        """What the kernel does not promise; each widens the judge's envelope by its bound."""
        found = [f for v, p in self.pipelines for f in p.freedoms(v)]
        if self.combine.sum == "moe_sum":
            found.append("float32 top-k sum order (top_k outside "
                         f"{list(self.combine.x_dtype_topk)})")
        if self.combine.ftz:
            found.append("combine: float32 subnormals flushed to zero or not")
        return tuple(found)

    @property
    def ftz(self) -> bool:
        """Some step of this kernel may flush float32 subnormals to zero."""
        return self.combine.ftz or any(getattr(s, "ftz", False)
                                       for _, p in self.pipelines for _, s in p.steps())

    def with_ftz(self, ftz: bool = True) -> KernelProfile:
        """This profile with every step of every pipeline, and the combine, allowed to flush
        float32 subnormals to zero (``ftz=False``: none), the FP8 block steps
        (:class:`GroupQuantiser`, :class:`BlockGemm`) included.

        >>> VLLM_TRITON.with_ftz(False).ftz, VLLM_TRITON.ftz
        (False, True)
        """
        return dataclasses.replace(
            self.map_steps(PIPELINE_STEPS, lambda s: dataclasses.replace(s, ftz=ftz)
                           if hasattr(s, "ftz") else s),
            combine=dataclasses.replace(self.combine, ftz=ftz))

    def describe(self) -> str:
        """Every knob, one line each."""
        lines = [f"{self.name}: {self.summary}", f"  sources: {self.sources}"]
        for variant, pipe in self.pipelines:
            lines.append(f"  {variant}:")
            lines += [f"    {name}: {step.describe()}" for name, step in pipe.steps()]
        lines.append(f"  combine: {self.combine.describe()}")
        lines.append(f"  domain: {self.domain.describe()}")
        lines.append("  freedoms: " + ("; ".join(self.freedoms) or "none (bitwise)"))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able record; :func:`profile_from_dict` rebuilds it (each step names its
        class, so the record needs no import to be read back)."""
        return {
            "name": self.name, "summary": self.summary, "sources": self.sources,
            "pipelines": {v: {name: {"step": type(s).__name__, **dataclasses.asdict(s)}
                              for name, s in p.steps()} for v, p in self.pipelines},
            "combine": dataclasses.asdict(self.combine),
            "domain": dataclasses.asdict(self.domain),
        }

    def ideal_assumptions(self, x_dtype: str) -> IdealAssumptions:
        """What the ideal judge's row test may assume of this kernel (:mod:`oracle.judge.rowtest`):
        its coarsest stored dtype (every profile stores ``y`` in x's dtype; the Ascend GEMM
        intermediates are float16, finer than bfloat16), its quantisers' tie rules and ``amax``
        floors, where its combine sums in x's dtype, whether it may flush subnormals, and its
        e4m3 quantisers' scale rule where every one of them is a :class:`GroupQuantiser` (a
        subclass may take its scale otherwise: both rules stay)."""
        steps = [s for _, p in self.pipelines for _, s in p.steps()]
        quantisers = [s for s in steps if isinstance(s, Quantiser)]
        groups = [s for s in steps if isinstance(s, GroupQuantiser)]
        pinned = bool(groups) and all(type(s) is GroupQuantiser for s in groups)
        floors = [p.quantise.amax_floor for _, p in self.pipelines
                  if isinstance(p.quantise, Quantiser) and p.quantise.amax_floor is not None]
        in_x = self.combine.x_dtype_topk if self.combine.sum == "moe_sum" else ()
        return IdealAssumptions(
            stored_dtype=x_dtype,
            ties=tuple(sorted({q.ties for q in quantisers})) or ("away", "even"),
            amax_floor=max(floors) if floors else None,
            div_ulps=max((q.div_ulps for q in quantisers), default=0),
            x_dtype_combine_topk=tuple(in_x),
            ftz=self.ftz,
            fp8_scales=(tuple(sorted({"ue8m0" if s.ue8m0 else "float32" for s in groups}))
                        if pinned else FP8_SCALE_RULES),
        )


def _constant(step: Any) -> Callable[[Any], Any]:
    return lambda _: step


_STEP_CLASSES: dict[str, type] = {
    c.__name__: c for c in (Quantiser, GroupQuantiser, IntGemm, SplitGemm, FloatGemm,
                            BlockGemm, Fp4Gemm, Swiglu)}


def _record(cls: type, value: object, what: str) -> Any:
    if not isinstance(value, dict):
        raise ValueError(f"kernel profile: {what} must be an object")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in value.items()})


def _from_old_dict(data: dict[str, Any]) -> dict[str, Any]:
    """A profile record written before pipelines (flat step fields) in today's form."""
    def step(name: str, cls: type) -> dict[str, Any]:
        if not isinstance(data.get(name), dict):
            raise ValueError(f"kernel profile: missing field {name!r}")
        return {"step": cls.__name__, **data[name]}

    int8 = {"quantise": step("quantise", Quantiser), "gemm1": step("gemm1", IntGemm),
            "swiglu": step("swiglu", Swiglu), "requantise": step("requantise", Quantiser),
            "gemm2": step("gemm2", IntGemm)}
    pipelines = {"w8a8": int8, "float": {"gemm1": step("float_gemm1", FloatGemm),
                                         "swiglu": step("float_swiglu", Swiglu),
                                         "gemm2": step("float_gemm2", FloatGemm)}}
    if data.get("split_gemm1") is not None or data.get("split_gemm2") is not None:
        pipelines["w4a8"] = {**int8, "gemm1": step("split_gemm1", SplitGemm),
                             "gemm2": step("split_gemm2", SplitGemm)}
    return {k: data[k] for k in ("name", "summary", "sources", "combine", "domain")
            if k in data} | {"pipelines": pipelines}


def profile_from_dict(data: dict[str, Any]) -> KernelProfile:
    """Rebuild a profile from :meth:`KernelProfile.to_dict` (a counterexample's manifest),
    or from the flat record files written before pipelines hold. Raises ``ValueError``
    (``TypeError`` for a wrong field) on anything else."""
    if not isinstance(data, dict):
        raise ValueError("a kernel profile must be a JSON object")
    if "pipelines" not in data:
        data = _from_old_dict(data)
    for name in ("name", "summary", "sources"):
        if not isinstance(data.get(name), str):
            raise ValueError(f"kernel profile: {name} must be a string")
    if not isinstance(data["pipelines"], dict) or not data["pipelines"]:
        raise ValueError("kernel profile: pipelines must be a non-empty object")
    pipelines = {}
    for variant, steps in data["pipelines"].items():
        if not isinstance(steps, dict):
            raise ValueError(f"kernel profile: pipeline {variant!r} must be an object")
        built = {}
        for name, value in steps.items():
            if name not in PIPELINE_STEPS or not isinstance(value, dict):
                raise ValueError(f"kernel profile: pipeline {variant!r}: {name!r} is not a step "
                                 f"({', '.join(PIPELINE_STEPS)}) given as an object")
            kind = value.get("step")
            if kind not in _STEP_CLASSES:
                raise ValueError(f"kernel profile: {variant}.{name}: unknown step class {kind!r}")
            built[name] = _record(_STEP_CLASSES[kind],
                                  {k: v for k, v in value.items() if k != "step"},
                                  f"{variant}.{name}")
        pipelines[variant] = Pipeline(**built)
    domain = data.get("domain")
    if isinstance(domain, dict) and "placement" not in domain:
        # A domain recorded before placed calls existed was never handed one.
        domain = {**domain, "placement": False}
    return KernelProfile(
        name=data["name"], summary=data["summary"], sources=data["sources"],
        pipelines=tuple(pipelines.items()),
        combine=_record(Combine, data.get("combine"), "combine"),
        **({} if domain is None else {"domain": _record(ShapeDomain, domain, "domain")}),
    )


# ---------------------------------------------------------------- the profiles

#: The Ascend operator (§6), unchanged bit for bit for W8A8; its BF16/FP16-weight path as
#: ``variants.md`` reads the kernel (float32 accumulation in any order, GMM1 output in x's
#: dtype, SwiGLU cast to x's dtype with ties away from zero). The vector unit's ``exp`` is not
#: documented: allowed 3 ulp, NumPy's own test tolerance for float32 ``exp`` [inferred];
#: divisions are IEEE float32 [inferred]; no step flushes subnormals (no source says the
#: kernel does, and no Ascend run has shown it) [inferred].
_A3_W8A8 = Pipeline(
    quantise=Quantiser(scale="divide", ties="away",
                       source="§6 step 1: x / σ1, a true division [code]"),
    gemm1=IntGemm("int32", ("col", "fp16", "row")),
    swiglu=Swiglu(exp_ulps=3),
    requantise=Quantiser(scale="reciprocal", ties="even",
                         source="§6 step 5: a · (127/amax2) [code], IEEE [inferred]"),
    gemm2=IntGemm("int32", ("col", "fp16", "row", "x")),
)
ASCEND_A3 = KernelProfile(
    name="ascend-a3",
    summary="vllm-ascend dispatch_ffn_combine on Atlas A3 (W8A8 §6; BF16/FP16 per variants.md)",
    sources="dispatch_ffn_combine.md §6 [code]; variants.md 'BF16 / FP16 weights' [code]; "
            "exp accuracy [inferred]",
    pipelines=(
        ("w8a8", _A3_W8A8),
        # W4A8 (variants.md): GMM1/GMM2 split the activation, the rest as W8A8.
        ("w4a8", dataclasses.replace(_A3_W8A8, gemm1=SplitGemm(), gemm2=SplitGemm("x"))),
        ("float", Pipeline(gemm1=FloatGemm(("x",)), swiglu=Swiglu(store="x_away", exp_ulps=3),
                           gemm2=FloatGemm(("x",)))),
    ),
    combine=Combine("combine", "f32_seq"),
    domain=A3_DOMAIN,
)

#: vLLM's Triton fused_moe (kernels.md, both vLLM columns) with the CUDA quantiser
#: ``ops.scaled_int8_quant`` (reciprocal multiply, half to even, no floor), which vLLM's dense
#: W8A8 linear layers call; int32 dots per K block summed in float32; GEMM outputs in x's
#: dtype; ``silu_and_mul`` rounds silu to x's dtype, multiplies in float32 and rounds again; the
#: routed weight in GEMM2's epilogue; ``moe_sum`` in x's dtype for top_k 2–4. CUDA's ``expf`` is
#: within 2 ulp (CUDA C Programming Guide, accuracy tables). Division: the reciprocal
#: ``127/amax`` within 2 ulp, as fast fp32 division and torch's ``reciprocal(amax)·127`` give
#: (issue 24: on an H100 the IEEE reciprocal's q differed by one in 0.2–7 % of rows, at near
#: ties); the scale ``amax/127`` stayed IEEE on every row measured there, so it stays pinned.
#: Subnormals: every step may flush float32 subnormals to zero (issue 24: on an H100, ideal
#: mode false-alarmed on vLLM's kernel at rows of values near 2^-126, and torch's CUTLASS
#: ``_grouped_mm`` returned 0 for -5.14e-39; the flush-to-zero mode of each vLLM step is not
#: stated by its source [inferred]), so the freedom is declared for the whole kernel.
_VLLM_CUDA_QUANTISER = Quantiser(
    scale="reciprocal", ties="even", div_ulps=2,
    source="CUDA ops.scaled_int8_quant, int8_quant_kernels.cu: vLLM's dense W8A8 linear layers")
VLLM_TRITON = KernelProfile(
    name="vllm-triton",
    summary="vLLM Triton fused_moe (int8 W8A8 per-token, and BF16/FP16 weights), CUDA quantiser",
    sources="kernels.md [code]: fused_moe.py, moe_align_sum_kernels.cu, int8_quant_kernels.cu; "
            "expf accuracy [doc]; division within 2 ulp (issue 24, measured); subnormals "
            "may flush (issue 24, measured on an H100) [inferred]",
    pipelines=(
        ("w8a8", Pipeline(
            quantise=_VLLM_CUDA_QUANTISER,
            gemm1=IntGemm("f32_blocks", ("row", "col", "x")),
            swiglu=Swiglu(silu_store="x", store="x", exp_ulps=2),
            requantise=_VLLM_CUDA_QUANTISER,
            gemm2=IntGemm("f32_blocks", ("slot", "row", "col", "x")))),
        ("float", Pipeline(
            gemm1=FloatGemm(("x",)), swiglu=Swiglu(silu_store="x", store="x", exp_ulps=2),
            gemm2=FloatGemm(("slot", "x")))),
    ),
    combine=Combine("gemm2", "moe_sum", (2, 3, 4)),
    domain=VLLM_DOMAIN,
).with_ftz()

#: The same kernel with the quantiser fused_moe itself calls for int8 per-token activations,
#: both before GEMM1 and for the requantisation after ``silu_and_mul``: ``moe_kernel_quantize_
#: input`` -> ``_int8_quantize`` -> Triton ``per_token_quant_int8`` (fused_moe/utils.py,
#: quantization/utils/int8_utils.py [code]): ``amax = max(amax, 1e-10)``, ``scale = amax/127``,
#: ``x · (127/amax)`` with Triton's fp32 ``/`` (within 2 ulp, ``div.full.f32`` [inferred]) in
#: both the quotient and the scale, ``libdevice.round``: ties away. The scale's freedom was
#: measured (issue 26): on an H100 the control's W8A8 output sat 1 fp16 ulp off the pinned value
#: in one column of a one-token call; torch's CUDA ``amax / 127`` is ``amax · fl(1/127)``, one
#: ulp from the quotient in 4.8 % of rows (tests/controls/gpu: the CPU emulation's case).
_VLLM_TRITON_QUANTISER = Quantiser(
    scale="reciprocal", ties="away", amax_floor=VLLM_INT8_AMAX_FLOOR, div_ulps=2, scale_ulps=2,
    source="Triton per_token_quant_int8, int8_utils.py: fused_moe's int8 per-token path "
           "(moe_kernel_quantize_input, both quantisations)")
VLLM_TRITON_TQ = dataclasses.replace(
    VLLM_TRITON.with_steps(quantise=_VLLM_TRITON_QUANTISER,
                           requantise=_VLLM_TRITON_QUANTISER).with_ftz(),
    name="vllm-triton-tq",
    summary="vLLM Triton fused_moe with its own Triton quantiser (per_token_quant_int8)",
    sources="kernels.md [code]; fused_moe/utils.py _int8_quantize and int8_utils.py "
            "per_token_quant_int8 [code]; division within 2 ulp (issue 24, measured); "
            "subnormals may flush (issue 24) [inferred]",
)

#: A torchtitan-style MoE on torch's grouped GEMM ``torch._grouped_mm`` (CUTLASS on Hopper;
#: ``tests/controls/gpu/grouped_mm.py`` is one): float32 accumulation, GEMM outputs in x's
#: dtype; ``F.silu(g) * u`` on x-dtype tensors (torch's silu is ``x / (1 + exp(-x))`` in
#: float32, rounded to x's dtype, the product in float32 rounded again); the routed weight
#: after GEMM2, in float32, rounded to x's dtype (torchtitan's ``score_before_experts=False``);
#: the top-k sum in float32 in an order not promised, one cast [inferred from torch's ATen
#: sources]. Only a float pipeline: torch has no int8 grouped GEMM (its FP8 one,
#: ``_scaled_grouped_mm``, needs the FP8 formats), so the gate draws BF16/FP16 weights only.
#: The domain is vLLM's (no receive buffer, no clamp). Flush to zero: measured on an H100,
#: ``_grouped_mm`` returned 0 for a float32 subnormal result (benchmarks/GPU.md).
TORCH_GROUPED_MM = KernelProfile(
    name="torch-grouped-mm",
    summary="torchtitan-style MoE on torch._grouped_mm (BF16/FP16 weights only)",
    sources="torch ATen silu and reductions [inferred]; torchtitan MoE score after experts "
            "[inferred]",
    pipelines=(("float", dataclasses.replace(VLLM_TRITON.pipeline("float"),
                                             gemm2=FloatGemm(("x", "slot", "x")))),),
    combine=Combine("gemm2", "moe_sum", ()),
    domain=VLLM_DOMAIN,
).with_ftz()

#: vLLM's Triton fused_moe on FP8 block-scale weights (``use_fp8_w8a8`` with ``block_shape
#: [128, 128]``; formats.md, FP8 block scale [code]): ``per_token_group_quant_fp8`` (amax floor
#: 1e-10, a division; Triton's float32 division within 2 ulp [inferred]) before each GEMM,
#: ``fused_moe_kernel``'s block path (``accumulator += tl.dot(a, b) * a_scale[:, None] *
#: b_scale[None, :]``, the routed weight and the cast after the K loop), and the rest of the
#: int8 pipeline: silu_and_mul, moe_sum. vLLM's loader rejects I % 128 != 0
#: (``quantization/fp8.py``: "not divisible by weight quantization block_n" [code]); other
#: shapes are the natural extension, partial blocks quantised on their own [inferred].
#: Subnormals may flush, as in the other GPU profiles (issue 24) [inferred].
VLLM_TRITON_FP8 = KernelProfile(
    name="vllm-triton-fp8",
    summary="vLLM Triton fused_moe, FP8 W8A8 with 128x128 weight blocks and 1x128 activation "
            "groups (DeepSeek-V3 style)",
    sources="formats.md [code]: fused_moe.py fused_moe_kernel (block_shape), fp8_utils.py "
            "per_token_group_quant_fp8; kernels.md [code] for the rest; fp8 dot precision "
            "[doc: DeepSeek-V3 report §3.3.2]; Triton division [inferred]",
    pipelines=(("fp8_block", Pipeline(
        quantise=GroupQuantiser(div_ulps=2),
        gemm1=BlockGemm(("x",), dot_bits=FP8_DOT_BITS),
        swiglu=Swiglu(silu_store="x", store="x", exp_ulps=2),
        requantise=GroupQuantiser(div_ulps=2),
        gemm2=BlockGemm(("slot", "x"), dot_bits=FP8_DOT_BITS))),),
    combine=VLLM_TRITON.combine,
    domain=VLLM_DOMAIN,
).with_ftz()

#: A torchtitan-style MoE on torch's FP8 grouped GEMM ``torch._scaled_grouped_mm`` (CUTLASS
#: on Hopper; ``tests/controls/gpu/scaled_grouped_mm.py`` is one), FP8 per token and channel:
#: e4m3 activations quantised per token by the driver (amax floor 1e-12 as vLLM's
#: ``scaled_fp8_quant`` per-token path, a division [inferred: the driver's torch ops]), one
#: e4m3 dot over K promoted to float32 every 128 products (DeepSeek-V3 report §3.3.2's
#: N_C = 128; CUTLASS without fast accumulation [inferred]), output ``× s_a[row] × s_w[col]``
#: in float32 and one cast to x's dtype (rowwise scales, ``out_dtype`` x's [inferred]), which
#: must be bfloat16 (the domain: torch refuses any other ``out_dtype``, measured); the
#: rest as ``torch-grouped-mm``: silu in x's dtype, the routed weight after GEMM2, the top-k
#: sum. Subnormals may flush, as in the other GPU profiles (issue 24) [inferred]. The
#: quantisers' ``σ = amax/448`` is torch's CUDA division by a scalar, ``amax·fl(1/448)``: up to
#: 2 ulps from the IEEE quotient (``div_ulps``; measured on an H100, benchmarks/GPU.md, sixth
#: part: one ulp moved an e4m3 value and 7 of 16 outputs of a K = 16, I = 8 call).
TORCH_SCALED_GROUPED_MM = KernelProfile(
    name="torch-scaled-grouped-mm",
    summary="torchtitan-style MoE on torch._scaled_grouped_mm (FP8 per token and channel)",
    sources="torch ATen _scaled_grouped_mm rowwise scales [inferred]; fp8 accumulation "
            "[doc: DeepSeek-V3 report §3.3.2]; σ = amax·fl(1/448) on CUDA [measured: H100, "
            "benchmarks/GPU.md]; the rest as torch-grouped-mm [inferred]",
    pipelines=(("fp8_channel", Pipeline(
        quantise=GroupQuantiser(group=None, amax_floor=1e-12, div_ulps=2),
        gemm1=BlockGemm(("x",), block=None, dot_bits=FP8_DOT_BITS, dot_span=BLOCK),
        swiglu=TORCH_GROUPED_MM.pipeline("float").swiglu,
        requantise=GroupQuantiser(group=None, amax_floor=1e-12, div_ulps=2),
        gemm2=BlockGemm(("x", "slot", "x"), block=None, dot_bits=FP8_DOT_BITS,
                        dot_span=BLOCK))),),
    combine=TORCH_GROUPED_MM.combine,
    domain=dataclasses.replace(
        VLLM_DOMAIN, name="torch-scaled-grouped-mm", x_dtypes=("bfloat16",),
        sources=VLLM_DOMAIN.sources + "; bfloat16 out only: torch 2.11 on an H100 raised \"Only "
        "bf16 high precision output types are supported for grouped gemm\" (benchmarks/GPU.md)"),
).with_ftz()


#: vLLM's DeepGEMM MoE experts on Blackwell (SM100; ``DeepGemmExperts``; formats.md, FP8 block
#: scale, its UE8M0 item [code]; docs/scale_layouts.md on packed-ue8m0 [code]): every scale
#: UE8M0. The weights' 128
#: x 128 block scales are powers of two (DeepGEMM's quantisers round up, ``ceil_to_ue8m0``) and
#: reach ``m_grouped_fp8_gemm_nt_contiguous`` packed four to an int32, so the domain draws only
#: such calls (``ue8m0_scales``); the activations are quantised per token and 128 columns with
#: the scale rounded up the same way (vLLM's ``per_token_group_quant_fp8(use_ue8m0=True)``:
#: ``exp2(ceil(log2(amax/448)))`` [code], so ``a/σ`` is exact). The shapes: vLLM runs DeepGEMM
#: only where K and I are multiples of 128 (``_valid_deep_gemm_shape``, deep_gemm_moe.py [code];
#: its ``M >= 128`` is a dispatch choice, not a kernel limit [inferred]); bfloat16 tokens only
#: (DeepGEMM's grouped FP8 GEMMs write bfloat16 [inferred]). The rest is vllm-triton-fp8's
#: pipeline: the block-scale product inside the K loop (exact here: powers of two), silu_and_mul,
#: the routed weight after GEMM2, moe_sum [inferred: the SM100 block-scaled MMA's in-tile
#: precision is taken as Hopper's 13 bits, and the epilogues as the Triton path's].
DEEPGEMM_SM100_FP8 = dataclasses.replace(
    VLLM_TRITON_FP8.with_steps(quantise=GroupQuantiser(ue8m0=True, div_ulps=2),
                               requantise=GroupQuantiser(ue8m0=True, div_ulps=2)).with_ftz(),
    name="deepgemm-sm100-fp8",
    summary="vLLM's DeepGEMM MoE on Blackwell (SM100): FP8 128x128 weight blocks and 1x128 "
            "activation groups, every scale UE8M0 (weights' packed four per int32)",
    sources="formats.md UE8M0 [code]; scale_layouts.md packed-ue8m0 [code]; vLLM "
            "deep_gemm_moe.py _valid_deep_gemm_shape [code]; bfloat16 out, SM100 MMA "
            "precision and the epilogues [inferred]",
    domain=dataclasses.replace(
        VLLM_DOMAIN, name="deepgemm-sm100", hidden_multiple=BLOCK, intermediate_multiple=BLOCK,
        x_dtypes=("bfloat16",), ue8m0_scales=True,
        sources=VLLM_DOMAIN.sources + "; K, I % 128: vLLM _valid_deep_gemm_shape [code]; "
        "UE8M0 weight scales: DeepGEMM SM100 (scale_layouts.md) [code]; bfloat16 [inferred]"),
)

def _w4a16(variant: str, name: str, summary: str, sources: str) -> KernelProfile:
    """A W4A16 kernel (:attr:`spec.fields.Variant.dequantise`): the weights dequantised to x's
    dtype, then vLLM Triton's float path (float32 accumulation, GEMM outputs in x's dtype,
    silu_and_mul, moe_sum) [inferred: where each kernel dequantises and its epilogue]."""
    return KernelProfile(name=name, summary=summary, sources=sources,
                         pipelines=((variant, VLLM_TRITON.pipeline("float")),),
                         combine=VLLM_TRITON.combine, domain=VLLM_DOMAIN)


#: MXFP4 weights with bf16/fp16 activations (vLLM's ``mxfp4_w4a16``; formats.md, MXFP4
#: [code] for the format): dequantised exactly in bfloat16. gpt-oss's own activation
#: (SwigluOAI on interleaved columns) is not modelled here.
VLLM_MXFP4 = _w4a16(
    "mxfp4_w4a16", "vllm-mxfp4-w4a16",
    "vLLM MXFP4 W4A16: e2m1 weights with e8m0 scales per 32, dequantised to x's dtype, then "
    "the Triton float path",
    "formats.md [code]: triton_kernels mxfp.py (format); kernels.md [code]: the float path; "
    "the dequantisation point [inferred]")
#: int4 W4A16 (vLLM's ``int4_w4a16``, Marlin AWQ/GPTQ MoE; formats.md, W4A16 [code] for the
#: format): ``(q − z)·s`` rounded once (Marlin converts int4 to 16-bit floats in registers).
VLLM_MARLIN_W4A16 = _w4a16(
    "int4_w4a16", "vllm-marlin-w4a16",
    "vLLM Marlin MoE W4A16: uint4 weights, x-dtype scales and zero points per 128, "
    "dequantised to x's dtype, then the Triton float path",
    "formats.md [code]: Marlin AWQ/GPTQ MoE (format); kernels.md [code]: the float path; one "
    "rounding of the dequantised weight and the epilogue [inferred]")
#: NVFP4 weights with 16-bit activations (vLLM's ``nvfp4_w4a16``; formats.md, NVFP4 [code] for
#: the format): dequantised as vLLM's reference does (``e2m1 · (scale / global_scale)`` in
#: float32, one rounding).
VLLM_NVFP4_W4A16 = _w4a16(
    "nvfp4_w4a16", "vllm-nvfp4-w4a16",
    "vLLM NVFP4 W4A16: e2m1 weights with e4m3 scales per 16 and a global scale per expert, "
    "dequantised to x's dtype, then the Triton float path",
    "formats.md [code]: nvfp4_utils.py (format, dequantisation order); kernels.md [code]: the "
    "float path; the dequantisation point [inferred]")

#: The MXFP8 activation quantiser (formats.md, MXFP4 [code] for the MX scale rule): per token
#: and 32 columns along K, ``σ = amax/448`` rounded **up** to a power of two (e8m0; triton's
#: ``downcast_to_mxfp`` rounds ``amax/dest_max`` up, ``dest_max`` 448 for e4m3 [inferred from
#: the e2m1 case]), ``q = e4m3(a·(1/σ))`` (the reciprocal of a power of two: exact), nearest
#: even, saturating [inferred: the hardware cast]. No amax epsilon in the MX rule: the floor
#: ``448·2^-126`` only keeps σ a normal float32 (the smallest e8m0 value, 2^-127, is a
#: subnormal that a flushing kernel reads as 0) [inferred].
MXFP8_QUANTISER = GroupQuantiser(group=32, amax_floor=E4M3_MAX * _NORMAL32, scale="reciprocal",
                                 ue8m0=True)
#: MXFP4 weights with MXFP8 activations (vLLM's ``mxfp4_mxfp8``, triton_kernels' ``matmul_ogs``
#: with MX activations; formats.md, MXFP4 [code] for the formats): the activations quantised
#: by :data:`MXFP8_QUANTISER` before each GEMM (x before GEMM1, silu_and_mul's output before
#: GEMM2); each GEMM multiplies e4m3 by e2m1 per 32-wide K block, the block's sum times the
#: two e8m0 scales (powers of two: exact) added into a float32 accumulator
#: (:class:`BlockGemm` with ``block=32`` on the weights dequantised exactly to float32);
#: in-block sums at :data:`FP8_DOT_BITS` bits as the FP8 profiles [inferred: the MMA's
#: internal precision]; the rest as ``vllm-triton-fp8`` (silu_and_mul, moe_sum) [inferred].
TRITON_MXFP4_MXFP8 = KernelProfile(
    name="triton-mxfp4-mxfp8",
    summary="triton_kernels matmul_ogs, MXFP4 weights x MXFP8 activations (e4m3, e8m0 per 32)",
    sources="formats.md [code]: triton_kernels mxfp.py (MX scale rounded up, e2m1 format); "
            "e4m3 destination, in-block precision and epilogue [inferred]",
    pipelines=(("mxfp4_mxfp8", Pipeline(
        quantise=MXFP8_QUANTISER,
        gemm1=BlockGemm(("x",), block=32, dot_bits=FP8_DOT_BITS),
        swiglu=VLLM_TRITON_FP8.pipeline("fp8_block").swiglu,
        requantise=MXFP8_QUANTISER,
        gemm2=BlockGemm(("slot", "x"), block=32, dot_bits=FP8_DOT_BITS))),),
    combine=VLLM_TRITON.combine,
    domain=VLLM_DOMAIN,
).with_ftz()

#: NVFP4 W4A4 (vLLM's ``nvfp4``: ``cutlass_moe_fp4``, the kernel vLLM's
#: ``tests/kernels/moe/test_nvfp4_moe.py`` checks; formats.md, NVFP4 [code]): per expert,
#: the rows quantised under ``a1_gscale`` (``scaled_fp4_experts_quant``: e4m3 block scales with
#: a saturating cast, e2m1 ties to even saturating at 6 [code]), ``cutlass_fp4_moe_mm`` into
#: x's dtype with ``alpha`` in the epilogue [code] (float32 accumulation in any order
#: [inferred]), ``silu_and_mul`` in x's dtype [code], the same quantisation under
#: ``a2_gscale``, GEMM2 into x's dtype, then ``c3 · topk_weights.to(x dtype)`` rounded to x's
#: dtype and the top-k ``sum`` (float32 in any order, one cast) [code: cutlass_moe.py;
#: torch's reduction order inferred]. The quantiser's approximate reciprocals within 2 ulp
#: [inferred]. Subnormals may flush, as in the other GPU profiles [inferred].
VLLM_NVFP4 = KernelProfile(
    name="vllm-nvfp4",
    summary="vLLM CUTLASS NVFP4 MoE (W4A4): e2m1 activations per 16 under static per-expert "
            "global scales, block-scaled e2m1 GEMMs with alpha in the epilogue",
    sources="formats.md [code]: cutlass_moe.py run_cutlass_moe_fp4, nvfp4_utils.py; the "
            "accumulation order and reciprocal error [inferred]",
    pipelines=(("nvfp4", Pipeline(
        gemm1=Fp4Gemm(("col", "x"), quotient_ulps=2),
        swiglu=VLLM_TRITON.pipeline("float").swiglu,
        gemm2=Fp4Gemm(("col", "x", "slot_x", "x"), quotient_ulps=2))),),
    combine=Combine("gemm2", "moe_sum", ()),
    domain=VLLM_DOMAIN,
).with_ftz()

PROFILES: dict[str, KernelProfile] = {
    p.name: p for p in (ASCEND_A3, VLLM_TRITON, VLLM_TRITON_TQ, TORCH_GROUPED_MM, VLLM_TRITON_FP8,
                        TORCH_SCALED_GROUPED_MM, VLLM_MXFP4, VLLM_MARLIN_W4A16,
                        VLLM_NVFP4_W4A16, DEEPGEMM_SM100_FP8, TRITON_MXFP4_MXFP8,
                        VLLM_NVFP4)}
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

