"""NVFP4 weights with bf16/fp16 activations (``docs/contract/formats.md``, section NVFP4): the
quantisation of ``spec/nvfp4.py`` as vLLM's reference makes it, the variant, the
vllm-nvfp4-w4a16 profile against the float path on the dequantised weights, and the global
scale's bugs: ignored, applied twice (killed by the search), another expert's (sglang #36597's
class: per-expert scales read as if per rank).

Each check is shown to fail on its mutant as well as to pass on the real thing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from gate_search import model_impl, shrunk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_mxfp4 import assert_float_path

import oracle
from oracle import Numerics
from oracle.model.kernels import VLLM_NVFP4_W4A16
from spec import DTYPES, OpConfig, Problem, ShapeError, random_problem
from spec.nvfp4 import NV_BLOCK, dequantise_nv, global_scale, quantise_nv
from spec.strategies import configs, problems

Array = np.ndarray[Any, Any]
NV = "float4_e2m1fn"
# K = 40 and I = 24 are not multiples of 16 (a partial last block).
NV_CONFIGS = configs(weight_dtypes=st.just(NV), hidden=st.sampled_from((16, 40, 64)),
                     intermediate=st.sampled_from((8, 24)),
                     experts_per_rank=st.sampled_from((1, 2)),
                     tokens_per_rank=st.integers(0, 3), ep_sizes=st.integers(1, 2),
                     top_k=st.integers(1, 2))
SEARCH = settings(max_examples=15, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
PROFILE = Numerics(kernel=VLLM_NVFP4_W4A16)


def test_ties_on_the_grid_midpoints_round_to_even() -> None:
    """A tensor whose amax is 6 has global scale 448 and block scale 448: the multiplier is 1
    and the midpoints 0.25, 0.75, 1.25, 2.5, 5 go to 0, 1, 1, 2, 4 (half to even, vLLM's
    reference); rounding ties up (triton's MX downcast) gives 0.5, 1, 1.5, 3, 6."""
    w = np.zeros((NV_BLOCK, 6), np.float32)
    w[0] = 6.0
    w[1] = [0.25, 0.75, 1.25, 2.5, 5.0, -2.5]
    q, s, g = quantise_nv(w)
    assert g.tolist() == [448.0] and (s.astype(np.float32) == 448).all()
    assert q[1].astype(np.float32).tolist() == [0.0, 1.0, 1.0, 2.0, 4.0, -2.0]
    ties_up = [0.5, 1.0, 1.5, 3.0, 6.0, -3.0]
    assert q[1].astype(np.float32).tolist() != ties_up


def test_quantisation_is_within_half_a_step_and_scales_saturate() -> None:
    """Each element within half an e2m1 step of its block (at most scale/global_scale, the
    step at the top of the grid being 2 in units of it), every block scale a finite e4m3 at
    most 448, the tensor's amax mapped to 6·448 by the global scale; an all-zero block gets
    scale 0 and dequantises to 0."""
    w = np.random.default_rng(0).standard_normal((2, 40, 6)).astype(np.float32)
    w[1, 16:32, 3] = 0
    q, s, g = quantise_nv(w)
    assert q.dtype == ml_dtypes.float4_e2m1fn and s.dtype == ml_dtypes.float8_e4m3fn
    assert s.shape == (2, 3, 6) and g.shape == (2, 1)
    assert np.allclose(g[:, 0] * np.abs(w).max(axis=(1, 2)), 448 * 6, rtol=1e-6)
    sf = s.astype(np.float32)
    assert np.isfinite(sf).all() and sf.max() <= 448 and sf[1, 1, 3] == 0
    back = dequantise_nv(q, s, g, np.float32)
    step = np.repeat(sf / g[:, :, None], NV_BLOCK, axis=1)[:, :40]
    assert (np.abs(back - w) <= step * (1 + 1e-6)).all() and not back[1, 16:32, 3].any()
    assert global_scale(np.array([0.0])).tolist() == [1.0]


def test_problem_validates_the_block_shapes() -> None:
    cfg = OpConfig(ep_size=1, experts_per_rank=2, top_k=2, hidden=40, intermediate=24,
                   tokens_per_rank=(3,), weight_dtype=NV)
    p = random_problem(cfg)
    assert p.config.variant == "nvfp4_w4a16"
    r = p.ranks[0]
    assert r.scale1[0].shape == (2, 3, 48) and r.scale2[0].shape == (2, 2, 40)
    assert r.gscale1[0].shape == (2, 1) and r.gscale1[0][0] != r.gscale1[0][1]  # expert tags
    assert r.scale1[0][-1, 0, 0] == 0 and r.scale2[0][-1, 0, 0] == 0  # the zero blocks
    bad = dataclasses.replace(r, gscale2=[r.gscale2[0][:, :0]])
    with pytest.raises(ShapeError, match="gscale2"):
        Problem([bad])


@settings(max_examples=10, deadline=None, derandomize=True)
@given(problems(configs=NV_CONFIGS))
def test_profile_is_the_float_path_on_the_dequantised_weights(problem: Problem) -> None:
    assert_float_path(problem, VLLM_NVFP4_W4A16.name)


# ---------------------------------------------------------------------------------------------
# The global scale's bugs


def with_global_scales(pick: Callable[[Array], Array]) -> Callable[
        [Problem], list[tuple[Array, Array]]]:
    """A kernel that reads ``pick(stacked global scales (E, 1))`` instead of the given ones."""
    def impl(problem: Problem) -> list[tuple[Array, Array]]:
        e = problem.config.experts_per_rank
        ranks = []
        for r in problem.ranks:
            changed = {}
            for name in ("gscale1", "gscale2"):
                stacked = np.stack([r.expert_lists(j)[name] for j in range(e)])
                changed[name] = [np.asarray(pick(stacked), np.float32)]
            lists = {n: [np.stack([r.expert_lists(j)[n] for j in range(e)])]
                     for n in ("w1", "w2", "scale1", "scale2")}
            ranks.append(dataclasses.replace(r, **lists, **changed))
        return model_impl(VLLM_NVFP4_W4A16)(Problem(ranks, **problem.config.call_attributes()))
    return impl


ignored = with_global_scales(np.ones_like)
applied_twice = with_global_scales(np.square)
first_expert_s = with_global_scales(lambda g: np.broadcast_to(g[:1], g.shape))


NV_PROBLEMS = problems(configs=NV_CONFIGS)


def test_search_passes_the_model_and_kills_the_global_scale_applied_twice() -> None:
    assert shrunk(model_impl(VLLM_NVFP4_W4A16), VLLM_NVFP4_W4A16, NV_PROBLEMS, SEARCH) is None
    assert shrunk(with_global_scales(lambda g: g), VLLM_NVFP4_W4A16, NV_PROBLEMS,
                  SEARCH) is None
    found = shrunk(applied_twice, VLLM_NVFP4_W4A16, NV_PROBLEMS, SEARCH)
    assert found is not None and sum(found.config.tokens_per_rank) == 1


def _nv(experts: int) -> Problem:
    """Four tokens, routed to the experts in turn."""
    ids = (np.arange(4) % experts).astype(np.int32)[:, None]
    return random_problem(OpConfig(ep_size=1, experts_per_rank=experts, top_k=1, hidden=40,
                                   intermediate=8, tokens_per_rank=(4,), weight_dtype=NV),
                          expert_idx=[ids])


def test_ignored_and_another_experts_global_scale_are_rejected() -> None:
    """The global scale ignored is off by ~10^3; expert 0's scale read for every expert shows
    with two experts (their tags differ) and not with one."""
    one, two = _nv(1), _nv(2)
    assert not oracle.compare(one, ignored(one), numerics=PROFILE).ok
    assert not oracle.compare(two, first_expert_s(two), numerics=PROFILE).ok
    assert oracle.compare(one, first_expert_s(one), numerics=PROFILE).ok


def test_counterexample_files_keep_the_nvfp4_bits(tmp_path: Any) -> None:
    from oracle.files import counterexample as files

    problem = _nv(2)
    back = files.load(files.save(tmp_path / "c.npz", problem)).problem
    assert back.config == problem.config
    for name in ("w1", "scale2", "gscale1"):
        a, b = getattr(back.ranks[0], name)[0], getattr(problem.ranks[0], name)[0]
        assert a.dtype == b.dtype == DTYPES.get(a.dtype.name, a.dtype)
        assert np.array_equal(a.view(np.uint8), b.view(np.uint8))
