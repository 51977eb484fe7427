"""The public strategies: argument validation, and proof that every edge family is generated
(each found by ``hypothesis.find``, which also shows it shrinks to a small call)."""

from __future__ import annotations

import doctest
import warnings

import numpy as np
import pytest
from hypothesis import Phase, find, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument, NonInteractiveExampleWarning

import oracle
import spec.strategies as strategies_module
from spec import Problem
from spec.limits import REAL_MODELS
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
}


def test_every_family_is_generated_by_the_default_strategy() -> None:
    """One generate-only pass records which families appear; every one must."""
    seen: set[str] = set()

    @settings(max_examples=600, derandomize=True, database=None, deadline=None,
              phases=[Phase.generate])
    @given(problems())
    def record(problem: Problem) -> None:
        seen.update(name for name, holds in FAMILIES.items()
                    if name not in seen and holds(problem))

    record()
    assert sorted(set(FAMILIES) - seen) == []


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
                                     swiglu_limits=st.none()),
                     routing=routings(families=st.just("uniform")),
                     values=token_rows(families=st.just("normal")))
    example = find(plain, lambda p: True, settings=SEARCH)
    for name in ("every rank empty", "an all-zero token row", "32 ranks",
                 "rows dropped by max_output_size", "per-expert weight lists", "swiglu clamp"):
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
    import oracle.judge
    import oracle.reference
    import spec.config
    import spec.synth

    for module in (strategies_module, spec.config, spec.synth, oracle.reference, oracle.judge):
        with warnings.catch_warnings():  # the examples show .example(), meant for the REPL
            warnings.simplefilter("ignore", NonInteractiveExampleWarning)
            failures, _ = doctest.testmod(module)
        assert failures == 0, module.__name__
