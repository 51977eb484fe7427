"""int4 W4A16 (Marlin AWQ/GPTQ MoE; ``docs/contract/formats.md``, section W4A16 / W4A8 on
GPUs): the group quantisation of ``spec/int4.py``, the variant, the vllm-marlin-w4a16 profile
against the float path on the dequantised weights, and two real-bug classes killed by the
search: zero points never subtracted, and scales read per 64 rows where the weights have groups
of 128.

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
from oracle.model.kernels import VLLM_MARLIN_W4A16
from spec import DTYPES, OpConfig, Problem, ShapeError, random_problem
from spec.int4 import GROUP, dequantise_groups, expand_groups, quantise_groups
from spec.strategies import configs, problems

Array = np.ndarray[Any, Any]
U4 = "uint4"
# K = 160 and I = 136 are not multiples of 128 (a partial last group); K = 32 is one group.
W4_CONFIGS = configs(weight_dtypes=st.just(U4), hidden=st.sampled_from((32, 64, 160)),
                     intermediate=st.sampled_from((16, 24, 136)),
                     experts_per_rank=st.sampled_from((1, 2)),
                     tokens_per_rank=st.integers(0, 3), ep_sizes=st.integers(1, 2),
                     top_k=st.integers(1, 2))
SEARCH = settings(max_examples=15, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
PROFILE = Numerics(kernel=VLLM_MARLIN_W4A16)


def test_quantisation_is_within_half_a_step() -> None:
    """Per 128 rows (the last group partial) and column: every element lies within half a
    step (scale/2, the scale rounded to x's dtype) of ``(q − z)·s``; an all-zero group has
    scale 0 and zero point 8 and dequantises to 0."""
    w = np.random.default_rng(0).standard_normal((300, 6)).astype(np.float32)
    w[128:256, 2] = 0
    q, s, z = quantise_groups(w, np.float32)
    assert q.dtype == ml_dtypes.uint4 and s.shape == z.shape == (3, 6)
    back = dequantise_groups(q, s, z, np.float32)
    step = expand_groups(s, 300)
    assert (np.abs(back - w) <= step / 2 * (1 + 1e-6)).all()
    assert s[1, 2] == 0 and int(z[1, 2]) == 8 and not back[128:256, 2].any()


def _no_zero_points(q: Array, s: Array, z: Array, dtype: Any) -> Array:
    """The mutant dequantiser: ``q·s``, the zero point never subtracted."""
    return dequantise_groups(q, s, np.zeros_like(z), dtype)


def _groups_of_64(q: Array, s: Array, z: Array, dtype: Any) -> Array:
    """The mutant dequantiser: scales and zero points read per 64 rows (a group size taken
    from the wrong place), clamped to the last group."""
    rows = q.shape[-2]
    pick = np.minimum(np.arange(rows) // 64, s.shape[-2] - 1)
    centred = q.astype(np.float32) - z[..., pick, :].astype(np.float32)
    return np.asarray((centred * s[..., pick, :].astype(np.float32)).astype(dtype))


def test_dequantisation_uses_zero_points_and_groups_of_128() -> None:
    w = np.random.default_rng(1).standard_normal((2 * GROUP, 4)).astype(np.float32) + 1
    w[GROUP:] *= 8  # the second group's scale is ~8x the first's
    parts = quantise_groups(w, np.float32)
    step = expand_groups(parts[1], 2 * GROUP)
    assert (np.abs(dequantise_groups(*parts, np.float32) - w) <= step / 2 * (1 + 1e-6)).all()
    for mutant in (_no_zero_points, _groups_of_64):
        assert (np.abs(mutant(*parts, np.float32) - w) > 2 * step).any()


def test_problem_validates_the_group_shapes() -> None:
    cfg = OpConfig(ep_size=1, experts_per_rank=2, top_k=2, hidden=160, intermediate=24,
                   tokens_per_rank=(3,), weight_dtype=U4, x_dtype="float16")
    p = random_problem(cfg)
    assert p.config.variant == "int4_w4a16"
    r = p.ranks[0]
    assert r.w1[0].shape == (2, 160, 48) and r.scale1[0].shape == r.zero1[0].shape == (2, 2, 48)
    assert r.scale2[0].dtype == np.float16 and r.zero2[0].shape == (2, 1, 160)
    # the generator's zero block: the last expert's first group of its first column
    assert r.scale1[0][-1, 0, 0] == 0 and int(r.zero1[0][-1, 0, 0]) == 8
    assert not dequantise_groups(r.w2[0], r.scale2[0], r.zero2[0], np.float32)[-1, :, 0].any()
    bad = dataclasses.replace(r, zero2=[r.zero2[0][:, :, :1]])
    with pytest.raises(ShapeError, match=r"per-expert shape \(1, 1\)"):
        Problem([bad])


# ---------------------------------------------------------------------------------------------
# The profile and the mutants


@settings(max_examples=10, deadline=None, derandomize=True)
@given(problems(configs=W4_CONFIGS))
def test_profile_is_the_float_path_on_the_dequantised_weights(problem: Problem) -> None:
    assert_float_path(problem, VLLM_MARLIN_W4A16.name)


def dequantising_with(how: Callable[[Array, Array, Array, Any], Array]) -> Callable[
        [Problem], list[tuple[Array, Array]]]:
    """A kernel that dequantises with ``how`` and then runs the float path."""
    def impl(problem: Problem) -> list[tuple[Array, Array]]:
        cfg = problem.config
        dtype = DTYPES[cfg.x_dtype]
        ranks = []
        for r in problem.ranks:
            ws = [r.expert_lists(e) for e in range(cfg.experts_per_rank)]
            ranks.append(dataclasses.replace(
                r, scale1=None, scale2=None, zero1=None, zero2=None,
                **{f"w{i}": [np.stack([how(w[f"w{i}"], w[f"scale{i}"], w[f"zero{i}"], dtype)
                                       for w in ws])] for i in (1, 2)}))
        floats = Problem(ranks, **cfg.call_attributes())
        return [(o.out, o.expert_token_nums)
                for o in oracle.run(floats, numerics="vllm-triton").ranks]
    return impl


W4_PROBLEMS = problems(configs=W4_CONFIGS)


def test_search_passes_the_model_and_its_float_path_twin() -> None:
    assert shrunk(model_impl(VLLM_MARLIN_W4A16), VLLM_MARLIN_W4A16, W4_PROBLEMS, SEARCH) is None
    assert shrunk(dequantising_with(dequantise_groups), VLLM_MARLIN_W4A16, W4_PROBLEMS,
                  SEARCH) is None


def test_search_kills_zero_points_not_subtracted() -> None:
    """Shrunk to one token: every weight is off by ``z·s``."""
    found = shrunk(dequantising_with(_no_zero_points), VLLM_MARLIN_W4A16, W4_PROBLEMS,
                   SEARCH)
    assert found is not None and sum(found.config.tokens_per_rank) == 1


def _w4(hidden: int, intermediate: int) -> Problem:
    return random_problem(OpConfig(ep_size=1, experts_per_rank=1, top_k=1, hidden=hidden,
                                   intermediate=intermediate, tokens_per_rank=(2,),
                                   weight_dtype=U4))


def test_groups_of_64_show_only_beyond_one_group() -> None:
    """The cheap twin of the search below: rejected at K = 160 (two groups), passed at K = 64
    and I = 16 (one group per column: the wrong group size reads the right scale)."""
    impl = dequantising_with(_groups_of_64)
    long, short = _w4(160, 16), _w4(64, 16)
    assert not oracle.compare(long, impl(long), numerics=PROFILE).ok
    assert oracle.compare(short, impl(short), numerics=PROFILE).ok


@pytest.mark.slow
def test_search_kills_groups_of_64() -> None:
    """Shrunk to one token with a reduction longer than 128 (K = 160 or I = 136)."""
    found = shrunk(dequantising_with(_groups_of_64), VLLM_MARLIN_W4A16, W4_PROBLEMS,
                   SEARCH)
    assert found is not None and sum(found.config.tokens_per_rank) == 1
    assert max(found.config.hidden, found.config.intermediate) > GROUP


def test_counterexample_files_keep_uint4(tmp_path: Any) -> None:
    from oracle.files import counterexample as files

    problem = random_problem(OpConfig(ep_size=1, experts_per_rank=2, top_k=1, hidden=160,
                                      intermediate=16, tokens_per_rank=(2,), weight_dtype=U4))
    back = files.load(files.save(tmp_path / "c.npz", problem)).problem
    assert back.config == problem.config
    for name in ("w1", "zero2"):
        a, b = getattr(back.ranks[0], name)[0], getattr(problem.ranks[0], name)[0]
        assert a.dtype == b.dtype and np.array_equal(a.view(np.uint8), b.view(np.uint8))
