"""The modular split (spec.modular, oracle.judge.modular, oracle.check.modular): each stage's
judge accepts the correct stage implementations of ``benchmarks/mutants/modular.py`` and the
freedoms of the contract (row order inside an expert, batched padding), and kills each stage
mutant on its minimal counterexample, where the correct implementation passes. The searches
that shrink to those counterexamples are slow (``-m slow``; ``benchmarks/MODULAR.md``)."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from oracle.check.modular import (
    StageConformanceError,
    check_stage,
    evaluate_stage,
    judge_stage,
    stage_calls,
)
from oracle.files.counterexample import load
from oracle.model.modular import dispatch_reference, stage_inputs
from spec import OpConfig, SpecError, random_problem
from spec.findings import search
from spec.modular import Received, StageCall
from spec.placement import PlacedCall, RoutingWeights
from spec.strategies import configs

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # benchmarks/ is a plain folder
    sys.path.insert(0, str(ROOT))

from benchmarks.mutants.modular import (  # noqa: E402
    CORRECT,
    STAGE_MUTANTS,
    combine_dispatched_ids,
    dispatch_clamps_unrouted,
    dispatch_shuffled,
)

FAST = settings(max_examples=8, deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck))


def make_call(stage: str, ids: list[list[list[int]]], *, experts: int, layout: str = "contiguous",
              max_tokens: int | None = None, masks: list[Any] | None = None,
              seed: int = 0) -> StageCall:
    """A stage call of EP = len(ids) ranks with the given expert ids per rank, its inputs
    built from the reference."""
    top_k = max((len(token) for r in ids for token in r), default=1)
    arrays = [np.array(r, np.int32).reshape(len(r), top_k) for r in ids]
    cfg = OpConfig(ep_size=len(ids), experts_per_rank=experts, top_k=top_k, hidden=16,
                   intermediate=8, tokens_per_rank=tuple(a.shape[0] for a in arrays),
                   masked=masks is not None)
    problem = random_problem(cfg, seed=seed, expert_idx=arrays,
                             active_mask=masks if masks is not None else [None] * len(ids))
    call = StageCall(stage=stage, problem=problem, layout=layout, max_tokens_per_rank=max_tokens)
    return stage_inputs(call, seed)


def verdict(impl: Any, call: StageCall) -> Any:
    return judge_stage(call, impl(call))


@pytest.mark.parametrize("stage", sorted(CORRECT))
def test_correct_stage_passes(stage: str) -> None:
    @FAST
    @given(stage_calls(stage))
    def passes(call: StageCall) -> None:
        v = evaluate_stage(CORRECT[stage], call)
        assert v.ok, f"{call.summary()}: {v.message}"

    passes()


BUSY = [[[0, 1], [1, 0], [0, 1], [1, 1]], [[1, 0], [0, 1], [0, 0]]]  # EP = 2, E = 1


@pytest.mark.parametrize("layout", ["contiguous", "batched"])
def test_dispatch_row_order_inside_an_expert_is_free(layout: str) -> None:
    call = make_call("dispatch", BUSY, experts=1, layout=layout)
    shuffled = dispatch_shuffled(call)
    assert any(not np.array_equal(b.source, w.source)
               for b, w in zip(shuffled, dispatch_reference(call))), "nothing was shuffled"
    assert verdict(dispatch_shuffled, call).ok


def _edited(call: StageCall, edit: Any) -> list[Received]:
    buffers = [Received(x=b.x.copy(), source=b.source.copy(), counts=b.counts.copy())
               for b in dispatch_reference(call)]
    edit(buffers[1])
    return buffers


def test_dispatch_row_moved_to_another_expert_fails() -> None:
    call = make_call("dispatch", [[[0, 2]], [[3, 2]]], experts=2)  # rank 1: experts 2, 3

    def swap(b: Received) -> None:  # rank 1: a row of expert 2 <-> the row of expert 3
        b.source[[0, 2]] = b.source[[2, 0]]
        b.x[[0, 2]] = b.x[[2, 0]]

    v = judge_stage(call, _edited(call, swap))
    assert (v.stage, v.rank) == ("source", 1)
    assert "which is not a slot routed to expert 2" in v.message, v.message


def test_dispatch_duplicated_and_changed_rows_fail() -> None:
    call = make_call("dispatch", [[[2], [2]], [[2]]], experts=2)

    def duplicate(b: Received) -> None:
        b.source[1], b.x[1] = b.source[0], b.x[0]

    v = judge_stage(call, _edited(call, duplicate))
    assert v.stage == "source" and "a second time" in v.message, v.message

    def flip(b: Received) -> None:
        b.x.view(np.uint16)[2, 5] ^= 1

    v = judge_stage(call, _edited(call, flip))
    assert v.stage == "rows" and "rank 1, local expert 0, row 2" in v.message, v.message
    assert "1 of 16 columns differ" in v.message and "column 5" in v.message


def test_batched_padding_is_not_judged() -> None:
    call = make_call("dispatch", BUSY, experts=1, layout="batched", max_tokens=6)

    def garbage(b: Received) -> None:
        b.x[:, int(b.counts[0]):] = 7
        b.source[:, int(b.counts[0]):] = 99

    assert judge_stage(call, _edited(call, garbage)).ok
    assert call.capacity == 12


#: Each mutant's minimal counterexample (what the slow search shrinks to, up to ties), a
#: call on which it must fail at ``stage``, and a call on which it does nothing wrong.
MINIMAL = {
    "dispatch_drops_last_row_of_full_expert": (
        dict(ids=[[[0]]], experts=1, layout="batched"), "source",
        dict(ids=[[[0]]], experts=1, layout="batched", max_tokens=2)),  # not full: no harm
    "dispatch_counts_padding_row": (
        dict(ids=[[]], experts=1, layout="batched"), "counts", None),
    "experts_next_expert_weights": (
        dict(ids=[[[1]]], experts=2), "out", dict(ids=[[[0]]], experts=1)),  # e+1 = e
    "combine_ignores_weights": (dict(ids=[[[0, 0]]], experts=1), "out", None),
    "combine_dispatched_ids": (
        dict(ids=[[], [[0], [1]]], experts=1), "out",
        dict(ids=[[[0, 1], [1, 0]]], experts=2)),  # EP = 1, no mask: the orders coincide
}


@pytest.mark.parametrize("name", sorted(STAGE_MUTANTS))
def test_mutant_fails_on_its_minimal_call_where_the_correct_one_passes(name: str) -> None:
    stage, _, mutant = STAGE_MUTANTS[name]
    fail_on, stage_name, harmless = MINIMAL[name]
    call = make_call(stage, **fail_on)
    v = verdict(mutant, call)
    assert not v.ok and v.stage == stage_name, f"{name}: {v.stage}: {v.message}"
    assert f"rank {v.rank}" in v.message
    assert verdict(CORRECT[stage], call).ok
    if harmless is not None:
        assert verdict(mutant, make_call(stage, **harmless)).ok, name


def test_minimal_table_names_every_mutant() -> None:
    assert set(MINIMAL) == set(STAGE_MUTANTS)


def test_mori_ids_show_at_ep_1_only_with_a_masked_token() -> None:
    ids = [[[0], [1], [0]]]
    plain = make_call("combine", ids, experts=2)
    masked = make_call("combine", ids, experts=2, masks=[np.array([False, True, True])])
    assert verdict(combine_dispatched_ids, plain).ok
    v = verdict(combine_dispatched_ids, masked)
    assert not v.ok and "rank 0, token 1" in v.message, v.message


@settings(max_examples=10, deadline=None, database=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(stage_calls("combine", configs=configs(ep_sizes=st.just(1), masked=st.just(False),
                                                truncation=st.just(False))))
def test_mori_ids_are_harmless_at_ep_1_without_masks(call: StageCall) -> None:
    assert verdict(combine_dispatched_ids, call).ok


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(STAGE_MUTANTS))
def test_search_kills_each_mutant_with_a_small_call(name: str) -> None:
    stage, layouts, mutant = STAGE_MUTANTS[name]
    call = search(stage_calls(stage, layouts=layouts),
                  lambda c: not evaluate_stage(mutant, c).ok, max_examples=300)
    assert call is not None, f"{name} survived 300 calls"
    cfg = call.problem.config
    assert sum(cfg.tokens_per_rank) <= 2 and cfg.ep_size <= 2, call.summary()
    if name == "combine_dispatched_ids":  # garbled only where the receive order differs
        assert cfg.ep_size >= 2 or cfg.masked, call.summary()
    assert evaluate_stage(CORRECT[stage], call).ok


def test_stage_call_errors_name_the_field() -> None:
    problem = random_problem(OpConfig(ep_size=2, experts_per_rank=1, top_k=1, hidden=16,
                                      intermediate=8, tokens_per_rank=(2, 1)))
    cases = {
        "stage": dict(stage="gemm"),
        "layout": dict(layout="ragged"),
        "max_tokens_per_rank": dict(max_tokens_per_rank=1),
        "received": dict(received=(dispatch_reference(StageCall(stage="dispatch",
                                                                problem=problem))[0],)),
    }
    for field, kwargs in cases.items():
        with pytest.raises(SpecError) as info:
            StageCall(**{"stage": "experts", "problem": problem, **kwargs})
        assert info.value.field == field and "Fix:" in str(info.value)
    capped = random_problem(OpConfig(ep_size=1, experts_per_rank=1, top_k=1, hidden=16,
                                     intermediate=8, tokens_per_rank=(2,), max_output_size=1))
    with pytest.raises(SpecError, match="max_output_size"):
        StageCall(stage="dispatch", problem=capped)


def test_a_raising_hanging_or_misshapen_stage_gets_a_report() -> None:
    call = make_call("combine", [[[0]], [[1]]], experts=1)

    def raises(c: StageCall) -> Any:
        raise RuntimeError("boom")

    def hangs(c: StageCall) -> Any:
        time.sleep(5)

    v = evaluate_stage(raises, call)
    assert (v.stage, v.ok) == ("call", False) and "RuntimeError: boom" in v.message
    v = evaluate_stage(hangs, call, timeout=0.2)
    assert v.stage == "timeout" and "did not return" in v.message
    v = judge_stage(call, [np.zeros((1, 16))])
    assert v.stage == "ranks" and "expected 2 per-rank" in v.message
    v = judge_stage(call, [np.zeros((1, 16)), np.zeros((1, 16))])
    assert v.stage == "structure" and "rank 0: out must be bfloat16 of shape (1, 16)" in v.message
    dispatch = make_call("dispatch", [[[0]], [[1]]], experts=1)
    v = judge_stage(dispatch, [(b.x, b.source, b.counts.astype(np.int64))
                               for b in dispatch_reference(dispatch)])
    assert v.stage == "structure" and "counts must be int32" in v.message


def test_check_stage_reports_the_failing_call(tmp_path: Path) -> None:
    with pytest.raises(StageConformanceError) as info:
        check_stage("combine", lambda c: [np.ones_like(r.x) for r in c.problem.ranks],
                    settings=settings(max_examples=5, database=None, derandomize=True,
                                      phases=[Phase.generate]), save_dir=tmp_path)
    assert info.value.call.stage == "combine"
    assert "the combine stage fails" in info.value.report and "routed slots" in info.value.report
    assert info.value.path is not None and f"saved: {info.value.path}" in info.value.report
    with pytest.raises(ValueError, match="stage 'ffn'"):
        check_stage("ffn", CORRECT["experts"])
    check_stage("dispatch", "benchmarks.mutants.modular:dispatch_shuffled",  # by name
                settings=settings(max_examples=3, database=None, derandomize=True))


def test_experts_message_names_rank_expert_row_and_slot() -> None:
    call = make_call("experts", [[[0]], [[3], [2]]], experts=2)
    v = verdict(STAGE_MUTANTS["experts_next_expert_weights"][2], call)
    assert v.message.startswith(f"rank {v.rank}, local expert "), v.message
    assert "slot 0): column " in v.message and "slots ->" not in v.message, v.message


def test_docstring_examples_run() -> None:
    import doctest

    import benchmarks.mutants.modular
    import oracle.check.modular
    import oracle.judge.modular
    import spec.modular
    import spec.modular_strategies

    for module in (spec.modular, spec.modular_strategies, oracle.judge.modular,
                   oracle.check.modular, benchmarks.mutants.modular):
        failures, _ = doctest.testmod(module)
        assert failures == 0, module.__name__


def test_a_float64_combine_conforms_and_an_ulp_off_one_does_not() -> None:
    # top_k = 5: no legitimate kernel sums in bf16 (kernels.md row 7), so 1 ulp is visible.
    call = make_call("combine", [[[0, 1, 0, 1, 1], [1, 1, 0, 0, 0]], [[0, 1, 1, 0, 1]]],
                     experts=1, seed=3)
    y = np.zeros((3, 5, 16))
    for b in call.received:
        s, t, k = b.source.T
        y[np.array([0, 2])[s] + t, k] = b.x.astype(np.float64)
    probs = np.concatenate([r.probs for r in call.problem.ranks]).astype(np.float64)
    exact = (y * probs[:, :, None]).sum(axis=1).astype(call.problem.ranks[0].x.dtype)
    outs = [exact[:2], exact[2:]]
    assert judge_stage(call, outs).ok
    off = [o.copy() for o in outs]
    off[1].view(np.uint16)[0, 3] += 1
    v = judge_stage(call, off)
    assert not v.ok and "rank 1, token 0, column 3" in v.message and "ulp" in v.message, v.message


def test_ideal_combine_admits_a_float64_sum_a_float32_profile_does_not() -> None:
    # Found by a vectorised scan: rounding the float32 sum of the float32 products to bf16
    # differs by one ulp from rounding the exact sum (a double rounding).
    y = np.array([-0.66796875, 0.10546875])
    p = np.array([1048323544, 1043559532], np.uint32).view(np.float32)
    cfg = OpConfig(ep_size=1, experts_per_rank=1, top_k=2, hidden=16, intermediate=8,
                   tokens_per_rank=(1,))
    problem = random_problem(cfg, expert_idx=[np.zeros((1, 2), np.int32)], probs=[p[None]])
    call = stage_inputs(StageCall(stage="combine", problem=problem))
    call.received[0].x[:, 0] = y  # slots 0 and 1 of token 0, in source order
    exact = (call.received[0].x.astype(np.float64) * p[:, None]).sum(axis=0)[None]
    out = [exact.astype(problem.ranks[0].x.dtype)]
    assert judge_stage(call, out).ok
    v = judge_stage(call, out, numerics="vllm-triton")
    assert not v.ok and "column 0" in v.message, v.message


def unrouted_call(stage: str, layout: str = "contiguous") -> StageCall:
    """One token of one rank whose second slot's logical id is -1 (routed nowhere), as a
    stage call of a placed call (identity placement, rsf 2.5)."""
    cfg = OpConfig(ep_size=1, experts_per_rank=2, top_k=2, hidden=16, intermediate=8,
                   tokens_per_rank=(1,))
    ranks = [dataclasses.replace(r, expert_idx=np.array([[1, -1]], np.int64))
             for r in random_problem(cfg, seed=3).ranks]
    placed = PlacedCall(ranks, weights=RoutingWeights(routed_scaling_factor=2.5))
    return stage_inputs(StageCall.from_placed(stage, placed, layout=layout), 3)


@pytest.mark.parametrize("layout", ["contiguous", "batched"])
def test_a_slot_routed_nowhere_is_dispatched_nowhere(layout: str) -> None:
    call = unrouted_call("dispatch", layout)
    assert [b.counts.tolist() for b in dispatch_reference(call)] == [[0, 1]]
    assert evaluate_stage(CORRECT["dispatch"], call).ok
    v = evaluate_stage(dispatch_clamps_unrouted, call)  # vllm-ascend's clamp to expert 0
    assert not v.ok and v.stage == "counts" and "routed nowhere (id -1)" in v.message
    assert "-1 slots=1" in call.summary()


def test_a_combine_adds_nothing_for_a_slot_routed_nowhere() -> None:
    call = unrouted_call("combine")
    assert evaluate_stage(CORRECT["combine"], call).ok
    y = call.received[0].x.astype(np.float32)  # the one routed row, expert 1
    rsf_only = [(2.5 * y[:1]).astype(call.problem.ranks[0].x.dtype)]  # the weight left out
    assert not evaluate_stage(lambda c: rsf_only, call).ok


def test_stage_calls_from_placed_calls_refuse_what_the_split_does_not_gate() -> None:
    cfg = OpConfig(ep_size=1, experts_per_rank=2, top_k=1, hidden=16, intermediate=8,
                   tokens_per_rank=(1,))
    ranks = random_problem(cfg, seed=1).ranks
    with pytest.raises(SpecError, match=r"weights\.on_input"):
        StageCall.from_placed("combine", PlacedCall(ranks, weights=RoutingWeights(on_input=True)))
    call = StageCall.from_placed("dispatch", PlacedCall(ranks))
    with pytest.raises(SpecError, match="routed"):
        dataclasses.replace(call, routed=(np.ones((2, 1), bool),))


@pytest.mark.parametrize("stage", ["dispatch", "experts", "combine"])
def test_correct_stages_pass_placed_stage_calls(stage: str) -> None:
    check_stage(stage, CORRECT[stage], calls=stage_calls(stage, placed=True),
                settings=FAST, save_dir=None)


def test_the_clamp_mutant_is_killed_in_a_placed_search(tmp_path: Path) -> None:
    with pytest.raises(StageConformanceError) as info:
        check_stage("dispatch", dispatch_clamps_unrouted,
                    calls=stage_calls("dispatch", placed=True), save_dir=tmp_path,
                    settings=settings(FAST, max_examples=40, phases=[Phase.generate]))
    assert info.value.verdict.stage == "counts" and "-1 slots=" in info.value.call.summary()
    saved = load(info.value.path)
    assert saved.stage is not None and saved.stage.routed
    assert not evaluate_stage(dispatch_clamps_unrouted, saved.stage).ok
    assert evaluate_stage(CORRECT["dispatch"], saved.stage).ok
