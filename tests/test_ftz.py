"""Flush to zero as a declared freedom (issue 24), each property with both outcomes.

On an H100, torch's ``_grouped_mm`` returned 0 where the profile pinned -5.14e-39, and ideal
mode false-alarmed on vLLM's kernel at rows near 2^-126: GPUs flush float32 subnormals. The
kernel here is the naive vLLM model (``naive_vllm.py``, written from docs/contract/kernels.md)
run as a flush-to-zero GPU runs (``ftz=True``: every subnormal float32 operand and result is
0), on problems whose x is scaled by 2^-e so that the pipeline's values cross 2^-126.

- It passes the ``vllm-triton`` profile and ideal mode; the same outputs fail the profile with
  the freedom removed (``with_ftz(False)``) and ideal mode assuming a kernel that never flushes.
- Garbage on tiny rows (the row zeroed, its sign flipped, doubled) still fails, in profile mode
  wherever some value of the row must be nonzero (its envelope excludes 0): the line is where
  every value's envelope reaches 0. Ideal mode holds the line down to outputs of 2^-116.
- On ordinary problems the freedom costs nothing: the envelope is the same bit for bit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from naive_vllm import naive_vllm_run

import oracle
from oracle import Numerics, compare
from oracle.model.kernels import ASCEND_A3, PROFILES, VLLM_TRITON, VLLM_TRITON_TQ
from spec import OpConfig, Problem, random_problem

Array = np.ndarray[Any, Any]
F32 = np.float32
WEIGHTS = ("bfloat16", "int8")
#: Exponents at which the tiny rows' values cross float32's subnormal range (x · 2^-e).
CROSSING = (56, 58, 60, 62, 64)
NEVER_FLUSHES = VLLM_TRITON.with_ftz(False)


def tiny(weights: str, e: int, seed: int = 0) -> Problem:
    cfg = OpConfig(ep_size=1, experts_per_rank=2, top_k=2, hidden=32, intermediate=8,
                   tokens_per_rank=(3,), x_dtype="bfloat16", weight_dtype=weights)
    base = random_problem(cfg, seed=seed)
    return Problem([dataclasses.replace(r, x=(r.x.astype(F32) * F32(2.0**-e)).astype(r.x.dtype))
                    for r in base.ranks])


def flushing_kernel(problem: Problem) -> list[tuple[Array, Array]]:
    outs, nums, _ = naive_vllm_run(problem, ftz=True)
    return list(zip(outs, nums))


def ieee_kernel(problem: Problem) -> list[tuple[Array, Array]]:
    outs, nums, _ = naive_vllm_run(problem)
    return list(zip(outs, nums))


@pytest.mark.parametrize("weights", WEIGHTS)
def test_a_flushing_kernel_passes_where_the_freedom_is_declared(weights: str) -> None:
    flushed, refused_profile, refused_ideal = 0, 0, 0
    for e in CROSSING:
        for seed in (0, 1):
            problem = tiny(weights, e, seed)
            got = flushing_kernel(problem)
            for numerics in (Numerics(kernel=VLLM_TRITON), Numerics("ideal"),
                             Numerics("ideal", kernel=VLLM_TRITON)):
                verdict = compare(problem, got, numerics=numerics)
                assert verdict.ok, f"e={e} seed={seed} {numerics.describe()}: {verdict.message}"
            ieee = ieee_kernel(problem)
            if any(not np.array_equal(g.view(np.uint16), i.view(np.uint16))
                   for (g, _), (i, _) in zip(got, ieee)):
                flushed += 1
                refused_profile += not compare(problem, got,
                                               numerics=Numerics(kernel=NEVER_FLUSHES)).ok
                refused_ideal += not compare(problem, got, numerics=Numerics(
                    "ideal", kernel=NEVER_FLUSHES)).ok
    assert flushed, "no problem where flushing changes the output"
    assert refused_profile, "without the freedom, the profile rejects none of the flushed outputs"
    assert refused_ideal, "assuming no flush, ideal mode rejects none of the flushed outputs"


GARBAGE: dict[str, Callable[[Array], Array]] = {
    "row zeroed": lambda out: np.zeros_like(out),
    "sign flipped": lambda out: -out,
    "doubled": lambda out: (out.astype(F32) * 2).astype(out.dtype),
}


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("garbage", GARBAGE)
def test_garbage_on_tiny_rows_fails_down_to_where_zero_is_legitimate(
    weights: str, garbage: str
) -> None:
    line = None
    for e in range(40, 66, 2):
        problem = tiny(weights, e)
        got = flushing_kernel(problem)
        bad = [(GARBAGE[garbage](out), nums) for out, nums in got]
        env = oracle.run(problem, numerics=Numerics(kernel=VLLM_TRITON), envelope=True).ranks[0]
        assert env.out_lo is not None and env.out_hi is not None
        all_may_vanish = bool(((env.out_lo <= 0) & (env.out_hi >= 0)).all())
        profile_ok = compare(problem, bad, numerics=Numerics(kernel=VLLM_TRITON)).ok
        # Profile mode: garbage passes exactly where every value may legitimately be 0.
        assert profile_ok == all_may_vanish, f"e={e}: profile {profile_ok}"
        largest = float(np.abs(got[0][0].astype(F32)).max())
        if largest >= 2.0**-116:  # ideal mode with this kernel's assumptions (no amax floor:
            # plain ideal mode allows vLLM's 1e-10 floor, under which tiny int8 rows may be 0)
            assert not compare(problem, bad, numerics=Numerics("ideal", kernel=VLLM_TRITON)
                               ).ok, f"e={e}: ideal passes"
        if all_may_vanish and line is None:
            line = e
    assert line is not None and 58 <= line <= 64, f"the line moved: 2^-{line}"


def test_the_freedom_costs_nothing_on_ordinary_values() -> None:
    """Values far from 2^-126 (x ~ N(0, 1)): the envelopes with and without the freedom are
    the same bit for bit, in both variants."""
    for weights in WEIGHTS:
        cfg = OpConfig(ep_size=2, experts_per_rank=2, top_k=2, hidden=64, intermediate=32,
                       tokens_per_rank=(3, 2), x_dtype="bfloat16", weight_dtype=weights)
        problem = random_problem(cfg, seed=3)
        with_, without = (oracle.run(problem, numerics=Numerics(kernel=k), envelope=True)
                          for k in (VLLM_TRITON, NEVER_FLUSHES))
        for a, b in zip(with_.ranks, without.ranks):
            assert a.out_lo is not None and b.out_lo is not None
            assert np.array_equal(a.out_lo, b.out_lo) and np.array_equal(a.out_hi, b.out_hi)


def test_the_gpu_profiles_declare_it_and_the_ascend_one_does_not() -> None:
    assert VLLM_TRITON.ftz and VLLM_TRITON_TQ.ftz and not ASCEND_A3.ftz
    assert PROFILES["vllm-triton-tq"].ideal_assumptions("bfloat16").ftz
    assert not ASCEND_A3.ideal_assumptions("bfloat16").ftz
    assert "subnormals flushed to zero or not" in "; ".join(VLLM_TRITON.freedoms)
    assert "subnormal" not in "; ".join(ASCEND_A3.freedoms)
    assert ASCEND_A3.with_ftz().ftz and not NEVER_FLUSHES.ftz
