"""MXFP4 weights with MXFP8 activations (``mxfp4_mxfp8``; ``docs/contract/formats.md``, section
MXFP4): the call attribute that selects the row (its inputs are ``mxfp4_w4a16``'s), the
``triton-mxfp4-mxfp8`` profile against a naive NumPy model, both judges on the model, and the
activation-scale bugs killed by the search with their shrunk counterexamples:

- the e8m0 activation scale rounded to nearest instead of up (a scale below amax/448: the
  block's largest values saturate at 448);
- the activation scales written row-major into a 128x4-swizzled buffer and read through the
  swizzle (vllm #42118, PR #49335: left unswizzled after EP dispatch): visible only with two
  or more scale rows (tokens at an expert) or more than four scale columns (K > 128);
- one activation scale for the whole tensor instead of one per 32 columns: with power-of-two
  scales it gives the per-block values wherever ``x/σ`` stays in e4m3's normal range, so only
  rows far apart in magnitude show it (the ``scale_blocks`` rows; benchmarks/MXFP8_POWER.md).

Each search is shown to pass the model as well as to fail on the mutant.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from gate_search import model_impl, shrunk
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from test_fp8 import NearestUe8m0

import oracle
from oracle import Numerics
from oracle.check.harness import ConformanceError, check_implementation
from oracle.judge.rowtest import _e4m3_ties
from oracle.model.kernels import (
    MXFP8_QUANTISER,
    TRITON_MXFP4_MXFP8,
    BlockGemm,
    Env,
    GroupQuantiser,
    KernelProfile,
    get_kernel,
)
from spec import ConfigError, OpConfig, Problem, random_problem
from spec.fp8 import to_e4m3, ue8m0_up
from spec.mxfp4 import dequantise_mx
from spec.scale_layout import storage_shape, to_logical
from spec.strategies import RowPlan, configs, problems, token_rows
from spec.synth import normal_tokens

Array = np.ndarray[Any, Any]
F32 = np.float32
MX, SCHEME = "uint8", "mxfp8"
PROFILE = TRITON_MXFP4_MXFP8
MX8_CONFIGS = configs(weight_dtypes=st.just(MX), act_schemes=st.just(SCHEME),
                      hidden=st.sampled_from((32, 64, 96, 160)),
                      intermediate=st.sampled_from((16, 24, 48)),
                      experts_per_rank=st.sampled_from((1, 2, 3)))
SEARCH = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck),
                  phases=[Phase.explicit, Phase.generate, Phase.shrink])


def _with(name: str, **steps: Any) -> KernelProfile:
    return dataclasses.replace(PROFILE.with_steps("mxfp4_mxfp8", **steps), name=name)



@dataclasses.dataclass(frozen=True)
class PerTensor(GroupQuantiser):
    """One scale for the whole tensor (its amax/448 rounded up) instead of one per group."""

    def __call__(self, a: Env, zero_rows: str) -> tuple[Env, Env, Array]:
        rows, cols = a.mid.shape
        g = self._grouped(a.mid)
        amax = np.full(g.shape[:2], np.abs(a.mid).max(initial=0), F32)
        sigma = self._sigma(amax)
        q = to_e4m3(self._quotient(g, sigma, amax)).astype(F32).reshape(
            rows, g.shape[1] * g.shape[2])[:, :cols]  # rows may be 0
        return Env(q), Env(sigma), np.zeros(rows, bool)


def read_as_swizzled(sigma: Array) -> Array:
    """Scales ``S[m, kb]`` written row-major into a 128x4-swizzled buffer and read back through
    the swizzle (:mod:`spec.scale_layout`)."""
    m, kb = sigma.shape
    rows, cols = storage_shape("swizzle-128x4", m, kb)
    buf = np.zeros(rows * cols, sigma.dtype)
    buf[: m * kb] = sigma.reshape(-1)
    return to_logical(buf.reshape(rows, cols), "swizzle-128x4", m, kb)


@dataclasses.dataclass(frozen=True)
class UnswizzledGemm(BlockGemm):
    """GEMM1 reading the dispatched activations' scales through the swizzle while they were
    written row-major (vllm #42118)."""

    def __call__(self, q: Env, sigma: Env, w: Array, w_scale: Array | None, slot: Array | None,
                 x_dtype: Any) -> Env:
        return super().__call__(q, Env(read_as_swizzled(sigma.mid)), w, w_scale, slot, x_dtype)


PIPE = PROFILE.pipeline("mxfp4_mxfp8")
NEAREST = _with("nearest", quantise=NearestUe8m0(**dataclasses.asdict(MXFP8_QUANTISER)),
                requantise=NearestUe8m0(**dataclasses.asdict(MXFP8_QUANTISER)))
UNSWIZZLED = _with("unswizzled", gemm1=UnswizzledGemm(**dataclasses.asdict(PIPE.gemm1)))
PER_TENSOR = _with("per-tensor", quantise=PerTensor(**dataclasses.asdict(MXFP8_QUANTISER)),
                   requantise=PerTensor(**dataclasses.asdict(MXFP8_QUANTISER)))


#: The searches' draws: the default rows, and only the scale_blocks family.
MX8_PROBLEMS = {False: problems(configs=MX8_CONFIGS),
                True: problems(configs=MX8_CONFIGS,
                               values=token_rows(families=st.just("scale_blocks")))}


# ---------------------------------------------------------------------------------------------
# How a call says its activation scheme


def _config(**over: Any) -> OpConfig:
    base: dict[str, Any] = dict(ep_size=1, experts_per_rank=2, top_k=1, hidden=64,
                                intermediate=16, tokens_per_rank=(2,), weight_dtype=MX,
                                act_scheme=SCHEME)
    return OpConfig(**{**base, **over})


def test_the_inputs_alone_select_w4a16_and_the_named_scheme_mxfp8() -> None:
    """The two rows' inputs are identical: the same arrays are ``mxfp4_w4a16`` unless the call
    names ``act_scheme="mxfp8"``; a scheme the weights have no row for is refused by name."""
    named = random_problem(_config(), seed=0)
    plain = Problem(named.ranks)  # the same arrays, no scheme
    assert (named.config.variant, plain.config.variant) == ("mxfp4_mxfp8", "mxfp4_w4a16")
    assert named.config.kernel_variant.lists == plain.config.kernel_variant.lists
    assert Problem(named.ranks, act_scheme=SCHEME).config == named.config
    assert "act_scheme=mxfp8" in named.config.summary()
    with pytest.raises(ConfigError, match=r"act_scheme.*'mxfp8' with int8 weights.*None"):
        _config(weight_dtype="int8")
    with pytest.raises(ConfigError, match=r"act_scheme.*'mxfp4'.*'mxfp8' \(mxfp4_mxfp8\)"):
        _config(act_scheme="mxfp4")


@settings(max_examples=5, deadline=None, derandomize=True)
@given(configs(weight_dtypes=st.just(MX)), MX8_CONFIGS)
def test_strategies_draw_the_scheme_only_when_asked(plain: OpConfig, named: OpConfig) -> None:
    assert (plain.variant, named.variant) == ("mxfp4_w4a16", "mxfp4_mxfp8")


def test_the_scheme_travels_with_the_call(tmp_path: Any) -> None:
    """Counterexample files and the torch adapter carry the scheme; a file or configuration
    written before it (no ``act_scheme`` key) means what it meant."""
    from oracle.files import counterexample as files

    problem = random_problem(_config(), seed=0)
    assert files.load(files.save(tmp_path / "c.npz", problem)).problem.config == problem.config
    old = dataclasses.asdict(problem.config)
    del old["act_scheme"]
    assert OpConfig(**old).variant == "mxfp4_w4a16"
    torch_io = pytest.importorskip("oracle.adapters.torch_io")
    pytest.importorskip("torch")
    t = torch_io.to_torch(problem.ranks[0], **problem.config.call_attributes())
    assert t.act_scheme == SCHEME


# ---------------------------------------------------------------------------------------------
# The profile against a naive model


def _naive_mx8(a: Array) -> Array:
    """MXFP8 of float32 rows, written from formats.md: per 32 columns, σ = amax/448 rounded up
    to a power of two (at least 2^-126), q = e4m3(clamp(a/σ)); returns q·σ (exact)."""
    rows, cols = a.shape
    width = -(-cols // 32) * 32
    g = np.zeros((rows, width), F32)
    g[:, :cols] = a
    g = g.reshape(rows, width // 32, 32)  # not -1: rows may be 0
    sigma = np.maximum(ue8m0_up((np.abs(g).max(axis=2) / F32(448)).astype(F32)), F32(2.0**-126))
    q = np.clip(g / sigma[..., None], -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(F32)
    return (q * sigma[..., None]).reshape(rows, width)[:, :cols]


def _naive_gemm(a: Array, w: Array) -> Array:
    """Per 32-wide K block, the exact block sum rounded to float32, added in K order."""
    acc = np.zeros((a.shape[0], w.shape[1]), F32)
    for b in range(0, a.shape[1], 32):
        acc = (acc + (a[:, b:b + 32].astype(np.float64) @ w[b:b + 32]).astype(F32)).astype(F32)
    return acc


def naive_out(problem: Problem) -> Array:
    """One expert, top_k = 1: the out rows of an MXFP4 x MXFP8 kernel (bf16 x)."""
    rank, i = problem.ranks[0], problem.config.intermediate
    bf16 = ml_dtypes.bfloat16
    w1, w2 = (dequantise_mx(rank.w1[0][0], rank.scale1[0][0], F32).astype(np.float64),
              dequantise_mx(rank.w2[0][0], rank.scale2[0][0], F32).astype(np.float64))
    h = _naive_gemm(_naive_mx8(rank.x.astype(F32)), w1).astype(bf16).astype(F32)
    silu = (h[:, :i] / (1 + np.exp(-h[:, :i]))).astype(bf16).astype(F32)
    act = (silu * h[:, i:]).astype(bf16).astype(F32)
    y = _naive_gemm(_naive_mx8(act), w2).astype(bf16).astype(F32)
    return np.asarray((y * rank.probs[:, :1]).astype(bf16))


@settings(max_examples=6, deadline=None, derandomize=True)
@given(st.sampled_from((32, 96, 160)), st.sampled_from((16, 40)), st.integers(0, 2**16))
def test_profile_matches_the_naive_model(k: int, i: int, seed: int) -> None:
    """Within one bfloat16 step per value (the routed weight applied before or after the cast:
    the profile rounds ``y·p`` once); the judges accept the profile's model in both modes."""
    problem = random_problem(_config(experts_per_rank=1, hidden=k, intermediate=i,
                                     tokens_per_rank=(3,)), seed=seed)
    got = oracle.run(problem, numerics=PROFILE.name).ranks[0].out.astype(F32)
    want = naive_out(problem).astype(F32)
    step = np.abs(want).astype(ml_dtypes.bfloat16).astype(F32) * 2.0**-7
    assert (np.abs(got - want) <= step + 2.0**-126).all()
    outs = model_impl(PROFILE)(problem)
    for numerics in (Numerics(kernel=PROFILE), "ideal"):
        assert oracle.compare(problem, outs, numerics=numerics).ok


# ---------------------------------------------------------------------------------------------
# The scale_blocks token rows


def test_scale_blocks_plants_what_it_says() -> None:
    """Block 0 as drawn; then zero, amax 2^-34 and 2^-14 (below 1e-10 and 1e-4), exact e4m3
    ties under σ = 2^-6, a hot block; odd rows 2^-12 smaller."""
    cfg = _config(hidden=192, tokens_per_rank=(2,))
    rng = np.random.default_rng(0)
    x = [normal_tokens(cfg, rng, 2)]
    RowPlan("scale_blocks").plant(cfg, rng, x)
    rows = x[0].astype(np.float64)
    amax = np.abs(rows.reshape(2, 6, 32)).max(axis=2)
    assert amax[0, 1] == 0 and amax[0, 2] == 2.0**-34 and amax[0, 3] == 2.0**-14
    assert amax[0, 4] == 7 and amax[1, 3] == 7 * 2.0**-12
    assert amax[0, 5] > 8 * amax[0, 0]
    ties = _e4m3_ties(x[0][:1, 128:160].astype(F32), 32)
    assert ties.sum() == 31  # every element but the amax, which fixes σ


# ---------------------------------------------------------------------------------------------
# The bugs, on their minimal calls (the searches that find them are below, marked slow)


def _witness(tokens: int = 2, hidden: int = 32, amax: float | None = None,
             blocks: bool = False) -> Problem:
    """EP=1 E=1 top_k=1 I=16, bf16 x: the searches' minima. ``amax``: the first element of
    every 32-block of every token, the others drawn 16 times smaller; ``blocks``: the
    scale_blocks rows (odd rows 2^-12 smaller)."""
    cfg = _config(experts_per_rank=1, hidden=hidden, tokens_per_rank=(tokens,))
    rng = np.random.default_rng(0)
    x = [normal_tokens(cfg, rng, tokens).astype(np.float64)]
    if amax is not None:
        x[0] = x[0] / 16
        x[0][:, ::32] = amax
    if blocks:
        RowPlan("scale_blocks").plant(cfg, rng, x)
    return random_problem(cfg, seed=0, x=[a.astype(ml_dtypes.bfloat16) for a in x])


def _verdicts(profile: KernelProfile, problem: Problem) -> tuple[bool, bool]:
    """(faithful to the profile, ideal) verdicts on ``profile``'s model output."""
    outs = model_impl(profile)(problem)
    return (oracle.compare(problem, outs, numerics=Numerics(kernel=PROFILE)).ok,
            oracle.compare(problem, outs, numerics="ideal").ok)


FLOAT32_SCALES = _with("float32-scales",
                       quantise=dataclasses.replace(MXFP8_QUANTISER, ue8m0=False),
                       requantise=dataclasses.replace(MXFP8_QUANTISER, ue8m0=False))


def test_each_bug_is_rejected_on_its_minimal_call_and_the_model_is_not() -> None:
    """Scale rounded to nearest: amax = 4.375 = 448·1.25·2^-7 rounds σ down to 2^-7, so 4.375
    saturates at 448·2^-7 = 3.5 (the ideal judge needs the three blocks of K = 96 and four
    tokens: at K = 32 or with full-size neighbours the error is within its noise). Swizzle
    misread: token 1's scale is read from byte 16 of the buffer, never written (0).
    Per-tensor: the 2^-12 row keeps two bits of e4m3 or none."""
    saturating = _witness(tokens=4, hidden=96, amax=4.375)
    assert _verdicts(PROFILE, saturating) == (True, True)
    assert _verdicts(NEAREST, saturating) == (False, False)
    assert _verdicts(NEAREST, _witness(tokens=4, amax=4.375)) == (False, True)
    assert _verdicts(PROFILE, _witness()) == (True, True)
    assert _verdicts(UNSWIZZLED, _witness()) == (False, False)
    assert _verdicts(UNSWIZZLED, _witness(tokens=1)) == (True, True)  # one row: no misread
    assert _verdicts(PROFILE, _witness(blocks=True)) == (True, True)
    assert _verdicts(PER_TENSOR, _witness(blocks=True)) == (False, False)


def test_ideal_mode_accepts_float32_scales_not_scales_below_amax_over_448() -> None:
    """The decision (docs/architecture.md): ideal mode takes any activation scale from amax/448
    (float32, as the FP8 rows) to its power-of-two round-up; a scale below it (nearest, OCP's
    floor rule) saturates and is rejected. The faithful profile pins the round-up."""
    assert _verdicts(FLOAT32_SCALES, _witness(tokens=4, hidden=96, amax=4.375)) == (False, True)


def test_read_as_swizzled_needs_two_rows_or_five_columns() -> None:
    s = np.arange(1, 11, dtype=F32).reshape(1, 10)
    assert np.array_equal(read_as_swizzled(s[:, :4]), s[:, :4])  # one row, four columns
    assert not np.array_equal(read_as_swizzled(s[:, :5]), s[:, :5])
    assert not np.array_equal(read_as_swizzled(s.reshape(2, 5)[:, :1]), s.reshape(2, 5)[:, :1])


# ---------------------------------------------------------------------------------------------
# The searches


@pytest.mark.slow
def test_search_passes_the_model() -> None:
    """Faithful and ideal, on the default rows and on the scale_blocks rows (41 s)."""
    for numerics in ("faithful", "ideal"):
        for drawn in MX8_PROBLEMS.values():
            assert shrunk(model_impl(PROFILE), PROFILE, drawn, SEARCH, numerics) is None


@pytest.mark.slow
def test_search_kills_the_activation_scale_bugs() -> None:
    """Each mutant is found by the faithful search (default rows) and by the ideal one
    (scale_blocks rows); the minima need what the bug needs: a scale row misread only with
    two rows at an expert or more than four scale columns, a per-tensor scale only with two
    tokens (80 s)."""
    for numerics, blocks in (("faithful", False), ("ideal", True)):
        drawn = MX8_PROBLEMS[blocks]
        assert shrunk(model_impl(NEAREST), PROFILE, drawn, SEARCH, numerics) is not None
        found = shrunk(model_impl(UNSWIZZLED), PROFILE, drawn, SEARCH, numerics)
        assert found is not None
        c = found.config
        assert c.top_k >= 2 or max(c.tokens_per_rank) >= 2 or c.hidden > 128
        found = shrunk(model_impl(PER_TENSOR), PROFILE, drawn, SEARCH, numerics)
        assert found is not None and sum(found.config.tokens_per_rank) >= 2


@pytest.mark.parametrize("weights", ["uint8", "float8_e4m3fn"])
def test_a_call_without_tokens_is_judged(weights: str) -> None:
    """No token on any rank: the e4m3 group quantiser and both judges' e4m3 terms reshaped
    0 rows with ``-1`` (a ValueError before this test), which no FP8 search had drawn."""
    cfg = _config(weight_dtype=weights, tokens_per_rank=(0,),
                  act_scheme=SCHEME if weights == MX else None)
    kernel = PROFILE.name if weights == MX else "vllm-triton-fp8"
    problem = random_problem(cfg, seed=0)
    outs = model_impl(get_kernel(kernel))(problem)
    assert oracle.compare(problem, outs, numerics=kernel).ok
    assert oracle.compare(problem, outs, numerics="ideal").ok


@pytest.mark.parametrize("weights", ["uint8", "float8_e4m3fn"])
def test_explain_diagnoses_a_gpu_format_counterexample(weights: str) -> None:
    """``dfc-oracle explain`` on an FP8 or MXFP8 counterexample: its int8 tie and per-tensor
    defects and the float pipeline's SwiGLU cast do not apply to an e4m3 group quantiser or a
    profile without a float pipeline (both raised before this test: no ``ties`` field, "no
    float pipeline"); the diagnosis runs the rest and names the one an all-zero output at
    top_k = 1 equals: the last slot left out of the combine."""
    from oracle.explain.diagnose import diagnose

    cfg = _config(weight_dtype=weights, experts_per_rank=1, hidden=32,
                  act_scheme=SCHEME if weights == MX else None)
    kernel = PROFILE if weights == MX else get_kernel("vllm-triton-fp8")
    problem = random_problem(cfg, seed=0)
    outs = [(o * 0, n) for o, n in model_impl(kernel)(problem)]
    found = diagnose(problem, outs, numerics=kernel.name)
    assert not found.verdict.ok and found.exact[0].key == "last_slot_dropped"
    assert "step1_ties" not in found.tried and "swiglu_cast_ties" not in found.tried


def test_the_default_ideal_search_kills_a_per_tensor_scale() -> None:
    """The gate's own ideal search of this profile (no rows chosen by the caller) finds a
    per-tensor activation scale: its ``varied_norms`` rows (amax over three decades,
    ``spec.strategies.POWER_ROW_FAMILIES``) give tokens' scales that differ, as the
    scale_blocks rows do in the searches above (2 to 5 s)."""
    with pytest.raises(ConformanceError) as found:
        check_implementation(model_impl(PER_TENSOR), kernel=PROFILE, numerics="ideal",
                             variants=("mxfp4_mxfp8",), settings=SEARCH, save_dir=None,
                             isolate=False)
    assert sum(found.value.problem.config.tokens_per_rank) >= 2
