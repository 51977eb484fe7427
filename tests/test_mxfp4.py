"""MXFP4 weights with bf16/fp16 activations (``docs/contract/formats.md``, section MXFP4): the
packing and scales of ``spec/mxfp4.py``, the variant, the vllm-mxfp4-w4a16 profile against the
float path on the dequantised weights, and the nibble-order bug killed by the search.

Each check is shown to fail on a mutant (high nibble first, e8m0 read as a plain exponent
with a bias of 128, a kernel whose loader swaps nibbles) as well as to pass on the real thing.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from gate_search import model_impl, shrunk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import oracle
from oracle import Numerics
from oracle.judge.rowtest import row_thresholds
from oracle.model.kernels import VLLM_MXFP4
from oracle.model.reference import float_weight_problem
from spec import OpConfig, Problem, ShapeError, random_problem
from spec.mxfp4 import (
    dequantise_mx,
    e2m1_values,
    e8m0_values,
    pack_e2m1,
    quantise_mx,
    unpack_e2m1,
)
from spec.strategies import configs, problems

Array = np.ndarray[Any, Any]
MX = "uint8"
MX_CONFIGS = configs(weight_dtypes=st.just(MX), hidden=st.sampled_from((32, 64, 96, 160)),
                     intermediate=st.sampled_from((16, 24, 48)),
                     experts_per_rank=st.sampled_from((1, 2, 3)))
SEARCH = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))


def _pack_high_first(codes: Array) -> Array:
    """The mutant packer: the even element in the high nibble."""
    c = np.asarray(codes, np.uint8)
    return np.asarray((c[..., 1::2] & 0xF) | ((c[..., 0::2] & 0xF) << 4), np.uint8)


def test_even_element_in_the_low_nibble() -> None:
    codes = np.array([1, 2, 3, 4], np.uint8)
    assert pack_e2m1(codes).tolist() == [0x21, 0x43]
    assert _pack_high_first(codes).tolist() != [0x21, 0x43]
    assert unpack_e2m1(pack_e2m1(codes)).tolist() == codes.tolist()


@given(st.lists(st.integers(0, 255), min_size=1, max_size=16))
def test_unpack_inverts_pack_for_every_byte(data: list[int]) -> None:
    packed = np.array(data, np.uint8)
    assert np.array_equal(pack_e2m1(unpack_e2m1(packed)), packed)


def test_e2m1_and_e8m0_values() -> None:
    assert e2m1_values(np.arange(16, dtype=np.uint8)).tolist() == [
        0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6]
    s = np.array([1, 120, 127, 130, 254], np.uint8)
    assert e8m0_values(s).tolist() == [2.0**-126, 2.0**-7, 1.0, 8.0, 2.0**127]
    assert s.view(ml_dtypes.float8_e8m0fnu).astype(np.float32).tolist() == (
        e8m0_values(s).tolist())  # ml_dtypes agrees on the decoding
    off_by_one = np.ldexp(np.float32(1), s.astype(np.int32) - 128)  # the mutant: bias 128
    assert off_by_one.tolist() != e8m0_values(s).tolist()


def test_quantisation_is_within_the_e2m1_step() -> None:
    """Per 32 rows (the last block partial) and column: the scale is amax/6 rounded up to a
    power of two, and every element lies within half an e2m1 step (at most scale) of its
    dequantised value."""
    w = np.random.default_rng(0).standard_normal((70, 10)).astype(np.float32)
    packed, scales = quantise_mx(w)
    assert packed.shape == (70, 5) and scales.shape == (3, 10)
    back = dequantise_mx(packed, scales, np.float32)
    step = np.repeat(e8m0_values(scales), 32, axis=0)[:70]
    assert (np.abs(back - w) <= step).all()
    amax = np.abs(np.pad(w, ((0, 26), (0, 0)))).reshape(3, 32, 10).max(axis=1)
    assert (e8m0_values(scales) >= amax / 6).all() and (e8m0_values(scales) < amax / 3).all()


def test_problem_validates_the_packed_shapes() -> None:
    cfg = OpConfig(ep_size=1, experts_per_rank=2, top_k=2, hidden=160, intermediate=48,
                   tokens_per_rank=(3,), weight_dtype=MX)
    p = random_problem(cfg)
    assert p.config.variant == "mxfp4_w4a16"
    assert p.ranks[0].w1[0].shape == (2, 160, 48) and p.ranks[0].scale1[0].shape == (2, 5, 96)
    bad = dataclasses.replace(p.ranks[0], scale2=[p.ranks[0].scale2[0][:, :1]])
    with pytest.raises(ShapeError, match=r"per-expert shape \(1, 160\)"):
        Problem([bad])


# ---------------------------------------------------------------------------------------------
# The profile


@settings(max_examples=10, deadline=None, derandomize=True)
@given(problems(configs=MX_CONFIGS))
def test_profile_is_the_float_path_on_the_dequantised_weights(problem: Problem) -> None:
    assert_float_path(problem, VLLM_MXFP4.name)


def assert_float_path(problem: Problem, kernel: str) -> None:
    """Bit for bit: a W4A16 pipeline equals vllm-triton's float path run on the problem
    whose weights are the dequantised ones; the judges read that problem too."""
    got = oracle.run(problem, numerics=kernel)
    floats = float_weight_problem(problem)
    assert floats.config.variant in ("bf16", "fp16")
    want = oracle.run(floats, numerics="vllm-triton")
    for a, b in zip(got.ranks, want.ranks):
        assert np.array_equal(a.out.view(np.uint16), b.out.view(np.uint16))
    ideal = oracle.run(problem, numerics="ideal")
    assert row_thresholds(problem, ideal).judge([r.out for r in got.ranks]).ok


def swapped_nibbles(problem: Problem) -> list[tuple[Array, Array]]:
    """vllm PR #54773's class: the kernel reads each byte's nibbles in the other order."""
    def swap(lists: Any) -> list[Array]:
        return [((t & 0xF) << 4 | (t >> 4)).astype(np.uint8) for t in lists]
    ranks = [dataclasses.replace(r, w1=swap(r.w1), w2=swap(r.w2)) for r in problem.ranks]
    return model_impl(VLLM_MXFP4)(Problem(ranks, **problem.config.call_attributes()))


MX_PROBLEMS = problems(configs=MX_CONFIGS)


def test_search_passes_the_model_and_kills_swapped_nibbles() -> None:
    """Shrunk to one token and one expert at the smallest K and I: any byte whose two
    elements differ moves a weight."""
    assert shrunk(model_impl(VLLM_MXFP4), VLLM_MXFP4, MX_PROBLEMS, SEARCH) is None
    found = shrunk(swapped_nibbles, VLLM_MXFP4, MX_PROBLEMS, SEARCH)
    assert found is not None and sum(found.config.tokens_per_rank) == 1
    witness = random_problem(OpConfig(ep_size=1, experts_per_rank=1, top_k=1, hidden=32,
                                      intermediate=16, tokens_per_rank=(1,), weight_dtype=MX))
    assert not oracle.compare(witness, swapped_nibbles(witness),
                              numerics=Numerics(kernel=VLLM_MXFP4)).ok
    assert not oracle.compare(witness, swapped_nibbles(witness), numerics="ideal").ok
