"""The field table (``spec.fields``) is the one list of a rank's inputs: the data model and the
torch adapter hold exactly its fields, and every consumer's round trip carries all of them."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from oracle.adapters.torch_io import TorchRankInputs
from oracle.config.options import DEFAULT_VARIANTS, WEIGHT_VARIANTS
from spec import ConfigError, OpConfig, Problem, RankInputs, SpecError, random_problem
from spec.config import CALL_ATTRIBUTES
from spec.fields import (
    FIELDS,
    GATE_VARIANTS,
    SELECTING_INPUTS,
    VARIANTS,
    ListSpec,
    Selection,
    scale_dims_of,
    variant_for,
)

#: A W4A8 call with a mask: every field of the table is given but the W4A16 ones.
MASKED = OpConfig(ep_size=1, experts_per_rank=2, top_k=1, hidden=16, intermediate=8,
                  tokens_per_rank=(3,), masked=True, weight_dtype="int32")
#: The W4A16 calls: int4's zero points, NVFP4's global scales.
ZEROS = dataclasses.replace(MASKED, masked=False, weight_dtype="uint4")
GLOBALS = dataclasses.replace(MASKED, masked=False, weight_dtype="float4_e2m1fn")
#: NVFP4 W4A4: the activations' global scales besides.
ACTIVATION_GLOBALS = dataclasses.replace(GLOBALS, activation_scales=True)


def test_rank_inputs_holds_exactly_the_table_fields() -> None:
    assert [f.name for f in dataclasses.fields(RankInputs)] == [f.name for f in FIELDS]
    binding = {f.name for f in dataclasses.fields(TorchRankInputs)}
    assert {f.binding for f in FIELDS} <= binding
    assert binding - {f.binding for f in FIELDS} == {*CALL_ATTRIBUTES, "out", "expert_token_nums"}


def test_rank_inputs_is_keyword_only() -> None:
    rank = random_problem(MASKED).ranks[0]
    with pytest.raises(TypeError):
        RankInputs(rank.x, rank.expert_idx, rank.probs, rank.w1, rank.w2)  # type: ignore[misc]


@pytest.mark.parametrize("binding", [False, True])
def test_arrays_round_trip_every_field(binding: bool) -> None:
    carried = set()
    for cfg in (MASKED, ZEROS, GLOBALS, ACTIVATION_GLOBALS):
        rank = random_problem(cfg).ranks[0]
        back = RankInputs.from_arrays(rank.arrays(binding=binding), binding=binding)
        for f in FIELDS:
            got, want = getattr(back, f.name), getattr(rank, f.name)
            if want is None:
                assert got is None, f.name
                continue
            pairs = zip(got, want, strict=True) if f.tensor_list else [(got, want)]
            assert all(a is b for a, b in pairs), f"{f.name} was not carried"
            carried.add(f.name)
    assert carried == {f.name for f in FIELDS}, "a field neither problem gives"


def test_map_arrays_copies_every_array() -> None:
    rank = random_problem(MASKED).ranks[0]
    copy = rank.map_arrays(np.array, lists=True)
    originals = rank.arrays()
    for name, a in copy.arrays().items():
        assert a is not originals[name] and np.array_equal(a, originals[name]), name
    assert isinstance(copy.w1, list) and isinstance(rank.map_arrays(np.array).w1, tuple)


def test_variant_table() -> None:
    weights = ("int8", "int32", "bfloat16", "float8_e4m3fn", "float8_e4m3fn", "uint8", "uint4",
               "float4_e2m1fn", "uint8", "float4_e2m1fn")
    assert [variant_for(Selection(w, "bfloat16", v.scale_dims, bool(v.selector.inputs),
                                  v.selector.act_scheme))
            for w, v in zip(weights, VARIANTS, strict=True)] == list(VARIANTS)
    assert variant_for(Selection("float16", "bfloat16")) is None
    assert ListSpec(("K", "N/8"), "int32").dims(k=16, n=64, i=32) == (16, 8)
    assert ListSpec(("K", "N/8"), "int32").packing == 8


def test_rows_sharing_weight_fields_differ_in_their_selector() -> None:
    """One record per row tells it apart: rows with one weight dtype and scale1 rank differ
    in their Selector, and each row's own selection selects it (at both x dtypes). The inputs
    a selector names are optional fields of the table, each read by its row."""
    by_weights: dict[tuple[str, int], list[str]] = {}
    for v in VARIANTS:
        by_weights.setdefault((v.weight_dtype, v.scale_dims), []).append(v.name)
        for x in ("bfloat16", "float16"):
            assert variant_for(v.selection(x)) is v, (v.name, x)
    shared = {k: names for k, names in by_weights.items() if len(names) > 1}
    assert shared == {("uint8", 2): ["mxfp4_w4a16", "mxfp4_mxfp8"],
                      ("float4_e2m1fn", 2): ["nvfp4_w4a16", "nvfp4"]}
    for names in shared.values():
        selectors = [next(v for v in VARIANTS if v.name == n).selector for n in names]
        assert len(set(selectors)) == len(selectors)
    optional = {f.name for f in FIELDS if not f.required}
    assert SELECTING_INPUTS == ("a1_gscale", "a2_gscale")
    assert set(SELECTING_INPUTS) <= optional
    assert all(set(v.selector.inputs) <= set(v.lists) for v in VARIANTS)


def test_block_dimensions_round_up() -> None:
    """``"K/128^"`` is one entry per started block: any size is allowed, and it packs nothing;
    a truncating reading (``K // 128``) would give 1 at K = 160 and 0 at K = 64."""
    spec = ListSpec(("K/128^", "N/128^"), "float32")
    assert spec.dims(k=160, n=64, i=32) == (2, 1)
    assert spec.dims(k=256, n=384, i=32) == (2, 3)
    assert spec.indivisible(k=160, n=100, i=50) is None
    assert spec.packing == 1


def test_gate_variants_come_from_the_table() -> None:
    """The gate's names (--dfc-variants, test_variant[...]) are the table's rows, the float
    row once per x dtype, the opt-in rows last and not run by default."""
    assert [(g.name, g.weight_dtype, g.x_dtypes, g.default) for g in GATE_VARIANTS] == [
        ("w8a8", "int8", ("bfloat16", "float16"), True),
        ("bf16", "bfloat16", ("bfloat16",), True),
        ("fp16", "float16", ("float16",), True),
        ("w4a8", "int32", ("bfloat16", "float16"), False),
        ("fp8_block", "float8_e4m3fn", ("bfloat16", "float16"), False),
        ("fp8_channel", "float8_e4m3fn", ("bfloat16", "float16"), False),
        ("mxfp4_w4a16", "uint8", ("bfloat16", "float16"), False),
        ("int4_w4a16", "uint4", ("bfloat16", "float16"), False),
        ("nvfp4_w4a16", "float4_e2m1fn", ("bfloat16", "float16"), False),
        ("mxfp4_mxfp8", "uint8", ("bfloat16", "float16"), False),
        ("nvfp4", "float4_e2m1fn", ("bfloat16", "float16"), False),
    ]
    assert WEIGHT_VARIANTS == ("w8a8", "bf16", "fp16", "w4a8", "fp8_block", "fp8_channel",
                               "mxfp4_w4a16", "int4_w4a16", "nvfp4_w4a16", "mxfp4_mxfp8",
                               "nvfp4")
    assert DEFAULT_VARIANTS == ("w8a8", "bf16", "fp16")
    for g in GATE_VARIANTS:
        for x in g.x_dtypes:
            cfg = OpConfig(ep_size=1, experts_per_rank=1, top_k=1, hidden=64, intermediate=32,
                           tokens_per_rank=(1,), x_dtype=x, weight_dtype=g.weight_dtype,
                           scale_dims=g.selection.scale_dims,
                           act_scheme=g.selection.act_scheme,
                           activation_scales=g.selection.activation_scales)
            assert (cfg.variant, cfg.kernel_variant) == (g.name, g.variant)


def test_scale_dims_tell_rows_of_one_dtype_apart() -> None:
    """Among rows sharing a weight dtype, scale1's per-expert dimensions pick the row; the
    first row's own dimensions normalise to ``None`` (one call, one configuration), and
    dimensions no row has are refused by name."""
    base = dict(ep_size=1, experts_per_rank=2, top_k=1, hidden=16, intermediate=8,
                tokens_per_rank=(1,))
    assert OpConfig(**base, scale_dims=1) == OpConfig(**base)  # w8a8's own: 1-D scales
    fp8 = OpConfig(**base, weight_dtype="float8_e4m3fn", scale_dims=2)
    assert (fp8.scale_dims, fp8.variant) == (None, "fp8_block")
    with pytest.raises(ConfigError, match=r"scale_dims.*3 with int8 weights"):
        OpConfig(**base, scale_dims=3)
    p = random_problem(OpConfig(**base, weight_dtype="float8_e4m3fn"))
    assert p.config.scale_dims is None
    stacked, per_expert = p.ranks[0], dataclasses.replace(
        p.ranks[0], **{f: list(getattr(p.ranks[0], f)[0]) for f in ("w1", "w2", "scale1",
                                                                     "scale2")})
    assert scale_dims_of(stacked.w1, stacked.scale1) == 2
    assert scale_dims_of(per_expert.w1, per_expert.scale1) == 2
    assert scale_dims_of(stacked.w1, None) is None



def test_activation_scales_select_nvfp4_w4a4() -> None:
    """Two rows share e2m1 weights with 2-D scales: the inputs' activation global scales
    (``a1_gscale``) select W4A4, their absence W4A16 as before; a call whose ranks disagree,
    and the flag with weights no such row has, are refused by name."""
    w4a16 = random_problem(GLOBALS)
    w4a4 = random_problem(ACTIVATION_GLOBALS)
    assert (w4a16.config.variant, w4a4.config.variant) == ("nvfp4_w4a16", "nvfp4")
    assert w4a16.ranks[0].a1_gscale is None and w4a4.config.scale_dims is None
    dropped = dataclasses.replace(w4a4.ranks[0], a1_gscale=None, a2_gscale=None)
    assert Problem([dropped]).config == GLOBALS  # the same weights, read as W4A16
    with pytest.raises(SpecError, match="activation global scales"):
        Problem([w4a4.ranks[0], dropped])
    with pytest.raises(ConfigError, match=r"activation_scales.*int32 weights"):
        dataclasses.replace(MASKED, masked=False, activation_scales=True)
