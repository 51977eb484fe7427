"""How far the kernel-faithful W8A8 result may lie from the ideal one: a bound derived step by
step from §6 of ``docs/contract/dispatch_ffn_combine.md``, from the problem's own values.

Notation, per received row (token ``x``, local expert with int8 ``W1`` (K, N), ``W2`` (I, K) and
float32 scales ``s1`` (N,), ``s2`` (K,)); starred values are the exact mathematics that
``numerics="ideal"`` evaluates: ``h* = x·W1d``, ``a* = silu(g*)·u*`` (``g*``, ``u*`` the gate and
up halves of ``h*``, clamped like the kernel when ``swiglu_limit`` is set), ``y* = a*·W2d`` and
``out* = Σ_k p_k·y*_k``, with ``W1d = W1·diag(s1)``, ``W2d = W2·diag(s2)``, ``B1 = |W1d|``,
``B2 = |W2d|``.

Rounding model: for a binary format ``f`` with unit roundoff ``u_f`` (half its machine epsilon:
2^-24 float32, 2^-11 float16, 2^-8 bfloat16, 2^-53 float64) and underflow error ``η_f`` (half its
smallest subnormal), rounding ``w`` gives ``fl(w) = w(1+δ) + η`` with ``|δ| <= u_f``,
``|η| <= η_f``. So if ``|w − v| <= E`` and ``|v| <= V``, then
``|fl(w) − v| <= E + u_f·(V + E) + η_f`` (:meth:`_Steps.round`). A length-``n`` dot product
summed in any order has error ``<= γ_n·Σ|terms|``, ``γ_n = n·u/(1 − n·u)`` (Higham,
*Accuracy and Stability of Numerical Algorithms*, §3.1). Every bound below is a vector over the
row's columns; ``|·|`` and products are elementwise, ``·B`` is a matrix product with ``B``.

Step 1 (``"activation"``). ``σ1 = fl(amax/127) <= (amax/127)(1+u32)``,
``q = round_half_away(fl(x/σ1))``. ``x − σ1·q = σ1·(x/σ1 − fl(x/σ1)) + σ1·(fl(x/σ1) − q)``, so
``|x − σ1 q| <= ε1 := σ1/2 + u32·|x|`` per element. Two elements do better: where
``|x| < σ1(1−u32)/2``, ``fl(x/σ1) < 1/2`` and ``q = 0``, so the error is ``|x|`` (zeros are
exact); the largest element has ``fl(amax/σ1) = 127(1 ± 2u32)``, so ``q = ±127`` and the error
is ``|amax − 127σ1| <= u32·amax``. Through the weights ``|(x − σ1 q)·W1d| <= ε1·B1``.

Step 2–3 (``"gemm1"``). ``acc1 = q·W1`` is exact; ``h = fl32(fl16(fl32(fl32(acc1)·s1))·σ1)``.
With ``V = |h*| + ε1·B1`` bounding ``|σ1·acc1·s1|``, the four roundings add
``u32·V`` (the int-to-float32 conversion of an integer: no underflow), then ``u32``, ``u16`` and
``u32`` steps on ``V`` (underflow terms of the scaled steps carry the factor ``σ1``). So
``|h − h*| <= E_h := ε1·B1 + (rounding chain)``. The fp16 intermediate is ``acc1·s1``, at
most ``127·V/amax`` (``σ1 >= amax(1 − u32)/127``) and at most ``127·colsum(B1)``; only where
that reaches the float16 maximum may it overflow, and the row's bound is ``inf``.
``"scale_truncation"`` (``truncate_scales=True`` only): the faithful model chops ``s1`` to 19
bits, 11 significant bits, a relative error below ``2^(1−11) = 2^-10``; the ideal keeps ``s1``.

Clamp. ``min(·, L)`` and ``max(·, −L)`` are 1-Lipschitz and never increase ``|h|``: ``E_h`` and
the magnitudes pass through unchanged.

Step 4 (``"swiglu"``; SwigluOAI, PR #11916: ``silu_α(g) = g/(1 + exp(−α·g)) = silu(αg)/α``
with the same Lipschitz constant and ``|silu_α(g)| <= |g|``, ``u + 1`` in place of ``u``, and
the rounding of ``α·g`` and of ``u + 1`` in ``ρ``: :func:`exp_rho`). ``silu`` is
Lipschitz with constant ``sup|silu'| = 1.0998…`` (attained at ``x ≈ ±2.3994``, the roots
of ``silu''``), bounded above by :data:`SILU_LIPSCHITZ`, and ``|silu(g)| <= |g|``. Hence
``|silu(g)u − silu(g*)u*| <= L·E_g·(|u*| + E_u) + |silu(g*)|·E_u``. The float32 evaluation
``fl(fl(g / fl(1 + fl(exp(−g)))) · u)`` adds a relative error
``ρ = (1+u)²/((1 − c·u)(1 − u)) − 1`` on ``|silu(g)u| <= (|silu(g*)| + L·E_g)(|u*| + E_u)``, with
``c·u`` the relative error of ``exp`` (``c`` = 2 × :data:`EXP_ULPS`: one ulp is at most
``2u`` relative), plus two underflow terms. Where ``exp(−g)`` may overflow (``|g| > ln(max)``)
the computed ``a`` is ``±0``: relative error 1 there.

Step 5 (``"requantisation"``). ``σ2 = fl(amax2/127)``, ``q2 = rint(fl(a·fl(127/amax2)))``:
``σ2·fl(a·inv) = a(1+δ)³`` (+ underflow), so ``|a − σ2 q2| <= σ2/2 + |a|·((1+u32)³ − 1)``,
with ``σ2 <= max|a|(1+u32)/127``. ``σ2`` may be subnormal: ``127·η32`` more. Where
``127/amax2`` overflows float32 the model (``zero_rows="zero"``) requantises in float64, with
the same error: no infinite bound.

Steps 6–7 (``"gemm2"``, ``"y_cast"``). As steps 2–3 with ``V2 = |y*| + (E_a + E_req)·B2``, and
the final rounding of ``y`` to the out dtype.

Step 8 (``"combine"``, ``"out_cast"``). The float32 combine is a length-``top_k`` dot product:
``|acc − Σ p_k y_k| <= γ_topk·Σ|p_k||y_k| + top_k·η32``; the propagated part is
``Σ|p_k|·E_y,k``; the cast to the out dtype adds ``u_out(|out*| + E) + η_out``.

``"ideal_float64"``: the ideal result is itself computed in float64 (dot products of length K,
I and top_k, a float64 ``exp`` within :data:`EXP_ULPS64`); the same propagation with float64
units bounds its distance to the exact mathematics, and the magnitudes used above are the
float64 values widened by that bound. Terms of second order in ``u64`` are neglected.

The BF16/FP16-weight variant has no quantisation: ``"gemm1"``/``"gemm2"`` are the model's
float64 sums (``γ_n`` in float64) rounded to float32 and stored in x's dtype, ``"swiglu"`` adds
the rounding of ``a`` to x's dtype.

NVFP4 W4A4 (:class:`oracle.model.kernels.Fp4Gemm`): the weights' values ``e2m1·s/γ_w`` in
float32 (within ``u32``), ``"activation"`` and ``"requantisation"`` :func:`e2m1_error` under
the expert's ``a1_gscale``, ``a2_gscale`` (half the e2m1 step under the block's e4m3 scale,
plus the excess of a saturated block), the GEMMs float32 in any order (``γ_n``) with ``α``
(``3·u32``), silu and the product stored in x's dtype, and per slot two more roundings to x's
dtype (the routed weight cast, the product).

Flush to zero (``ftz=True``: a kernel that may flush float32 subnormals, GPU-style). Every
rounding into float32 or bfloat16 then has the underflow error 2^-126 in place of ``η``
(:meth:`oracle.model.arithmetic.FloatFormat.flushing`): a flushed result is a rounding with
``δ = 0``, ``η = −w``. Operands may be read as 0 too: an element of ``x`` of magnitude at most
2^-126 quantises with error ``|x|``; a BF16/FP16-weight GEMM moves by at most
``2^-126·(colsum|W| + ||x||₁ + 2n)`` (operands read as 0, ``n`` products and ``n − 1``
partial sums written as 0); a routed weight read as 0 drops ``|p_k·y_k| <= 2^-126·|y_k|``.
A scale ``σ1``, ``σ2`` or ``s`` that may flush makes its whole product 0, an error of at most
the exact value's magnitude: those rows (columns) take ``|h*|`` (``|y*|``) as their error.

The bound is for the default ``zero_rows="zero"`` policy. Undefined rows (masked tokens, tokens
that lost a slot to truncation) get ``inf``: nothing is promised there.

Evaluation. The magnitudes start from the float64 ideal's own ``h*`` (GEMM1, before the
clamp) and ``y*`` (``numerics="ideal"``: the run the judge holds, or one made here): each is a
dot product of length ``n`` of the same operands, within ``γ64_{n+1}·Σ|terms|`` of its exact
value (:func:`_ideal_error`: ``n`` products, ``n − 1`` additions and the per-channel scaling,
in any order, so for either GEMM backend), carried as a never-omitted error on the
magnitudes; ``a`` is computed from that ``h*`` as the ideal computes it (the same clamp and
:func:`oracle.model.arithmetic.glu64`, so it is the ideal's ``a`` bit for bit, the one its
``y*`` multiplies). Before issue 26's third stop the bound made its own float32 ``x·W1`` and
``a·W2``, whose ``γ32_n`` error it carried: the float64 values make it up to a few percent
tighter where a GEMM's output cancels, and spare two products per expert. Every product
with ``B1``/``B2`` is an upper bound: nonnegative rows rounded up to float32, the sum
divided by ``1 − γ_n`` (``γ_n``-relative for sums of nonnegative terms, Higham §3.1), plus
``n·η32`` for underflowing products. All vectors that meet the same ``|W|`` share one product,
and every product of one weight comes from one pass over it, a chunk of rows at a time
summed in float64: sound for any chunking (:func:`_weight_products`). The float64-sized error
vectors of ``a`` (``γ64``-relative) reach ``y`` through the column sums of ``B2``
(:func:`_column_bound`), without a product.

It is a worst case (absolute values everywhere): on generated problems the actual error is
typically 3–20 % of the bound, and up to about 60 % where one final rounding dominates.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import numpy as np

from oracle.adapters.gemm import Product, weight_products
from oracle.model.arithmetic import FORMATS, FloatFormat, glu64
from oracle.model.kernels import E4M3_TINY, E4M3_UNIT, FP8_DOT_BITS
from oracle.model.reference import Result, float_weight_problem, route, run
from spec import DTYPES, Problem
from spec.config import OpConfig
from spec.fields import Variant
from spec.fp8 import BLOCK, E4M3_MAX, WEIGHT_EPS, dequantise, to_e4m3
from spec.mxfp4 import E2M1_MAX
from spec.nvfp4 import NV_BLOCK, dequantise_nv

__all__ = [
    "EXP_ULPS",
    "EXP_ULPS64",
    "SILU_LIPSCHITZ",
    "TERMS",
    "block_amax",
    "e2m1_error",
    "e4m3_error",
    "fp8_gemm_error",
    "half_step",
    "ideal_tolerance",
    "nv_multiplier",
    "quantisation_error_bound",
]

Array = np.ndarray[Any, Any]

#: The error terms of the bound, in pipeline order; any can be dropped with ``omit``.
TERMS = (
    "activation", "gemm1", "scale_truncation", "swiglu", "requantisation", "gemm2", "y_cast",
    "combine", "out_cast", "ideal_float64",
)
#: ``sup|silu'(x)| = 1.09984…`` (at ``x ≈ 2.3994``), rounded up.
SILU_LIPSCHITZ = 1.1
#: NumPy's own accuracy tests accept 3 ulp for float32 ``exp`` and 1 ulp for float64
#: (``numpy/_core/tests/data/umath-validation-set-exp.csv``).
EXP_ULPS = 3
EXP_ULPS64 = 1
#: The 19-bit scales keep 11 significant bits: chopping errs by less than 2^(1−11) [inferred].
_CHOP_UNIT = 2.0**-10
#: float32's smallest normal value: a flush-to-zero kernel may read or write 0 up to it.
_NORMAL32 = 2.0**-126


def exp_rho(fmt: FloatFormat, ulps: int, oai_arg: Any = None) -> Any:
    """Relative error of ``fl(fl(g / fl(1 + exp(−g))) · u)`` in ``fmt`` with ``exp`` within
    ``ulps``; for SwigluOAI, ``fl(fl(g / fl(1 + exp(−fl(α·g)))) · fl(u + 1))`` with ``|α·g| <=
    oai_arg``: the rounded argument puts ``exp`` within ``exp(|αg|·u) − 1`` (at most
    ``1.01·|αg|·u`` for ``|αg| < 89``) more, and ``u + 1`` is one more rounding."""
    c = 2 * ulps * fmt.unit
    if oai_arg is None:
        return (1 + fmt.unit) ** 2 / ((1 - c) * (1 - fmt.unit)) - 1
    c = c + 1.01 * oai_arg * fmt.unit
    return (1 + fmt.unit) ** 3 / ((1 - c) * (1 - fmt.unit)) - 1


F16, F32, F64 = FORMATS["float16"], FORMATS["float32"], FORMATS["float64"]


class _Steps:
    """Applies the rounding model, with the omitted terms contributing nothing."""

    def __init__(self, omit: Collection[str], ftz: bool = False) -> None:
        unknown = set(omit) - set(TERMS)
        if unknown:
            raise ValueError(f"omit: unknown terms {sorted(unknown)}; the terms are {TERMS}")
        self.omit = frozenset(omit)
        self.ftz = ftz

    def kernel(self, fmt: FloatFormat) -> FloatFormat:
        """``fmt`` as the kernel rounds into it: with its underflow error grown to 2^-126
        where the kernel may flush float32 subnormals."""
        return fmt.flushing() if self.ftz else fmt

    def add(self, term: str, err: Array, extra: Array | float) -> Array:
        """``err + extra``, unless ``term`` is omitted."""
        return err if term in self.omit else np.asarray(err + extra)

    def round(
        self, term: str, mag: Array, err: Array, fmt: FloatFormat, scale: Array | float = 1.0
    ) -> Array:
        """``|fl(w) − v|`` given ``|w − v| <= err`` and ``|v| <= mag``; the underflow error of
        a value computed as ``scale · (something rounded)`` scales with it."""
        # A value bounded by 0 is exactly 0: nothing to round, nothing to underflow.
        tiny = self.kernel(fmt).tiny
        return self.add(term, err, fmt.unit * (mag + err) + scale * tiny * (mag + err > 0))


def _dequant_chain(steps: _Steps, term: str, mag: Array, sigma: Array, truncate: bool) -> Array:
    """Error of ``fl32(fl16(fl32(fl32(acc)·s))·σ)`` against ``σ·acc·s``, ``|σ·acc·s| <= mag``
    (§6 steps 2–3 and 6–7)."""
    err = steps.add(term, np.zeros_like(mag), F32.unit * mag)  # float32(acc) of an integer
    if truncate:
        err = steps.add("scale_truncation", err, _CHOP_UNIT * (mag + err))
    err = steps.round(term, mag, err, F32, sigma)  # · s
    err = steps.round(term, mag, err, F16, sigma)  # the fp16 intermediate
    return steps.round(term, mag, err, F32)  # · σ


def _swiglu_error(
    steps: _Steps, silu_mag: Array, up_mag: Array, err_g: Array, err_u: Array,
    gate_hi: Array, fmt: FloatFormat, ulps: int, term: str, alpha: float | None,
) -> Array:
    """``|a − a*|`` of a SwiGLU evaluated in ``fmt`` on inputs within ``err_g``/``err_u`` of the
    exact ``g*``, ``u*`` (``|silu(g*)| <= silu_mag``, ``|u*| <= up_mag``; ``|g| <= gate_hi``).
    SwigluOAI (``alpha``): ``silu_α(g) = silu(αg)/α`` has the same Lipschitz constant and
    ``|silu_α(g)| <= |g|``; ``up_mag`` then bounds ``|u* + 1|``."""
    propagated = SILU_LIPSCHITZ * err_g * (up_mag + err_u) + silu_mag * err_u
    value = (silu_mag + SILU_LIPSCHITZ * err_g) * (up_mag + err_u)
    arg_hi = gate_hi if alpha is None else alpha * gate_hi
    rho = np.where(arg_hi < math.log(fmt.max),
                   exp_rho(fmt, ulps, None if alpha is None else arg_hi), 1.0)
    return steps.add(term, propagated, rho * value + 2 * fmt.tiny * (value > 0))


def block_amax(v: Array, width: int, dtype: Any = np.float64) -> Array:
    """Per row and ``width``-column block of ``v`` (rows by columns; the last block may be
    partial, read as if zero-padded), ``max|v|`` in ``dtype``."""
    rows, cols = v.shape
    grouped = np.zeros((rows, -(-cols // width) * width), dtype)
    grouped[:, :cols] = np.abs(v)
    return np.asarray(grouped.reshape(rows, -1, width).max(axis=2))


def e4m3_error(v: Array, group: int | None = BLOCK) -> Array:
    """Per element of ``|v|`` (rows by columns, float64), a bound on ``|v − σ·e4m3(v/σ)|``
    under any legitimate FP8 group quantiser (:class:`oracle.model.kernels.GroupQuantiser`
    and its variants, formats.md): e4m3's relative ``2^-4``, the float32 divisions
    (``3·u32``), and the subnormal spacing ``σ·2^-10``, with ``σ`` the group's
    ``max(amax, 1e-4)/448`` (the largest floor, DeepGEMM's) doubled for a scale rounded up to
    a power of two (UE8M0). Saturation never adds: every kernel's ``|v/σ|`` stays within
    448 up to its roundings. ``group``: the columns sharing a scale (the variant's
    :attr:`spec.fields.Variant.group`; ``None``: the row)."""
    cols = v.shape[1]
    width = group or max(cols, 1)
    sigma = np.maximum(block_amax(v, width), WEIGHT_EPS) / E4M3_MAX * 2 * (1 + F32.unit)
    per_col = np.repeat(sigma, width, axis=1)[:, :cols]
    return np.asarray((E4M3_UNIT + 3 * F32.unit) * np.abs(v) + E4M3_TINY * per_col)


def half_step(v: Array, sigma: Array, digits: int, emin: int) -> Array:
    """Half the spacing of the grid ``σ·F`` around ``|v|`` (``F`` a float format of
    ``digits`` significand bits, the implicit one included, smallest normal exponent
    ``emin``): ``σ·2^(e − digits)``, ``e`` the binade of ``|v|/σ`` (``emin`` below it). The
    quotient is taken 2^-20 relative high, so a kernel whose division or scale lies a few
    float32 ulps away never lands in a larger binade than the one used."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        t = np.abs(v) / sigma * (1 + 2.0**-20)
        e = np.maximum(np.floor(np.log2(np.where(t > 0, t, 1.0))), emin)
    return np.asarray(np.where(sigma > 0, sigma * 2.0 ** (e - digits), 0.0))


def nv_multiplier(v: Array, gscale: float, slack: float = 4 * F32.unit) -> Array:
    """Per element of ``|v|`` (rows by columns), the NVFP4 block multiplier ``s/γ`` of a
    legitimate quantiser under the global scale ``γ``: ``s = e4m3(γ·amax/6)`` clamped at 448
    (formats.md, NVFP4), ``amax`` the element's block of 16's, taken ``slack`` high (4 float32
    ulps: a kernel computing ``γ·amax/6`` otherwise never lands on a larger scale)."""
    rows, cols = v.shape
    grouped = np.zeros((rows, -(-cols // NV_BLOCK) * NV_BLOCK))
    grouped[:, :cols] = np.abs(v)
    amax = grouped.reshape(rows, -1, NV_BLOCK).max(axis=2)
    s = to_e4m3((gscale * amax / E2M1_MAX * (1 + slack)).astype(np.float32))
    return np.repeat(s.astype(np.float64) / gscale, NV_BLOCK, axis=1)[:, :cols]


def e2m1_error(v: Array, gscale: float, div_ulps: int) -> tuple[Array, Array]:
    """Per element of ``|v|`` (float64), the NVFP4 activation quantiser's error under the
    global scale ``γ`` (:class:`oracle.model.kernels.Fp4Gemm`): ``(c, excess)``, ``c`` half
    the e2m1 grid step at the element (2 significand bits, the smallest normal exponent 0, on
    the grid ``s/γ``) plus the float32 quotient's ``(3 + 2·div_ulps)·u32·|v|``, and
    ``excess`` the deterministic error beyond the grid's end ``6·s/γ`` where the block scale
    saturates at 448. ``c + excess`` bounds the error."""
    mult = nv_multiplier(v, gscale) * (1 + 2 * F32.unit)
    top = E2M1_MAX * mult
    half = half_step(np.minimum(v, top), mult, 2, 0)
    excess = np.maximum(v - top * (1 + 2.0**-20), 0.0)
    return half + (3 + 2 * div_ulps) * F32.unit * v, excess


#: How far NVFP4 activation quantisers' quotients may lie from the reference's float32
#: operations (vLLM's CUDA quantiser's approximate reciprocals; the vllm-nvfp4 profile's
#: ``quotient_ulps``) [inferred].
_NV_QUOTIENT_ULPS = 2


def fp8_gemm_error(n: int) -> float:
    """The FP8 block GEMM's worst-case error relative to ``Σ|a_j·w_j|``
    (:class:`oracle.model.kernels.BlockGemm`): tile sums of at most 128 products with
    :data:`~oracle.model.kernels.FP8_DOT_BITS` bits, at most ``ceil(n/16)`` tiles added in
    float32, the two scale products."""
    dot = min(n, BLOCK) * 2.0**-FP8_DOT_BITS
    return dot / (1 - dot) + F32.gamma(-(-n // 16)) + 3 * F32.unit


def _floored(amax: Array, amax_floor: float | None) -> Array:
    """``max(amax, floor)`` as a quantiser with an ``amax`` floor computes it (float32)."""
    return amax if amax_floor is None else np.maximum(amax, float(np.float32(amax_floor)))


def _activation_error(ax: Array, amax: Array, amax_floor: float | None) -> Array:
    """``|x − σ1·q|`` per element (§6 step 1), ``σ1`` from ``max(amax, amax_floor)``:
    ``σ1/2 + u32·|x|`` in general; exactly ``|x|`` where ``|x|/σ1 < 1/2`` even after rounding
    (q = 0); at most ``u32·amax`` for the largest element of a row above the floor
    (``fl(amax/σ1)`` is within ``127 ± 2^-16`` of 127, so q = ±127 and the error is
    ``|amax − 127·σ1| = amax·|δ|``)."""
    u = F32.unit
    scale = _floored(amax, amax_floor)
    sigma_hi, sigma_lo = scale / 127 * (1 + u), scale / 127 * (1 - u)
    general = np.where(ax < sigma_lo * (1 - u) / 2, ax, sigma_hi / 2 + u * ax)
    return np.asarray(np.where((ax == amax) & (scale == amax), u * amax, general))


@dataclass(frozen=True)
class _SlotBound:
    """Per computed slot: ``|y*|`` bound, faithful error, float64 ideal error (rows, K)."""

    mag: Array
    err: Array
    err64: Array


def _upper32(v: Array) -> Array:
    """``v`` (float64, >= 0) rounded up to float32: every element ``>= v``."""
    with np.errstate(over="ignore"):
        v32 = v.astype(np.float32)
        return np.asarray(np.where(v32 < v, np.nextafter(v32, np.float32(np.inf)), v32))


def _weight_products(w: Array, nonneg: Array, scale: Array | None,
                     w_abs: Array | None = None) -> Array:
    """One pass over ``w`` (n, C), float32 chunks (:func:`oracle.adapters.gemm.
    weight_products`), for float32-exact ``w`` and nonnegative ``nonneg`` (float64): an upper
    bound on ``nonneg @ (|w|·diag(scale))`` whose last row, one more, bounds the column sums
    of ``|w|·diag(scale)``. ``w_abs`` (float32, ``>= |w|``) replaces ``|w|`` where the
    weight is not float32-exact (FP8's dequantised weights).

    The upper bound: ``nonneg`` rounded up to float32, each chunk's ``c`` products summed in
    float32 (within ``γ_c`` of its exact sum, Higham §3.1, plus ``c·η32`` for products that
    underflow), the chunks' sums added in float64, then divided by ``1 − γ_n`` and ``n·η32``
    added. Sound for any chunking: with ``m`` chunks, ``(1 − γ_c)(1 − γ64_m) >= 1 − γ_n``
    whenever ``c < n`` (``γ_n − γ_c >= u32``, ``γ64_m < n·2^-52``), and a single chunk is the
    whole sum. The scale is applied in float64 (two roundings on the bound: ``(1 + u64)²``).
    The torch backend sums each product in float64, within ``γ64_n <= γ_n`` of the exact
    sum: the same bound holds."""
    n = w.shape[0]
    left = np.concatenate([_upper32(nonneg), np.ones((1, n), np.float32)])
    with np.errstate(over="ignore", invalid="ignore"):
        ap, = (weight_products(w, [Product(left, "abs")]) if w_abs is None
               else weight_products(w_abs, [Product(left)]))
        ap = ap / (1 - F32.gamma(n)) + n * F32.tiny
    return np.asarray(ap if scale is None else ap * scale.astype(np.float64) * (1 + F64.unit) ** 2)


def _ideal_error(n: int, abs_bound: Array, scale: Array | None) -> Array:
    """How far a product of the float64 ideal (:func:`oracle.model.reference._ideal_product`:
    ``n`` products summed, then the per-channel scale; FP8 on weights dequantised in
    float64) may lie from the exact product of the same operands, ``abs_bound`` bounding
    ``Σ|terms|``: ``γ64_{n+1}`` (``n`` products, ``n − 1`` additions and the scaling,
    Higham §3.1, in any order), plus ``n·η64`` for products that underflow."""
    s = 1.0 if scale is None else scale.astype(np.float64)
    return np.asarray(F64.gamma(n + 1) * abs_bound + n * F64.tiny * s)


def _column_bound(v: Array, col: Array) -> Array:
    """An upper bound on ``v @ B`` for nonnegative ``v`` (rows, n) and ``B >= 0`` whose
    column sums are at most ``col``: ``max_j v_j · col``. For error vectors of float64 size
    (``γ64``-relative), where its slack is ten orders below every other term: no product."""
    return np.asarray(v.max(axis=1, keepdims=True, initial=0.0) * col)


def _expert_bound(
    x: Array, w1: Array, s1: Array | None, w2: Array, s2: Array | None,
    cfg: OpConfig, steps: _Steps, truncate: bool, amax_floor: float | None,
    h_ideal: Array, y_ideal: Array, variant: Variant,
    act_gscales: tuple[float, float] | None = None,
) -> _SlotBound:
    """The per-slot bounds of one expert's rows (§6 steps 1–7); ``h_ideal``, ``y_ideal``:
    the float64 ideal's GEMM1 output (before the clamp) and ``y`` of these rows; ``variant``:
    the call's row (MXFP4 x MXFP8 reaches here as the float-weight problem of its dequantised
    weights); ``act_gscales``: NVFP4 W4A4's activation global scales of the expert (its
    weights then come dequantised, in float64)."""
    i, k_len = cfg.intermediate, cfg.hidden
    out = FloatFormat.of(DTYPES[cfg.x_dtype])
    exact = _Steps(())  # the error of our own evaluation is never omitted
    x64 = x.astype(np.float64)
    ax = np.abs(x64)
    int8 = cfg.weight_dtype == "int8"
    fp8 = variant.e4m3_activations  # FP8 rows, MXFP8: e4m3 activations per group
    nv = act_gscales is not None
    a1: Array | None = None  # >= |W| where the float32 weights are not exact
    a2: Array | None = None
    # int8 and 16-bit weights are exact in float32: |W| is taken chunk by chunk
    if fp8 and s1 is not None and s2 is not None:  # scales: |W·s| dequantised once, rounded up
        a1, a2 = _upper32(np.abs(dequantise(w1, s1))), _upper32(np.abs(dequantise(w2, s2)))
        s1 = s2 = None
    if nv:  # e2m1·s/γ (float64): |W| rounded up to float32
        a1, a2 = _upper32(np.abs(w1)), _upper32(np.abs(w2))
    rows = x.shape[0]

    # |x|·B1 and (int8, FP8) the activation error through B1, in one float32 product.
    if int8 or fp8 or nv:
        if nv:
            assert act_gscales is not None
            act_in = np.add(*e2m1_error(ax, act_gscales[0], _NV_QUOTIENT_ULPS))
        elif fp8:
            act_in = e4m3_error(ax, variant.group)
        else:
            amax = ax.max(axis=1, keepdims=True, initial=0.0)
            act_in = _activation_error(ax, amax, amax_floor)
        if steps.ftz:  # an element read as 0 quantises to 0: error |x|
            act_in = np.where(ax <= _NORMAL32, np.maximum(act_in, ax), act_in)
        both = _weight_products(w1, np.concatenate([ax, act_in]), s1, a1)
        ax_b1, act = both[:rows], both[rows:-1]
    else:
        both = _weight_products(w1, ax, s1, a1)
        ax_b1 = both[:-1]
    col1 = both[-1]  # >= Σ_k |W1d_kn|
    # h, the float64 ideal's: within e_c of the exact h* (our evaluation, never omitted),
    # and that same distance as the ideal's own error e64 (omittable).
    h = np.array(h_ideal, dtype=np.float64)
    e_c_h = _ideal_error(k_len, ax_b1, s1)
    e64_h = steps.add("ideal_float64", np.zeros_like(h), e_c_h)
    h_mag = np.abs(h) + e_c_h  # >= |h*| (before the clamp)
    if cfg.swiglu_limit is not None:
        h = np.minimum(h, cfg.swiglu_limit)
        h[:, i:] = np.maximum(h[:, i:], -cfg.swiglu_limit)
    alpha = cfg.oai_alpha
    g = h[:, :i]
    _, silu, u = glu64(g, h[:, i:], alpha)
    a = silu * u
    silu_mag = np.abs(silu) + SILU_LIPSCHITZ * e_c_h[:, :i]
    up_mag = np.abs(u) + e_c_h[:, i:]
    gate_hi = np.abs(g) + e_c_h[:, :i]
    e_c_a = _swiglu_error(exact, silu_mag, up_mag, e_c_h[:, :i], e_c_h[:, i:], gate_hi, F64,
                          EXP_ULPS64, "ideal_float64", alpha)
    e64_a = _swiglu_error(steps, silu_mag, up_mag, e64_h[:, :i], e64_h[:, i:], gate_hi, F64,
                          EXP_ULPS64, "ideal_float64", alpha)
    a_mag = np.abs(a) + e_c_a  # >= |a*|

    overflow = np.zeros(rows, dtype=bool)
    c_max = 127 * (1 + F32.unit) ** 2 * (1 + truncate * _CHOP_UNIT)
    if int8:
        sigma1 = _floored(amax, amax_floor) / 127 * (1 + F32.unit)
        e_h = steps.add("activation", np.zeros_like(act), act)
        e_h = e_h + _dequant_chain(steps, "gemm1", h_mag + act, sigma1, truncate)
        overflow |= _fp16_overflow(h_mag + act, amax, c_max * col1)
        if steps.ftz:  # σ1 or a scale flushed to 0: h is 0
            e_h = np.where(_may_vanish(steps, sigma1, s1), np.maximum(e_h, h_mag), e_h)
    elif fp8 or nv:
        e_h = steps.add("activation", np.zeros_like(act), act)
        relative = fp8_gemm_error(k_len) if fp8 else F32.gamma(k_len) + 3 * F32.unit  # α
        e_h = steps.add("gemm1", e_h, relative * (ax_b1 + act))
        e_h = steps.round("gemm1", h_mag + act, e_h, out)  # stored in x's dtype
        overflow |= (h_mag + e_h >= out.max).any(axis=1)
    else:
        e_h = steps.add("gemm1", np.zeros_like(h), F64.gamma(k_len) * ax_b1)
        if steps.ftz:
            e_h = e_h + _flushed_gemm(col1, ax)
        e_h = steps.round("gemm1", h_mag, steps.round("gemm1", h_mag, e_h, F32), out)
    e_g, e_u = e_h[:, :i], e_h[:, i:]
    e_a = _swiglu_error(
        steps, silu_mag, up_mag, e_g, e_u, gate_hi + e_g, steps.kernel(F32), EXP_ULPS, "swiglu",
        alpha,
    )
    if int8:
        af_mag = a_mag + e_a  # >= |a| as the kernel computes it
        amax2 = af_mag.max(axis=1, keepdims=True, initial=0.0)
        sigma2 = _floored(amax2, amax_floor) / 127 * (1 + F32.unit)
        # sigma2 may be subnormal (absolute error η32, times |q2| <= 127); where 127/amax2
        # overflows the model requantises in float64 (zero_rows="zero"), with the same error.
        req = (sigma2 / 2 + af_mag * ((1 + F32.unit) ** 3 - 1)
               + 127 * steps.kernel(F32).tiny * (af_mag > 0))
        blocks = [steps.add("requantisation", e_a, req), a_mag]
    elif fp8 or nv:
        # vLLM's silu_and_mul rounds silu and the product to x's dtype (kernels.md)
        e_a = steps.round("swiglu", a_mag, steps.round("swiglu", a_mag, e_a, out), out)
        af_mag = a_mag + e_a
        req = steps.add("requantisation", e_a, np.add(*e2m1_error(
            af_mag, act_gscales[1], _NV_QUOTIENT_ULPS)) if act_gscales is not None
            else e4m3_error(af_mag, variant.group))
        blocks = [req, af_mag + req, a_mag]
    else:
        e_a = steps.round("swiglu", a_mag, e_a, out)  # a is stored in x's dtype
        blocks = [e_a, a_mag + e_a, a_mag]
    both = _weight_products(w2, np.concatenate(blocks), s2, a2)
    col2 = both[-1]  # >= Σ_i |W2d_ik|
    prods = np.split(both[:-1], len(blocks))
    prop, a_b2 = prods[0], prods[-1]
    # y, the float64 ideal's: the product of this very a (the ideal's own, bit for bit: the
    # same h, clamp and glu64) with W2d, within γ64 of it; a is within e_c_a of a*. Both
    # error vectors are float64-sized: through B2 by its column sums.
    y = y_ideal
    e_c_y = _column_bound(e_c_a, col2) + _ideal_error(i, a_b2, s2)
    e64_y = steps.add("ideal_float64", _column_bound(e64_a, col2), F64.gamma(i + 1) * a_b2)
    y_mag = np.abs(y) + e_c_y
    if int8:
        e_y = prop + _dequant_chain(steps, "gemm2", y_mag + prop, sigma2, truncate)
        lowest = np.clip(np.abs(a) - e_c_a - e_a, 0, None).max(axis=1, initial=0.0)
        worst_case = c_max * col2
        overflow |= np.where(lowest > 0, _fp16_overflow(y_mag + prop, lowest[:, None],
                                                        worst_case),
                             (worst_case >= F16.max).any())
        if steps.ftz:  # σ2 or a scale flushed to 0: y is 0
            e_y = np.where(_may_vanish(steps, sigma2, s2), np.maximum(e_y, y_mag), e_y)
    elif fp8 or nv:
        e_y = steps.add("gemm2", prop, (fp8_gemm_error(i) if fp8
                                        else F32.gamma(i) + 3 * F32.unit) * prods[1])
    else:
        gemm = steps.add("gemm2", prop, F64.gamma(i) * prods[1])
        if steps.ftz:
            gemm = gemm + _flushed_gemm(col2, a_mag + e_a)
        e_y = steps.round("gemm2", y_mag, gemm, F32)
    e_y = steps.round("y_cast", y_mag, e_y, out)
    if nv:  # the routed weight cast to x's dtype, the product rounded to it (cutlass_moe_fp4)
        e_y = steps.round("y_cast", y_mag, steps.round("y_cast", y_mag, e_y, out), out)
    bad = overflow | (y_mag + e_y >= out.max).any(axis=1)
    e_y[bad] = np.inf
    return _SlotBound(y_mag, e_y, e64_y)


def _flushed_gemm(col_abs: Array, rows: Array) -> Array:
    """What flushing float32 subnormals can move a float-weight GEMM ``rows @ W`` by
    (``rows`` bounding the operands' magnitudes, ``col_abs`` the column sums of ``|W|``):
    each weight or operand read as 0, at most 2^-126 times the other factor, and each of the
    ``n`` products and ``n − 1`` partial sums written as 0."""
    n = rows.shape[1]
    return np.asarray(_NORMAL32 * (col_abs + rows.sum(axis=1, keepdims=True) + 2 * n))


def _may_vanish(steps: _Steps, sigma_hi: Array, scale: Array | None) -> Array:
    """Rows (``σ <= σ_hi``, a column vector) and columns (the per-channel ``scale``) whose
    dequant factor a flush-to-zero kernel may read as 0, zeroing the product."""
    rows = sigma_hi <= _NORMAL32
    if scale is None:
        return np.asarray(rows)
    return np.asarray(rows | (np.abs(scale) <= _NORMAL32))


def _fp16_overflow(mag: Array, amax: Array, worst_case: Array) -> Array:
    """Rows whose fp16 intermediate ``fl16(acc·s)`` may overflow: ``|σ·acc·s| <= mag`` with
    ``σ >= amax(1 − u32)/127``, so ``|acc·s| <= 127·mag/(amax(1 − u32))`` (two float32
    roundings on top), and never more than the worst case ``127·colsum|W·s|`` (``worst_case``,
    rounding included). A zero row has ``acc = 0``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        value = 127 * mag / (amax * (1 - F32.unit)) * (1 + F32.unit) ** 2
    reach = np.minimum(np.where(amax > 0, value, 0.0), worst_case)
    return np.asarray((reach >= F16.max).any(axis=1))


@dataclass(frozen=True)
class _Bound:
    err: tuple[Array, ...]  # per rank (M_r, K): |faithful out − ideal combined|
    mag: tuple[Array, ...]  # per rank (M_r, K): >= |ideal combined|


def _ideal_values(problem: Problem, ideal: Result | None, kept: Array) -> tuple[Array, Array]:
    """Per slot, the float64 ideal's GEMM1 output ``h*`` (before the clamp) and ``y*``: from
    ``ideal`` (an ideal-mode run of ``problem``) where it holds every ``kept`` slot, else
    from an ideal run here (one made on some tokens only has NaN on the others; on finite
    inputs a computed slot's float64 values are finite)."""
    cfg = problem.config
    slots, n_len = sum(cfg.tokens_per_rank) * cfg.top_k, 2 * cfg.intermediate

    def values(result: Result) -> tuple[Array, Array]:
        return (np.concatenate(result.trace.h).reshape(slots, n_len),
                np.concatenate(result.trace.y).reshape(slots, cfg.hidden))

    if ideal is not None and ideal.trace.h:
        h, y = values(ideal)
        if not (np.isnan(h[kept]).any() or np.isnan(y[kept]).any()):
            return h, y
    return values(run(problem, numerics="ideal"))


def _bound(problem: Problem, truncate_scales: bool, omit: Collection[str],
           ftz: bool, amax_floor: float | None, ideal: Result | None = None) -> _Bound:
    variant = problem.config.kernel_variant  # the call's, before its weights become floats
    if variant.dequantise is not None:  # W4A16, MXFP4 x MXFP8: their float weights
        problem = float_weight_problem(problem)
    steps = _Steps(omit, ftz)
    cfg = problem.config
    top_k, k_len, e_local = cfg.top_k, cfg.hidden, cfg.experts_per_rank
    out = FloatFormat.of(DTYPES[cfg.x_dtype])
    routing = route(problem)
    total = sum(cfg.tokens_per_rank)
    x = np.concatenate([r.x for r in problem.ranks]) if total else np.zeros((0, k_len))
    probs = np.abs(
        np.concatenate([r.probs for r in problem.ranks]).astype(np.float64)
        if total else np.zeros((0, top_k))
    )
    mag = np.zeros((total * top_k, k_len))
    err = np.full((total * top_k, k_len), np.inf)
    err64 = np.zeros((total * top_k, k_len))
    h_ideal, y_ideal = _ideal_values(problem, ideal, routing.slot_kept)
    for g in np.flatnonzero(routing.expert_kept):
        start = routing.expert_start[g]
        slots = routing.order[start : start + routing.expert_kept[g]]
        w1, w2, s1, s2 = problem.ranks[g // e_local].expert_weights(int(g % e_local))
        act: tuple[float, float] | None = None
        if variant.activation_scales:  # NVFP4 W4A4: the weights' values
            lists = problem.ranks[g // e_local].expert_lists(int(g % e_local))
            w1, w2 = (dequantise_nv(lists[f"w{j}"], lists[f"scale{j}"], lists[f"gscale{j}"],
                                    np.float64) for j in (1, 2))
            s1 = s2 = None
            act = (float(lists["a1_gscale"][0]), float(lists["a2_gscale"][0]))
        b = _expert_bound(x[slots // top_k], w1, s1, w2, s2, cfg, steps, truncate_scales,
                          amax_floor, h_ideal[slots], y_ideal[slots], variant, act)
        mag[slots], err[slots], err64[slots] = b.mag, b.err, b.err64

    def combine(values: Array) -> Array:  # Σ_k |p_k|·values_k per token
        return np.asarray(np.einsum("tk,tkc->tc", probs, values.reshape(total, top_k, k_len)))

    with np.errstate(invalid="ignore"):  # inf · 0 for a zero weight of an undefined slot
        e_comb = combine(err)
        y_abs = combine(mag + err)
        rounding = F32.gamma(top_k) * y_abs + top_k * steps.kernel(F32).tiny * (y_abs > 0)
        if ftz:  # a routed weight read as 0 drops |p·y| <= 2^-126·|y|
            subnormal_p = np.where((probs > 0) & (probs <= _NORMAL32), _NORMAL32, 0.0)
            rounding = rounding + np.einsum("tk,tkc->tc", subnormal_p,
                                            (mag + err).reshape(total, top_k, k_len))
        if variant.e4m3_activations or variant.activation_scales:
            # vLLM's moe_sum may add in x's dtype
            rounding = rounding + (top_k - 1) * (out.unit * y_abs + out.tiny)
        e_comb = steps.add("combine", e_comb, rounding)
        out_mag = combine(mag)
        e_out = steps.round("out_cast", out_mag, e_comb, out)
        # The final cast may overflow the out dtype (fp16: 65504): nothing is promised there.
        e_out = np.where(out_mag + e_comb >= out.max, np.inf, e_out)
        e64 = steps.add(
            "ideal_float64", np.zeros_like(e_out),
            combine(err64) + F64.gamma(top_k) * combine(mag + err64),
        )
    defined = np.asarray(routing.slot_kept.reshape(total, top_k).all(axis=1), dtype=bool)
    total_err = e_out + e64  # NaN (inf · 0) only where nothing is promised
    bound = np.where(defined[:, None] & ~np.isnan(total_err), total_err, np.inf)
    cuts = np.cumsum(cfg.tokens_per_rank)[:-1]
    return _Bound(tuple(np.split(bound, cuts)), tuple(np.split(out_mag + e64, cuts)))


def quantisation_error_bound(
    problem: Problem, *, truncate_scales: bool = False, omit: Collection[str] = (),
    ftz: bool = False, amax_floor: float | None = None,
) -> tuple[Array, ...]:
    """Per rank, an ``(M_r, K)`` float64 array bounding ``|faithful out − ideal combined|``
    elementwise, where *faithful out* is ``oracle.run(problem).ranks[r].out`` (the W8A8 kernel
    emulation; for the BF16/FP16 variant its float model) and *ideal combined* the float64
    ``oracle.run(problem, numerics="ideal").trace.combined[r]`` before its final cast. ``inf``
    on undefined rows and where an fp16 intermediate may overflow. ``truncate_scales`` matches
    ``Numerics(truncate_scales=True)``. ``omit`` drops named :data:`TERMS` (for showing that
    each term is needed). ``ftz``: the kernel may flush float32 subnormals to zero (then it
    bounds every such kernel's distance, not only the model's). ``amax_floor``: the kernel's
    int8 quantisers may floor ``amax`` there (vLLM's Triton quantiser: 1e-10), so a row below it
    is quantised on the floor's coarser grid. The derivation is the module docstring; it runs
    the ideal model for its ``h*`` and ``y*`` (:func:`ideal_tolerance` takes one at hand).

    >>> from spec import OpConfig, random_problem
    >>> cfg = OpConfig(ep_size=2, experts_per_rank=2, top_k=2, hidden=32, intermediate=16,
    ...                tokens_per_rank=(3, 1))
    >>> [b.shape for b in quantisation_error_bound(random_problem(cfg, seed=0))]
    [(3, 32), (1, 32)]
    """
    return _bound(problem, truncate_scales, omit, ftz, amax_floor).err


def ideal_tolerance(
    problem: Problem, ideal: Result | None = None, *, truncate_scales: bool = False,
    ftz: bool = False, amax_floor: float | None = None,
) -> tuple[Array, ...]:
    """Per rank, how far a kernel-faithful ``out`` may lie from the ideal ``out`` (the ideal
    value rounded to the out dtype): :func:`quantisation_error_bound` plus that one rounding,
    ``u_out·|ideal| + η_out``. ``ideal``, the ideal-mode :class:`oracle.Result` of ``problem``
    if at hand, makes the rounding term exact and gives the bound its ``h*`` and ``y*`` (else
    the ideal model is run here, and a bound on ``|ideal|`` is used). ``ftz``, ``amax_floor``:
    as in :func:`quantisation_error_bound`."""
    b = _bound(problem, truncate_scales, (), ftz, amax_floor, ideal)
    out = FloatFormat.of(DTYPES[problem.config.x_dtype])
    mags = b.mag if ideal is None else tuple(
        np.where(np.isnan(c), np.inf, np.abs(c)) for c in ideal.trace.combined  # NaN: undefined
    )
    return tuple(e + out.unit * m + out.tiny for e, m in zip(b.err, mags))
