"""The public strategies: argument validation, and proof that every edge family is generated
(each found by ``hypothesis.find``, which also shows it shrinks to a small call)."""

from __future__ import annotations

import doctest
import json
import subprocess
import sys
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, find, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument, NonInteractiveExampleWarning

import oracle
import oracle.model.reference
import spec.strategies as strategies_module
from spec import Problem
from spec.limits import A3_DOMAIN, REAL_MODELS
from spec.strategies import configs, problems, routings, token_rows

SEARCH = settings(max_examples=400, derandomize=True, database=None, deadline=None)


def _ids(p: Problem) -> list[np.ndarray]:
    return [r.expert_idx[r.is_active()] for r in p.ranks]


def _slots_per_rank(p: Problem) -> np.ndarray:
    cfg = p.config
    per = np.zeros(cfg.ep_size, dtype=np.int64)
    for ids in _ids(p):
        per += np.bincount(ids.reshape(-1) // cfg.experts_per_rank, minlength=cfg.ep_size)
    return per


def _x(p: Problem) -> list[np.ndarray]:
    return [r.x.astype(np.float64) for r in p.ranks if r.num_tokens]


FAMILIES = {
    "an empty rank beside a busy one": lambda p: 0 in p.config.tokens_per_rank
    and max(p.config.tokens_per_rank) > 0,
    "every rank empty": lambda p: p.config.ep_size > 1 and sum(p.config.tokens_per_rank) == 0,
    "top_k above E": lambda p: p.config.top_k > p.config.experts_per_rank > 1,
    "duplicate ids within a token": lambda p: any(
        len(set(row)) < len(row) for ids in _ids(p) for row in ids.tolist()),
    "all slots on one rank of several": lambda p: p.config.ep_size > 1
    and int((_slots_per_rank(p) > 0).sum()) == 1 and _slots_per_rank(p).sum() > 2,
    "a rank whose experts are all empty": lambda p: p.config.ep_size > 1
    and 0 in _slots_per_rank(p) and _slots_per_rank(p).sum() > 0,
    "an all-zero token row": lambda p: any((np.abs(x).max(axis=1) == 0).any() for x in _x(p)),
    "int8 rounding ties": lambda p: any(
        (np.abs(np.abs(x) / (np.abs(x).max(axis=1, keepdims=True) / 127) % 1 - 0.5) < 1e-9).sum()
        > x.size // 2 for x in _x(p)),
    "an outlier element": lambda p: any(
        (np.abs(x).max(axis=1) > 30 * np.median(np.abs(x), axis=1) + 1e-30).any()
        for x in _x(p) if x.shape[1] > 8),
    "negative routing weights": lambda p: any((r.probs < 0).any() for r in p.ranks),
    "tied routing weights": lambda p: any(
        r.probs.shape[1] > 1 and (r.probs == r.probs[:, :1]).all() and r.num_tokens
        for r in p.ranks),
    "every token masked": lambda p: p.config.masked and sum(p.config.tokens_per_rank) > 0
    and not any(r.is_active().any() for r in p.ranks),
    "some tokens masked": lambda p: any(
        r.is_active().any() and not r.is_active().all() for r in p.ranks),
    "rows dropped by max_output_size": lambda p: any(
        layout.dropped for layout in oracle.run(p).trace.receive),
    "exactly at capacity": lambda p: p.config.max_output_size is not None
    and p.config.max_output_size > 0
    and max(layout.rows for layout in oracle.run(p).trace.receive) == p.config.max_output_size,
    "per-expert weight lists": lambda p: p.config.weight_form == "list",
    "bf16 weights": lambda p: p.config.weight_dtype == "bfloat16",
    "fp16 tokens with int8 weights": lambda p: (p.config.x_dtype, p.config.weight_dtype)
    == ("float16", "int8"),
    "K straddling a 512-byte row": lambda p: p.config.hidden in (240, 272),
    "E not a power of two": lambda p: p.config.experts_per_rank in (3, 5, 7),
    "32 ranks": lambda p: p.config.ep_size == 32,
    "swiglu clamp": lambda p: p.config.swiglu_limit is not None,
    "SwigluOAI (swiglu_alpha > 0)": lambda p: p.config.oai_alpha is not None,
    "swiglu_alpha <= 0 (standard SwiGLU)": lambda p: p.config.swiglu_alpha is not None
    and p.config.oai_alpha is None,
}


def missing_families() -> list[str]:
    """The families one generate-only pass of 800 derandomised draws does not produce."""
    seen: set[str] = set()

    @settings(max_examples=800, derandomize=True, database=None, deadline=None,
              phases=[Phase.generate])
    @given(problems())
    def record(problem: Problem) -> None:
        seen.update(name for name, holds in FAMILIES.items()
                    if name not in seen and holds(problem))

    record()
    return sorted(set(FAMILIES) - seen)


def test_every_family_is_generated_by_the_default_strategy() -> None:
    """Every family appears in one pass, run in a fresh interpreter: Hypothesis draws some
    values from constants of the modules already imported, so the same derandomised pass
    inside the test session depends on which test modules ran before (a full CI run once
    missed 'every token masked')."""
    code = ("import json, sys; sys.path.insert(0, 'tests'); "
            "from test_strategies import missing_families; print(json.dumps(missing_families()))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=600, cwd=Path(__file__).resolve().parents[1], check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.splitlines()[-1]) == []


def test_a_family_shrinks_to_a_minimal_call() -> None:
    found = find(problems(), FAMILIES["duplicate ids within a token"], settings=SEARCH)
    cfg = found.config
    assert (cfg.ep_size, cfg.experts_per_rank, cfg.top_k, cfg.tokens_per_rank) == (1, 1, 2, (1,))


def test_families_are_absent_when_the_predicate_is_false() -> None:
    """The predicates are not vacuous: a plain uniform problem satisfies none of the edges."""
    plain = problems(configs=configs(ep_sizes=st.just(2), experts_per_rank=st.just(2),
                                     top_k=st.just(1), tokens_per_rank=st.just(2),
                                     masked=st.just(False), truncation=st.just(False),
                                     weight_forms=st.just("stacked"), hidden=st.just(16),
                                     weight_dtypes=st.just("int8"), x_dtypes=st.just("bfloat16"),
                                     swiglu_limits=st.none(), swiglu_alphas=st.none()),
                     routing=routings(families=st.just("uniform")),
                     values=token_rows(families=st.just("normal")))
    example = find(plain, lambda p: True, settings=SEARCH)
    for name in ("every rank empty", "an all-zero token row", "32 ranks",
                 "rows dropped by max_output_size", "per-expert weight lists", "swiglu clamp",
                 "SwigluOAI (swiglu_alpha > 0)", "swiglu_alpha <= 0 (standard SwiGLU)"):
        assert not FAMILIES[name](example), name


@given(configs(sizes="realistic", tokens_per_rank=st.integers(0, 1)))
@settings(max_examples=20)
def test_realistic_sizes_are_real_models(cfg) -> None:
    shapes = {(m.hidden, m.intermediate, m.experts, m.top_k) for m in REAL_MODELS}
    assert (cfg.hidden, cfg.intermediate, cfg.num_experts, cfg.top_k) in shapes


@given(configs(ep_sizes=st.just(3), top_k=st.just(2), tokens_per_rank=st.integers(1, 2)))
def test_fields_given_are_respected(cfg) -> None:
    assert cfg.ep_size == 3 and cfg.top_k == 2 and all(1 <= m <= 2 for m in cfg.tokens_per_rank)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: configs(ep_sizes=4), "must be a Hypothesis strategy"),
        (lambda: configs(sizes="huge"), "must be 'small' or 'realistic'"),
        (lambda: configs(sizes="realistic", hidden=st.just(64)), "drop hidden"),
        (lambda: routings(families="uniform"), "must be a Hypothesis strategy"),
        (lambda: problems(configs=configs(), routing=3).example(), "must be a Hypothesis"),
    ],
)
def test_invalid_arguments_say_what_to_change(call, message) -> None:
    with pytest.raises(InvalidArgument, match=message):
        call()


def test_out_of_range_draws_are_invalid_arguments() -> None:
    with pytest.raises(InvalidArgument, match=r"ep_sizes drew 40"):
        configs(ep_sizes=st.just(40)).example()


def test_docstring_examples_run() -> None:
    import oracle.judge.verdict
    import oracle.model.reference
    import spec.config
    import spec.synth

    for module in (strategies_module, spec.config, spec.synth, oracle.model.reference,
                   oracle.judge.verdict):
        with warnings.catch_warnings():  # the examples show .example(), meant for the REPL
            warnings.simplefilter("ignore", NonInteractiveExampleWarning)
            failures, _ = doctest.testmod(module)
        assert failures == 0, module.__name__


# --- Edge families (issue 15): each family's event label, and the property it claims. ---

def _labelled(strategy: st.SearchStrategy[Problem], n: int) -> list[tuple[frozenset[str], Problem]]:
    """``n`` generate-only draws, each with the ``event`` labels its own draw recorded."""
    labels: list[str] = []
    draws: list[tuple[frozenset[str], Problem]] = []

    @settings(max_examples=n, derandomize=True, database=None, deadline=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(st.data())
    def record(data: st.DataObject) -> None:
        labels.clear()
        problem = data.draw(strategy)
        draws.append((frozenset(labels), problem))

    with mock.patch.object(strategies_module, "event", labels.append):
        record()
    return draws


def _judged(p: Problem) -> bool:
    """At least one output row is defined: an active token that kept every slot."""
    kept = oracle.model.reference.route(p).slot_kept
    return bool(kept.size and kept.reshape(-1, p.config.top_k).all(axis=1).any())


def _received(p: Problem, *, active_only: bool = True) -> np.ndarray:
    cfg = p.config
    per = np.zeros(cfg.num_experts, dtype=np.int64)
    for r in p.ranks:
        ids = r.expert_idx[r.is_active()] if active_only else r.expert_idx
        per += np.bincount(ids.reshape(-1), minlength=cfg.num_experts)
    return per


def _rank_rows(p: Problem) -> np.ndarray:
    return _received(p).reshape(p.config.ep_size, -1).sum(axis=1)


def _copies(p: Problem) -> set[int]:
    """The largest multiplicity of one id within each token, over every token of the call."""
    return {max(np.unique(row, return_counts=True)[1]) for r in p.ranks for row in r.expert_idx}


def _masked_rank(p: Problem) -> bool:
    busy = [r for r in p.ranks if r.num_tokens]
    return any(not r.is_active().any() for r in busy) and any(r.is_active().all() for r in busy)


#: What each family label claims of its draw (labels absent here claim nothing checkable).
CLAIMS = {
    "tokens: ragged": lambda p: min(p.config.tokens_per_rank) >= 1,
    "tokens: some_empty": lambda p: 0 in p.config.tokens_per_rank
    and max(p.config.tokens_per_rank) > 0,
    "tokens: one_busy": lambda p: sum(m > 0 for m in p.config.tokens_per_rank) == 1
    and p.config.ep_size > 1,
    "tokens: few_tokens": lambda p: len(set(p.config.tokens_per_rank)) == 1
    and p.config.tokens_per_rank[0] in strategies_module.FEW_TOKENS,
    "tokens: all_empty": lambda p: sum(p.config.tokens_per_rank) == 0,
    "mask: none_active": lambda p: not any(r.is_active().any() for r in p.ranks),
    "mask: all_active": lambda p: all(r.is_active().all() for r in p.ranks),
    "mask: one_rank_masked": _masked_rank,
    "mask: random": lambda p: any(r.is_active().any() for r in p.ranks)
    or sum(p.config.tokens_per_rank) == 0,
    "capacity: at_capacity": lambda p: p.config.max_output_size == max(0, *_rank_rows(p)),
    "capacity: one_past": lambda p: p.config.max_output_size == max(0, max(_rank_rows(p)) - 1),
    "capacity: one_spare": lambda p: p.config.max_output_size == max(_rank_rows(p)) + 1,
    "routing: balanced": lambda p: np.ptp(
        _received(p, active_only=False).reshape(p.config.ep_size, -1).sum(axis=1)) <= 1,
    "routing: empty_experts": lambda p: p.config.num_experts == 1 or sum(
        p.config.tokens_per_rank) == 0 or 0 in _received(p, active_only=False),
}


@pytest.fixture(scope="module")
def default_draws() -> list[tuple[frozenset[str], Problem]]:
    """900 derandomised draws of the default strategy, drawn once for two tests (about 15 ms
    a draw): the first 500 are the draws of ``_labelled(problems(), 500)``, which the edge test
    drew on its own before (the budget only decides where the stream stops; compared equal)."""
    return _labelled(problems(), 900)


def test_every_edge_family_is_drawn_with_its_property(default_draws) -> None:
    """The default strategy draws every family label, and each draw has what its label claims;
    >= 90 % of draws judge at least one output row, and the count-only families are a minority.
    """
    draws = default_draws[:500]
    seen: set[str] = set()
    for labels, problem in draws:
        seen |= labels
        for label in labels:
            if label.startswith("routing: duplicates, "):
                copies = int(label.split(", ")[1].split()[0])
                assert min(_copies(problem)) >= copies if sum(
                    problem.config.tokens_per_rank) else True, label
            elif label in CLAIMS:
                assert CLAIMS[label](problem), (label, problem.config.summary())
    # The rare count-only families may miss 500 draws; the FAMILIES test above finds them
    # ("every rank empty", "every token masked") in the default strategy.
    rare = {f"{kind}: {name}" for kind, name in strategies_module.COUNT_ONLY.items()}
    missing = set(CLAIMS) - rare - seen
    assert not missing, f"never drawn: {sorted(missing)}"
    assert any(s.startswith("routing: duplicates, ") for s in seen)
    judged = sum(_judged(p) for _, p in draws) / len(draws)
    count_only = sum(bool(labels & rare) for labels, _ in draws) / len(draws)
    print(f"default draws judging >= 1 output row: {judged:.1%}; count-only families: "
          f"{count_only:.1%} of {len(draws)}")
    assert judged >= 0.9 and 0 < count_only <= 0.1


@pytest.mark.parametrize(
    ("name", "strategy"),
    [
        ("W8A8 gate", configs(x_dtypes=st.just("bfloat16"), weight_dtypes=st.just("int8"),
                              domain=A3_DOMAIN)),
        ("BF16 gate", configs(x_dtypes=st.just("bfloat16"), weight_dtypes=st.just("bfloat16"),
                              domain=A3_DOMAIN)),
    ],
)
def test_most_gate_draws_judge_an_output_row(name: str, strategy: st.SearchStrategy) -> None:
    """Issue 15 measured 41 % (W8A8) and 25 % (BF16) of the gate's draws count-only."""
    draws = _labelled(problems(configs=strategy), 300)
    judged = sum(_judged(p) for _, p in draws) / len(draws)
    print(f"{name}: {judged:.1%} of {len(draws)} draws judge >= 1 output row")
    assert judged >= 0.9


def test_duplicates_reach_every_multiplicity() -> None:
    """top_k = 8 over 16 experts: every token repeats one id exactly 2..8 times, each drawn."""
    strategy = problems(configs=configs(top_k=st.just(8), ep_sizes=st.just(2),
                                        experts_per_rank=st.just(8)),
                        routing=routings(families=st.just("duplicates")))
    seen = set()
    for labels, problem in _labelled(strategy, 240):
        (label,) = [s for s in labels if s.startswith("routing: ")]
        copies = int(label.split(", ")[1].split()[0])
        if sum(problem.config.tokens_per_rank):
            assert _copies(problem) == {copies}, label
            seen.add(copies)
    assert seen == set(range(2, 9))


def test_few_tokens_reach_one_odd_and_below_the_core_counts(default_draws) -> None:
    # 900 derandomised draws: the first 500 of today's stream draw M = 19 in none of their 144
    # few-token problems, the next 400 in 22 (the order of Hypothesis's generation, not bias)
    seen = {p.config.tokens_per_rank[0] for labels, p in default_draws
            if "tokens: few_tokens" in labels}
    assert {1, 19, 39} <= seen and any(m % 2 and 1 < m < 19 for m in seen)


def test_balanced_routing_puts_every_rank_at_capacity_within_one_row() -> None:
    """With "balanced" routing and the capacity families, every rank's received rows are
    within one of max_output_size − shift (R − 1, R, R + 1 against every rank)."""
    strategy = problems(configs=configs(truncation=st.just(True), masked=st.just(False),
                                        ep_sizes=st.sampled_from((2, 3, 4))),
                        routing=routings(families=st.just("balanced")))
    for labels, p in _labelled(strategy, 60):
        rows = _rank_rows(p)
        if "capacity: at_capacity" in labels and rows.sum():
            assert set(rows.tolist()) <= {p.config.max_output_size,
                                          p.config.max_output_size - 1}


def test_unknown_routing_names_are_rejected() -> None:
    with warnings.catch_warnings(), pytest.raises(InvalidArgument, match="drew 'duplicate'"):
        warnings.simplefilter("ignore", NonInteractiveExampleWarning)
        routings(families=st.just("duplicate")).example()
