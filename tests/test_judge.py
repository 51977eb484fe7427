"""The judge's meta-tests (ulp spacing, signed zeros, NaN, undefined rows) and the ideal-mode
row test (:mod:`oracle.judge.rowtest`): legitimate kernels pass, coherent bugs fail, the threshold
follows its false-alarm probability, and a modelled error source is needed; under a kernel
profile, the row test catches what a wide envelope admits."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import ml_dtypes
import numpy as np
import pytest

import oracle
from oracle.check.harness import evaluate
from oracle.judge.bounds import ideal_tolerance
from oracle.judge.rowtest import TERMS, row_test, row_thresholds
from oracle.judge.verdict import compare, envelope_ratio, error_ratios, out_dtype_spacing
from oracle.model.kernels import IdealAssumptions
from spec import OpConfig, Problem, random_problem

Array = np.ndarray[Any, Any]
BF16 = ml_dtypes.bfloat16


def _pairs(result: oracle.Result, outs: list[Array] | None = None) -> list[tuple[Array, Array]]:
    return [(r.out if outs is None else o, r.expert_token_nums)
            for r, o in zip(result.ranks, outs or [None] * len(result.ranks))]


def _problem(k: int = 256, i: int = 128, **kw: Any) -> Problem:
    cfg = OpConfig(ep_size=2, experts_per_rank=2, top_k=4, hidden=k, intermediate=i,
                   tokens_per_rank=(4, 3), **kw)
    return random_problem(cfg, seed=3)


# ---------------------------------------------------------------------------------------------
# ulp spacing, ±0, NaN, undefined rows


@pytest.mark.parametrize(("dtype_name", "digits"), [("bfloat16", 8), ("float16", 11)])
def test_spacing_below_a_power_of_two_is_half(dtype_name: str, digits: int) -> None:
    one = np.array([1.0, -4.0])
    above = 2.0 ** (1 - digits) * np.abs(one)
    assert np.array_equal(out_dtype_spacing(one, dtype_name), above)
    assert np.array_equal(out_dtype_spacing(one, dtype_name, toward=one * 1.5), above)
    assert np.array_equal(out_dtype_spacing(one, dtype_name, toward=one * 0.9), above / 2)
    # Two ulps below a power of two are two spacings, not one.
    two_below = one - np.sign(one) * 2 * above / 2
    err = np.abs(two_below - one)
    assert (err / out_dtype_spacing(one, dtype_name, toward=two_below) == 2).all()


def test_spacing_at_the_smallest_normal_stays_subnormal() -> None:
    tiny = np.array([2.0**-14])
    assert out_dtype_spacing(tiny, "float16", toward=tiny / 2)[0] == 2.0**-24


def _with_zero_row() -> Problem:
    cfg = OpConfig(ep_size=1, experts_per_rank=2, top_k=2, hidden=32, intermediate=16,
                   tokens_per_rank=(3,))
    x = np.random.default_rng(0).standard_normal((3, 32)).astype(BF16)
    x[1] = 0
    return random_problem(cfg, seed=0, x=[x])


@pytest.mark.parametrize("numerics", ["faithful", "ideal"])
def test_negative_zero_equals_zero(numerics: str) -> None:
    problem = _with_zero_row()
    result = oracle.run(problem)
    out = result.ranks[0].out.copy()
    assert (out[1].astype(np.float32) == 0).all()
    out[1] = -out[1]
    assert compare(problem, _pairs(result, [out]), numerics=numerics).ok


def test_nan_on_a_defined_row_fails_and_is_ignored_on_an_undefined_one() -> None:
    cfg = OpConfig(ep_size=1, experts_per_rank=2, top_k=2, hidden=32, intermediate=16,
                   tokens_per_rank=(3,))
    problem = random_problem(cfg, seed=0, active_mask=[np.array([True, False, True])])
    result = oracle.run(problem)
    for numerics in ("faithful", "ideal"):
        out = result.ranks[0].out.copy()
        out[1] = np.nan  # masked: undefined, anything goes
        assert compare(problem, _pairs(result, [out]), numerics=numerics).ok
        out[0, 3] = np.nan
        verdict = compare(problem, _pairs(result, [out]), numerics=numerics)
        assert (verdict.ok, verdict.stage, verdict.where) == (False, "non_finite", (0, 3))


def test_undefined_rows_are_not_row_tested() -> None:
    cfg = OpConfig(ep_size=1, experts_per_rank=2, top_k=2, hidden=64, intermediate=32,
                   tokens_per_rank=(4,))
    problem = random_problem(cfg, seed=0, active_mask=[np.array([True, False, True, True])])
    ideal = oracle.run(problem, numerics="ideal")
    th = row_thresholds(problem, ideal)
    assert th.judged_by[0][1] == "undefined" and np.isinf(th.threshold[0][1])
    out = oracle.run(problem).ranks[0].out.copy()
    out[1] = 1000
    assert row_test(problem, ideal, [out]).ok


# ---------------------------------------------------------------------------------------------
# The sound bound's degenerate cases


def test_tiny_rows_get_a_finite_ideal_tolerance() -> None:
    """Rows so small that 127/amax2 overflows float32: the model requantises in float64, so
    the bound stays finite (it used to be inf, which let any output pass)."""
    cfg = OpConfig(ep_size=1, experts_per_rank=1, top_k=2, hidden=32, intermediate=16,
                   tokens_per_rank=(4,))
    scale = 2.0 ** np.array([-58, -61, -63, 0])[:, None]
    x = (np.random.default_rng(0).standard_normal((4, 32)) * scale).astype(BF16)
    problem = random_problem(cfg, seed=1, x=[x])
    ideal = oracle.run(problem, numerics="ideal")
    tol = ideal_tolerance(problem, ideal)[0]
    assert np.isfinite(tol).all() and (tol < 1e300).all()
    faithful = oracle.run(problem).ranks[0].out.astype(np.float64)
    assert (np.abs(faithful - ideal.ranks[0].out.astype(np.float64)) <= tol).all()


def test_ideal_mode_accepts_the_amax_floor_of_vllms_int8_quantiser() -> None:
    """vLLM's Triton quantiser floors amax at 1e-10 (profile vllm-triton-tq): a row whose x or
    SwiGLU output lies near or below the floor is quantised on the floor's coarser grid, down
    to zeros. Found on an H100 (got 0, expected -5.57e-35). The ideal judge now assumes the
    floor (both the sound bound and the row test); without it, both reject that kernel."""
    cfg = OpConfig(ep_size=1, experts_per_rank=1, top_k=1, hidden=16, intermediate=8,
                   tokens_per_rank=(8,))
    scale = 2.0 ** -np.arange(20, 36, 2)[:, None]  # amax2 from above to below the floor
    x = (np.random.default_rng(0).standard_normal((8, 16)) * scale).astype(BF16)
    problem = random_problem(cfg, seed=0, x=[x])
    ideal = oracle.run(problem, numerics="ideal")
    got = oracle.run(problem, numerics=oracle.Numerics(kernel="vllm-triton-tq")).ranks[0]
    assert compare(problem, [(got.out, got.expert_token_nums)], numerics="ideal").ok
    error = np.abs(got.out.astype(np.float64) - ideal.ranks[0].out.astype(np.float64))
    assert (error <= ideal_tolerance(problem, ideal, amax_floor=1e-10)[0]).all()
    # the mutants: the bound and the row test without the floor
    assert (error > ideal_tolerance(problem, ideal, amax_floor=None)[0]).any()
    assert row_test(problem, ideal, [got.out]).ok
    assert not row_test(problem, ideal, [got.out], IdealAssumptions(amax_floor=None)).ok


# ---------------------------------------------------------------------------------------------
# The row test


@pytest.mark.parametrize("kernel", ["ascend-a3", "vllm-triton"])
@pytest.mark.parametrize("weights", ["int8", "bfloat16"])
def test_legitimate_kernels_pass_the_row_test(kernel: str, weights: str) -> None:
    problem = _problem(weight_dtype=weights)
    verdict = compare(problem, _pairs(oracle.run(problem, numerics=kernel)), numerics="ideal")
    assert verdict.ok, verdict.message
    th = row_thresholds(problem, oracle.run(problem, numerics="ideal"))
    assert all((j == "projection").all() for j in th.judged_by)


def test_scaled_output_fails_the_row_test_with_its_numbers() -> None:
    problem = _problem()
    result = oracle.run(problem)
    outs = [(r.out.astype(np.float32) * 1.08).astype(r.out.dtype) for r in result.ranks]
    verdict = compare(problem, _pairs(result, outs), numerics="ideal")
    assert not verdict.ok and verdict.stage == "out", verdict
    assert "row test, false-alarm probability 1e-09" in verdict.message
    assert "error projection on the ideal row +0.08" in verdict.message
    assert verdict.ratio > 1


def test_zero_output_fails_where_the_bound_alone_passes_it() -> None:
    problem = _problem(k=1024, i=512)
    ideal = oracle.run(problem, numerics="ideal")
    result = oracle.run(problem)
    zeros = [r.out * 0 for r in result.ranks]
    tol = ideal_tolerance(problem, ideal)
    within = all((np.abs(w.out.astype(np.float64)) <= t).all() for w, t in zip(ideal.ranks, tol))
    verdict = compare(problem, _pairs(result, zeros), numerics="ideal", expected=ideal)
    assert not verdict.ok and ("row test" in verdict.message or not within)


def test_threshold_follows_the_false_alarm_probability() -> None:
    """``T = sqrt(2V·ln(2n/δ))`` (plus terms that do not depend on δ): a smaller δ raises it,
    and the statistic of a legitimate kernel is the same whatever δ."""
    problem = _problem()
    ideal = oracle.run(problem, numerics="ideal")
    loose, strict = (row_thresholds(problem, ideal, IdealAssumptions(false_alarm=d))
                     for d in (1e-3, 1e-12))
    for a, b in zip(loose.threshold, strict.threshold):
        assert (b > a).all()
    outs = [r.out for r in oracle.run(problem).ranks]
    for a, b in zip(loose.statistics(outs), strict.statistics(outs)):
        assert np.array_equal(a, b)


def _activation_witness() -> Problem:
    """I = 1 and fp16 x: the activation quantisation error dominates every other source."""
    cfg = OpConfig(ep_size=1, experts_per_rank=1, top_k=1, hidden=256, intermediate=1,
                   tokens_per_rank=(64,), x_dtype="float16")
    return random_problem(cfg, seed=1)


def test_the_row_test_fails_without_the_activation_term() -> None:
    """At a false-alarm probability of 0.9 the threshold is tight enough that dropping the
    dominant modelled source makes the legitimate kernel fail; with it, it passes."""
    problem = _activation_witness()
    ideal = oracle.run(problem, numerics="ideal")
    outs = [r.out for r in oracle.run(problem).ranks]
    tight = IdealAssumptions(false_alarm=0.9)
    assert row_thresholds(problem, ideal, tight).judge(outs).ok
    assert not row_thresholds(problem, ideal, tight, omit=("activation",)).judge(outs).ok


def test_the_row_test_projects_on_a_given_direction() -> None:
    """``direction=`` (benchmarks/ideal_bias.py): the ideal rows reproduce the default
    thresholds; an output moved orthogonally to every given row is not seen on them, and is
    on the ideal rows."""
    problem = _activation_witness()
    ideal = oracle.run(problem, numerics="ideal")
    default = row_thresholds(problem, ideal)
    ideal_rows = np.concatenate(default.direction)
    same = row_thresholds(problem, ideal, direction=ideal_rows)
    assert all(np.array_equal(a, b) for a, b in zip(same.threshold, default.threshold))
    rng = np.random.default_rng(0)
    other = rng.standard_normal(ideal_rows.shape)
    other -= np.einsum("tk,tk->t", other, ideal_rows)[:, None] * ideal_rows
    other /= np.linalg.norm(other, axis=1, keepdims=True)
    out = ideal.ranks[0].out.astype(np.float64)
    moved = [(out + 0.2 * default.norm[0][:, None] * ideal_rows).astype(np.float16)]
    assert not default.judge(moved).ok
    assert row_thresholds(problem, ideal, direction=other).judge(moved).ok


def _subnormal_rows() -> Problem:
    """fp16 x and weights scaled so that every output is below fp16's smallest normal: the
    kernel's output underflows to zero where the mathematics is a tiny nonzero row."""
    cfg = OpConfig(ep_size=1, experts_per_rank=2, top_k=2, hidden=512, intermediate=64,
                   tokens_per_rank=(3,), x_dtype="float16", weight_dtype="float16")
    base = random_problem(cfg, seed=1)
    return Problem([replace(r, x=(r.x.astype(np.float32) * 1e-5).astype(np.float16))
                    for r in base.ranks])


def test_underflow_sends_rows_of_subnormal_values_to_the_sound_bound() -> None:
    """With the underflow term the kernel's all-zero rows pass (the row test leaves them to
    the sound bound); without it they are rejected as 100 % errors."""
    problem = _subnormal_rows()
    ideal = oracle.run(problem, numerics="ideal")
    result = oracle.run(problem)
    outs = [r.out for r in result.ranks]
    assert not np.any(outs[0]) and np.any(ideal.trace.combined[0]), "the witness must underflow"
    a3 = oracle.model.kernels.ASCEND_A3.ideal_assumptions("float16")
    th = row_thresholds(problem, ideal, a3)
    assert th.judge(outs).ok
    assert all("underflow" in j for j in th.judged_by[0])
    assert not row_thresholds(problem, ideal, a3, omit=("underflow",)).judge(outs).ok
    assert compare(problem, _pairs(result)).ok


def test_a_pass_says_which_rows_the_row_test_left_to_the_bound() -> None:
    """A verdict that passes rows the row test could not judge says how many and why (a
    kernel whose rows all go to a wide bound is not tested by it): the subnormal rows
    (underflow), the zero row of x; a pass on rows it judged names none."""
    cases = ((_subnormal_rows(), 3, "deterministic terms"), (_with_zero_row(), 1, "zero ideal row"),
             (_problem(), 0, ""))
    for problem, untested, reason in cases:
        verdict = compare(problem, _pairs(oracle.run(problem)), numerics="ideal")
        assert verdict.ok and verdict.untested_rows == untested, verdict
        assert verdict.untested_reason.startswith(reason)
        assert ("left" in verdict.message) is bool(untested), verdict.message
    # the gate's evaluate records it as a search statistic, and outside a search does not raise
    problem = _with_zero_row()
    outs = _pairs(oracle.run(problem))
    verdict, _ = evaluate(lambda _: outs, problem, numerics="ideal")
    assert verdict.ok and verdict.untested_rows == 1


def _wide_envelope() -> Problem:
    """BF16 weights, K = 2048, top_k = 8: an ascend-a3 envelope wider than 5 % of the output."""
    cfg = OpConfig(ep_size=1, experts_per_rank=8, top_k=8, hidden=2048, intermediate=768,
                   tokens_per_rank=(2,), weight_dtype="bfloat16")
    return random_problem(cfg, seed=0)


def test_profile_mode_row_test_catches_what_a_wide_envelope_admits() -> None:
    """The output scaled by 1.05 lies inside the envelope (the judge before the row test
    joined it passed it); today's judge rejects it by the row test, and still passes the
    profile's own output."""
    problem = _wide_envelope()
    expected = oracle.run(problem, envelope=True)
    scaled = [(r.out.astype(np.float32) * 1.05).astype(r.out.dtype) for r in expected.ranks]
    inside = [envelope_ratio(o[r.defined], r, r.defined, "bfloat16", 0).max()
              for o, r in zip(scaled, expected.ranks)]
    assert max(inside) <= 1, inside
    verdict = compare(problem, _pairs(expected, scaled), expected=expected)
    assert not verdict.ok and verdict.stage == "out"
    assert "row test" in verdict.message and "inside the ascend-a3 envelope" in verdict.message
    assert compare(problem, _pairs(expected), expected=expected).ok


def test_profile_mode_row_test_reads_the_rows_that_differ_from_the_model() -> None:
    """Under a profile only rows that differ from the model's own output are row-tested
    (issue 26: one changed row reads the experts of that row alone), each with the threshold
    the whole test gives it: token 1 scaled by 1.05 is still rejected, at token 1. Asked for
    no row (a mutant selection), the same output would pass."""
    problem = _wide_envelope()
    expected = oracle.run(problem, envelope=True)
    scaled = [r.out.copy() for r in expected.ranks]
    scaled[0][1] = (scaled[0][1].astype(np.float32) * 1.05).astype(scaled[0].dtype)
    verdict = compare(problem, _pairs(expected, scaled), expected=expected)
    assert not verdict.ok and verdict.where == (1,) and "row test" in verdict.message
    ideal = oracle.run(problem, numerics="ideal")
    whole = row_thresholds(problem, ideal)
    asked = row_thresholds(problem, ideal, only=np.array([False, True]))
    np.testing.assert_allclose(asked.threshold[0][1], whole.threshold[0][1], rtol=1e-6)
    assert np.isinf(asked.threshold[0][0]) and asked.judged_by[0][0] == "not asked"
    assert not asked.judge(scaled).ok
    assert row_thresholds(problem, ideal, only=np.array([False, False])).judge(scaled).ok

#: Per modelled source, a problem where it decides (found by a search over 1 100 random
#: configurations at false-alarm probability 0.9, vllm-triton's assumptions): (config,
#: seed, x integer-valued so that step 1 quantises exactly). The output-level terms ("y",
#: "combine", "out_cast") decided nowhere: their errors are independent per column and reach
#: the projection with about 1/sqrt(K) of their norm, while every upstream error reaches it
#: coherently through W2; they stay in the model because the derivation needs them.
TERM_WITNESSES = {
    "gemm1": (OpConfig(ep_size=1, experts_per_rank=1, top_k=8, hidden=256, intermediate=8,
                       tokens_per_rank=(64,), x_dtype="float16", weight_dtype="float16"),
              992, False),
    "swiglu": (OpConfig(ep_size=1, experts_per_rank=1, top_k=8, hidden=128, intermediate=8,
                        tokens_per_rank=(16,), weight_dtype="bfloat16"), 654, False),
    "requantisation": (OpConfig(ep_size=1, experts_per_rank=1, top_k=2, hidden=32,
                                intermediate=256, tokens_per_rank=(64,), x_dtype="float16"),
                       381, False),
    "remainder": (OpConfig(ep_size=1, experts_per_rank=1, top_k=8, hidden=16, intermediate=1,
                           tokens_per_rank=(64,), x_dtype="float16", weight_dtype="float16"),
                  30, True),
}


@pytest.mark.parametrize("term", sorted(TERM_WITNESSES))
def test_each_modelled_source_is_needed(term: str) -> None:
    """At a false-alarm probability of 0.9, the legitimate vllm-triton output passes with
    every term and fails without ``term``."""
    cfg, seed, integer_x = TERM_WITNESSES[term]
    problem = random_problem(cfg, seed=seed)
    if integer_x:
        x = np.random.default_rng(seed).integers(-127, 128, (cfg.tokens_per_rank[0], cfg.hidden))
        x[:, 0] = 127
        problem = Problem([replace(r, x=x.astype(r.x.dtype)) for r in problem.ranks])
    ideal = oracle.run(problem, numerics="ideal")
    outs = [r.out for r in oracle.run(problem, numerics="vllm-triton").ranks]
    tight = replace(oracle.model.kernels.VLLM_TRITON.ideal_assumptions(cfg.x_dtype),
                    false_alarm=0.9)
    assert row_thresholds(problem, ideal, tight).judge(outs).ok
    assert not row_thresholds(problem, ideal, tight, omit=(term,)).judge(outs).ok


def test_the_row_test_runs_only_where_the_output_is_not_the_models(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The model's own output is a legitimate kernel's: the judge does not spend a row test
    on it; one differing value is enough to run it."""
    import oracle.judge.verdict

    problem = _problem()
    result = oracle.run(problem)
    calls = []
    original = oracle.judge.verdict._row_test
    monkeypatch.setattr(oracle.judge.verdict, "_row_test",
                        lambda *a: calls.append(1) or original(*a))
    assert compare(problem, _pairs(result)).ok and calls == []
    nudged = [r.out.copy() for r in result.ranks]
    nudged[0].view(np.uint16)[0, 0] ^= 1  # one ulp on one value: outside the pinned envelope
    compare(problem, _pairs(result, nudged), ulps=1)
    assert calls == [1]


def test_the_envelope_is_computed_only_for_an_output_that_is_not_the_models(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Under a profile the model's own output passes on the model alone (the envelope costs
    about 4x the model); one differing value makes the judge compute the envelope and judge
    by it, here rejecting a value the envelope pins."""
    import oracle.judge.verdict

    problem = _problem()
    result = oracle.run(problem)
    envelopes = []
    original = oracle.judge.verdict.run
    monkeypatch.setattr(oracle.judge.verdict, "run",
                        lambda *a, **kw: envelopes.append(kw.get("envelope", False))
                        or original(*a, **kw))
    assert compare(problem, _pairs(result)).ok and envelopes == [False]
    nudged = [r.out.copy() for r in result.ranks]
    nudged[0].view(np.uint16)[0, 0] ^= 1
    verdict = compare(problem, _pairs(result, nudged))
    assert envelopes[1:3] == [False, True]
    assert not verdict.ok and verdict.stage == "out" and "pins this value" in verdict.message


def test_zero_rows_fall_back_to_the_sound_bound() -> None:
    problem = _with_zero_row()
    th = row_thresholds(problem, oracle.run(problem, numerics="ideal"))
    assert th.judged_by[0].tolist() == ["projection", "bound: zero ideal row", "projection"]


def test_rows_below_the_amax_floor_fall_back() -> None:
    problem = _with_zero_row()
    ideal = oracle.run(problem, numerics="ideal")
    th = row_thresholds(problem, ideal, IdealAssumptions(amax_floor=1e3))
    assert all(j.startswith("bound") for j in th.judged_by[0])


def test_assumptions_and_terms_are_checked() -> None:
    with pytest.raises(ValueError, match="false_alarm"):
        IdealAssumptions(false_alarm=0)
    with pytest.raises(ValueError, match="ties"):
        IdealAssumptions(ties=("up",))
    with pytest.raises(ValueError, match="stored_dtype"):
        IdealAssumptions(stored_dtype="int8")
    problem = _with_zero_row()
    with pytest.raises(ValueError, match="unknown terms"):
        row_thresholds(problem, oracle.run(problem, numerics="ideal"), omit=("rounding",))
    assert "activation" in TERMS and "remainder" in TERMS


# ---------------------------------------------------------------------------------------------
# error_ratios: the judge's elementwise ratios, as the plot draws them


@pytest.mark.parametrize("numerics", ["faithful", "ideal"])
def test_error_ratios_are_the_ratios_compare_judges(numerics: str) -> None:
    """Conforming outputs: every ratio at most 1; one value moved far: its ratio is the
    verdict's worst, at the verdict's place, and the only one above 1."""
    problem = _problem(max_output_size=9)
    result = oracle.run(problem, numerics=numerics)
    ratios = error_ratios(problem, _pairs(result), numerics=numerics)
    assert isinstance(ratios, list)
    for r, (ratio, rank) in enumerate(zip(ratios, result.ranks)):
        assert np.isnan(ratio[~rank.defined]).all() and (ratio[rank.defined] <= 1).all(), r
    r, t = next((r, int(np.flatnonzero(x.defined)[0])) for r, x in enumerate(result.ranks)
                if x.defined.any())
    outs = [x.out.copy() for x in result.ranks]
    outs[r][t, 5] = outs[r][t, 5] + 1000
    verdict = compare(problem, _pairs(result, outs), numerics=numerics)
    ratios = error_ratios(problem, _pairs(result, outs), numerics=numerics)
    assert isinstance(ratios, list)
    assert not verdict.ok and verdict.rank == r and verdict.where == (t, 5)
    assert ratios[r][t, 5] == pytest.approx(verdict.ratio)
    assert sum(int((x > 1).sum()) for x in ratios) == 1


def test_error_ratios_mark_non_finite_values_and_bad_structure() -> None:
    problem = _problem()
    result = oracle.run(problem)
    outs = [x.out.copy() for x in result.ranks]
    t = int(np.flatnonzero(result.ranks[0].defined)[0])
    outs[0][t, 3] = np.nan
    ratios = error_ratios(problem, _pairs(result, outs))
    assert isinstance(ratios, list) and ratios[0][t, 3] == np.inf
    assert error_ratios(problem, _pairs(result)[:1]).stage == "ranks"  # type: ignore[union-attr]


@pytest.mark.parametrize("kind", ["float8", "meta", "sparse", "size"])
def test_compare_never_raises_on_tensors_it_cannot_read(kind) -> None:
    """Issue 23: float8, meta and sparse tensors and a torch.Size as out. Converting the last
    three raises (the mutant: judging without the guard); compare reports stage 'structure'
    for all four (a float8 out is read, and named as the wrong dtype)."""
    torch = pytest.importorskip("torch")
    from oracle.judge.verdict import _as_numpy, compare
    from spec import OpConfig, random_problem

    problem = random_problem(OpConfig(ep_size=1, experts_per_rank=2, top_k=2, hidden=16,
                                      intermediate=8, tokens_per_rank=(2,)), seed=0)
    shape = (2, 16)
    out = {"float8": lambda: torch.zeros(shape, dtype=torch.float8_e4m3fn),
           "meta": lambda: torch.zeros(shape, device="meta"),
           "sparse": lambda: torch.zeros(shape).to_sparse(),
           "size": lambda: torch.Size(shape)}[kind]()
    verdict = compare(problem, [(out, torch.zeros(2, dtype=torch.int32))])
    assert verdict.stage == "structure"
    if kind == "float8":  # read as its bytes since the format bindings (issue 25): a wrong dtype
        assert _as_numpy(out).dtype.name == "float8_e4m3fn"
        assert "got float8_e4m3fn array" in verdict.message
        return
    with pytest.raises(Exception):  # noqa: B017 - whatever the conversion raises
        _as_numpy(out)
    assert "cannot be read as an array" in verdict.message
