"""The analytic index-width and threshold checks (``spec.index_width``): the int32-offset bug
is found with a shrunk shape over the declared domain and an int64 kernel never is; the real
bug's shape overflows by the formula; the default generators never cross CombineV1's
threshold and ``crossing_configs`` always does, at a size the model runs."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings

import oracle
from spec import OpConfig, random_problem
from spec.findings import search
from spec.index_width import (
    INT32_LIMIT,
    INT32_OFFSETS,
    THRESHOLDS,
    crossing_configs,
    crossing_fields,
    domain_coverage,
    first_overflow,
)
from spec.limits import A3_DOMAIN, VLLM_DOMAIN
from spec.strategies import configs

PERMUTED = INT32_OFFSETS[0]


def test_int32_offset_found_with_a_shrunk_shape() -> None:
    c = first_overflow(PERMUTED, max_examples=200)
    assert c is not None and PERMUTED.largest(c) >= INT32_LIMIT
    # Shrunk: just past the limit, not a random huge shape.
    assert PERMUTED.largest(c) < 2 * INT32_LIMIT


def test_int64_offsets_never_overflow_in_the_domain() -> None:
    for off in INT32_OFFSETS:
        assert first_overflow(off, limit=2**63, max_examples=200) is None


def test_flashinfer_shape_overflows_int32() -> None:
    """flashinfer PR #2642: 65 536 tokens, top-8, hidden 7168."""
    c = OpConfig(ep_size=1, experts_per_rank=256, top_k=8, hidden=7168, intermediate=2048,
                 tokens_per_rank=(65536,))
    assert PERMUTED.largest(c) >= INT32_LIMIT


def test_default_generators_never_cross_combine_v1() -> None:
    assert search(configs(), THRESHOLDS[0].crosses, max_examples=100) is None


@settings(max_examples=3, deadline=None, database=None, derandomize=True)
@given(crossing_configs(THRESHOLDS[0]))
def test_crossing_family_crosses_and_runs(cfg: OpConfig) -> None:
    assert THRESHOLDS[0].crosses(cfg)
    result = oracle.run(random_problem(cfg, seed=0))
    assert np.isfinite(np.concatenate([r.out.astype(np.float32) for r in result.ranks])).all()


def test_coverage_line_per_domain_says_not_crossed() -> None:
    """The Ascend domain's generators never reach CombineV1 and the line says so; the vLLM
    domain's kernel has no such path, so no line; int32 offsets are reported for both."""
    a3 = domain_coverage(A3_DOMAIN, max_examples=30)
    assert any(line.startswith("CombineV1") and "not crossed by the generators" in line
               for line in a3)
    assert sum("int32" in line for line in a3) == len(INT32_OFFSETS)
    assert not any(line.startswith("CombineV1") for line in domain_coverage(VLLM_DOMAIN,
                                                                            max_examples=30))


@settings(max_examples=3, deadline=None, database=None, derandomize=True)
@given(configs(domain=A3_DOMAIN, **crossing_fields(THRESHOLDS[0])))
def test_gate_family_crosses_combine_v1_inside_the_ascend_domain(cfg: OpConfig) -> None:
    """The gate's test_family[combine_v1] draws: past the threshold, runnable on A3."""
    assert THRESHOLDS[0].crosses(cfg) and A3_DOMAIN.violations(cfg) == []
