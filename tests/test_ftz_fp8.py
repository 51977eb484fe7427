"""Flush to zero on the FP8 block-scale steps (issue 24's freedom, ``tests/test_ftz.py``, on
:class:`GroupQuantiser` and :class:`BlockGemm`): each step's envelope holds what a flushing
kernel computes with the knob and excludes it without (both outcomes), and the freedom costs
nothing on ordinary values.

The FP8 pipeline hides most flushes (the activation scale's floor keeps every σ normal, e4m3
products are at least 2^-18, and the combine may already read a subnormal y as 0), so the
properties are shown on the steps, where they are visible: a subnormal activation under a
floor of 1e-35, and a subnormal weight scale.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import oracle
from oracle import Numerics
from oracle.model.kernels import VLLM_TRITON_FP8, BlockGemm, Env, GroupQuantiser
from spec import OpConfig, random_problem
from spec.fp8 import E4M3

Array = np.ndarray[Any, Any]
F32 = np.float32
BF16 = "bfloat16"


def pinned(a: Array) -> Env:
    return Env(a, a.copy(), a.copy())


def test_a_flushed_activation_lies_inside_the_quantiser_envelope_only_with_ftz() -> None:
    """amax 1e-35 (σ = 2.2e-38, normal) and an activation of 1e-38 (subnormal): IEEE
    quantises it to 0.4375, a flushing kernel to 0."""
    x = np.array([[1e-35, 1e-38, 3e-36]], F32)
    for ftz, holds_zero in ((True, True), (False, False)):
        q, _, _ = GroupQuantiser(amax_floor=1e-35, ftz=ftz)(pinned(x), "zero")
        assert q.lo is not None and q.hi is not None
        assert float(q.mid[0, 1]) == 0.4375
        assert bool(q.lo[0, 1] <= 0 <= q.hi[0, 1]) is holds_zero, ftz
        assert q.lo[0, 0] > 447 and q.mid[0, 0] == 448  # the normal amax is not flushed


def test_a_quantiser_floor_that_flushes_its_scale_is_refused() -> None:
    with pytest.raises(ValueError, match=r"amax_floor 1e-40 with ftz: σ = amax/448 may be a "
                                         r"float32 subnormal.*at least 5.27e-36 or ftz=False"):
        GroupQuantiser(amax_floor=1e-40, ftz=True)
    GroupQuantiser(amax_floor=1e-40)  # without the knob: IEEE, σ subnormal and exact


def test_a_flushed_weight_scale_lies_inside_the_gemm_envelope_only_with_ftz() -> None:
    """One 128-wide block of ones under a weight scale of 1e-39 (subnormal): IEEE gives
    128e-39 (normal), a kernel reading the scale as 0 gives 0."""
    q = pinned(np.ones((1, 128), F32))
    sigma = pinned(np.ones((1, 1), F32))
    w = np.ones((128, 2), F32).astype(E4M3)
    w_scale = np.full((1, 1), 1e-39, F32)
    for ftz, holds_zero in ((True, True), (False, False)):
        acc = BlockGemm(("x",), ftz=ftz)(q, sigma, w, w_scale, None, np.dtype(F32))
        assert acc.lo is not None and acc.hi is not None
        assert float(acc.mid[0, 0]) == float(F32(128) * F32(1e-39))
        assert bool((acc.lo <= 0).all() and (acc.hi >= 0).all()) is holds_zero, ftz


def test_the_fp8_profile_declares_it_and_with_ftz_reaches_its_steps() -> None:
    never = VLLM_TRITON_FP8.with_ftz(False)
    for profile, ftz in ((VLLM_TRITON_FP8, True), (never, False)):
        steps = dict(profile.pipeline("fp8_block").steps())
        assert all(getattr(s, "ftz", ftz) is ftz for s in steps.values()), profile.name
        assert ("may flush float32 subnormals" in steps["gemm1"].describe()) is ftz


def test_the_freedom_costs_nothing_on_ordinary_fp8_values() -> None:
    """x ~ N(0, 1): the envelopes with and without the freedom are the same bit for bit."""
    cfg = OpConfig(ep_size=2, experts_per_rank=2, top_k=2, hidden=160, intermediate=96,
                   tokens_per_rank=(3, 2), x_dtype=BF16, weight_dtype="float8_e4m3fn")
    problem = random_problem(cfg, seed=3)
    with_, without = (oracle.run(problem, numerics=Numerics(kernel=k), envelope=True)
                      for k in (VLLM_TRITON_FP8, VLLM_TRITON_FP8.with_ftz(False)))
    for a, b in zip(with_.ranks, without.ranks):
        assert a.out_lo is not None and b.out_lo is not None and b.out_hi is not None
        assert np.array_equal(a.out_lo, b.out_lo) and np.array_equal(a.out_hi, b.out_hi)
