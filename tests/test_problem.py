"""Every ``SpecError`` path of ``spec/problem.py`` and ``spec/config.py``: the error class, the
message's parts (rank, field, given, allowed, fix) and its one template; the caller's arrays
are never modified, whether validation passes or fails.

The cases are a table; :func:`test_every_raise_site_has_a_case` parses both modules and fails
when a ``raise`` statement has no case, so a new error path cannot go untested.
"""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import spec.config
import spec.problem
from spec import (
    AmbiguousTensorList,
    BiasError,
    ConfigError,
    DTypeError,
    ExpertIdError,
    MaskError,
    NonFiniteError,
    OpConfig,
    Problem,
    RankCountError,
    RankInputs,
    ShapeError,
    SpecError,
    TensorListError,
    random_problem,
)
from spec.fields import FIELDS

Ranks = list[dict[str, Any]]
#: Two ranks, so that errors on rank 1 show the rank is reported (not always 0).
BASE = OpConfig(ep_size=2, experts_per_rank=2, top_k=2, hidden=8, intermediate=4,
                tokens_per_rank=(3, 2))
BF16 = dataclasses.replace(BASE, weight_dtype="bfloat16")
W4A8 = dataclasses.replace(BASE, weight_dtype="int32")


def fresh_ranks(cfg: OpConfig = BASE) -> Ranks:
    """Valid per-rank keyword dicts for :class:`RankInputs`, every array a fresh writable copy."""
    ranks = []
    for r in random_problem(cfg, seed=0).ranks:
        fields = {f.name: getattr(r, f.name) for f in dataclasses.fields(r)}
        ranks.append({k: None if v is None else [np.array(t) for t in v]
                      if isinstance(v, tuple) else np.array(v) for k, v in fields.items()})
    return ranks


def _arrays(value: Any) -> Iterator[np.ndarray]:
    if isinstance(value, np.ndarray):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _arrays(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _arrays(v)
    elif isinstance(value, RankInputs):
        yield from _arrays([getattr(value, f.name) for f in dataclasses.fields(value)])


@dataclasses.dataclass(frozen=True)
class Case:
    """One bad input. ``make`` edits fresh valid ranks and returns ``Problem``'s arguments (or
    raises by building an :class:`OpConfig`); the rest is what the error must say."""

    name: str
    error: type[SpecError]
    rank: int | None
    field: str
    given: str
    allowed: str
    fix: str
    make: Callable[[Ranks], tuple[Any, dict[str, Any]]]
    config: OpConfig = BASE


def problem_args(ranks: Ranks, **keywords: Any) -> tuple[Any, dict[str, Any]]:
    return [RankInputs(**r) for r in ranks], keywords


def edit(rank: int, **changes: Any) -> Callable[[Ranks], tuple[Any, dict[str, Any]]]:
    """Replace fields of one rank; callables are applied to the field's current value."""

    def make(ranks: Ranks) -> tuple[Any, dict[str, Any]]:
        for key, value in changes.items():
            ranks[rank][key] = value(ranks[rank][key]) if callable(value) else value
        return problem_args(ranks)

    return make


def keywords(**problem_keywords: Any) -> Callable[[Ranks], tuple[Any, dict[str, Any]]]:
    return lambda ranks: problem_args(ranks, **problem_keywords)


def config(**fields: Any) -> Callable[[Ranks], tuple[Any, dict[str, Any]]]:
    """Build an OpConfig directly (paths the array checks never reach)."""

    def make(ranks: Ranks) -> tuple[Any, dict[str, Any]]:
        OpConfig(**{**dataclasses.asdict(BASE), **fields})
        raise AssertionError("OpConfig accepted " + repr(fields))

    return make


def with_nan(a: np.ndarray) -> np.ndarray:
    a = a.copy()
    a.flat[3] = np.nan
    return a


def with_inf(tensors: list[np.ndarray]) -> list[np.ndarray]:
    t = tensors[0].copy()
    t.flat[5] = np.inf
    return [t]


def per_expert(tensors: list[np.ndarray]) -> list[np.ndarray]:
    return [np.ascontiguousarray(t) for t in tensors[0]]


def other_rank(cfg: OpConfig) -> Callable[[Ranks], tuple[Any, dict[str, Any]]]:
    """Rank 1 replaced by a rank that is valid alone but disagrees with rank 0."""

    def make(ranks: Ranks) -> tuple[Any, dict[str, Any]]:
        ranks[1] = fresh_ranks(cfg)[1]
        ranks[1]["expert_idx"] = np.zeros_like(ranks[1]["expert_idx"])  # valid for both
        return problem_args(ranks)

    return make


CASES = [
    # The call: the rank sequence.
    Case("ranks is one RankInputs", RankCountError, None, "ranks", "RankInputs(",
         "a sequence of RankInputs", "one RankInputs per rank in a list",
         lambda ranks: (RankInputs(**ranks[0]), {})),
    Case("no ranks", RankCountError, None, "ranks", "0 ranks", "1..32 ranks", "at most 32",
         lambda ranks: ([], {})),
    Case("33 ranks", RankCountError, None, "ranks", "33 ranks", "1..32 ranks", "PR #5787",
         lambda ranks: ([RankInputs(**ranks[0])] * 33, {})),
    Case("a rank that is not RankInputs", SpecError, 1, "ranks",
         f"tuple of {len(FIELDS)} entries",
         "spec.RankInputs", "wrap each rank's arrays",
         lambda ranks: ([RankInputs(**ranks[0]), tuple(ranks[1].values())], {})),
    # x, expert_idx, probs.
    Case("x not an array", DTypeError, 1, "x", "list of 2 entries", "a NumPy array",
         "as a NumPy array", edit(1, x=lambda x: x.tolist())),
    Case("expert_idx a masked array hiding -1", DTypeError, 1, "expert_idx",
         "numpy.ma.MaskedArray (an ndarray subclass)", "a plain NumPy array",
         "np.asarray(expert_idx)",
         edit(1, expert_idx=lambda i: np.ma.masked_equal(np.where(i == 0, -1, i), -1))),
    Case("x an np.matrix", DTypeError, 1, "x", "numpy.matrix", "a plain NumPy array",
         "active_mask", edit(1, x=lambda x: np.asmatrix(x))),
    Case("x 1-D", ShapeError, 1, "x", "shape (16,)", "2-D (M, K)", "(tokens, hidden)",
         edit(1, x=lambda x: x.reshape(-1))),
    Case("x float32", DTypeError, 1, "x", "dtype float32", "bfloat16 or float16",
         ".astype(ml_dtypes.bfloat16)", edit(1, x=lambda x: x.astype(np.float32))),
    Case("x NaN", NonFiniteError, 1, "x[0, 3]", "nan", "finite values", "active_mask",
         edit(1, x=with_nan)),
    Case("expert_idx not an array", DTypeError, 1, "expert_idx", "list", "a NumPy array",
         "as a NumPy array", edit(1, expert_idx=lambda i: i.tolist())),
    Case("expert_idx rows differ from x", ShapeError, 1, "expert_idx", "shape (1, 2)",
         "M = 2", "one row of top_k", edit(1, expert_idx=lambda i: i[:1])),
    Case("expert_idx with top_k = 0", ShapeError, 1, "expert_idx", "shape (2, 0)",
         "top_k >= 1", "one row of top_k", edit(1, expert_idx=lambda i: i[:, :0])),
    Case("expert_idx int64", DTypeError, 1, "expert_idx", "dtype int64", "int32",
         "expert_idx.astype(np.int32)", edit(1, expert_idx=lambda i: i.astype(np.int64))),
    Case("id = EP·E, the sentinel", ExpertIdError, 1, "expert_idx[1, 0]", "4 = EP·E",
         "0..3 (EP=2 x E=2)", "active_mask",
         edit(1, expert_idx=lambda i: np.array([[0, 1], [4, 0]], np.int32))),
    Case("negative id", ExpertIdError, 0, "expert_idx[2, 1]", "-1 (negative ids",
         "0..3", "mark padding tokens inactive",
         edit(0, expert_idx=lambda i: np.array([[0, 1], [2, 3], [0, -1]], np.int32))),
    Case("stale id", ExpertIdError, 1, "expert_idx[0, 0]", "9 (a stale or foreign id",
         "0..3", "g // E", edit(1, expert_idx=lambda i: np.array([[9, 0], [1, 2]], np.int32))),
    Case("probs not an array", DTypeError, 1, "probs", "list", "a NumPy array",
         "as a NumPy array", edit(1, probs=lambda p: p.tolist())),
    Case("probs shape", ShapeError, 1, "probs", "shape (2, 1)", "shape (2, 2) like expert_idx",
         "one routing weight", edit(1, probs=lambda p: p[:, :1])),
    Case("probs float64", DTypeError, 1, "probs", "dtype float64", "float32",
         "probs.astype(np.float32)", edit(1, probs=lambda p: p.astype(np.float64))),
    Case("probs inf", NonFiniteError, 0, "probs[", "inf", "finite values", "replace NaN/inf",
         edit(0, probs=lambda p: np.where(np.arange(p.size).reshape(p.shape) == 3, np.inf,
                                          p).astype(np.float32))),
    # TensorLists.
    Case("weight1 a bare array", TensorListError, 1, "weight1", "int8 array of shape (2, 8, 8)",
         "a list", "wrap the tensor in a list", edit(1, w1=lambda w: w[0])),
    Case("weight1 empty", TensorListError, 1, "weight1", "an empty list", "stacked (E, K, N)",
         "at least one tensor", edit(1, w1=[])),
    Case("weight1 entry not an array", DTypeError, 1, "weight1[0]", "list", "a NumPy array",
         "as a NumPy array", edit(1, w1=lambda w: [w[0].tolist()])),
    Case("one 2-D tensor: ambiguous at E = 1", AmbiguousTensorList, 1, "weight1",
         "a list of one 2-D tensor of shape (8, 8)", "when E = 1", "[weight1[0][None]]",
         edit(1, w1=lambda w: [w[0][0]])),
    Case("stacked weight1 4-D", ShapeError, 1, "weight1[0]", "shape (2, 8, 8, 1)",
         "stacked (E, K, N)", "new first axis", edit(1, w1=lambda w: [w[0][..., None]])),
    Case("per-expert shapes differ", TensorListError, 1, "weight1[1]", "shape (8, 6)",
         "like weight1[0]", "one shape (K, N) and dtype",
         edit(1, w1=lambda w: [w[0][0], w[0][1][:, :6]])),
    Case("weight1 K differs from x", ShapeError, 1, "weight1", "per-expert shape (9, 8)",
         "K = 8", "transpose", edit(1, w1=lambda w: [np.concatenate([w[0], w[0][:, :1]], 1)])),
    Case("odd N", ShapeError, 1, "weight1", "N = 7", "an even N = 2I", "gate columns first",
         edit(1, w1=lambda w: [w[0][:, :, :7]])),
    Case("weight1 float32", DTypeError, 1, "weight1", "dtype float32",
         "int8 (w8a8) or int32 (w4a8) or bfloat16 (float)",
         "quantise the weights", edit(1, w1=lambda w: [w[0].astype(np.float32)])),
    Case("weight2 in another form", TensorListError, 1, "weight2", "list form with E=2",
         "stacked form with E=2, like weight1", "same TensorList form",
         edit(1, w2=per_expert)),
    Case("weight2 shape", ShapeError, 1, "weight2", "per-expert shape (3, 8)",
         "per-expert shape (4, 8)", "reshape weight2", edit(1, w2=lambda w: [w[0][:, :3]])),
    Case("weight2 dtype", DTypeError, 1, "weight2", "dtype int16", "int8", "cast weight2",
         edit(1, w2=lambda w: [w[0].astype(np.int16)])),
    Case("W8A8 without scale1", TensorListError, 1, "scale1", "None",
         "float32 dequant scales of weight1 (per channel or per block) (8,)",
         "pass scale1", edit(1, scale1=None)),
    Case("scale1 per-expert shape", ShapeError, 1, "scale1", "per-expert shape (7,)",
         "per-expert shape (8,)", "reshape scale1", edit(1, scale1=lambda s: [s[0][:, :7]])),
    Case("scale1 a one-entry 1-D list", ShapeError, 1, "scale1[0]", "shape (8,)",
         "stacked (E, N)", "new first axis", edit(1, scale1=lambda s: [s[0][0]])),
    Case("scale2 float64", DTypeError, 1, "scale2", "dtype float64", "float32", "cast scale2",
         edit(1, scale2=lambda s: [s[0].astype(np.float64)])),
    Case("scale1 NaN", NonFiniteError, 1, "scale1[", "nan", "finite values", "scale1",
         edit(1, scale1=lambda s: [with_nan(s[0])])),
    Case("scales with bf16 weights", TensorListError, 1, "scale1", "list of 1 entries",
         "None with bfloat16 weights", "drop scale1",
         edit(1, scale1=[np.ones((2, 8), np.float32)]), BF16),
    # W4A8 (variants.md): packed dimensions, N <= K, the compensation bias.
    Case("W4A8 N > K", ShapeError, 1, "weight1", "N = 16 columns with K = 8", "N <= K for w4a8",
         "I <= K/2", edit(1, w1=lambda w: [np.concatenate([w[0], w[0]], axis=2)]), W4A8),
    Case("W4A8 K not a multiple of 8", ShapeError, 1, "weight2", "K = 12", "a multiple of 8",
         "pad K", edit(1, x=lambda x: np.concatenate([x, x[:, :4]], 1),
                       w1=lambda w: [np.concatenate([w[0], w[0][:, :4]], 1)]), W4A8),
    Case("W4A8 bias1 not the compensation", BiasError, 1, "bias1[expert 0][", "", "8·Σ W·s",
         "compensation_bias", edit(1, bias1=lambda b: [b[0] * 2 + 1]), W4A8),
    Case("W4A8 config N > K", ConfigError, None, "intermediate", "N = 16 > K = 8",
         "N = 2I <= K for w4a8", "I <= K/2", config(weight_dtype="int32", intermediate=8)),
    Case("W4A8 config K not a multiple of 8", ConfigError, None, "hidden", "K = 12",
         "a multiple of 8 for w4a8", "pad K", config(weight_dtype="int32", hidden=12)),
    Case("scale_dims no FP8 row has", ConfigError, None, "scale_dims",
         "3 with float8_e4m3fn weights", "1 (fp8_channel)", "scale1's per-expert dimensions",
         config(weight_dtype="float8_e4m3fn", scale_dims=3)),
    Case("act_scheme no row of the weights has", ConfigError, None, "act_scheme",
         "'mxfp8' with int8 weights", "None", "activation quantisation",
         config(act_scheme="mxfp8")),
    Case("activation_scales not a bool", ConfigError, None, "activation_scales", "'yes'",
         "True or False", "a1_gscale and a2_gscale", config(activation_scales="yes")),
    Case("activation_scales with int8 weights", ConfigError, None, "activation_scales",
         "True with int8 weights", "(nvfp4)", "use float4_e2m1fn weights",
         config(activation_scales=True)),
    Case("bf16 weight inf", NonFiniteError, 1, "weight1[", "inf", "finite values", "weight1",
         edit(1, w1=with_inf), BF16),
    # The mask.
    Case("mask not an array", DTypeError, 1, "active_mask", "list", "a NumPy array",
         "as a NumPy array", edit(1, active_mask=[True, False])),
    Case("mask int", MaskError, 1, "active_mask", "int64 array of shape (2,)",
         "bool of shape (2,)", "one bool per token", edit(1, active_mask=np.ones(2, np.int64))),
    Case("mask shape", MaskError, 1, "active_mask", "bool array of shape (3,)",
         "bool of shape (2,)", "one bool per token", edit(1, active_mask=np.ones(3, bool))),
    Case("mask with bf16 weights", MaskError, 1, "active_mask",
         "a mask with bfloat16 weights", "the float variant has no x_active_mask",
         "drop active_mask",
         edit(1, active_mask=np.ones(2, bool)), BF16),
    # Ranks that disagree.
    Case("ranks disagree on K", SpecError, 1, "x's hidden size K", "16", "8 as on rank 0",
         "must agree on x's hidden size K", other_rank(dataclasses.replace(BASE, hidden=16))),
    Case("ranks disagree on x dtype", SpecError, 1, "x's dtype", "'float16'",
         "'bfloat16' as on rank 0", "must agree",
         other_rank(dataclasses.replace(BASE, x_dtype="float16"))),
    Case("ranks disagree on top_k", SpecError, 1, "top_k (expert_idx columns)", "3",
         "2 as on rank 0", "must agree", other_rank(dataclasses.replace(BASE, top_k=3))),
    Case("ranks disagree on E", SpecError, 1, "experts per rank E", "3", "2 as on rank 0",
         "must agree", other_rank(dataclasses.replace(BASE, experts_per_rank=3))),
    Case("ranks disagree on I", SpecError, 1, "intermediate size I", "2", "4 as on rank 0",
         "must agree", other_rank(dataclasses.replace(BASE, intermediate=2))),
    Case("ranks disagree on the weight dtype", SpecError, 1, "weight dtype", "'bfloat16'",
         "'int8' as on rank 0", "must agree", other_rank(BF16)),
    Case("ranks disagree on the TensorList form", SpecError, 1, "TensorList form", "'list'",
         "'stacked' as on rank 0", "must agree",
         other_rank(dataclasses.replace(BASE, weight_form="list"))),
    # Attributes of the call, checked by OpConfig.
    Case("negative max_output_size", ConfigError, None, "max_output_size", "-1",
         "None (no truncation) or an int from 0 to 2147483647", "receive capacity",
         keywords(max_output_size=-1)),
    # Values that reached OverflowError or TypeError deep inside before round 2 (issue 23).
    *(Case(f"max_output_size {value}", ConfigError, None, "max_output_size", str(value),
           "an int from 0 to 2147483647", "receive capacity", keywords(max_output_size=value))
      for value in (2**31, 2**63, 2**64)),
    Case("swiglu_limit 10**400", ConfigError, None, "swiglu_limit", "1000", "float32's range",
         "positive clamp", keywords(swiglu_limit=10**400)),
    Case("swiglu_limit beyond float32", ConfigError, None, "swiglu_limit", "1e+39",
         "float32's range", "positive clamp", keywords(swiglu_limit=1e39)),
    Case("swiglu_alpha 10**400", ConfigError, None, "swiglu_alpha", "1000", "float32's range",
         "SwigluOAI alpha", keywords(swiglu_alpha=10**400)),
    *(Case(f"tokens_per_rank {value!r}", ConfigError, None, "tokens_per_rank", repr(value),
           "a tuple of ints >= 0, one per rank", "one token count per rank",
           config(tokens_per_rank=value)) for value in (5, None)),
    Case("tokens_per_rank beyond int32 slots", ConfigError, None, "tokens_per_rank",
         "(1073741824, 0)", "at most 2147483647 slots", "one token count per rank",
         config(tokens_per_rank=(2**30, 0))),
    Case("masked 'yes'", ConfigError, None, "masked", "'yes'", "True or False",
         "masked=True", config(masked="yes")),
    Case("x_dtype not a name", ConfigError, None, "x_dtype", "['bfloat16']", "a name (str)",
         "x_dtype by name, e.g. 'bfloat16'", config(x_dtype=["bfloat16"])),
    Case("EP·E beyond int32 ids", ConfigError, None, "experts_per_rank", "EP·E = 2147483648",
         "int32 expert ids", "fewer experts", config(experts_per_rank=2**30)),
    Case("fractional max_output_size", ConfigError, None, "max_output_size", "2.5",
         "an int from 0", "receive capacity", keywords(max_output_size=2.5)),
    Case("swiglu_limit <= 0", ConfigError, None, "swiglu_limit", "-1.0",
         "None or a finite float > 0", "positive clamp", keywords(swiglu_limit=-1.0)),
    Case("swiglu_limit NaN", ConfigError, None, "swiglu_limit", "nan", "finite float > 0",
         "positive clamp", keywords(swiglu_limit=float("nan"))),
    Case("swiglu_limit True", ConfigError, None, "swiglu_limit", "True", "finite float > 0",
         "positive clamp", keywords(swiglu_limit=True)),
    Case("swiglu_limit with bf16 weights", ConfigError, None, "swiglu_limit",
         "0.5 with bfloat16 weights", "the float variant has no clamp",
         "variant with a clamp (w8a8, w4a8)",
         keywords(swiglu_limit=0.5), BF16),
    Case("swiglu_alpha NaN", ConfigError, None, "swiglu_alpha", "nan",
         "None or a finite float within float32's range", "SwigluOAI alpha",
         keywords(swiglu_alpha=float("nan"))),
    Case("swiglu_alpha beyond float32", ConfigError, None, "swiglu_alpha", "1e+39",
         "within float32's range", "0 or None for standard SwiGLU", keywords(swiglu_alpha=1e39)),
    Case("swiglu_alpha True", ConfigError, None, "swiglu_alpha", "True", "finite float",
         "SwigluOAI alpha", keywords(swiglu_alpha=True)),
    Case("swiglu_alpha a string", ConfigError, None, "swiglu_alpha", "'1.702'", "finite float",
         "SwigluOAI alpha", config(swiglu_alpha="1.702")),
    Case("swiglu_alpha > 0 with bf16 weights", ConfigError, None, "swiglu_alpha",
         "1.702 with bfloat16 weights", "None or <= 0 unless the weights are int8",
         "use the W8A8 variant", keywords(swiglu_alpha=1.702), BF16),
    # OpConfig built directly.
    *(Case(f"{name} = {value!r}", ConfigError, None, name, repr(value),
           "an int from 1 to 2147483647", f"positive integer for {name}", config(**{name: value}))
      for name in ("ep_size", "experts_per_rank", "top_k", "hidden", "intermediate")
      for value in (0, True, 2**31)),
    Case("ep_size 33", ConfigError, None, "ep_size", "33", "1..32", "PR #5787",
         config(ep_size=33, tokens_per_rank=(1,) * 33)),
    Case("tokens_per_rank length", ConfigError, None, "tokens_per_rank", "(3,)",
         "a tuple of 2 ints >= 0", "one token count per rank", config(tokens_per_rank=(3,))),
    Case("tokens_per_rank negative", ConfigError, None, "tokens_per_rank", "(3, -1)",
         "ints >= 0", "0 is allowed", config(tokens_per_rank=(3, -1))),
    Case("x_dtype float32", ConfigError, None, "x_dtype", "'float32'", "bfloat16 or float16",
         "bfloat16 or float16 tokens", config(x_dtype="float32")),
    Case("weight_dtype int4", ConfigError, None, "weight_dtype", "'int4'",
         "'int8' (w8a8) or 'int32' (w4a8) or 'bfloat16' (float)", "float32 scales",
         config(weight_dtype="int4")),
    Case("fp16 weights with bf16 x", ConfigError, None, "weight_dtype", "'float16'",
         "'bfloat16' (float)", "weights in x's dtype", config(weight_dtype="float16")),
    Case("weight_form packed", ConfigError, None, "weight_form", "'packed'",
         "stacked or list", "'stacked' or 'list'", config(weight_form="packed")),
    Case("per-expert list at E = 1", ConfigError, None, "weight_form",
         "'list' with experts_per_rank=1", "'stacked' when E = 1", "E becomes K",
         config(weight_form="list", experts_per_rank=1)),
    Case("masked with bf16 weights", ConfigError, None, "masked", "True with bfloat16 weights",
         "the float variant has no x_active_mask", "drop active_mask",
         config(masked=True, weight_dtype="bfloat16")),
    Case("swiglu_limit a string", ConfigError, None, "swiglu_limit", "'7'",
         "None or a finite float > 0", "positive clamp", config(swiglu_limit="7")),
]


def raise_site(case: Case) -> tuple[str, int]:
    """Run one case and check everything about its error; return ``(module file, line)`` of
    the ``raise`` statement that produced it."""
    ranks = fresh_ranks(case.config)
    arrays = list(_arrays(ranks))
    snapshot = [a.copy() for a in arrays]
    with pytest.raises(case.error) as info:
        given_ranks, problem_keywords = case.make(ranks)
        Problem(given_ranks, **problem_keywords)
    err = info.value
    where = f"rank {err.rank}, " if err.rank is not None else ""
    assert str(err) == f"{where}{err.field}: got {err.given}; allowed: {err.allowed}. " \
                       f"Fix: {err.fix}", "the message does not follow the one template"
    assert err.rank == case.rank, f"rank {err.rank}, want {case.rank}"
    assert err.field.startswith(case.field), f"field {err.field!r}, want {case.field!r}"
    assert case.given in err.given, f"given {err.given!r} lacks {case.given!r}"
    assert case.allowed in err.allowed, f"allowed {err.allowed!r} lacks {case.allowed!r}"
    assert case.fix in err.fix, f"fix {err.fix!r} lacks {case.fix!r}"
    for i, (a, b) in enumerate(zip(arrays, snapshot)):
        assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), (
            f"input array {i} was modified"
        )
    tb = info.tb
    while tb.tb_next is not None:
        tb = tb.tb_next
    return Path(tb.tb_frame.f_code.co_filename).name, tb.tb_lineno


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_spec_error_message(case: Case) -> None:
    raise_site(case)


def test_every_raise_site_has_a_case() -> None:
    sites = {
        (Path(str(module.__file__)).name, node.lineno)
        for module in (spec.problem, spec.config)
        for node in ast.walk(ast.parse(Path(str(module.__file__)).read_text()))
        if isinstance(node, ast.Raise)
    }
    covered = {raise_site(case) for case in CASES}
    assert sites - covered == set(), f"raise statements without a case: {sorted(sites - covered)}"


def test_case_table_fails_on_a_wrong_expectation() -> None:
    """The checker itself can fail: a case whose expected fix text is wrong is rejected."""
    wrong = dataclasses.replace(CASES[0], fix="some other advice")
    with pytest.raises(AssertionError, match="fix"):
        raise_site(wrong)


def test_valid_problem_leaves_inputs_unchanged_and_read_only() -> None:
    """Masked tokens may hold any id (the kernel overwrites them with EP·E, §4); the model does
    not: the caller's arrays are untouched and the problem's views cannot be written."""
    ranks = fresh_ranks(dataclasses.replace(BASE, masked=True))
    ranks[0]["active_mask"] = np.array([True, False, True])
    ranks[0]["expert_idx"][1] = [-1, 4]
    ranks[1]["active_mask"] = np.array([False, False])
    ranks[1]["expert_idx"][:] = 99
    arrays = list(_arrays(ranks))
    snapshot = [a.copy() for a in arrays]
    problem = Problem([RankInputs(**r) for r in ranks], max_output_size=3, swiglu_limit=1.0)
    assert problem.config.masked and problem.max_output_size == 3
    for a, b in zip(arrays, snapshot):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    for name in ("x", "expert_idx", "probs", "active_mask"):
        with pytest.raises(ValueError, match="read-only"):
            getattr(problem.ranks[0], name)[0] = 0
    with pytest.raises(ValueError, match="read-only"):
        problem.ranks[0].w1[0][0, 0, 0] = 0


def test_problem_config_describes_the_arrays() -> None:
    ranks = fresh_ranks(dataclasses.replace(BASE, weight_form="list", x_dtype="float16"))
    problem = Problem([RankInputs(**r) for r in ranks])
    assert problem.config == dataclasses.replace(BASE, weight_form="list", x_dtype="float16")
    assert problem.ranks[0].x.dtype == np.float16


# Invalid ids (edge_cases.md, 2026: vllm PR #46408, #48371; ROCm/aiter #4636): -1 padding, the
# sentinel EP·E, ids past EP·E and the int32 extremes, on either rank and any slot.
INVALID_IDS = [-1, -(2**31), 4, 5, 2**31 - 1]


@pytest.mark.parametrize("value", INVALID_IDS)
@pytest.mark.parametrize(("rank", "token", "slot"), [(0, 2, 1), (1, 0, 0), (1, 1, 1)])
def test_invalid_id_names_field_rank_token_and_value(
    value: int, rank: int, token: int, slot: int
) -> None:
    ranks = fresh_ranks()
    ranks[rank]["expert_idx"][token, slot] = value
    with pytest.raises(ExpertIdError) as err:
        Problem(*problem_args(ranks)[:1])
    e = err.value
    assert (e.rank, e.field) == (rank, f"expert_idx[{token}, {slot}]")
    assert str(e).startswith(f"rank {rank}, expert_idx[{token}, {slot}]: got {value} ")
    assert "allowed: 0..3 (EP=2 x E=2)" in str(e)


@pytest.mark.parametrize("value", INVALID_IDS)
def test_invalid_id_of_a_masked_token_is_not_read(value: int) -> None:
    """§4: the kernel overwrites a masked token's ids with the sentinel before routing."""
    ranks = fresh_ranks()
    ranks[1]["expert_idx"][0, 1] = value
    ranks[1]["active_mask"] = np.array([False, True])
    assert Problem(*problem_args(ranks)[:1]).config.masked


@pytest.mark.parametrize("shape,at", [((3, 4), (1, 2)), ((300, 500), (299, 487))])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float8_e4m3fn", "float32"])
def test_nonfinite_values_are_found_by_their_bits(dtype: str, shape: tuple[int, int],
                                                  at: tuple[int, int]) -> None:
    """The 16- and 8-bit floats are checked on their exponent bits, not a float32 copy: NaN
    and inf (cast to e4m3fn: NaN) found where they are, in a strided view and in Fortran
    order too; the largest finite values not. 150 000 values: the piecewise test (pieces of
    65 536), the value in the last piece. A mask one bit short (here: bfloat16's taken for
    float16) misses inf on both paths."""
    wide = np.dtype(spec.problem.DTYPES.get(dtype, dtype))
    largest = float(np.finfo(wide).max) if dtype != "bfloat16" else 3.3895313892515355e38
    for value, bad in ((np.nan, True), (np.inf, True), (largest, False),  # e4m3fn: inf is NaN
                       (-largest, False), (-np.inf, True)):
        a = np.zeros(shape, np.float32)
        a[at] = value
        narrow = a.astype(wide)
        assert spec.problem._first_nonfinite(narrow) == (at if bad else None)
        assert spec.problem._first_nonfinite(np.asfortranarray(narrow)) == (at if bad else None)
        strided = (at[0], at[1] // 2) if at[1] % 2 == 0 else None
        assert spec.problem._first_nonfinite(narrow[:, ::2]) == (strided if bad else None)
    if dtype != "float16":
        return
    short = {np.dtype(np.float16): (np.uint16, 0x7F80, 0x7FFF)}
    inf16 = np.zeros(shape, np.float16)
    inf16[at] = np.inf
    assert spec.problem._first_nonfinite(inf16) == at
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(spec.problem, "_NONFINITE_BITS", short)
        assert spec.problem._first_nonfinite(inf16) is None


@pytest.mark.parametrize("at", [0, 77_777, 149_999])
def test_nonfinite_values_are_found_in_every_slice_of_a_parallel_test(
        at: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Large arrays are tested one slice per core: a NaN in the first, a middle or the last
    slice is found (slices of 2^12 values here, so that 150 000 values make one per core);
    with two cores at least, the parallel path runs."""
    monkeypatch.setattr(spec.problem, "_PARALLEL_VALUES", 1 << 12)
    monkeypatch.setattr(spec.problem.os, "cpu_count", lambda: 3)
    a = np.zeros(150_000, spec.problem.DTYPES["bfloat16"])
    assert spec.problem._first_nonfinite(a) is None
    a[at] = np.nan
    assert spec.problem._first_nonfinite(a) == (at,)
