"""Evidence that the reference model :func:`oracle.run` is right.

- A second, naive model (``naive_reference.py``, loops written from the notes) agrees with it
  bitwise in faithful mode and within one ulp (1e-12 relative before the final cast) in ideal
  mode, on generated problems and on a fixed list that covers the issue's ranges.
- Invariants of the contract (``docs/contract/dispatch_ffn_combine.md`` §4–§6): slot
  conservation, per-expert receive sets, stacked = per-expert lists, EP-size invariance, masked
  tokens change nothing, determinism, inputs never written.
- Faithful vs ideal stays within :func:`oracle.judge.bounds.quantisation_error_bound`, and the bound
  fails when a quantisation term is dropped.

Every check is a plain function; each is shown to fail on a mutant of the reference (a
monkeypatched defect) as well as to pass on the real one.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from naive_reference import naive_run

import oracle
import oracle.model.kernels as kernels
import oracle.model.reference as reference
from oracle import Numerics
from oracle.judge.bounds import SILU_LIPSCHITZ, TERMS, ideal_tolerance, quantisation_error_bound
from spec import DTYPES, OpConfig, Problem, RankInputs, random_problem
from spec.strategies import configs, problems

Array = np.ndarray[Any, Any]

FAITHFUL_SWITCHES = st.sampled_from(
    [Numerics(), Numerics(truncate_scales=True), Numerics(zero_rows="nan")]
)


# ---------------------------------------------------------------------------------------------
# Comparison helpers


def _bits(a: Array) -> Array:
    a = np.ascontiguousarray(a)
    return a.view(np.dtype(f"u{a.dtype.itemsize}"))


def assert_bitwise(got: Array, want: Array, what: str) -> None:
    """Same shape, dtype and bit pattern (so -0 differs from +0, NaN payloads must match)."""
    assert got.shape == want.shape and got.dtype == want.dtype, (
        f"{what}: got {got.dtype}{got.shape}, want {want.dtype}{want.shape}"
    )
    same = _bits(got) == _bits(want)
    if not same.all():
        where = tuple(int(i) for i in np.argwhere(~same)[0])
        raise AssertionError(
            f"{what}: {int((~same).sum())} of {same.size} values differ; first at {where}: "
            f"got {got[where]!r}, want {want[where]!r}"
        )


def ulps_apart(a: Array, b: Array) -> Array:
    """Distance in units in the last place between two 16-bit float arrays (sign-magnitude
    bits mapped to a monotone integer line; +0 and -0 coincide)."""

    def line(v: Array) -> Array:
        bits = _bits(v).astype(np.int64)
        return np.where(bits & 0x8000, -(bits & 0x7FFF), bits)

    return np.asarray(np.abs(line(a) - line(b)))


def assert_relative(got: Array, want: Array, what: str, rel: float = 1e-12) -> None:
    """``|got − want| <= rel · max|want|`` along the last axis (a row's scale: elementwise
    relative error is meaningless where the row's terms cancel); NaN must match NaN."""
    scale = np.nan_to_num(np.abs(want)).max(axis=-1, keepdims=True, initial=0.0)
    both_nan = np.isnan(got) & np.isnan(want)
    with np.errstate(invalid="ignore"):
        ok = both_nan | (got == want) | (np.abs(got - want) <= rel * scale)
    if not ok.all():
        where = tuple(int(i) for i in np.argwhere(~ok)[0])
        raise AssertionError(
            f"{what}: {int((~ok).sum())} values beyond {rel:g} relative; first at {where}: "
            f"got {got[where]!r}, want {want[where]!r}"
        )


def _layout_rows(layout: reference.ReceiveLayout) -> list[tuple[int, int, int, int]]:
    return list(zip(layout.src_rank.tolist(), layout.token.tolist(), layout.slot.tolist(),
                    layout.local_expert.tolist()))


def assert_results_bitwise(got: oracle.Result, want: oracle.Result) -> None:
    """Every output and intermediate of two results bit for bit."""
    assert np.array_equal(got.trace.counts, want.trace.counts), "count matrices differ"
    for d, (a, b) in enumerate(zip(got.trace.receive, want.trace.receive)):
        assert _layout_rows(a) == _layout_rows(b) and a.kept == b.kept, f"rank {d}: receive"
    for r, (mine, theirs) in enumerate(zip(got.ranks, want.ranks)):
        assert_bitwise(mine.out, theirs.out, f"rank {r}: out")
        assert_bitwise(mine.expert_token_nums, theirs.expert_token_nums, f"rank {r}: nums")
        assert_bitwise(mine.defined, theirs.defined, f"rank {r}: defined")
        assert_bitwise(got.trace.y[r], want.trace.y[r], f"rank {r}: y")
        assert_bitwise(got.trace.combined[r], want.trace.combined[r], f"rank {r}: combined")


def _active(inputs: RankInputs) -> Array:
    """The caller's mask read directly (not through ``RankInputs.is_active``, which a mutant
    may replace)."""
    if inputs.active_mask is None:
        return np.ones(inputs.x.shape[0], dtype=bool)
    return np.asarray(inputs.active_mask, dtype=bool)


# ---------------------------------------------------------------------------------------------
# The naive model agrees with the vectorised one


def check_agreement(
    problem: Problem, numerics: str | Numerics = "faithful", naive: Numerics | None = None
) -> None:
    """``oracle.run`` and ``naive_run``: counts, receive layouts, expert_token_nums, defined rows
    and token scales exactly; faithful ``out``, ``y`` and the combine accumulator bitwise; ideal
    ``out`` within 1 ulp and ``y``, ``combined`` within 1e-12 relative."""
    num = numerics if isinstance(numerics, Numerics) else Numerics(numerics)
    got = oracle.run(problem, numerics=num)
    want = naive_run(problem, naive or num)
    assert np.array_equal(got.trace.counts, want.counts), "count matrix cnt[s][g] differs"
    for d, (layout, buffer) in enumerate(zip(got.trace.receive, want.receive)):
        assert _layout_rows(layout) == buffer.rows, f"rank {d}: receive layout differs"
        assert layout.kept == buffer.kept, f"rank {d}: kept {layout.kept} != {buffer.kept}"
    for r, res in enumerate(got.ranks):
        defined = want.defined[r]
        assert_bitwise(res.expert_token_nums, want.expert_token_nums[r], f"rank {r}: nums")
        assert_bitwise(res.defined, defined, f"rank {r}: defined")
        assert_bitwise(got.trace.token_scale[r], want.token_scale[r], f"rank {r}: σ1")
        if num.mode == "faithful":
            assert_bitwise(res.out[defined], want.out[r][defined], f"rank {r}: out")
            assert_bitwise(got.trace.y[r], want.y[r], f"rank {r}: y")
            assert_bitwise(got.trace.combined[r][defined], want.combined[r][defined],
                           f"rank {r}: combine accumulator")
        else:
            apart = ulps_apart(res.out[defined], want.out[r][defined])
            assert (apart <= 1).all(), f"rank {r}: ideal out {int(apart.max())} ulps apart"
            assert_relative(got.trace.y[r], want.y[r], f"rank {r}: ideal y")
            assert_relative(got.trace.combined[r][defined], want.combined[r][defined],
                            f"rank {r}: ideal combine")


# The naive float-weight FFN sums every column with math.fsum: keep K and I modest here (the
# numerics do not depend on the 512-byte row sizes that the default K values probe).
SMALL_FFN = configs(hidden=st.sampled_from((16, 32, 48, 64)),
                    intermediate=st.sampled_from((8, 16, 32)))


@given(problems(configs=SMALL_FFN), FAITHFUL_SWITCHES)
def test_naive_agrees_bitwise_in_faithful_mode(problem: Problem, numerics: Numerics) -> None:
    check_agreement(problem, numerics)


@given(problems())
def test_naive_agrees_in_ideal_mode(problem: Problem) -> None:
    check_agreement(problem, "ideal")


def _ids_with_duplicates(cfg: OpConfig, seed: int) -> list[Array]:
    """Ids drawn with replacement; every rank's first token sends all its slots to one expert."""
    rng = np.random.default_rng(seed)
    ids = [rng.integers(0, cfg.num_experts, size=(m, cfg.top_k)).astype(np.int32)
           for m in cfg.tokens_per_rank]
    for r, m in enumerate(cfg.tokens_per_rank):
        if m:
            ids[r][0] = (7 * r) % cfg.num_experts
    return ids


def _special_rows(cfg: OpConfig, seed: int) -> list[Array]:
    """Normal rows, plus on the first busy rank an all-zero row and a row of exact quantisation
    ties (x/σ1 = n + 1/2 with σ1 = 1/8, exact in bf16 and fp16)."""
    rng = np.random.default_rng(seed)
    x = [rng.standard_normal((m, cfg.hidden)) for m in cfg.tokens_per_rank]
    busy = next(r for r, m in enumerate(cfg.tokens_per_rank) if m >= 2)
    x[busy][0] = 0.0
    x[busy][1] = (2 * rng.integers(-127, 127, size=cfg.hidden) + 1) / 16
    x[busy][1, 0] = 127 / 8
    return [a.astype(DTYPES[cfg.x_dtype]) for a in x]


def _coverage() -> Iterator[tuple[str, Problem]]:
    """Fixed problems spanning the issue's ranges, whatever the search draws."""
    base: dict[str, Any] = dict(hidden=16, intermediate=8)
    yield "EP1 E1 top_k1", random_problem(OpConfig(
        ep_size=1, experts_per_rank=1, top_k=1, tokens_per_rank=(3,), **base), seed=1)
    cfg = OpConfig(ep_size=32, experts_per_rank=2, top_k=8, weight_form="list", masked=True,
                   max_output_size=6, tokens_per_rank=tuple(r % 3 for r in range(32)), **base)
    yield "EP32 E2 lists top_k8 masked truncated", random_problem(
        cfg, seed=2, expert_idx=_ids_with_duplicates(cfg, 2))
    cfg = OpConfig(ep_size=3, experts_per_rank=8, top_k=8, weight_form="list", swiglu_limit=0.5,
                   tokens_per_rank=(4, 0, 3), **base)
    yield "EP3 E8 duplicates clamp zero+tie rows", random_problem(
        cfg, seed=3, x=_special_rows(cfg, 3), expert_idx=_ids_with_duplicates(cfg, 3))
    yield "every rank empty", random_problem(OpConfig(
        ep_size=4, experts_per_rank=3, top_k=2, tokens_per_rank=(0, 0, 0, 0), **base), seed=4)
    yield "fp16 weights, lists, some ranks empty", random_problem(OpConfig(
        ep_size=5, experts_per_rank=2, top_k=3, x_dtype="float16", weight_dtype="float16",
        weight_form="list", tokens_per_rank=(0, 3, 0, 2, 1), **base), seed=5)
    yield "bf16 weights, stacked", random_problem(OpConfig(
        ep_size=2, experts_per_rank=3, top_k=4, weight_dtype="bfloat16",
        tokens_per_rank=(3, 2), **base), seed=6)
    cfg = OpConfig(ep_size=2, experts_per_rank=4, top_k=4, x_dtype="float16", masked=True,
                   max_output_size=5, swiglu_limit=7.0, tokens_per_rank=(4, 3), **base)
    yield "fp16 x, mask, truncation, zero+tie rows", random_problem(
        cfg, seed=7, x=_special_rows(cfg, 7))
    yield "bf16 weights with ties", _bf16_swiglu_ties()


def _bf16_swiglu_ties() -> Problem:
    """BF16 weights whose SwiGLU products are exact ties of the bf16 cast: x = e0 makes
    gate = 29 (silu(29) = 29 in float32: 1 + e^-29 rounds to 1) and up = 9, so a = 261, halfway
    between 260 and 262; ties to even give 260, ties away (variants.md) 262."""
    bf16 = DTYPES["bfloat16"]
    x = np.zeros((2, 16), bf16)
    x[:, 0] = 1
    w1 = np.zeros((2, 16, 16), np.float32)
    w1[:, 0, :8], w1[:, 0, 8:] = 29, 9
    w2 = np.full((2, 8, 16), 2.0**-10, np.float32)
    w2[:, 0, :] = 1
    ranks = [RankInputs(x=x, expert_idx=np.array([[0, 1], [1, 0]], np.int32),
                        probs=np.full((2, 2), 0.5, np.float32), w1=[w1.astype(bf16)],
                        w2=[w2.astype(bf16)])]
    return Problem(ranks)


COVERAGE = dict(_coverage())


@pytest.mark.parametrize("numerics", ["faithful", Numerics(zero_rows="nan"),
                                      Numerics(truncate_scales=True), "ideal"], ids=str)
@pytest.mark.parametrize("name", sorted(COVERAGE))
def test_naive_agrees_on_the_coverage_list(name: str, numerics: str | Numerics) -> None:
    check_agreement(COVERAGE[name], numerics)


def _descending_ties(original: Any) -> Any:
    """NumPy with an argsort that breaks ties by descending index (an unstable dispatch sort)."""

    class Patched:
        def __getattr__(self, name: str) -> Any:
            return getattr(original, name)

        @staticmethod
        def argsort(a: Array, kind: str | None = None) -> Array:
            return np.lexsort((-np.arange(a.shape[0]), a))

    return Patched()


class _ReversedCombine(kernels.Combine):
    """The combine summed in reverse k order: one step class, as a new profile would add."""

    def __call__(self, y: kernels.Env, probs: Array, x_dtype: Any) -> kernels.Env:
        flipped = kernels.Env(y.mid[:, ::-1])
        return super().__call__(flipped, probs[:, ::-1], x_dtype)


def _float32_ideal(original: Callable[..., tuple[Array, Array]]
                   ) -> Callable[..., tuple[Array, Array]]:
    def rounded(*args: Any) -> tuple[Array, Array]:
        h, y = original(*args)
        return h, y.astype(np.float32).astype(np.float64)
    return rounded


_A3 = kernels.ASCEND_A3
#: A realistic defect each: a mutated kernel profile run where the naive model runs ascend-a3,
#: or (attribute of oracle.model.reference, replacement factory, numerics) patched into the model.
REFERENCE_MUTANTS: dict[str, kernels.KernelProfile | tuple[str, Callable[[Any], Any], str]] = {
    "step 1 rounds half to even": _A3.map_steps("quantise", lambda q: replace(q, ties="even")),
    "no fp16 intermediate": _A3.with_steps(
        "w8a8", gemm1=replace(_A3.pipeline("w8a8").gemm1, epilogue=("col", "row"))),
    "combine in reverse k order": replace(_A3, combine=_ReversedCombine()),
    "bf16 swiglu cast ties to even": _A3.with_steps(
        "float", swiglu=replace(_A3.pipeline("float").swiglu, store="x")),
    "dispatch sort not stable": ("np", _descending_ties, "faithful"),
    "ideal mode in float32": ("_ffn_ideal", _float32_ideal, "ideal"),
}


@pytest.mark.parametrize("mutant", sorted(REFERENCE_MUTANTS))
def test_agreement_check_catches_reference_mutants(
    mutant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = REFERENCE_MUTANTS[mutant]
    problem = COVERAGE["EP3 E8 duplicates clamp zero+tie rows"]
    if isinstance(entry, kernels.KernelProfile):
        if "bf16" in mutant:
            problem = COVERAGE["bf16 weights with ties"]
        check_agreement(problem, "faithful")
        with pytest.raises(AssertionError):
            check_agreement(problem, Numerics(kernel=entry), naive=Numerics())
        return
    attribute, replacement, numerics = entry
    check_agreement(problem, numerics)
    monkeypatch.setattr(reference, attribute, replacement(getattr(reference, attribute)))
    with pytest.raises(AssertionError):
        check_agreement(problem, numerics)


# ---------------------------------------------------------------------------------------------
# Invariants


def check_slot_conservation(problem: Problem, result: oracle.Result) -> None:
    """Σ expert_token_nums over ranks = unmasked slots; each rank's nums are the column sums of
    its experts in cnt[s][g] (§5: counted before truncation, masked slots excluded)."""
    cfg = problem.config
    unmasked = sum(int(_active(r).sum()) for r in problem.ranks) * cfg.top_k
    nums = [r.expert_token_nums for r in result.ranks]
    assert sum(int(n.sum()) for n in nums) == unmasked, "expert_token_nums do not sum to slots"
    assert int(result.trace.counts.sum()) == unmasked, "cnt[s][g] does not sum to slots"
    per_expert = result.trace.counts.sum(axis=0).reshape(cfg.ep_size, cfg.experts_per_rank)
    for r, n in enumerate(nums):
        assert np.array_equal(n, per_expert[r]), f"rank {r}: nums are not cnt's column sums"


@given(problems())
def test_counts_conserve_slots(problem: Problem) -> None:
    check_slot_conservation(problem, oracle.run(problem))


def _masked_problem() -> Problem:
    cfg = OpConfig(ep_size=2, experts_per_rank=2, top_k=2, hidden=16, intermediate=8,
                   tokens_per_rank=(4, 3), masked=True)
    masks = [np.array([True, False, True, False]), np.array([False, True, True])]
    return random_problem(cfg, seed=11, active_mask=masks)


def test_slot_conservation_catches_counting_masked_slots(monkeypatch: pytest.MonkeyPatch) -> None:
    problem = _masked_problem()
    check_slot_conservation(problem, oracle.run(problem))
    monkeypatch.setattr(RankInputs, "is_active", lambda self: np.ones(self.num_tokens, bool))
    with pytest.raises(AssertionError, match="sum to slots"):
        check_slot_conservation(problem, oracle.run(problem))


def check_receive_sets(problem: Problem, result: oracle.Result) -> None:
    """Per global expert, the received (source, token, slot) rows are exactly its routed active
    slots, as multisets; ``kept`` is the capacity-clipped row count; a token is defined iff it is
    active and all its slots are among the kept rows (§4–§5)."""
    cfg = problem.config
    kept_slots: set[tuple[int, int, int]] = set()
    for d, layout in enumerate(result.trace.receive):
        rows = _layout_rows(layout)
        for e in range(cfg.experts_per_rank):
            g = d * cfg.experts_per_rank + e
            got = sorted((s, t, k) for s, t, k, le in rows if le == e)
            want = sorted(
                (s, int(t), int(k))
                for s, inputs in enumerate(problem.ranks)
                for t, k in zip(*np.nonzero((inputs.expert_idx == g) & _active(inputs)[:, None]))
            )
            assert got == want, f"expert {g}: received rows are not its routed slots"
        cap = cfg.max_output_size
        assert layout.kept == (len(rows) if cap is None else min(len(rows), cap)), f"rank {d}"
        kept_slots.update((s, t, k) for s, t, k, _ in rows[: layout.kept])
    for s, (inputs, res) in enumerate(zip(problem.ranks, result.ranks)):
        want_defined = [
            bool(_active(inputs)[t]) and all((s, t, k) in kept_slots for k in range(cfg.top_k))
            for t in range(inputs.x.shape[0])
        ]
        assert res.defined.tolist() == want_defined, f"rank {s}: defined rows"


@given(problems())
def test_receive_sets_equal_routed_slots(problem: Problem) -> None:
    check_receive_sets(problem, oracle.run(problem))


def test_receive_set_check_catches_a_duplicated_row() -> None:
    problem = COVERAGE["EP3 E8 duplicates clamp zero+tie rows"]
    result = oracle.run(problem)
    check_receive_sets(problem, result)
    layout = result.trace.receive[0]
    token = layout.token.copy()
    token[1] = token[0]  # one row received twice, another never: a set comparison would pass
    slot = layout.slot.copy()
    slot[1] = slot[0]
    receive = (dataclasses.replace(layout, token=token, slot=slot), *result.trace.receive[1:])
    broken = dataclasses.replace(result, trace=dataclasses.replace(result.trace, receive=receive))
    with pytest.raises(AssertionError, match="routed slots"):
        check_receive_sets(problem, broken)


def other_form(problem: Problem) -> Problem:
    """The same values in the other TensorList form (stacked <-> per-expert, E >= 2)."""
    e_local = problem.config.experts_per_rank

    def flip(tensors: Any) -> Any:
        if tensors is None:
            return None
        if len(tensors) == 1:
            return [np.ascontiguousarray(tensors[0][e]) for e in range(e_local)]
        return [np.stack(tensors)]

    return Problem(
        [dataclasses.replace(r, w1=flip(r.w1), w2=flip(r.w2), scale1=flip(r.scale1),
                             scale2=flip(r.scale2)) for r in problem.ranks],
        **problem.config.call_attributes(),
    )


def check_forms_agree(problem: Problem) -> None:
    for numerics in ("faithful", "ideal"):
        assert_results_bitwise(oracle.run(other_form(problem), numerics=numerics),
                               oracle.run(problem, numerics=numerics))


@given(problems(configs=configs(experts_per_rank=st.integers(2, 8))))
def test_stacked_and_per_expert_lists_agree(problem: Problem) -> None:
    check_forms_agree(problem)


def test_form_check_catches_lists_read_in_reverse(monkeypatch: pytest.MonkeyPatch) -> None:
    problem = random_problem(OpConfig(ep_size=2, experts_per_rank=3, top_k=2, hidden=16,
                                      intermediate=8, tokens_per_rank=(3, 2)), seed=12)
    check_forms_agree(problem)
    original = RankInputs.expert_lists

    def reversed_lists(self: RankInputs, e: int) -> Any:
        return original(self, e if len(self.w1) == 1 else len(self.w1) - 1 - e)

    monkeypatch.setattr(RankInputs, "expert_lists", reversed_lists)
    with pytest.raises(AssertionError):
        check_forms_agree(problem)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, min(n, 32) + 1) if n % d == 0]


def split_over_ranks(full: Problem, cuts: list[int]) -> Problem:
    """A one-rank problem of G experts spread over ``len(cuts) + 1`` ranks: contiguous expert
    blocks (§4), tokens split at ``cuts`` (sorted; empty ranks allowed)."""
    (r0,) = full.ranks
    ep = len(cuts) + 1
    e = full.config.experts_per_rank // ep
    bounds = [0, *cuts, r0.x.shape[0]]

    def part(tensors: Any, r: int) -> Any:
        return None if tensors is None else [tensors[0][r * e : (r + 1) * e]]

    return Problem([
        RankInputs(x=r0.x[lo:hi], expert_idx=r0.expert_idx[lo:hi], probs=r0.probs[lo:hi],
                   w1=part(r0.w1, r), w2=part(r0.w2, r), scale1=part(r0.scale1, r),
                   scale2=part(r0.scale2, r))
        for r, (lo, hi) in enumerate(itertools.pairwise(bounds))
    ])


def _global_problem(experts: int, tokens: int, top_k: int, seed: int, x_dtype: str = "bfloat16",
                    weight_dtype: str = "int8") -> Problem:
    whole = OpConfig(ep_size=1, experts_per_rank=experts, top_k=top_k, hidden=16,
                     intermediate=8, tokens_per_rank=(tokens,), x_dtype=x_dtype,
                     weight_dtype=weight_dtype)
    return random_problem(whole, seed=seed, expert_idx=_ids_with_duplicates(whole, seed))


@st.composite
def global_layouts(draw: Any) -> list[Problem]:
    """One global MoE problem (tokens, global expert ids, G experts' weights) split over several
    EP sizes dividing G, each with its own random split of the tokens over the ranks."""
    experts = draw(st.sampled_from((2, 4, 6, 8, 12, 16, 32)))
    tokens = draw(st.integers(0, 10))
    x_dtype = draw(st.sampled_from(("bfloat16", "float16")))
    full = _global_problem(experts, tokens, draw(st.integers(1, 4) | st.just(8)),
                           draw(st.integers(0, 2**32 - 1)), x_dtype,
                           draw(st.sampled_from(("int8", x_dtype))))
    sizes = draw(st.lists(st.sampled_from(_divisors(experts)), min_size=2, max_size=3,
                          unique=True))
    return [
        split_over_ranks(full, sorted(draw(st.lists(st.integers(0, tokens), min_size=ep - 1,
                                                    max_size=ep - 1))))
        for ep in sizes
    ]


def check_ep_invariance(layouts: list[Problem]) -> None:
    """Per-token outputs are the same at every EP size: bitwise in faithful mode, within 1 ulp
    (and 1e-12 relative before the cast) in ideal mode."""
    for numerics in ("faithful", "ideal"):
        results = [oracle.run(p, numerics=numerics) for p in layouts]
        outs = [np.concatenate([r.out for r in res.ranks]) for res in results]
        combined = [np.concatenate(res.trace.combined) for res in results]
        for p, out, acc in zip(layouts[1:], outs[1:], combined[1:]):
            what = f"{numerics} at EP={p.config.ep_size} vs EP={layouts[0].config.ep_size}"
            if numerics == "faithful":
                assert_bitwise(out, outs[0], what)
            else:
                assert (ulps_apart(out, outs[0]) <= 1).all(), what
                assert_relative(acc, combined[0], what)


@settings(max_examples=25)
@given(global_layouts())
def test_same_global_tokens_give_same_result_at_every_ep_size(layouts: list[Problem]) -> None:
    check_ep_invariance(layouts)


def test_ep_invariance_check_catches_a_placement_bug(monkeypatch: pytest.MonkeyPatch) -> None:
    """Local expert e read as e + 1 (mod E): invisible at E = 1, a rotation at EP = 1."""
    full = _global_problem(experts=4, tokens=6, top_k=2, seed=13)
    layouts = [full, split_over_ranks(full, [0, 2, 2]), split_over_ranks(full, [3])]
    check_ep_invariance(layouts)
    original = RankInputs.expert_lists

    def shifted(self: RankInputs, e: int) -> Any:
        experts = self.w1[0].shape[0] if len(self.w1) == 1 else len(self.w1)
        return original(self, (e + 1) % experts)

    monkeypatch.setattr(RankInputs, "expert_lists", shifted)
    with pytest.raises(AssertionError):
        check_ep_invariance(layouts)


def with_masked_tokens(problem: Problem, extra: list[int], seed: int) -> Problem:
    """``problem`` with ``extra[r]`` inactive tokens appended to rank r. Their ids are anything,
    including -1 and the sentinel EP·E: the kernel never reads them (§4)."""
    rng = np.random.default_rng(seed)
    cfg = problem.config
    ranks = []
    for inputs, n in zip(problem.ranks, extra):
        x = rng.standard_normal((n, cfg.hidden)).astype(inputs.x.dtype)
        ids = rng.integers(-1, cfg.num_experts + 1, size=(n, cfg.top_k)).astype(np.int32)
        probs = rng.random((n, cfg.top_k)).astype(np.float32)
        ranks.append(dataclasses.replace(
            inputs, x=np.concatenate([inputs.x, x]),
            expert_idx=np.concatenate([inputs.expert_idx, ids]),
            probs=np.concatenate([inputs.probs, probs]),
            active_mask=np.concatenate([_active(inputs), np.zeros(n, bool)]),
        ))
    return Problem(ranks, **problem.config.call_attributes())


def check_masked_tokens_change_nothing(problem: Problem, appended: Problem) -> None:
    for numerics in ("faithful", "ideal"):
        before, after = oracle.run(problem, numerics=numerics), oracle.run(appended,
                                                                           numerics=numerics)
        assert np.array_equal(before.trace.counts, after.trace.counts), "counts changed"
        for r, (a, b) in enumerate(zip(before.ranks, after.ranks)):
            m = a.out.shape[0]
            assert_bitwise(b.expert_token_nums, a.expert_token_nums, f"rank {r}: nums")
            assert_bitwise(b.defined[:m], a.defined, f"rank {r}: defined")
            assert not b.defined[m:].any(), f"rank {r}: a masked token is defined"
            assert_bitwise(b.out[:m][a.defined], a.out[a.defined], f"rank {r}: {numerics} out")


@given(problems(configs=configs(weight_dtypes=st.just("int8"))),
       st.lists(st.integers(0, 3), min_size=32, max_size=32), st.integers(0, 2**32 - 1))
def test_appending_masked_tokens_leaves_other_rows_unchanged(
    problem: Problem, extra: list[int], seed: int
) -> None:
    appended = with_masked_tokens(problem, extra[: problem.config.ep_size], seed)
    check_masked_tokens_change_nothing(problem, appended)


def test_masked_token_check_catches_routing_masked_slots(monkeypatch: pytest.MonkeyPatch) -> None:
    problem = _masked_problem()
    # Valid ids for the appended tokens, so that the mutant below can route them.
    appended = Problem(
        [dataclasses.replace(r, x=np.concatenate([r.x, r.x[:1]]),
                             expert_idx=np.concatenate([r.expert_idx, r.expert_idx[:1]]),
                             probs=np.concatenate([r.probs, r.probs[:1]]),
                             active_mask=np.concatenate([_active(r), [False]]))
         for r in problem.ranks])
    check_masked_tokens_change_nothing(problem, appended)
    monkeypatch.setattr(RankInputs, "is_active", lambda self: np.ones(self.num_tokens, bool))
    with pytest.raises(AssertionError):
        check_masked_tokens_change_nothing(problem, appended)


def check_deterministic(problem: Problem, numerics: str | Numerics) -> None:
    assert_results_bitwise(oracle.run(problem, numerics=numerics),
                           oracle.run(problem, numerics=numerics))


@given(problems(), st.sampled_from(["faithful", "ideal", Numerics(zero_rows="nan")]))
def test_run_twice_is_bitwise_equal(problem: Problem, numerics: str | Numerics) -> None:
    check_deterministic(problem, numerics)


def test_determinism_check_catches_a_buffer_not_reset(monkeypatch: pytest.MonkeyPatch) -> None:
    """The defect §8 had to avoid: a persistent accumulator that is not zeroed between calls."""
    problem = COVERAGE["EP1 E1 top_k1"]
    check_deterministic(problem, "faithful")
    buffers: dict[tuple[int, ...], Array] = {}

    class StaleCombine(kernels.Combine):
        def __call__(self, y: kernels.Env, probs: Array, x_dtype: Any) -> kernels.Env:
            acc = super().__call__(y, probs, x_dtype).mid
            buffer = buffers.setdefault(acc.shape, np.zeros_like(acc))
            buffer += acc
            return kernels.Env(buffer.copy())

    stale = Numerics(kernel=replace(kernels.ASCEND_A3, combine=StaleCombine()))
    with pytest.raises(AssertionError):
        check_deterministic(problem, stale)


def _caller_copy(problem: Problem) -> Problem:
    """A problem built from fresh, writable arrays that the test owns (as a caller would)."""
    return Problem(
        [r.map_arrays(np.array) for r in problem.ranks],
        **problem.config.call_attributes(),
    )


def _caller_arrays(problem: Problem) -> list[Array]:
    """The caller's arrays behind the problem's read-only views."""
    arrays: list[Array] = []
    for r in problem.ranks:
        tensors = [r.x, r.expert_idx, r.probs, *r.w1, *r.w2, *(r.scale1 or ()),
                   *(r.scale2 or ())]
        if r.active_mask is not None:
            tensors.append(r.active_mask)
        arrays.extend(t.base if t.base is not None else t for t in tensors)
    return arrays


def check_inputs_untouched(problem: Problem) -> None:
    arrays = _caller_arrays(problem)
    snapshot = [a.copy() for a in arrays]
    oracle.run(problem)
    oracle.run(problem, numerics="ideal")
    quantisation_error_bound(problem)
    for i, (a, b) in enumerate(zip(arrays, snapshot)):
        assert_bitwise(a, b, f"caller's array {i}")


@given(problems())
def test_run_leaves_the_callers_arrays_unchanged(problem: Problem) -> None:
    check_inputs_untouched(_caller_copy(problem))


def test_input_check_catches_the_kernels_sentinel_write_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The kernel writes EP·E into the caller's expert_idx for masked tokens (§4)."""
    problem = _caller_copy(_masked_problem())
    check_inputs_untouched(problem)
    original = reference.route

    def writing_route(p: Problem) -> Any:
        for r in p.ranks:  # the problem holds read-only copies; a C extension could unlock one
            held = r.expert_idx.base if r.expert_idx.base is not None else r.expert_idx
            held.flags.writeable = True
            held[~_active(r)] = p.config.num_experts
        return original(p)

    monkeypatch.setattr(reference, "route", writing_route)
    with pytest.raises(AssertionError, match="caller's array"):
        check_inputs_untouched(problem)


# ---------------------------------------------------------------------------------------------
# Faithful vs ideal: the quantisation error bound


def check_within_bound(
    problem: Problem, *, truncate_scales: bool = False, omit: tuple[str, ...] = ()
) -> None:
    """``|faithful out − ideal combined| <= quantisation_error_bound`` and
    ``|faithful out − ideal out| <= ideal_tolerance`` on defined rows (``inf`` allows anything:
    an fp16 overflow or a 127/amax2 overflow may make the faithful row NaN)."""
    faithful = oracle.run(problem, numerics=Numerics(truncate_scales=truncate_scales))
    ideal = oracle.run(problem, numerics="ideal")
    bounds = quantisation_error_bound(problem, truncate_scales=truncate_scales, omit=omit)
    tolerances = ideal_tolerance(problem, ideal, truncate_scales=truncate_scales)
    for r, (f, i) in enumerate(zip(faithful.ranks, ideal.ranks)):
        d = f.defined
        out = f.out[d].astype(np.float64)
        for what, err, bound in (
            ("quantisation_error_bound", np.abs(out - ideal.trace.combined[r][d]), bounds[r][d]),
            ("ideal_tolerance", np.abs(out - i.out[d].astype(np.float64)), tolerances[r][d]),
        ):
            with np.errstate(invalid="ignore"):
                ok = np.isinf(bound) | (err <= bound)
            if not ok.all():
                t, c = (int(v) for v in np.argwhere(~ok)[0])
                raise AssertionError(
                    f"rank {r}: |faithful − ideal| {err[t, c]:.3g} > {what} {bound[t, c]:.3g} "
                    f"at defined row {t}, column {c} (omitted: {omit or 'none'})"
                )


@given(problems(), st.booleans())
def test_faithful_stays_within_the_quantisation_bound(problem: Problem, truncate: bool) -> None:
    check_within_bound(problem, truncate_scales=truncate)


def _bound_witness(rows: str) -> Problem:
    """I = 1 with normal rows: the activation error dominates (SwiGLU of one value needs no
    requantisation error: q2 = ±127). One-hot rows: x is exactly on its quantisation grid, the
    requantisation error dominates."""
    cfg = OpConfig(ep_size=1, experts_per_rank=1, top_k=1, hidden=32,
                   intermediate=1 if rows == "normal" else 16, tokens_per_rank=(16,))
    rng = np.random.default_rng(1)
    x = rng.standard_normal((16, 32))
    if rows == "one-hot":
        x = np.where(np.arange(32) == rng.integers(0, 32, size=(16, 1)), 4 * x, 0)
    return random_problem(cfg, seed=1, x=[x.astype(ml_dtypes.bfloat16)])


@pytest.mark.parametrize(("term", "rows"), [("activation", "normal"),
                                            ("requantisation", "one-hot")])
def test_bound_fails_without_a_quantisation_term(term: str, rows: str) -> None:
    problem = _bound_witness(rows)
    check_within_bound(problem)
    with pytest.raises(AssertionError, match="quantisation_error_bound"):
        check_within_bound(problem, omit=(term,))


def test_ideal_tolerance_without_the_ideal_result_is_wider() -> None:
    problem = COVERAGE["EP3 E8 duplicates clamp zero+tie rows"]
    exact = ideal_tolerance(problem, oracle.run(problem, numerics="ideal"))
    for wide, tight in zip(ideal_tolerance(problem), exact):
        assert (wide >= tight).all()


def test_the_bound_takes_h_and_y_only_from_a_whole_ideal_run(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The bound takes ``h*`` and ``y*`` from the ideal result it is given; one made on some
    tokens (NaN on the others) is not used: the bound is that of the whole run. A mutant
    that takes it anyway gives NaN there, which reads as "nothing promised" (``inf``)."""
    import oracle.judge.bounds as bounds

    problem = COVERAGE["EP3 E8 duplicates clamp zero+tie rows"]

    def bound(ideal: Any) -> Any:
        return np.concatenate(bounds._bound(problem, False, (), False, None, ideal).err)

    whole = bound(oracle.run(problem, numerics="ideal"))
    tokens = np.zeros(sum(problem.config.tokens_per_rank), dtype=bool)
    tokens[0] = True
    partial = oracle.run(problem, numerics="ideal", tokens=tokens)
    assert np.array_equal(bound(partial), whole)
    assert np.array_equal(bound(None), whole)

    def trusting(problem: Problem, ideal: Any, kept: Any) -> tuple[Any, Any]:
        cfg = problem.config
        slots = sum(cfg.tokens_per_rank) * cfg.top_k
        return (np.concatenate(ideal.trace.h).reshape(slots, -1),
                np.concatenate(ideal.trace.y).reshape(slots, -1))

    monkeypatch.setattr(bounds, "_ideal_values", trusting)
    mutant = bound(partial)
    assert (np.isinf(mutant) & np.isfinite(whole)).any()


def test_silu_lipschitz_constant_bounds_the_derivative() -> None:
    x = np.linspace(-30, 30, 600_001)
    s = 1 / (1 + np.exp(-x))
    slope = np.abs(s * (1 + x * (1 - s)))  # silu'(x)
    assert slope.max() <= SILU_LIPSCHITZ < slope.max() + 0.01


def test_bound_rejects_an_unknown_term() -> None:
    with pytest.raises(ValueError, match="unknown terms"):
        quantisation_error_bound(COVERAGE["EP1 E1 top_k1"], omit=("rounding",))
    assert "activation" in TERMS and "requantisation" in TERMS


def test_tiny_rows_take_their_mathematical_value_unless_the_nan_reading_is_asked() -> None:
    """Rows so small that 127/amax2 overflows float32 (§6 step 5): the default policy gives the
    finite mathematical value, Numerics(zero_rows="nan") the kernel's literal NaN; the naive
    model agrees bitwise under both."""
    cfg = OpConfig(ep_size=1, experts_per_rank=1, top_k=2, hidden=32, intermediate=16,
                   tokens_per_rank=(6,))
    scale = 2.0 ** np.array([-58, -60, -61, -62, -63, -64])[:, None]
    x = (np.random.default_rng(0).standard_normal((6, 32)) * scale).astype(ml_dtypes.bfloat16)
    problem = random_problem(cfg, seed=1, x=[x])
    literal = Numerics(zero_rows="nan")
    finite = oracle.run(problem).ranks[0].out.astype(np.float32)
    nan = oracle.run(problem, numerics=literal).ranks[0].out.astype(np.float32)
    assert np.isfinite(finite).all()
    assert np.isnan(nan).any(axis=1).tolist() == [False, False, True, True, True, True]
    for numerics in ("faithful", literal):
        got = oracle.run(problem, numerics=numerics).ranks[0].out.view(np.uint16)
        assert np.array_equal(got, np.asarray(naive_run(problem, numerics).out[0]).view(np.uint16))


@pytest.mark.parametrize("weights", ["int8", "bfloat16"])
def test_a_run_on_some_tokens_gives_those_rows_of_the_whole_run(weights: str) -> None:
    """``run(..., tokens=...)`` (the judge's rows that differ from the model, issue 26): the
    asked rows as the whole run computes them (profile and envelope bit for bit, ideal within
    float64 sums re-blocked by the row count), the other defined rows NaN; truncation is the
    whole call's (token 3 of rank 0 loses a slot to ``max_output_size``)."""
    cfg = OpConfig(ep_size=2, experts_per_rank=2, top_k=2, hidden=64, intermediate=32,
                   max_output_size=5, tokens_per_rank=(4, 3), weight_dtype=weights)
    problem = random_problem(cfg, seed=5)
    tokens = np.array([False, True, False, True, True, False, True])
    for numerics, envelope in (("ascend-a3", True), ("vllm-triton", True), ("ideal", False)):
        whole = oracle.run(problem, numerics=numerics, envelope=envelope)
        part = oracle.run(problem, numerics=numerics, envelope=envelope, tokens=tokens)
        for w, q, asked in zip(whole.ranks, part.ranks, np.split(tokens, [4])):
            rows = asked & w.defined
            if numerics == "ideal":
                np.testing.assert_allclose(q.out[rows].astype(np.float64),
                                           w.out[rows].astype(np.float64), rtol=2**-8)
            else:
                for a, b in ((q.out, w.out), (q.out_lo, w.out_lo), (q.out_hi, w.out_hi)):
                    assert a is not None and b is not None
                    assert np.array_equal(a[rows], b[rows])
            assert np.isnan(q.out[~asked & w.defined].astype(np.float32)).all()
        np.testing.assert_allclose(np.concatenate(part.trace.combined)[tokens],
                                   np.concatenate(whole.trace.combined)[tokens], rtol=1e-12)
