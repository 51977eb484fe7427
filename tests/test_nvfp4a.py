"""NVFP4 W4A4 (``nvfp4``; ``docs/contract/formats.md``, section NVFP4): the row selected by the
activations' global scales, the vllm-nvfp4 profile against a naive model of vLLM's
``cutlass_moe_fp4``, the judges' e2m1 activation terms, and the real bugs as mutants killed by
the search (slow; their shrunk counterexamples as fast tests): the activation global scale of
another expert (sglang #36597: expert 0's for every expert, or rank 0's list on every rank
under EP), GEMM1's output scale never written (flashinfer #5053: an all-zero output), the e4m3
block scale cast without its clamp (NaN).

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

import oracle
from oracle import Numerics
from oracle.judge.bounds import quantisation_error_bound
from oracle.judge.rowtest import row_thresholds
from oracle.model.kernels import VLLM_NVFP4, Env, Fp4Gemm, KernelProfile, profile_from_dict
from spec import DTYPES, OpConfig, Problem, random_problem
from spec.nvfp4 import global_scale
from spec.strategies import configs, problems
from spec.synth import expert_tag

Array = np.ndarray[Any, Any]
NV = "float4_e2m1fn"
# K = 40 and I = 24 are not multiples of 16 (a partial last block).
W4A4_CONFIGS = configs(weight_dtypes=st.just(NV), activation_scales=st.just(True),
                       hidden=st.sampled_from((16, 40, 64)), intermediate=st.sampled_from((8, 24)),
                       experts_per_rank=st.sampled_from((1, 2)), tokens_per_rank=st.integers(0, 3),
                       ep_sizes=st.integers(1, 2), top_k=st.integers(1, 2))
SEARCH = settings(max_examples=15, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
PROFILE = Numerics(kernel=VLLM_NVFP4)
E4M3 = ml_dtypes.float8_e4m3fn


def _config(ep: int = 1, experts: int = 2, tokens: tuple[int, ...] = (4,)) -> OpConfig:
    return OpConfig(ep_size=ep, experts_per_rank=experts, top_k=1, hidden=40, intermediate=24,
                    tokens_per_rank=tokens, weight_dtype=NV, activation_scales=True)


# ---------------------------------------------------------------------------------------------
# The profile against a naive model of cutlass_moe_fp4


def _naive_fp4(a: Array, gs: float) -> Array:
    """vLLM's per-16 activation quantisation written out: ``q·s`` per element, float32."""
    rows, k = a.shape
    pad = np.zeros((rows, -(-k // 16) * 16), np.float32)
    pad[:, :k] = a
    blocks = pad.reshape(rows, pad.shape[1] // 16, 16)  # not -1: rows may be 0
    amax = np.abs(blocks).max(axis=2, keepdims=True)
    s = np.minimum(np.float32(gs) * (amax * np.float32(1 / 6)), 448).astype(E4M3)
    s = s.astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(s > 0, np.float32(1) / (s / np.float32(gs)), np.float32(0))
    q = np.clip(blocks * inv, -6, 6).astype(ml_dtypes.float4_e2m1fn).astype(np.float32)
    return (q * s).reshape(pad.shape)[:, :k]


def _naive_out(problem: Problem) -> Array:
    """Rank 0's out for top_k = 1, EP = 1: per token its expert's two quantised GEMMs in
    float64 (exact here), alpha, the casts of the vLLM path, the routed weight in x's dtype."""
    dt = DTYPES[problem.config.x_dtype]
    r = problem.ranks[0]
    out = np.zeros(r.x.shape, np.float32)
    i = problem.config.intermediate
    for t in range(r.x.shape[0]):
        lists = r.expert_lists(int(r.expert_idx[t, 0]))

        def gemm(a: Array, g: int, lists: dict[str, Array] = lists) -> Array:
            w = lists[f"w{g}"].astype(np.float32)
            s = np.repeat(lists[f"scale{g}"].astype(np.float32), 16, axis=0)[:w.shape[0]]
            acc = (_naive_fp4(a, float(lists[f"a{g}_gscale"][0])).astype(np.float64)
                   @ (w * s).astype(np.float64)).astype(np.float32)
            alpha = np.float32(1) / (lists[f"a{g}_gscale"][0] * lists[f"gscale{g}"][0])
            return (acc * alpha).astype(dt).astype(np.float32)

        h = gemm(r.x[t:t + 1].astype(np.float32), 1)
        g, u = h[:, :i], h[:, i:]
        silu = (g / (np.float32(1) + np.exp(-g))).astype(dt).astype(np.float32)
        y = gemm((silu * u).astype(dt).astype(np.float32), 2)
        p = np.float32(r.probs[t, 0].astype(dt))
        out[t] = (y * p).astype(dt).astype(np.float32)[0]
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_profile_is_the_naive_cutlass_path(seed: int) -> None:
    """Up to the SwiGLU's exp (2 ulp apart between NumPy float32 and the model's), the profile
    is vLLM's path step by step; the bits agree on all but a few values."""
    problem = random_problem(_config(), seed=seed)
    got = oracle.run(problem, numerics=PROFILE).ranks[0].out.astype(np.float32)
    want = _naive_out(problem)
    assert np.mean(got == want) > 0.95 and np.allclose(got, want, rtol=2**-6, atol=1e-3)


def _w4a4(hidden: int, intermediate: int, top_k: int, seed: int) -> Problem:
    return random_problem(OpConfig(ep_size=1, experts_per_rank=2, top_k=top_k, hidden=hidden,
                                   intermediate=intermediate, tokens_per_rank=(4,),
                                   weight_dtype=NV, activation_scales=True), seed=seed)


def test_ideal_mode_judges_the_profile_and_rejects_zeros() -> None:
    """Ideal mode (the sound bound, then the row test, both with the e2m1 terms) accepts the
    profile's output and rejects flashinfer #5053's all-zero one."""
    problem = _w4a4(64, 24, 2, 0)
    outs = [(r.out, r.expert_token_nums) for r in oracle.run(problem, numerics=PROFILE).ranks]
    assert oracle.compare(problem, outs, numerics="ideal").ok
    assert not oracle.compare(problem, ALPHA_UNWRITTEN(problem), numerics="ideal").ok


def test_the_sound_bound_fails_without_the_e2m1_activation_term() -> None:
    """K = 128, I = 1, top_k = 8: the profile's error is 0.02 of the bound with the term and
    7.2 times a bound without it."""
    problem = _w4a4(128, 1, 8, 1)
    got = oracle.run(problem, numerics=PROFILE).ranks[0].out.astype(np.float64)
    err = np.abs(got - oracle.run(problem, numerics="ideal").trace.combined[0])
    assert (err <= quantisation_error_bound(problem, ftz=True)[0]).all()
    assert (err > quantisation_error_bound(problem, ftz=True, omit=("activation",))[0]).any()


# ---------------------------------------------------------------------------------------------
# Mutants



def _stacked(problem: Problem, r: int, name: str) -> Array:
    e = problem.config.experts_per_rank
    return np.stack([problem.ranks[r].expert_lists(j)[name] for j in range(e)])


def quantised_with(pick: Callable[[Problem, int, str], Array]) -> Callable[[Problem], Any]:
    """A kernel whose activation quantisers read ``pick(problem, rank, name)`` ``(E, 1)`` as
    the global scales ``name`` (``a1_gscale``, ``a2_gscale``) of rank ``rank`` while its
    alphas keep the right ones (vLLM computes ``g1_alphas`` at load time): the model on a
    problem whose weight global scales absorb the difference (the kernel reads them only
    through alpha)."""
    def impl(problem: Problem) -> list[tuple[Array, Array]]:
        ranks = []
        for r, rank in enumerate(problem.ranks):
            changed = {}
            for g in (1, 2):
                right, wrong = _stacked(problem, r, f"a{g}_gscale"), pick(problem, r,
                                                                          f"a{g}_gscale")
                changed[f"a{g}_gscale"] = [wrong.astype(np.float32)]
                changed[f"gscale{g}"] = [(_stacked(problem, r, f"gscale{g}") * right / wrong)
                                         .astype(np.float32)]
            lists = {n: [_stacked(problem, r, n)] for n in ("w1", "w2", "scale1", "scale2")}
            ranks.append(dataclasses.replace(rank, **lists, **changed))
        return model_impl(VLLM_NVFP4)(Problem(ranks, **problem.config.call_attributes()))
    return impl


def _first_expert(problem: Problem, r: int, name: str) -> Array:
    a = _stacked(problem, r, name)
    return np.broadcast_to(a[:1], a.shape)


def _rank_zero(problem: Problem, r: int, name: str) -> Array:
    return _stacked(problem, 0, name)


first_expert = quantised_with(_first_expert)
rank_zero = quantised_with(_rank_zero)
own_scales = quantised_with(_stacked)


@dataclasses.dataclass(frozen=True)
class AlphaUnwritten(Fp4Gemm):
    """flashinfer #5053: the GEMM's output scale left at 0."""

    def alpha(self, a_gscale: Array, w_gscale: Array) -> Array:
        return np.zeros(1, np.float32)


@dataclasses.dataclass(frozen=True)
class Unclamped(Fp4Gemm):
    """The e4m3 block scale cast by ml_dtypes without the clamp: NaN beyond 448."""

    def quantise(self, a: Env, gscale: Array) -> Env:
        gs = np.float32(np.asarray(gscale).reshape(-1)[0])
        rows, k = a.mid.shape
        pad = np.zeros((rows, -(-k // 16) * 16), np.float32)
        pad[:, :k] = a.mid
        amax = np.abs(pad.reshape(rows, pad.shape[1] // 16, 16)).max(axis=2, keepdims=True)
        raw = (gs * (amax * np.float32(1 / 6))).astype(E4M3).astype(np.float32)
        fine = super().quantise(a, gscale)
        bad = np.repeat(np.isnan(raw)[..., 0], 16, axis=1)[:, :k]
        return Env(np.where(bad, np.nan, fine.mid), fine.lo, fine.hi)


def _with_gemms(name: str, cls: type, which: tuple[int, ...] = (1, 2)) -> KernelProfile:
    pipe = VLLM_NVFP4.pipeline("nvfp4")
    steps = {f"gemm{g}": cls(getattr(pipe, f"gemm{g}").epilogue, 2, True) for g in which}
    return dataclasses.replace(VLLM_NVFP4.with_steps("nvfp4", **steps), name=name)


W4A4_PROBLEMS = problems(configs=W4A4_CONFIGS)


def test_search_passes_the_model() -> None:
    assert shrunk(model_impl(VLLM_NVFP4), VLLM_NVFP4, W4A4_PROBLEMS, SEARCH) is None
    assert shrunk(own_scales, VLLM_NVFP4, W4A4_PROBLEMS, SEARCH) is None


def _witness(ep: int, experts: int, tokens: tuple[int, ...], expert: int,
             seed: int = 0) -> Problem:
    """A shrunk counterexample's configuration (K = 16, I = 8, top_k = 1), each token routed to
    global expert ``expert``."""
    cfg = OpConfig(ep_size=ep, experts_per_rank=experts, top_k=1, hidden=16, intermediate=8,
                   tokens_per_rank=tokens, weight_dtype=NV, activation_scales=True)
    ids = [np.full((m, 1), expert, np.int32) for m in tokens]
    return random_problem(cfg, seed=seed, expert_idx=ids)


def _rejected(problem: Problem, impl: Callable[[Problem], Any]) -> bool:
    return not oracle.compare(problem, impl(problem), numerics=PROFILE).ok


ALPHA_UNWRITTEN = model_impl(_with_gemms("alpha-unwritten", AlphaUnwritten, (1,)))


@pytest.mark.slow
def test_search_kills_the_scale_bugs() -> None:
    """The search (15 examples, 20–30 s each) shrinks to: expert 0's scale, EP=1 E=2 M=[1];
    rank 0's scales, EP=2 E=1 M=[0, 1]; GEMM1's alpha unwritten, EP=1 E=1 M=[1]; the e4m3
    cast without its clamp, EP=1 E=1 M=[1] with a planted |x| = 32 beyond the calibration
    (K = 16, I = 8, top_k = 1 each): the witnesses of the tests below."""
    found = shrunk(first_expert, VLLM_NVFP4, W4A4_PROBLEMS, SEARCH)
    assert found is not None and found.config.experts_per_rank == 2
    found = shrunk(rank_zero, VLLM_NVFP4, W4A4_PROBLEMS, SEARCH)
    assert found is not None and found.config.ep_size == 2
    found = shrunk(ALPHA_UNWRITTEN, VLLM_NVFP4, W4A4_PROBLEMS, SEARCH)
    assert found is not None and sum(found.config.tokens_per_rank) == 1
    found = shrunk(model_impl(_with_gemms("unclamped", Unclamped)), VLLM_NVFP4, W4A4_PROBLEMS,
                   SEARCH)
    assert found is not None and max(np.abs(r.x.astype(np.float32)).max(initial=0)
                                     for r in found.ranks) > 8


def test_expert_zeros_activation_scale_is_rejected() -> None:
    """sglang #36597's class: every expert quantised under expert 0's scale, alpha right:
    rejected on a token of expert 1, invisible with one expert."""
    assert _rejected(_witness(1, 2, (1,), 1), first_expert)
    assert not _rejected(_witness(1, 2, (1,), 0), first_expert)
    assert not _rejected(_witness(1, 1, (1,), 0), first_expert)


def test_rank_zeros_scales_under_ep_are_rejected() -> None:
    """sglang #36597 itself: the scales of global experts 0..E-1 (rank 0's) read on every
    rank: rejected on rank 1's expert where the ranks' tags differ; EP = 1 cannot show it."""
    witness = _witness(2, 1, (0, 1), 1)
    assert not np.array_equal(*(_stacked(witness, r, "a1_gscale") for r in (0, 1)))
    assert _rejected(witness, rank_zero)
    assert not _rejected(_witness(1, 2, (1,), 1), rank_zero)


def test_an_unwritten_gemm1_output_scale_is_rejected() -> None:
    """flashinfer #5053: GEMM1's alpha never written, every output 0 with return code 0."""
    witness = _witness(1, 1, (1,), 0)
    outs = ALPHA_UNWRITTEN(witness)
    assert not outs[0][0].astype(np.float32).any() and _rejected(witness, ALPHA_UNWRITTEN)


def _calibrated(problem: Problem, amax: tuple[float, float], offsets: tuple[int, ...]) -> Problem:
    """``problem`` with the activation global scales ``448·6 / (amax_g · expert_tag(j + o))``
    (rank r's offset ``o = offsets[r]``): the generator's until issue 25's round 6."""
    ranks = []
    for rank, o in zip(problem.ranks, offsets, strict=True):
        tag = expert_tag(np.arange(problem.config.experts_per_rank) + o)
        ranks.append(dataclasses.replace(rank, **{
            f"a{g}_gscale": [global_scale(a * tag)[:, None]] for g, a in enumerate(amax, 1)}))
    return Problem(ranks, **problem.config.call_attributes())


def test_the_calibration_leaves_the_row_test_its_rows_at_deepseek_v3s_shape() -> None:
    """K = 7168, I = 2048 (EP = 2, E = 2, top_k = 2, 2 tokens a rank): under the old
    calibration (SwiGLU amax 4 times tags of 1/2..2; seed 0's offsets) the SwiGLU outputs
    pass GEMM2's calibration on every row, the e4m3 block scale saturates, and that
    deterministic clamp sends every row to the sound bound, whose envelope holds 0 here:
    expert 0's activation scale read for every expert, outputs off by 1-2x of their norm,
    passed. Under the generator's calibration (16, tags 1..4) the row test tests every row
    and rejects it."""
    problem = random_problem(OpConfig(
        ep_size=2, experts_per_rank=2, top_k=2, hidden=7168, intermediate=2048,
        tokens_per_rank=(2, 2), weight_dtype=NV, activation_scales=True), seed=0)
    old = _calibrated(problem, (8.0, 4.0), (3, 1))
    assumptions = VLLM_NVFP4.ideal_assumptions(problem.config.x_dtype)
    for p, tested in ((old, False), (problem, True)):
        ideal = oracle.run(p, numerics="ideal")
        th = row_thresholds(p, ideal, assumptions)
        by = np.concatenate(th.judged_by)
        assert (by == "projection").all() if tested else not (by == "projection").any(), by
        assert th.judge([o for o, _ in first_expert(p)]).ok is not tested
    verdict = oracle.compare(old, first_expert(old), numerics=PROFILE)  # the hole, whole
    assert verdict.ok and verdict.untested_rows == 4, verdict  # and the verdict says so
    assert "left 4 to the envelope alone (deterministic terms" in verdict.message


def test_missing_clamp_gives_nan_beyond_the_calibration() -> None:
    """Without the clamp ml_dtypes' e4m3 cast gives NaN where γ·amax/6 > 448 (an activation
    beyond the calibrated amax); the clamped profile saturates and stays finite."""
    problem = random_problem(_config(experts=1))
    x = problem.ranks[0].x.copy()
    x[0, 0] = 40.0  # amax 40 > 448·6/γ = 8·tag
    big = Problem([dataclasses.replace(problem.ranks[0], x=x)])
    unclamped = model_impl(_with_gemms("unclamped", Unclamped))(big)
    assert np.isnan(unclamped[0][0][0].astype(np.float32)).any()
    assert np.isfinite(model_impl(VLLM_NVFP4)(big)[0][0].astype(np.float32)).all()
    assert not oracle.compare(big, unclamped, numerics=PROFILE).ok


@settings(max_examples=8, deadline=None, derandomize=True)
@given(problems(configs=W4A4_CONFIGS))
def test_generator_tags_each_experts_activation_scales(problem: Problem) -> None:
    """Per rank the experts' activation scales differ (a wrong expert shows), and GEMM2's
    differ from GEMM1's (one read for the other shows)."""
    for r in range(problem.config.ep_size):
        a1, a2 = _stacked(problem, r, "a1_gscale"), _stacked(problem, r, "a2_gscale")
        assert len(set(a1.ravel().tolist())) == a1.size and not np.array_equal(a1, a2)


def test_the_profile_round_trips_as_a_file() -> None:
    """A counterexample file records the profile: Fp4Gemm and the slot_x epilogue load back."""
    assert profile_from_dict(VLLM_NVFP4.to_dict()) == VLLM_NVFP4


# ---------------------------------------------------------------------------------------------
# The row test's e2m1 activation terms


def test_the_row_test_fails_without_the_e2m1_activation_term() -> None:
    """At a false-alarm probability of 0.9 (I = 1, top_k = 8, fp16 x: the activations' e2m1
    error dominates) the profile's own output passes with the term (|s|/T 0.57) and fails
    without it (2.6)."""
    cfg = OpConfig(ep_size=1, experts_per_rank=1, top_k=8, hidden=128, intermediate=1,
                   tokens_per_rank=(64,), x_dtype="float16", weight_dtype=NV,
                   activation_scales=True)
    problem = random_problem(cfg, seed=1)
    ideal = oracle.run(problem, numerics=dataclasses.replace(PROFILE, mode="ideal"))
    outs = [r.out for r in oracle.run(problem, numerics=PROFILE).ranks]
    tight = dataclasses.replace(VLLM_NVFP4.ideal_assumptions("float16"), false_alarm=0.9)
    assert row_thresholds(problem, ideal, tight).judge(outs).ok
    assert not row_thresholds(problem, ideal, tight, omit=("activation",)).judge(outs).ok


def test_the_row_test_catches_an_all_zero_output_the_envelope_holds() -> None:
    """At K = 1024, I = 2048 the envelope (float32 in any order meeting e2m1 requantisation)
    contains 0: flashinfer #5053's all-zero output passes it and the row test rejects it
    (benchmarks/NVFP4_POWER.md: the same at K = 7168)."""
    cfg = OpConfig(ep_size=1, experts_per_rank=1, top_k=1, hidden=1024, intermediate=2048,
                   tokens_per_rank=(1,), weight_dtype=NV, activation_scales=True)
    problem = random_problem(cfg)
    verdict = oracle.compare(problem, ALPHA_UNWRITTEN(problem), numerics=PROFILE)
    assert not verdict.ok and "error projection on the ideal row -1 x |row|" in verdict.message


def test_diagnosis_runs_on_a_profile_without_a_float_pipeline() -> None:
    """explain's catalogue flipped the float pipeline's SwiGLU ties on every profile, and a
    GPU format's profile has none (ValueError, a traceback from ``dfc-oracle explain``); the
    entry now does not apply there, and the all-zero output is named."""
    from oracle.explain.diagnose import diagnose

    witness = _witness(1, 1, (1,), 0)
    found = diagnose(witness, ALPHA_UNWRITTEN(witness), numerics=PROFILE)
    assert not found.verdict.ok and "swiglu_cast_ties" not in str(found)
