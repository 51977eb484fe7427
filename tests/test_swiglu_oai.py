"""SwigluOAI (vllm-ascend open PR #11916; variants.md): the ``swiglu_alpha`` attribute.

1. Validation (its messages: tests/test_problem.py): a finite float32 value; with BF16/FP16
   weights only ``<= 0`` (the PR passes α to the int8 kernel alone).
2. α is a mode switch: ``None``, 0, a negative α and a positive α that underflows float32 give
   today's SwiGLU bit for bit, in every numerics path; a positive α does not.
3. The naive per-token model agrees bitwise (faithful) and within 1 ulp (ideal).
4. The gate catches a kernel that drops α, the ``+ 1`` or α altogether, and accepts the
   correct one; the ideal judge and the profile envelope raise no false alarm on legitimate
   kernels' SwigluOAI outputs.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from test_reference import _special_rows, check_agreement, check_within_bound

import oracle
import spec.config
from oracle.check.harness import ConformanceError, check_implementation
from oracle.judge.bounds import quantisation_error_bound
from oracle.judge.rowtest import row_thresholds
from oracle.judge.verdict import compare
from oracle.model.kernels import Env
from spec import OpConfig, Problem, random_problem
from spec.strategies import configs, problems

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.mutants.correct import F32, DispatchFfnCombine  # noqa: E402

Array = np.ndarray[Any, Any]
#: α values that take the OAI branch (gpt-oss uses 1.702).
OAI = st.sampled_from((1.702, 1.0, 0.25, 8.0))
OAI_CONFIGS = configs(hidden=st.sampled_from((16, 32, 64)),
                      intermediate=st.sampled_from((8, 16, 32)),
                      weight_dtypes=st.just("int8"), swiglu_alphas=OAI)


def _cfg(**kw: Any) -> OpConfig:
    base: dict[str, Any] = dict(ep_size=2, experts_per_rank=2, top_k=2, hidden=32,
                                intermediate=16, tokens_per_rank=(3, 2))
    return OpConfig(**{**base, **kw})


# ---- 1. validation -----------------------------------------------------------------------


def test_standard_alpha_is_accepted_on_float_weights() -> None:
    """α <= 0 selects standard SwiGLU, which the BF16 kernel runs anyway."""
    assert _cfg(weight_dtype="bfloat16", swiglu_alpha=0.0).oai_alpha is None
    assert _cfg(weight_dtype="bfloat16", swiglu_alpha=-1.0).oai_alpha is None


@pytest.mark.parametrize(("alpha", "mode"), [
    (None, None), (0.0, None), (-0.0, None), (-1.702, None), (1e-50, None),
    (1.702, float(np.float32(1.702))), (1.0, 1.0)])
def test_the_mode_switch_reads_alpha_as_float32(alpha: float | None, mode: float | None) -> None:
    assert _cfg(swiglu_alpha=alpha).oai_alpha == mode


def test_alpha_survives_the_call_copies() -> None:
    problem = random_problem(_cfg(swiglu_alpha=1.702, swiglu_limit=7.0), seed=1)
    assert problem.swiglu_alpha == 1.702
    assert problem.config.call_attributes() == {
        "max_output_size": None, "swiglu_limit": 7.0, "swiglu_alpha": 1.702,
        "act_scheme": None}
    assert "swiglu_alpha=1.702" in problem.config.summary()


# ---- 2. α <= 0 is today's SwiGLU, bit for bit ---------------------------------------------


def _bits(problem: Problem, numerics: str) -> list[Array]:
    result = oracle.run(problem, numerics=numerics, envelope=numerics == "faithful")
    parts = []
    for r in result.ranks:
        parts.append(np.asarray(r.out).view(np.uint16))
        if r.out_lo is not None and r.out_hi is not None:
            parts += [np.asarray(r.out_lo).view(np.uint16), np.asarray(r.out_hi).view(np.uint16)]
    parts += [np.asarray(y).view(np.uint32 if y.dtype == np.float32 else np.uint64)
              for y in result.trace.y]
    return parts


def _with_alpha(problem: Problem, alpha: float | None) -> Problem:
    return Problem(problem.ranks, **{**problem.config.call_attributes(), "swiglu_alpha": alpha})


def _same(a: list[Array], b: list[Array]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def check_standard_alphas(problem: Problem) -> None:
    """Every non-OAI α gives the outputs, envelopes, y and sound bound of α = None, bitwise;
    a positive α gives other outputs (else the check could not fail)."""
    for numerics in ("faithful", "ideal", "vllm-triton"):
        today = _bits(problem, numerics)
        for alpha in (0.0, -0.0, -1.0, -1.702, 1e-50):
            assert _same(_bits(_with_alpha(problem, alpha), numerics), today), (numerics, alpha)
        assert not _same(_bits(_with_alpha(problem, 1.702), numerics), today), numerics
    bound = quantisation_error_bound(problem)
    for b, c in zip(quantisation_error_bound(_with_alpha(problem, -1.0)), bound):
        assert np.array_equal(b, c)


@given(problems(configs=configs(weight_dtypes=st.just("int8"), swiglu_alphas=st.none(),
                                tokens_per_rank=st.integers(1, 4))))
@settings(max_examples=10, suppress_health_check=[HealthCheck.too_slow])
def test_alpha_zero_negative_and_none_are_todays_swiglu(problem: Problem) -> None:
    check_standard_alphas(problem)


def test_the_standard_check_catches_a_mode_switch_on_nonzero_alpha(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel (here: the model) that takes the OAI branch for every α ≠ 0 changes a negative
    α's output."""
    problem = random_problem(_cfg(swiglu_limit=7.0), seed=2)
    check_standard_alphas(problem)
    monkeypatch.setattr(spec.config, "oai_alpha", lambda a: a or None)
    with pytest.raises(AssertionError):
        check_standard_alphas(problem)


# ---- 3. the naive model agrees ------------------------------------------------------------


@given(problems(configs=OAI_CONFIGS))
def test_naive_agrees_bitwise_on_swiglu_oai(problem: Problem) -> None:
    check_agreement(problem, "faithful")
    check_agreement(problem, "ideal")


def test_naive_agrees_on_clamped_special_rows() -> None:
    """The clamp (up on both sides, gate above, in both modes) with zero and tie rows."""
    cfg = _cfg(ep_size=3, experts_per_rank=4, top_k=4, tokens_per_rank=(4, 0, 3),
               swiglu_limit=0.5, swiglu_alpha=1.702)
    problem = random_problem(cfg, seed=3, x=_special_rows(cfg, 3))
    for numerics in ("faithful", "ideal"):
        check_agreement(problem, numerics)


@given(problems(configs=OAI_CONFIGS), st.booleans())
def test_faithful_stays_within_the_bound_on_swiglu_oai(problem: Problem, truncate: bool) -> None:
    check_within_bound(problem, truncate_scales=truncate)


# ---- 4. the gate and the judge -------------------------------------------------------------


class _SigmoidWithoutAlpha(DispatchFfnCombine):
    """SwigluOAI with ``sigmoid(gate)`` for ``sigmoid(α·gate)``: α read but not applied."""

    def swiglu(self, gate: Array, up: Array, alpha: float | None = None) -> Array:
        return super().swiglu(gate, up + F32(1)) if alpha is not None else super().swiglu(gate, up)


class _WithoutPlusOne(DispatchFfnCombine):
    """SwigluOAI without the ``+ 1`` on up."""

    def swiglu(self, gate: Array, up: Array, alpha: float | None = None) -> Array:
        return super().swiglu(gate, up - F32(1) if alpha is not None else up, alpha)


class _AlphaIgnored(DispatchFfnCombine):
    """A kernel at HEAD (or the BF16 adapter): α dropped, standard SwiGLU."""

    def swiglu(self, gate: Array, up: Array, alpha: float | None = None) -> Array:
        return super().swiglu(gate, up)


_GATE = settings(max_examples=25, derandomize=True, database=None, deadline=None)


@pytest.mark.parametrize("mutant", [_SigmoidWithoutAlpha, _WithoutPlusOne, _AlphaIgnored],
                         ids=lambda c: c.__name__)
def test_the_gate_catches_swiglu_oai_mutants(mutant: type[DispatchFfnCombine]) -> None:
    with pytest.raises(ConformanceError, match="stage 'out'"):  # any failing call: unshrunk
        check_implementation(mutant(), problems=problems(configs=OAI_CONFIGS),
                             settings=settings(_GATE, phases=[Phase.explicit, Phase.generate]),
                             save_dir=None)


def test_the_gate_accepts_the_correct_swiglu_oai_kernel() -> None:
    check_implementation(DispatchFfnCombine(), problems=problems(configs=OAI_CONFIGS),
                         settings=_GATE, save_dir=None)


class _ExpTwoUlpsHigh(DispatchFfnCombine):
    """A legitimate kernel: its ``exp`` 2 ulp above NumPy's float32 ``exp``, within the
    profile's 3-ulp freedom (ascend-a3's vector ``exp`` is not pinned)."""

    def swiglu(self, gate: Array, up: Array, alpha: float | None = None) -> Array:
        arg = gate if alpha is None else gate * F32(alpha)
        with np.errstate(over="ignore"):
            e = np.exp(-arg)
        e = np.nextafter(np.nextafter(e, F32(np.inf)), F32(np.inf))
        return np.asarray(gate / (F32(1) + e) * (up if alpha is None else up + F32(1)))


@pytest.mark.parametrize("kernel", ["ascend-a3", "vllm-triton"])
@pytest.mark.parametrize("alpha", [1.702, 8.0])
def test_legitimate_swiglu_oai_outputs_pass_the_ideal_judge(kernel: str, alpha: float) -> None:
    """As tests/test_judge.py for SwiGLU: a profile's output (vllm-triton: float32 BLAS
    order) passes the ideal judge, every defined row by the row test."""
    problem = random_problem(OpConfig(ep_size=2, experts_per_rank=2, top_k=4, hidden=256,
                                      intermediate=128, tokens_per_rank=(4, 3),
                                      swiglu_alpha=alpha), seed=3)
    result = oracle.run(problem, numerics=kernel)
    outs = [(r.out, r.expert_token_nums) for r in result.ranks]
    verdict = compare(problem, outs, numerics="ideal")
    assert verdict.ok, verdict.message
    th = row_thresholds(problem, oracle.run(problem, numerics="ideal"))
    assert all((j == "projection").all() for j in th.judged_by)


@pytest.mark.parametrize("alpha", [None, 1.702, 8.0])
def test_a_legitimate_exp_lies_in_the_profile_envelope(alpha: float | None) -> None:
    """ascend-a3's SwiGLU step (``exp`` within 3 ulp): the values of a kernel whose ``exp`` is
    2 ulp high lie in its envelope, on gates from −100 to 100; dropping the ``+ 1`` does not."""
    cfg = _cfg(intermediate=4001, swiglu_alpha=alpha)
    rng = np.random.default_rng(5)
    gate = np.concatenate([np.linspace(-100, 100, 2001), rng.standard_normal(2000) * 3])
    h = np.concatenate([gate, rng.standard_normal(4001) * 3]).astype(F32)[None, :]
    env = oracle.model.kernels.ASCEND_A3.pipeline("w8a8").swiglu(Env(h, h, h), cfg, np.float32)
    assert env.lo is not None and env.hi is not None
    oai = cfg.oai_alpha
    high = _ExpTwoUlpsHigh().swiglu(h[:, :4001], h[:, 4001:], oai)
    assert not np.array_equal(high, env.mid)
    assert ((env.lo <= high) & (high <= env.hi)).all()
    if oai is not None:
        dropped = DispatchFfnCombine().swiglu(h[:, :4001], h[:, 4001:] - F32(1), oai)
        assert not ((env.lo <= dropped) & (dropped <= env.hi)).all()


@pytest.mark.parametrize("mutant", [_SigmoidWithoutAlpha, _WithoutPlusOne, _AlphaIgnored],
                         ids=lambda c: c.__name__)
def test_the_ideal_judge_rejects_swiglu_oai_mutants(mutant: type[DispatchFfnCombine]) -> None:
    """Where the correct kernel passes the ideal judge, each mutant fails it."""
    problem = random_problem(OpConfig(ep_size=2, experts_per_rank=2, top_k=4, hidden=256,
                                      intermediate=128, tokens_per_rank=(4, 3),
                                      swiglu_alpha=1.702), seed=3)
    assert compare(problem, DispatchFfnCombine()(problem), numerics="ideal").ok
    assert not compare(problem, mutant()(problem), numerics="ideal").ok
