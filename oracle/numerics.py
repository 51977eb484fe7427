"""Numerics of the reference model: the switches, and the rounding and GEMM primitives.

Two modes (``shared/reference/dispatch_ffn_combine.md`` §6):

- ``"faithful"`` emulates the W8A8 kernel step by step, pinned to NumPy float32 operations so
  that independent models agree bit for bit. The hardware's ``exp`` and division are not
  bit-identical to NumPy's; that is a documented choice, not a claim about the hardware.
- ``"ideal"`` is the mathematics the kernel approximates: float64, dequantised weights, no
  activation quantisation.

The uncertain points of §6 are the named switches of :class:`Numerics`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from oracle.kernels import KernelProfile

__all__ = [
    "MODES",
    "ZERO_ROW_POLICIES",
    "Numerics",
    "exact_int_matmul",
    "exact_int_matmuls",
    "glu64",
    "resolve_numerics",
    "round_half_away",
    "truncate_scale_bits",
    "with_kernel",
]

MODES = ("faithful", "ideal")
#: Degenerate rows: an all-zero row (σ = 0) at step 1 or 5, or a row so small at step 5 that
#: ``127/amax2`` overflows float32. ``"zero"``: such a row takes its mathematical value (0 for
#: a zero row; the scale in float64 for a tiny one), which a correct kernel must produce;
#: ``"nan"``: the kernel's literal reading of §6 steps 1 and 5, 0/0 and inf·0 = NaN [inferred].
ZERO_ROW_POLICIES = ("zero", "nan")

F32 = np.float32
Array = np.ndarray[Any, Any]


@dataclass(frozen=True)
class Numerics:
    """How the reference model computes.

    ``mode="faithful"`` runs the pipeline of the kernel profile ``kernel`` (a name in
    :data:`oracle.kernels.PROFILES`, or a :class:`oracle.kernels.KernelProfile`; ``None``, the
    default: ``"ascend-a3"``); ``"ideal"`` the float64 mathematics, judged assuming the given
    profile's stored dtypes and quantisers, or (``None``) the coarsest legitimate kernel.
    ``truncate_scales`` (an ascend-a3 switch): use the dequant scales truncated to 19 bits
    (``bits & 0xFFFFE000``), as the official CANN weight converter stores them [inferred];
    default off because vLLM passes the raw float32 bits. ``zero_rows``: see
    :data:`ZERO_ROW_POLICIES`.

    >>> Numerics("ideal").mode
    'ideal'
    """

    mode: str = "faithful"
    truncate_scales: bool = False
    zero_rows: str = "zero"
    kernel: str | KernelProfile | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"numerics mode {self.mode!r} is not one of {MODES}")
        self.profile  # noqa: B018 -- an unknown kernel name fails here, with the known ones
        if self.zero_rows not in ZERO_ROW_POLICIES:
            raise ValueError(f"zero_rows {self.zero_rows!r} is not one of {ZERO_ROW_POLICIES}")

    @property
    def profile(self) -> KernelProfile:
        """The kernel profile (the default one when none is given)."""
        from oracle.kernels import DEFAULT_KERNEL, get_kernel

        return get_kernel(DEFAULT_KERNEL if self.kernel is None else self.kernel)

    def read_scales(self, s1: Array, s2: Array) -> tuple[Array, Array]:
        """The dequant scales as the kernel reads them: truncated to 19 bits with
        ``truncate_scales``, else as given."""
        if self.truncate_scales:
            return truncate_scale_bits(s1), truncate_scale_bits(s2)
        return s1, s2

    def describe(self) -> str:
        extras = []
        if self.truncate_scales:
            extras.append("19-bit scales")
        if self.zero_rows != "zero":
            extras.append(f"zero rows -> {self.zero_rows}")
        if self.mode == "faithful":
            name = f"faithful to {self.profile.name}"
        else:
            name = "ideal" + (f", assuming {self.profile.name}" if self.kernel is not None else "")
        return name + (f" ({', '.join(extras)})" if extras else "")

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable, with the whole profile (a counterexample's manifest)."""
        # Faithful runs a profile even when none was named: record it whole. Ideal without a
        # profile assumes the coarsest kernel, and says so with None.
        unnamed_ideal = self.kernel is None and self.mode == "ideal"
        kernel = None if unnamed_ideal else self.profile.to_dict()
        return {"mode": self.mode, "truncate_scales": self.truncate_scales,
                "zero_rows": self.zero_rows, "kernel": kernel}

    @classmethod
    def from_dict(cls, data: object) -> Numerics:
        """Inverse of :meth:`to_dict`; older files without a kernel get the default.
        ``ValueError``/``TypeError`` on anything malformed."""
        from oracle.kernels import PROFILES, profile_from_dict

        if not isinstance(data, dict):
            raise ValueError("numerics must be a JSON object")
        kernel_data = data.get("kernel")
        if kernel_data is None or isinstance(kernel_data, str):
            kernel: str | KernelProfile | None = kernel_data
        else:
            kernel = profile_from_dict(kernel_data)
            known = PROFILES.get(kernel.name)
            kernel = kernel.name if known == kernel else kernel
        flags = {k: data[k] for k in ("mode", "truncate_scales", "zero_rows") if k in data}
        if not all(isinstance(v, bool if k == "truncate_scales" else str)
                   for k, v in flags.items()):
            raise ValueError(f"numerics: malformed switches {flags}")
        return cls(**flags, kernel=kernel)


def with_kernel(numerics: Numerics, kernel: str | KernelProfile | None) -> Numerics:
    """``numerics`` with its kernel profile replaced (``None``: unchanged)."""
    return numerics if kernel is None else replace(numerics, kernel=kernel)


def resolve_numerics(numerics: str | Numerics) -> Numerics:
    """Accept a mode name (``"faithful"``: the default profile; ``"ideal"``), a kernel profile
    name (``"vllm-triton"``) or a :class:`Numerics`."""
    if isinstance(numerics, Numerics):
        return numerics
    if numerics in MODES:
        return Numerics(numerics)
    return Numerics("faithful", kernel=numerics)


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
