"""The fields of one rank's inputs and the kernel variants that use them, as tables.

Every consumer (validation in :mod:`spec.problem`, the counterexample and capture file formats,
the isolated child's copies, the torch adapter) reads :data:`FIELDS` and :data:`VARIANTS`
instead of naming fields itself, so a variant's new input is a row here (and an attribute of
:class:`spec.RankInputs`). Sources: §2–§3 of ``docs/contract/dispatch_ffn_combine.md``; the
kernel picks its variant by ``weight1[0].dtype`` [code].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ARRAY_FIELDS",
    "FIELDS",
    "GATE_VARIANTS",
    "LIST_FIELDS",
    "SELECTING_INPUTS",
    "VARIANTS",
    "VARIANT_NAMES",
    "X_DTYPES",
    "Field",
    "GateVariant",
    "ListSpec",
    "Selection",
    "Selector",
    "Variant",
    "gate_variant",
    "scale_dims_of",
    "selection_of",
    "variant_for",
]


@dataclass(frozen=True)
class Field:
    """One input of a rank: ``name`` is the :class:`spec.RankInputs` attribute (and the key in
    counterexample files), ``binding`` the torch binding's argument name, ``role`` what it is
    for. A ``tensor_list`` field is a TensorList (one stacked tensor or one per expert, §3);
    a field that is not ``required`` may be ``None`` (whether it must be depends on the
    variant). ``float32_bits``: the binding may pass it as int64 holding float32 bits (vLLM's
    scales); :class:`spec.RankInputs` holds the float32 values."""

    name: str
    binding: str
    role: str
    tensor_list: bool
    required: bool
    float32_bits: bool = False


#: The inputs of one rank, in the binding's order where it has one.
FIELDS: tuple[Field, ...] = (
    Field("x", "x", "tokens (M, K)", False, True),
    Field("expert_idx", "expert_idx", "global expert ids (M, top_k) int32", False, True),
    Field("probs", "probs", "routing weights (M, top_k) float32", False, True),
    Field("w1", "weight1", "gate+up projection (gate columns first)", True, True),
    Field("w2", "weight2", "down projection", True, True),
    Field("scale1", "scale1", "dequant scales of weight1 (per channel or per block)", True, False,
          True),
    Field("scale2", "scale2", "dequant scales of weight2 (per channel or per block)", True, False,
          True),
    Field("active_mask", "x_active_mask", "tokens the kernel computes (M,) bool", False, False),
    Field("bias1", "bias1", "W4A8 compensation 8·Σ_k W1[k, n]·s1[n]", True, False),
    Field("bias2", "bias2", "W4A8 compensation 8·Σ_i W2[i, k]·s2[k]", True, False),
    Field("zero1", "zero1", "W4A16 zero points of weight1 (uint4 per group)", True, False),
    Field("zero2", "zero2", "W4A16 zero points of weight2 (uint4 per group)", True, False),
    Field("gscale1", "gscale1", "NVFP4 global scale of weight1 (float32 per expert)", True,
          False),
    Field("gscale2", "gscale2", "NVFP4 global scale of weight2 (float32 per expert)", True,
          False),
    Field("a1_gscale", "a1_gscale", "NVFP4 W4A4 global scale of GEMM1's activations (float32 "
          "per expert)", True, False),
    Field("a2_gscale", "a2_gscale", "NVFP4 W4A4 global scale of GEMM2's activations (float32 "
          "per expert)", True, False),
)
#: Names of the plain-array fields and of the TensorList fields.
ARRAY_FIELDS = tuple(f.name for f in FIELDS if not f.tensor_list)
LIST_FIELDS = tuple(f.name for f in FIELDS if f.tensor_list)


def _parse_dim(d: str) -> tuple[str, int, bool]:
    """``"N/8"`` -> ``("N", 8, False)``; ``"K/128^"`` -> ``("K", 128, True)``; ``"K"`` ->
    ``("K", 1, False)``."""
    base, _, per = d.partition("/")
    return base, int(per.rstrip("^") or 1), per.endswith("^")


@dataclass(frozen=True)
class ListSpec:
    """A TensorList of a variant: its per-expert ``shape`` in the call's dimensions (``"K"``,
    ``"N"``, ``"I"``, ``"1"`` for one value per expert; ``"N/8"`` is N packed eight to a word;
    ``"K/128^"`` is one entry per started block of 128, ``ceil(K/128)``: block scales) and
    its ``dtype`` (``"x"``: x's).
    """

    shape: tuple[str, ...]
    dtype: str

    def dims(self, *, k: int, n: int, i: int) -> tuple[int, ...]:
        """The per-expert shape as numbers (a packed dimension rounded down, a block
        dimension up)."""
        size = {"K": k, "N": n, "I": i, "1": 1}
        return tuple(-(-size[base] // per) if ceil else size[base] // per
                     for base, per, ceil in map(_parse_dim, self.shape))

    def indivisible(self, *, k: int, n: int, i: int) -> tuple[str, int, int] | None:
        """``(dimension, size, per word)`` of a packed dimension whose size the packing does
        not divide, else ``None`` (a block dimension takes any size)."""
        size = {"K": k, "N": n, "I": i, "1": 1}
        for base, per, ceil in map(_parse_dim, self.shape):
            if not ceil and size[base] % per:
                return base, size[base], per
        return None

    @property
    def packing(self) -> int:
        """Elements per stored element along the last axis (8 int4 per int32 word, else 1)."""
        _, per, ceil = _parse_dim(self.shape[-1])
        return 1 if ceil else per

    def dtype_given(self, x_dtype: str) -> str:
        """The dtype name with ``"x"`` resolved."""
        return x_dtype if self.dtype == "x" else self.dtype


@dataclass(frozen=True)
class Selector:
    """What tells a row apart from the rows with the same weight fields (weight1's dtype and
    scale1's dimensions), as a call shows it; the default, nothing, is the row those fields
    alone select. ``inputs``: optional inputs whose presence selects the row (NVFP4 W4A4's
    activation global scales); a call that gives them says so as ``activation_scales``.
    ``act_scheme``: the value of the call attribute ``act_scheme`` that names the row, for a
    row whose inputs are another's (MXFP8 activations on MXFP4 weights); such a row is never
    selected from the inputs alone. A new row that shares its weight fields with another adds
    one of these, nothing at the doors: every door infers a call's row through
    :func:`selection_of` (the arrays) or :attr:`spec.OpConfig.selection` and
    :func:`variant_for`."""

    inputs: tuple[str, ...] = ()
    act_scheme: str | None = None


@dataclass(frozen=True)
class Selection:
    """What one call shows of its row, named as :class:`spec.OpConfig`'s fields (so
    ``OpConfig(**asdict(selection), ...)``): weight1's dtype, x's, scale1's per-expert
    dimensions (``None``: the dtype's first row's), whether it gives the inputs a row's
    :attr:`Selector.inputs` names, and the activation scheme it names."""

    weight_dtype: str
    x_dtype: str
    scale_dims: int | None = None
    activation_scales: bool = False
    act_scheme: str | None = None


@dataclass(frozen=True)
class Variant:
    """A kernel variant: selected by weight1's dtype ``weight_dtype`` (``"x"``: x's dtype) and,
    among rows sharing that dtype, by the per-expert dimensions of its ``scale1``
    (:attr:`scale_dims`; FP8: 2 for block scales, 1 for per-channel ones) and its
    :attr:`selector`; the first such row in table order is the one the dtype alone selects
    (:func:`variant_for`). The TensorLists it reads (every other TensorList field must be
    ``None``), and whether it reads ``x_active_mask`` and ``swiglu_limit``. ``n_le_k``:
    GMM1's output rows overlap unless ``N <= K``. ``scale_extension``: how the binding's
    int64 scales hold the float32 bits (``"sign"`` or ``"zero"``-extended). ``quantised``:
    the activations are quantised to int8 per token (§6 step 1; FP8: e4m3 per token and
    128-column group) before GEMM1, else they enter it in x's dtype. ``swiglu_alpha``: the
    kernel reads SwigluOAI's α (PR #11916). ``opt_in``: the gate runs it only when asked for.
    ``send_row_pad``: bytes
    after the K int8 values of a dispatch send row (the per-token scale and padding) [inferred
    for the float variant]. ``dequantise``: the kernel turns the weights and their scales into
    x's dtype before float GEMMs (W4A16), in this format (``"mxfp4"``: :mod:`spec.mxfp4`,
    ``"int4"``: :func:`spec.int4.dequantise_groups`, ``"nvfp4"``: :mod:`spec.nvfp4`); the
    numerics then read them as float weights (in float32 where the activations are
    ``quantised``: the kernel never rounds the weights to x's dtype). ``group``: the columns
    that share one activation scale (``None``: the whole row, per token). ``selector``: what
    tells the row apart from rows with the same weight fields (:class:`Selector`)."""

    name: str
    weight_dtype: str
    lists: Mapping[str, ListSpec]
    masked: bool
    clamped: bool
    quantised: bool = True
    swiglu_alpha: bool = False
    opt_in: bool = False
    n_le_k: bool = False
    scale_extension: str = "sign"
    send_row_pad: int = 32
    dequantise: str | None = None
    group: int | None = None
    selector: Selector = Selector()

    @property
    def e4m3_activations(self) -> bool:
        """The kernel quantises the activations to e4m3 per group (the FP8 rows, MXFP8)."""
        return self.quantised and (self.weight_dtype == "float8_e4m3fn"
                                   or self.selector.act_scheme == "mxfp8")

    @property
    def activation_scales(self) -> bool:
        """The row reads the activations' global scales (``a1_gscale``): NVFP4 W4A4, whose
        activations the judges quantise per expert."""
        return "a1_gscale" in self.lists

    def selection(self, x_dtype: str) -> Selection:
        """The :class:`Selection` of a call of this row at x's dtype: what
        :func:`variant_for` needs to select it, ``scale_dims`` ``None`` where the rest
        selects it alone (one call, one configuration)."""
        sel = Selection(self.lists["w1"].dtype_given(x_dtype), x_dtype, None,
                        bool(self.selector.inputs), self.selector.act_scheme)
        return sel if variant_for(sel) is self else dataclasses.replace(
            sel, scale_dims=self.scale_dims)

    @property
    def scale_dims(self) -> int:
        """The per-expert dimensions of ``scale1`` (0 without scales): what tells rows with one
        weight dtype apart."""
        return len(self.lists["scale1"].shape) if "scale1" in self.lists else 0


_W1 = ("K", "N")
_W2 = ("I", "K")
#: The kernel variants (§2): W8A8 with float32 per-channel scales (the torch binding passes them
#: as int64 holding the bits, which the adapter decodes), W4A8, the variant whose weights
#: share x's dtype, which reads no scales and silently drops the mask and clamp (variants.md),
#: and the GPU formats (formats.md).
VARIANTS: tuple[Variant, ...] = (
    Variant(
        "w8a8", "int8",
        {"w1": ListSpec(_W1, "int8"), "w2": ListSpec(_W2, "int8"),
         "scale1": ListSpec(("N",), "float32"), "scale2": ListSpec(("K",), "float32")},
        masked=True, clamped=True, swiglu_alpha=True,
    ),
    # W4A8 (variants.md, W4A8 [code]): int4 packed eight to an int32 word, per-channel scales
    # (int64 zero-extended in the binding), the compensation biases; N <= K since PR #9927;
    # dispatch rows of K + ALIGN_512 bytes (dispatch_ffn_combine_w4_a8_kernel.hpp at 182b75ea).
    Variant(
        "w4a8", "int32",
        {"w1": ListSpec(("K", "N/8"), "int32"), "w2": ListSpec(("I", "K/8"), "int32"),
         "scale1": ListSpec(("N",), "float32"), "scale2": ListSpec(("K",), "float32"),
         "bias1": ListSpec(("N",), "float32"), "bias2": ListSpec(("K",), "float32")},
        masked=True, clamped=True, opt_in=True, n_le_k=True, scale_extension="zero",
        send_row_pad=512,
    ),
    Variant(
        "float", "x", {"w1": ListSpec(_W1, "x"), "w2": ListSpec(_W2, "x")},
        masked=False, clamped=False, quantised=False,
    ),
    # FP8 block scale (formats.md, FP8 block scale [code]): e4m3fn weights, one float32 scale
    # per 128 x 128 block in the weights' own (reduction, output) orientation; the kernel
    # quantises the activations per token and 128-channel group itself. A GPU format: no
    # x_active_mask, no clamp (vLLM's fused_moe has neither) [inferred for other kernels].
    Variant(
        "fp8_block", "float8_e4m3fn",
        {"w1": ListSpec(_W1, "float8_e4m3fn"), "w2": ListSpec(_W2, "float8_e4m3fn"),
         "scale1": ListSpec(("K/128^", "N/128^"), "float32"),
         "scale2": ListSpec(("I/128^", "K/128^"), "float32")},
        masked=False, clamped=False, opt_in=True, group=128,
    ),
    # FP8 per token and channel (formats.md; vLLM's fp8_w8a8 without block_shape [code]): e4m3
    # weights with one float32 scale per output channel, activations e4m3 per token, the
    # kernel's own quantisation. Told from fp8_block by scale1's 1-D per-expert shape.
    Variant(
        "fp8_channel", "float8_e4m3fn",
        {"w1": ListSpec(_W1, "float8_e4m3fn"), "w2": ListSpec(_W2, "float8_e4m3fn"),
         "scale1": ListSpec(("N",), "float32"), "scale2": ListSpec(("K",), "float32")},
        masked=False, clamped=False, opt_in=True,
    ),
    # MXFP4 weights with bf16/fp16 activations (formats.md, MXFP4 [code]): e2m1 two per byte
    # (even element low), e8m0 scales per 32 along the reduction, dequantised to x's dtype
    # before float GEMMs (W4A16) [inferred for where the kernel rounds]; a GPU format as FP8.
    Variant(
        "mxfp4_w4a16", "uint8",
        {"w1": ListSpec(("K", "N/2"), "uint8"), "w2": ListSpec(("I", "K/2"), "uint8"),
         "scale1": ListSpec(("K/32^", "N"), "uint8"),
         "scale2": ListSpec(("I/32^", "K"), "uint8")},
        masked=False, clamped=False, quantised=False, opt_in=True, dequantise="mxfp4",
    ),
    # int4 W4A16 (formats.md, W4A16 [code]: Marlin AWQ/GPTQ MoE): unsigned int4 values (the
    # logical values, one per byte; :mod:`spec.int4`), scales in x's dtype and uint4 zero points
    # per group of 128 along the reduction (GPTQ without zero points: z = 8), dequantised to
    # x's dtype before float GEMMs [inferred for where the kernel rounds]; a GPU format.
    Variant(
        "int4_w4a16", "uint4",
        {"w1": ListSpec(_W1, "uint4"), "w2": ListSpec(_W2, "uint4"),
         "scale1": ListSpec(("K/128^", "N"), "x"), "scale2": ListSpec(("I/128^", "K"), "x"),
         "zero1": ListSpec(("K/128^", "N"), "uint4"),
         "zero2": ListSpec(("I/128^", "K"), "uint4")},
        masked=False, clamped=False, quantised=False, opt_in=True, dequantise="int4",
    ),
    # NVFP4 weights with bf16/fp16 activations (vLLM's nvfp4_w4a16; formats.md, NVFP4 [code]):
    # e2m1 values (logical, one per byte; :mod:`spec.nvfp4`), e4m3 scales per 16 along the
    # reduction and a float32 global scale per expert, dequantised to x's dtype before float
    # GEMMs [inferred for where the kernel rounds]. The NVFP4 activations of the Blackwell
    # kernels are not modelled yet.
    Variant(
        "nvfp4_w4a16", "float4_e2m1fn",
        {"w1": ListSpec(_W1, "float4_e2m1fn"), "w2": ListSpec(_W2, "float4_e2m1fn"),
         "scale1": ListSpec(("K/16^", "N"), "float8_e4m3fn"),
         "scale2": ListSpec(("I/16^", "K"), "float8_e4m3fn"),
         "gscale1": ListSpec(("1",), "float32"), "gscale2": ListSpec(("1",), "float32")},
        masked=False, clamped=False, quantised=False, opt_in=True, dequantise="nvfp4",
    ),
    # MXFP4 weights with MXFP8 activations (vLLM's mxfp4_mxfp8; formats.md, MXFP4 [code]): the
    # inputs of mxfp4_w4a16, but the kernel quantises the activations to e4m3 with one e8m0
    # scale per 32 along K before each GEMM. Nothing in the data says so: the call names the
    # scheme (``act_scheme="mxfp8"``, ``OpConfig.act_scheme``).
    Variant(
        "mxfp4_mxfp8", "uint8",
        {"w1": ListSpec(("K", "N/2"), "uint8"), "w2": ListSpec(("I", "K/2"), "uint8"),
         "scale1": ListSpec(("K/32^", "N"), "uint8"),
         "scale2": ListSpec(("I/32^", "K"), "uint8")},
        masked=False, clamped=False, opt_in=True, dequantise="mxfp4", group=32,
        selector=Selector(act_scheme="mxfp8"),
    ),
    # NVFP4 W4A4 (vLLM's nvfp4, CUTLASS fp4 MoE; formats.md, NVFP4 [code]): nvfp4_w4a16's
    # weights plus the static activation global scales per expert (a1_gscale, a2_gscale; vLLM's
    # cutlass_moe_fp4 reads one per expert), whose presence in the inputs selects this row.
    # The kernel quantises each GEMM's activations to e2m1 with e4m3 scales per 16 under the
    # expert's scale (the profile's steps); the weights stay e2m1 (no x-dtype dequantisation).
    Variant(
        "nvfp4", "float4_e2m1fn",
        {"w1": ListSpec(_W1, "float4_e2m1fn"), "w2": ListSpec(_W2, "float4_e2m1fn"),
         "scale1": ListSpec(("K/16^", "N"), "float8_e4m3fn"),
         "scale2": ListSpec(("I/16^", "K"), "float8_e4m3fn"),
         "gscale1": ListSpec(("1",), "float32"), "gscale2": ListSpec(("1",), "float32"),
         "a1_gscale": ListSpec(("1",), "float32"), "a2_gscale": ListSpec(("1",), "float32")},
        masked=False, clamped=False, opt_in=True, group=16,
        selector=Selector(inputs=("a1_gscale", "a2_gscale")),
    ),
)


#: The variants' names, in table order.
VARIANT_NAMES = tuple(v.name for v in VARIANTS)
#: x's dtypes (§2) and the short names the gate gives the float variant at each.
X_DTYPES = ("bfloat16", "float16")
_SHORT = {"bfloat16": "bf16", "float16": "fp16"}


@dataclass(frozen=True)
class GateVariant:
    """A variant as the gate and the CLI name it (``--dfc-variants``, ``test_variant[...]``):
    a row of :data:`VARIANTS` at the x dtypes it runs with. Weights in x's dtype make one
    gate variant per x dtype (``bf16``, ``fp16``); the others keep the row's name."""

    name: str
    variant: Variant
    x_dtypes: tuple[str, ...]

    @property
    def selection(self) -> Selection:
        """What a configuration of it names (:meth:`Variant.selection`, at its first x
        dtype)."""
        return self.variant.selection(self.x_dtypes[0])

    @property
    def weight_dtype(self) -> str:
        return self.selection.weight_dtype

    @property
    def default(self) -> bool:
        """Whether the gate runs it unless ``--dfc-variants`` says otherwise."""
        return not self.variant.opt_in


#: The optional inputs whose presence selects a row (every row's :attr:`Selector.inputs`).
SELECTING_INPUTS = tuple(dict.fromkeys(n for v in VARIANTS for n in v.selector.inputs))


def variant_for(selection: Selection, *, strict: bool = True) -> Variant | None:
    """The variant a call's :class:`Selection` selects, or ``None`` when no variant has its
    weight dtype (or none of those rows has its ``act_scheme``). Rows sharing the dtype are
    told apart by their :class:`Selector`: the activation scheme the call names (``None``
    never selects a row that has one), then whether it gives the inputs a row's selector
    names (``activation_scales``), then ``scale_dims`` (scale1's per-expert dimensions,
    :attr:`Variant.scale_dims`); ``None``, or a selector or dimensions no such row has,
    select the first (validation then names what it wants). ``strict=False``: an
    ``act_scheme`` none of the weight dtype's rows has selects as ``None`` does (for a door
    that validates the arrays before :class:`spec.OpConfig` names the schemes there are).

    >>> def name(w, dims=None, inputs=False, scheme=None):
    ...     return variant_for(Selection(w, "bfloat16", dims, inputs, scheme)).name
    >>> [name("float8_e4m3fn", d) for d in (None, 2, 1)]
    ['fp8_block', 'fp8_block', 'fp8_channel']
    >>> [name("uint8", scheme=s) for s in (None, "mxfp8")]
    ['mxfp4_w4a16', 'mxfp4_mxfp8']
    >>> [name("float4_e2m1fn", 2, inputs=a) for a in (False, True)]
    ['nvfp4_w4a16', 'nvfp4']
    """
    w = selection.weight_dtype
    rows = [v for v in VARIANTS if v.selector.act_scheme == selection.act_scheme
            and v.weight_dtype in (w, "x" if w == selection.x_dtype else None)]
    rows = [v for v in rows if bool(v.selector.inputs) == selection.activation_scales] or rows
    if not rows and not strict:
        return variant_for(dataclasses.replace(selection, act_scheme=None))
    return next((v for v in rows if v.scale_dims == selection.scale_dims),
                rows[0] if rows else None)


def selection_of(inputs: Any, *, binding: bool = False,
                 act_scheme: str | None = None) -> Selection | None:
    """The :class:`Selection` of one rank's arrays (a :class:`spec.RankInputs`, or with
    ``binding`` an object holding the torch binding's arguments) and the ``act_scheme`` the
    call names; ``None`` when weight1 or x has no dtype (validation says why).

    >>> from spec import OpConfig, random_problem
    >>> p = random_problem(OpConfig(ep_size=1, experts_per_rank=2, top_k=1, hidden=32,
    ...                             intermediate=16, tokens_per_rank=(1,),
    ...                             weight_dtype="float8_e4m3fn", scale_dims=1))
    >>> variant_for(selection_of(p.ranks[0])).name
    'fp8_channel'
    """
    def get(name: str) -> Any:
        return getattr(inputs, _BINDING[name] if binding else name, None)

    try:
        w_dtype, x_dtype = (str(t.dtype).removeprefix("torch.") for t in (get("w1")[0], get("x")))
    except (TypeError, AttributeError, KeyError, IndexError):
        return None
    return Selection(w_dtype, x_dtype, scale_dims_of(get("w1"), get("scale1")),
                     any(get(name) is not None for name in SELECTING_INPUTS), act_scheme)


_BINDING = {f.name: f.binding for f in FIELDS}


def scale_dims_of(w1: Sequence[Any], scale1: Sequence[Any] | None) -> int | None:
    """The per-expert dimensions of a ``scale1`` TensorList of arrays or tensors (stacked
    when ``w1`` is one tensor, as :meth:`spec.RankInputs.expert_lists` reads it), or ``None``
    when it is missing or not a sequence of arrays (validation says why)."""
    try:
        ndim = scale1[0].ndim if scale1 is not None and len(scale1) else None
        stacked = len(w1) == 1
    except (TypeError, AttributeError, KeyError, IndexError):
        return None
    return ndim - stacked if isinstance(ndim, int) else None


#: Every gate variant, derived from :data:`VARIANTS`: the default ones first, in table order.
GATE_VARIANTS: tuple[GateVariant, ...] = tuple(sorted((
    GateVariant(_SHORT[x], v, (x,)) if v.weight_dtype == "x" else GateVariant(v.name, v, X_DTYPES)
    for v in VARIANTS for x in (X_DTYPES if v.weight_dtype == "x" else X_DTYPES[:1])
), key=lambda g: g.variant.opt_in))


def gate_variant(selection: Selection) -> GateVariant | None:
    """The gate's variant a call's :class:`Selection` selects (:func:`variant_for`), or
    ``None``."""
    variant = variant_for(selection)
    return next((g for g in GATE_VARIANTS
                 if g.variant is variant and selection.x_dtype in g.x_dtypes), None)
