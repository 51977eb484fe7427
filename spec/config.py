"""``OpConfig``: the shape of one collective call, without its arrays.

Strategies and buffer rules reason about shapes before any array exists, so the configuration is
a value of its own. :class:`spec.Problem` derives one from its arrays; it can also be built
directly.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from dataclasses import dataclass
from typing import TypedDict, TypeGuard

from spec.errors import ConfigError
from spec.fields import (
    SELECTING_INPUTS,
    VARIANTS,
    X_DTYPES,
    Selection,
    Variant,
    gate_variant,
    variant_for,
)

__all__ = [
    "CALL_ATTRIBUTES",
    "INT32_MAX",
    "MAX_EP_SIZE",
    "WEIGHT_DTYPES",
    "WEIGHT_FORMS",
    "X_DTYPES",
    "CallAttributes",
    "OpConfig",
    "oai_alpha",
]

#: The data model's EP limit. The A3 kernel's Python guard allows up to 32 ranks
#: (PR #5787 "enable ep32"; PR #5156 had set 16).
MAX_EP_SIZE = 32
#: Token dtypes of ``x`` [code].
#: int8 selects the W8A8 kernel, int32 (packed int4) W4A8, float8_e4m3fn FP8 block scale (a GPU
#: format, formats.md); x's own dtype selects the BF16/FP16-weight variant [code]. Read from
#: the table, :data:`spec.fields.VARIANTS`.
WEIGHT_DTYPES = tuple(dict.fromkeys(v.weight_dtype for v in VARIANTS
                                    if v.weight_dtype != "x")) + X_DTYPES
#: TensorList forms: one stacked tensor, or one tensor per expert (§3 of the reference notes).
WEIGHT_FORMS = ("stacked", "list")


class CallAttributes(TypedDict):
    """The call's scalar attributes: keyword arguments of :class:`spec.Problem`, fields of
    :class:`OpConfig`, and what every copy of a call carries over."""

    max_output_size: int | None
    swiglu_limit: float | None
    swiglu_alpha: float | None
    act_scheme: str | None


#: Their names (:meth:`OpConfig.call_attributes`).
CALL_ATTRIBUTES = tuple(CallAttributes.__annotations__)
#: The largest finite float32 (the kernel's attributes are float32).
FLOAT32_MAX = 3.4028234663852886e38


def _float32(value: float) -> float:
    """``value`` rounded to float32 (round to nearest even), as a Python float."""
    return float(struct.unpack("f", struct.pack("f", value))[0])


def oai_alpha(swiglu_alpha: float | None) -> float | None:
    """The α of the SwigluOAI branch if the kernel takes it, else ``None``.

    α is a mode switch (PR #11916): the kernel compares its float32 value with 0, so ``None``
    (not passed: the default 0), α ≤ 0 and a positive α that underflows float32 run standard
    SwiGLU bit for bit; otherwise the activation is ``(up + 1)·gate/(1 + exp(−α·gate))`` with
    α as float32 (returned as that float32 value).
    """
    if swiglu_alpha is None:
        return None
    alpha = _float32(swiglu_alpha)
    return alpha if alpha > 0 else None


#: The largest size, count or capacity of a call: the kernel's counts and ids are int32
#: (``expert_idx`` and ``expert_token_nums``, §2 of docs/contract/dispatch_ffn_combine.md), and
#: int32 offsets are where real kernels overflow (docs/contract/placement.md, "Index width").
INT32_MAX = 2**31 - 1


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _float32_range(value: object) -> TypeGuard[float]:
    """``value`` is a real number (not a bool) that float32 holds without becoming infinite:
    an int too large for a float (``10**400``) is not, and raises nothing here."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value) and abs(value) <= FLOAT32_MAX
    except OverflowError:
        return False


@dataclass(frozen=True, kw_only=True)
class OpConfig:
    """The shape of one ``dispatch_ffn_combine`` call.

    Every field is validated on construction; a bad one raises :class:`spec.ConfigError` naming
    the field, the value and what to change. ``weight_dtype``, ``x_dtype``, ``scale_dims``,
    ``activation_scales`` and ``act_scheme`` are the call's :attr:`selection` of its row
    (:func:`spec.fields.variant_for`). ``scale_dims`` tells variants with one weight dtype
    apart (scale1's per-expert dimensions); ``None`` selects the first, and is what a
    configuration of that variant holds. ``act_scheme`` names the activation quantisation
    where the inputs cannot tell it (``"mxfp8"`` with MXFP4 weights: ``mxfp4_mxfp8``,
    :class:`spec.fields.Selector`); ``None``: the row the inputs select.
    ``activation_scales``: the call passes the inputs whose presence selects a row (the
    activations' global scales ``a1_gscale``, ``a2_gscale``: NVFP4 W4A4, ``nvfp4``, among the
    e2m1-weight rows).

    >>> cfg = OpConfig(ep_size=2, experts_per_rank=4, top_k=2, hidden=64, intermediate=32,
    ...                tokens_per_rank=(3, 0))
    >>> cfg.num_experts, cfg.n, cfg.variant
    (8, 64, 'w8a8')
    """

    ep_size: int
    experts_per_rank: int
    top_k: int
    hidden: int
    intermediate: int
    tokens_per_rank: tuple[int, ...]
    x_dtype: str = "bfloat16"
    weight_dtype: str = "int8"
    weight_form: str = "stacked"
    max_output_size: int | None = None
    swiglu_limit: float | None = None
    swiglu_alpha: float | None = None
    masked: bool = False
    scale_dims: int | None = None
    act_scheme: str | None = None
    activation_scales: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.tokens_per_rank, (tuple, list)):
            raise ConfigError(
                field="tokens_per_rank", given=repr(self.tokens_per_rank)[:80],
                allowed="a tuple of ints >= 0, one per rank",
                fix="give one token count per rank, e.g. (3, 0) for two ranks",
            )
        object.__setattr__(self, "tokens_per_rank", tuple(self.tokens_per_rank))
        for name in ("ep_size", "experts_per_rank", "top_k", "hidden", "intermediate"):
            value = getattr(self, name)
            if not _is_int(value) or not 1 <= value <= INT32_MAX:
                raise ConfigError(
                    field=name, given=repr(value)[:80], allowed=f"an int from 1 to {INT32_MAX}",
                    fix=f"pass a positive integer for {name}",
                )
        if self.num_experts > INT32_MAX:
            raise ConfigError(
                field="experts_per_rank", given=f"{self.experts_per_rank} (EP·E = "
                f"{self.num_experts})", allowed=f"EP·E <= {INT32_MAX} (int32 expert ids)",
                fix="use fewer experts per rank",
            )
        if self.ep_size > MAX_EP_SIZE:
            raise ConfigError(
                field="ep_size", given=repr(self.ep_size), allowed=f"1..{MAX_EP_SIZE}",
                fix=f"use at most {MAX_EP_SIZE} ranks (the kernel's guard, PR #5787)",
            )
        if len(self.tokens_per_rank) != self.ep_size or not all(
            _is_int(m) and 0 <= m <= INT32_MAX for m in self.tokens_per_rank
        ) or self.total_slots > INT32_MAX:
            raise ConfigError(
                field="tokens_per_rank", given=repr(self.tokens_per_rank)[:200],
                allowed=f"a tuple of {self.ep_size} ints >= 0 (one per rank) with at most "
                f"{INT32_MAX} slots (Σ M_r · top_k) in all",
                fix="give one token count per rank; 0 is allowed",
            )
        for name, example in (("x_dtype", "bfloat16"), ("weight_dtype", "int8"),
                              ("weight_form", "stacked")):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(
                    field=name, given=repr(getattr(self, name))[:80], allowed="a name (str)",
                    fix=f"pass {name} by name, e.g. {example!r}",
                )
        if self.x_dtype not in X_DTYPES:
            raise ConfigError(
                field="x_dtype", given=repr(self.x_dtype), allowed=" or ".join(X_DTYPES),
                fix="use bfloat16 or float16 tokens",
            )
        if not isinstance(self.activation_scales, bool):
            raise ConfigError(
                field="activation_scales", given=repr(self.activation_scales)[:80],
                allowed="True or False",
                fix="pass activation_scales=True when the call has "
                + " and ".join(SELECTING_INPUTS),
            )
        variant = variant_for(Selection(self.weight_dtype, self.x_dtype))
        if variant is None:
            raise ConfigError(
                field="weight_dtype", given=repr(self.weight_dtype),
                allowed=" or ".join(f"{v.lists['w1'].dtype_given(self.x_dtype)!r} ({v.name})"
                                    for v in VARIANTS),
                fix="use int8 weights with float32 scales, or weights in x's dtype",
            )
        if self.act_scheme is not None:
            variant = self._scheme()
        variant = self._select(variant)
        if variant.n_le_k and self.n > self.hidden:
            raise ConfigError(
                field="intermediate", given=f"{self.intermediate} (N = {self.n} > K = "
                f"{self.hidden})", allowed=f"N = 2I <= K for {variant.name} (PR #9927)",
                fix="use an intermediate size I <= K/2",
            )
        if (bad := variant.lists["w2"].indivisible(k=self.hidden, n=self.n, i=self.intermediate)
                or variant.lists["w1"].indivisible(k=self.hidden, n=self.n, i=self.intermediate)):
            raise ConfigError(
                field="hidden" if bad[0] == "K" else "intermediate",
                given=f"{bad[0]} = {bad[1]}",
                allowed=f"{bad[0]} a multiple of {bad[2]} for {variant.name} (packed weights)",
                fix=f"pad {bad[0]} to a multiple of {bad[2]}",
            )
        if self.weight_form not in WEIGHT_FORMS:
            raise ConfigError(
                field="weight_form", given=repr(self.weight_form),
                allowed=" or ".join(WEIGHT_FORMS), fix="use 'stacked' or 'list'",
            )
        if self.weight_form == "list" and self.experts_per_rank == 1:
            raise ConfigError(
                field="weight_form", given="'list' with experts_per_rank=1",
                allowed="'stacked' when E = 1",
                fix="a per-expert list of one 2-D tensor is read by the kernel as stacked "
                "(E becomes K); use the stacked form [(1, K, N)]",
            )
        if self.max_output_size is not None and (
            not _is_int(self.max_output_size) or not 0 <= self.max_output_size <= INT32_MAX
        ):
            raise ConfigError(
                field="max_output_size", given=repr(self.max_output_size)[:80],
                allowed=f"None (no truncation) or an int from 0 to {INT32_MAX}",
                fix="pass the receive capacity in rows per rank",
            )
        if self.swiglu_limit is not None:
            limit = self.swiglu_limit
            if not _float32_range(limit) or not limit > 0:  # a float32 attribute, as alpha
                raise ConfigError(
                    field="swiglu_limit", given=repr(limit)[:80],
                    allowed="None or a finite float > 0 within float32's range",
                    fix="pass a positive clamp value or None",
                )
            if not variant.clamped:
                raise ConfigError(
                    field="swiglu_limit", given=f"{limit!r} with {self.weight_dtype} weights",
                    allowed=f"None (the {variant.name} variant has no clamp)",
                    fix="drop swiglu_limit or use a variant with a clamp "
                    f"({', '.join(v.name for v in VARIANTS if v.clamped)})",
                )
        if self.swiglu_alpha is not None:
            self._check_alpha(self.swiglu_alpha)
        if not isinstance(self.masked, bool):
            raise ConfigError(
                field="masked", given=repr(self.masked)[:80], allowed="True or False",
                fix="pass masked=True when the call has an active_mask",
            )
        if self.masked and not variant.masked:
            raise ConfigError(
                field="masked", given=f"True with {self.weight_dtype} weights",
                allowed=f"False (the {variant.name} variant has no x_active_mask)",
                fix="drop active_mask or use a variant that reads it "
                f"({', '.join(v.name for v in VARIANTS if v.masked)})",
            )

    def _scheme(self) -> Variant:
        """The row ``act_scheme`` names for the weight dtype, else a ``ConfigError`` naming
        the schemes that dtype has."""
        def named(scheme: str) -> Variant | None:
            return variant_for(Selection(self.weight_dtype, self.x_dtype, act_scheme=scheme))

        found = named(self.act_scheme) if isinstance(self.act_scheme, str) else None
        if found is None:
            schemes = [f"{scheme!r} ({v.name})" for v in VARIANTS
                       if (scheme := v.selector.act_scheme) and named(scheme)]
            raise ConfigError(
                field="act_scheme", given=f"{self.act_scheme!r} with {self.weight_dtype} "
                "weights", allowed=" or ".join(["None", *schemes]),
                fix="name the activation quantisation your kernel applies, or None for the "
                "row the weights select",
            )
        return found

    def _select(self, first: Variant) -> Variant:
        """The row ``scale_dims`` selects among those sharing the weight dtype (``first``: the
        one the dtype alone selects); stores ``scale_dims`` as ``None`` for ``first``, so one
        call has one configuration."""
        dims, act = self.scale_dims, self.activation_scales
        rows = [v for v in VARIANTS if variant_for(dataclasses.replace(
            self.selection, scale_dims=v.scale_dims)) is v]
        if act and not any(v.selector.inputs for v in rows):
            readers = [v for v in VARIANTS if v.selector.inputs]
            raise ConfigError(
                field="activation_scales", given=f"True with {self.weight_dtype} weights",
                allowed="False, or True with " + " or ".join(
                    f"{v.weight_dtype} weights ({v.name})" for v in readers),
                fix=f"drop activation_scales ({', '.join(SELECTING_INPUTS)}) or use "
                f"{' or '.join(dict.fromkeys(v.weight_dtype for v in readers))} weights",
            )
        if dims is not None and (isinstance(dims, bool) or dims not in
                                 [v.scale_dims for v in rows]):
            raise ConfigError(
                field="scale_dims", given=f"{dims!r} with {self.weight_dtype} weights",
                allowed="None or " + " or ".join(f"{v.scale_dims} ({v.name})" for v in rows),
                fix="give scale1's per-expert dimensions, or None for "
                f"{first.name}",
            )
        variant = variant_for(self.selection)
        assert variant is not None
        object.__setattr__(self, "scale_dims", variant.selection(self.x_dtype).scale_dims)
        return variant

    def _check_alpha(self, alpha: object) -> None:
        # The kernel reads swigluAlpha as a float32 attribute (PR #11916).
        if not _float32_range(alpha):
            raise ConfigError(
                field="swiglu_alpha", given=repr(alpha)[:80],
                allowed="None or a finite float within float32's range",
                fix="pass the SwigluOAI alpha (e.g. 1.702), 0 or None for standard SwiGLU",
            )
        if not self.kernel_variant.swiglu_alpha and _float32(alpha) > 0:
            # PR #11916 passes swigluAlpha to the int8 kernel only: the BF16/FP16 adapter
            # drops it and runs standard SwiGLU (its review asks for a TORCH_CHECK instead).
            raise ConfigError(
                field="swiglu_alpha", given=f"{alpha!r} with {self.weight_dtype} weights",
                allowed="None or <= 0 unless the weights are int8 (SwigluOAI is W8A8 only)",
                fix="drop swiglu_alpha or use the W8A8 variant",
            )

    @property
    def oai_alpha(self) -> float | None:
        """:func:`oai_alpha` of the call's ``swiglu_alpha``.

        >>> OpConfig(ep_size=1, experts_per_rank=2, top_k=1, hidden=32, intermediate=8,
        ...          tokens_per_rank=(1,), swiglu_alpha=1e-50).oai_alpha is None
        True
        """
        return oai_alpha(self.swiglu_alpha)

    def call_attributes(self) -> CallAttributes:
        """The call's attributes by name (:data:`CALL_ATTRIBUTES`), for ``Problem(ranks, **…)``."""
        return CallAttributes(max_output_size=self.max_output_size,
                              swiglu_limit=self.swiglu_limit, swiglu_alpha=self.swiglu_alpha,
                              act_scheme=self.act_scheme)

    @property
    def selection(self) -> Selection:
        """What the call shows of its row (:class:`spec.fields.Selection`)."""
        return Selection(self.weight_dtype, self.x_dtype, self.scale_dims,
                         self.activation_scales, self.act_scheme)

    @property
    def num_experts(self) -> int:
        """``EP·E``: the number of global experts; also the kernel's masked-slot sentinel."""
        return self.ep_size * self.experts_per_rank

    @property
    def n(self) -> int:
        """``N = 2I``: the gate+up columns of weight1 (gate first, then up)."""
        return 2 * self.intermediate

    @property
    def variant(self) -> str:
        """The gate's name of the call's variant (:data:`spec.fields.GATE_VARIANTS`): ``"w8a8"``
        for int8 weights, ``"w4a8"`` for int32 (packed int4), else ``"bf16"`` or ``"fp16"``
        (weights in x's dtype)."""
        found = gate_variant(self.selection)
        assert found is not None  # checked on construction
        return found.name

    @property
    def kernel_variant(self) -> Variant:
        """The row of :data:`spec.fields.VARIANTS` the call's :attr:`selection` selects."""
        variant = variant_for(self.selection)
        assert variant is not None  # checked on construction
        return variant

    @property
    def max_tokens(self) -> int:
        """The largest tokens-per-rank (the ``M`` of the operator's buffer check)."""
        return max(self.tokens_per_rank)

    @property
    def total_slots(self) -> int:
        """Σ over ranks of ``M_r · top_k``: every (token, slot) pair of the call."""
        return sum(self.tokens_per_rank) * self.top_k

    def summary(self) -> str:
        """One line: the configuration as a kernel engineer reads it."""
        parts = [
            f"EP={self.ep_size}", f"E={self.experts_per_rank}", f"top_k={self.top_k}",
            f"K={self.hidden}", f"I={self.intermediate}",
            f"M={list(self.tokens_per_rank)}", f"x={self.x_dtype}", f"w={self.weight_dtype}",
            f"form={self.weight_form}",
        ]
        if self.max_output_size is not None:
            parts.append(f"max_output_size={self.max_output_size}")
        if self.swiglu_limit is not None:
            parts.append(f"swiglu_limit={self.swiglu_limit}")
        if self.swiglu_alpha is not None:
            parts.append(f"swiglu_alpha={self.swiglu_alpha}")
        if self.masked:
            parts.append("masked")
        if self.scale_dims is not None:
            parts.append(f"scale_dims={self.scale_dims}")
        if self.act_scheme is not None:
            parts.append(f"act_scheme={self.act_scheme}")
        if self.activation_scales:
            parts.append("activation_scales")
        return " ".join(parts)
