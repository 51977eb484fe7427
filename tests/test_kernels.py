"""Evidence for the kernel profiles (issue 14), each property with both outcomes.

- The vllm-triton profile agrees with a naive loop model written from ``kernels.md``
  (``naive_vllm.py``): bitwise for W8A8 (K <= 1032: every int sum exact), inside the envelope for
  BF16/FP16 weights (the naive model sums in K order); a planted defect fails.
- Legitimate orders pass each profile: float32 BLAS batched and row by row, reversed K, another
  int8 K block size; and a from-scratch batched-BLAS BF16 kernel passes the default gate.
- A change of one rounding point is caught: every search example where the mutant differs from
  the profile's model on a defined row is rejected, and at least one such example exists.
- A third profile (CUTLASS-style, SiLU on the second half) is one record.
- The generated shapes lie in each profile's domain; the envelope contains the model's own out
  and is pinned (lo = hi) on almost every ascend-a3 W8A8 element.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from naive_vllm import naive_vllm_run
from test_reference import _bf16_swiglu_ties, _ReversedCombine, _special_rows

import oracle
import oracle.model.kernels as kernels
from oracle import Numerics, compare
from oracle.model.kernels import (
    ASCEND_A3,
    DEEPGEMM_SM100_FP8,
    TORCH_SCALED_GROUPED_MM,
    VLLM_TRITON,
    KernelProfile,
    profile_from_dict,
)
from spec import DTYPES, OpConfig, Problem, random_problem
from spec.limits import A3_W8A8, check_supported
from spec.strategies import ROW_FAMILIES, configs, problems, token_rows

Array = np.ndarray[Any, Any]
F32 = np.float32


def search(max_examples: int) -> settings:
    return settings(max_examples=max_examples, derandomize=True, database=None, deadline=None)


def outputs(result: oracle.Result) -> list[tuple[Array, Array]]:
    return [(r.out, r.expert_token_nums) for r in result.ranks]


def run_outputs(problem: Problem, profile: KernelProfile) -> list[tuple[Array, Array]]:
    return outputs(oracle.run(problem, numerics=Numerics(kernel=profile)))


#: Small problems in each profile's domain (few ranks: the naive model loops per slot).
def domain_problems(profile: KernelProfile, values: st.SearchStrategy[Any] | None = None,
                    **fields: Any) -> st.SearchStrategy[Problem]:
    fields.setdefault("ep_sizes", st.sampled_from((1, 2, 3, 4)))
    return problems(configs=configs(domain=profile.domain, **fields), values=values)


#: Rows of every family but ``tiny_row``: at x ~ 2^-60 the SwiGLU input is ~1e-20, where
#: silu(g)·u = g·u/2 to first order, so gate/up order and silu's rounding vanish into float32
#: underflow (the envelope rightly admits either); a one-rounding mutant is only visible above.
VISIBLE_ROWS = token_rows(families=st.sampled_from(
    tuple(f for f in ROW_FAMILIES if f != "tiny_row")))


FLOAT_WEIGHTS = st.just("float")  # any non-int8 weight dtype becomes x's dtype


# ---------------------------------------------------------------------------------------------
# 1. The vllm-triton profile agrees with a naive model of it


def check_vllm_agreement(problem: Problem, **naive: Any) -> None:
    """W8A8: bitwise on defined rows; float weights: the naive out inside [out_lo, out_hi]."""
    res = oracle.run(problem, numerics="vllm-triton", envelope=True)
    outs, nums, defined = naive_vllm_run(problem, **naive)
    for r, (rank, out, n, d) in enumerate(zip(res.ranks, outs, nums, defined)):
        assert np.array_equal(rank.defined, d), f"rank {r}: defined rows"
        assert np.array_equal(rank.expert_token_nums, n), f"rank {r}: expert_token_nums"
        if problem.config.weight_dtype == "int8":
            same = rank.out[d].view(np.uint16) == out[d].view(np.uint16)
            assert same.all(), f"rank {r}: {int((~same).sum())} W8A8 values not bitwise equal"
        else:
            assert rank.out_lo is not None and rank.out_hi is not None
            got = out[d].astype(F32)
            inside = (got >= rank.out_lo[d]) & (got <= rank.out_hi[d])
            assert inside.all(), f"rank {r}: {int((~inside).sum())} float values off envelope"


@search(80)
@given(domain_problems(VLLM_TRITON))
def test_vllm_triton_agrees_with_the_naive_model(problem: Problem) -> None:
    check_vllm_agreement(problem)


@pytest.mark.parametrize("weights", ["int8", "bfloat16"])
def test_vllm_agreement_fails_when_the_naive_model_keeps_silu_in_float32(weights: str) -> None:
    cfg = OpConfig(ep_size=2, experts_per_rank=2, top_k=2, hidden=64, intermediate=32,
                   tokens_per_rank=(4, 3), weight_dtype=weights)
    problem = random_problem(cfg, seed=3)
    check_vllm_agreement(problem)
    with pytest.raises(AssertionError):
        check_vllm_agreement(problem, silu_rounded=False)


# ---------------------------------------------------------------------------------------------
# 2. Legitimate orders pass


@dataclass(frozen=True)
class BlasFloatGemm(kernels.FloatGemm):
    """Float32 BLAS: the products summed in whatever order the library takes; ``rows``: one
    GEMV per row instead of one batched GEMM."""

    rows: bool = False

    def __call__(self, a: kernels.Env, w: Array, slot: Array | None, x_dtype: Any) -> kernels.Env:
        w32, a32 = w.astype(F32), a.mid.astype(F32)
        if self.rows:
            acc = np.stack([w32.T @ row for row in a32]) if len(a32) else a32 @ w32
        else:
            acc = a32 @ w32
        return kernels._apply_epilogue(self.epilogue, kernels.Env(acc.astype(F32)), col=None,
                                       row=None, slot=slot, x_dtype=x_dtype, ftz=self.ftz)


class ReversedFloatGemm(kernels.FloatGemm):
    """Float32 accumulation sequentially from the last K index to the first."""

    def __call__(self, a: kernels.Env, w: Array, slot: Array | None, x_dtype: Any) -> kernels.Env:
        w32, a32 = w.astype(F32), a.mid.astype(F32)
        acc = np.zeros((a32.shape[0], w.shape[1]), F32)
        for k in reversed(range(w.shape[0])):
            acc = (acc + a32[:, k, None] * w32[k]).astype(F32)
        return kernels._apply_epilogue(self.epilogue, kernels.Env(acc), col=None, row=None,
                                       slot=slot, x_dtype=x_dtype, ftz=self.ftz)


@dataclass(frozen=True)
class BlockedIntGemm(kernels.IntGemm):
    """int dots per ``block``-wide K block summed in float32 (vLLM's Triton accumulator),
    optionally from the last block to the first."""

    reverse: bool = False

    def __call__(self, q: kernels.Env, w: Array, col: Array, row: kernels.Env,
                 slot: Array | None, x_dtype: Any) -> kernels.Env:
        n = w.shape[0]
        starts = list(range(0, n, self.block))
        acc = np.zeros((q.mid.shape[0], w.shape[1]), F32)
        qi, wi = q.mid.astype(np.int64), w.astype(np.int64)
        for b in reversed(starts) if self.reverse else starts:
            acc = (acc + (qi[:, b:b + self.block] @ wi[b:b + self.block]).astype(F32)).astype(F32)
        return kernels._apply_epilogue(self.epilogue, kernels.Env(acc), col=col,
                                       row=kernels.Env(row.mid), slot=slot, x_dtype=x_dtype,
                                       ftz=self.ftz)


def float_orders(profile: KernelProfile) -> dict[str, KernelProfile]:
    float_path = profile.pipeline("float")
    one, two = float_path.gemm1.epilogue, float_path.gemm2.epilogue
    return {
        "float32 BLAS, batched": profile.with_steps(
            "float", gemm1=BlasFloatGemm(one), gemm2=BlasFloatGemm(two)),
        "float32 BLAS, row by row": profile.with_steps(
            "float", gemm1=BlasFloatGemm(one, True), gemm2=BlasFloatGemm(two, True)),
        "reversed K": profile.with_steps(
            "float", gemm1=ReversedFloatGemm(one), gemm2=ReversedFloatGemm(two)),
    }


#: Reductions long enough for the summation order to change some stored value.
LONG_SUMS = dict(hidden=st.sampled_from((512, 1024)), intermediate=st.just(64),
                 ep_sizes=st.sampled_from((1, 2)))

LEGITIMATE = {
    **{f"ascend-a3 {k}": (ASCEND_A3, v) for k, v in float_orders(ASCEND_A3).items()},
    **{f"vllm-triton {k}": (VLLM_TRITON, v) for k, v in float_orders(VLLM_TRITON).items()},
}


def check_legitimate(problem: Problem, profile: KernelProfile, legit: KernelProfile) -> bool:
    """``legit``'s outputs pass ``profile``'s judge; returns whether they differ from its model
    (the order made a difference somewhere)."""
    got = run_outputs(problem, legit)
    verdict = compare(problem, got, numerics=Numerics(kernel=profile))
    assert verdict.ok, verdict.message
    want = oracle.run(problem, numerics=Numerics(kernel=profile))
    return any(not np.array_equal(g.view(np.uint16), w.out.view(np.uint16))
               for (g, _), w in zip(got, want.ranks))


@pytest.mark.parametrize("name", sorted(LEGITIMATE))
def test_a_legitimate_float_order_passes(name: str) -> None:
    profile, legit = LEGITIMATE[name]
    differs = []

    @search(30)
    @given(domain_problems(profile, weight_dtypes=FLOAT_WEIGHTS, **LONG_SUMS))
    def check(problem: Problem) -> None:
        differs.append(check_legitimate(problem, profile, legit))

    check()
    assert sum(differs) >= 1, f"the order changed only {sum(differs)} of {len(differs)} outputs"


# K > 1032: partial sums pass 2^24, so the float32 block sum depends on the block size.
WIDE_K = dict(hidden=st.sampled_from((1056, 2048)), intermediate=st.sampled_from((8, 16)),
              weight_dtypes=st.just("int8"), top_k=st.sampled_from((1, 2, 8)),
              ep_sizes=st.sampled_from((1, 2)))


def _wide_positive_problem() -> Problem:
    """K = 2048, positive tokens and weights 64..127: GEMM1's partial sums pass 2^24, where a
    float32 block sum is no longer exact."""
    cfg = OpConfig(ep_size=1, experts_per_rank=2, top_k=2, hidden=2048, intermediate=16,
                   tokens_per_rank=(6,))
    rng = np.random.default_rng(7)
    x = rng.uniform(0.9, 1.0, size=(6, 2048)).astype(ml_dtypes.bfloat16)
    base = random_problem(cfg, seed=7, x=[x])
    w1 = rng.integers(64, 128, size=(2, 2048, 32)).astype(np.int8)
    return Problem([dataclasses.replace(r, w1=[w1]) for r in base.ranks])


def _blocked_accumulators_differ(problem: Problem, gemm: kernels.IntGemm) -> bool:
    rank = problem.ranks[0]
    quantise = VLLM_TRITON.pipeline("w8a8").quantise
    assert quantise is not None
    q, sigma, _ = quantise(kernels.Env(rank.x.astype(F32)), "zero")
    w1 = rank.expert_weights(0)[0]
    ones = np.ones(w1.shape[1], F32)
    exact = kernels.IntGemm("int32", ())(q, w1, ones, sigma, None, rank.x.dtype).mid
    blocked = replace(gemm, epilogue=())(q, w1, ones, sigma, None, rank.x.dtype).mid
    return not np.array_equal(exact, blocked)


@pytest.mark.parametrize(("block", "reverse"), [(32, False), (64, False), (64, True)])
def test_vllm_int8_block_sizes_pass_at_wide_k(block: int, reverse: bool) -> None:
    v = VLLM_TRITON
    int8 = v.pipeline("w8a8")
    gemm1 = BlockedIntGemm("f32_blocks", int8.gemm1.epilogue, block, reverse)
    gemm2 = BlockedIntGemm("f32_blocks", int8.gemm2.epilogue, block, reverse)
    legit = v.with_steps("w8a8", gemm1=gemm1, gemm2=gemm2)
    wide = _wide_positive_problem()
    assert _blocked_accumulators_differ(wide, gemm1), "the freedom is not exercised"
    check_legitimate(wide, v, legit)

    @search(25)
    @given(domain_problems(v, **WIDE_K))
    def check(problem: Problem) -> None:
        check_legitimate(problem, v, legit)

    check()


def _round_to(a: Array, dtype: Any, ties_away: bool) -> Array:
    """float32 -> 16-bit dtype (as float32), nearest, ties even or away from zero."""
    near = a.astype(dtype)
    if not ties_away:
        return near.astype(F32)
    other = np.nextafter(near.astype(F32), np.copysign(F32(np.inf), a)).astype(dtype)
    other = np.where(other.astype(F32) == near.astype(F32),  # nextafter in float32 steps
                     _step_away(near), other)
    a64, n64, o64 = a.astype(np.float64), near.astype(np.float64), other.astype(np.float64)
    tie = (np.abs(a64 - n64) == np.abs(o64 - a64)) & (np.abs(o64) > np.abs(n64))
    return np.where(tie & (a64 != n64), o64, n64).astype(F32)


def _step_away(v: Array) -> Array:
    """One 16-bit step away from zero (sign-magnitude bit pattern + 1)."""
    return (v.view(np.uint16) + np.uint16(1)).view(v.dtype)


def blas_bf16_kernel(problem: Problem, ties_away: bool = True) -> list[tuple[Array, Array]]:
    """A from-scratch ascend-a3 BF16/FP16-weight kernel: batched float32 BLAS per expert,
    GMM1 and GMM2 stored in x's dtype, SwiGLU cast ties away, combine in float32 in k order.
    (Written for problems without masks or truncation, as the A3 float variant drops both.)"""
    cfg = problem.config
    dtype = DTYPES[cfg.x_dtype]
    e_local, top_k = cfg.experts_per_rank, cfg.top_k
    xs = np.concatenate([r.x for r in problem.ranks]).astype(F32)
    ids = np.concatenate([r.expert_idx for r in problem.ranks]).reshape(-1)
    probs = np.concatenate([r.probs for r in problem.ranks]).reshape(-1, top_k)
    y = np.zeros((ids.shape[0], cfg.hidden), F32)
    for g in np.unique(ids):
        slots = np.flatnonzero(ids == g)
        w1, w2, _, _ = problem.ranks[g // e_local].expert_weights(int(g % e_local))
        h = (xs[slots // top_k] @ w1.astype(F32)).astype(dtype).astype(F32)
        gate, up = h[:, :cfg.intermediate], h[:, cfg.intermediate:]
        a = _round_to((gate / (F32(1) + np.exp(-gate)) * up).astype(F32), dtype, ties_away)
        y[slots] = (a @ w2.astype(F32)).astype(dtype).astype(F32)
    y3 = y.reshape(-1, top_k, cfg.hidden)
    acc = y3[:, 0] * probs[:, :1]
    for k in range(1, top_k):
        acc = (acc + y3[:, k] * probs[:, k, None]).astype(F32)
    out = acc.astype(dtype)
    counts = np.bincount(ids, minlength=cfg.num_experts).reshape(cfg.ep_size, e_local)
    bounds = np.cumsum([0, *cfg.tokens_per_rank])
    return [(out[lo:hi], counts[r].astype(np.int32))
            for r, (lo, hi) in enumerate(itertools.pairwise(bounds))]


BF16_GATE = problems(configs=configs(domain=ASCEND_A3.domain, weight_dtypes=FLOAT_WEIGHTS,
                                     masked=st.just(False), truncation=st.just(False),
                                     ep_sizes=st.sampled_from((1, 2, 3, 4))))


def test_the_default_gate_passes_a_float32_batched_blas_bf16_kernel() -> None:
    oracle.check_implementation(blas_bf16_kernel, problems=BF16_GATE, settings=search(60),
                                save_dir=None)


def test_the_blas_bf16_kernel_passes_compare_and_its_ties_even_twin_does_not() -> None:
    problem = _bf16_swiglu_ties()
    assert compare(problem, blas_bf16_kernel(problem)).ok
    assert not compare(problem, blas_bf16_kernel(problem, ties_away=False)).ok


# ---------------------------------------------------------------------------------------------
# 3. A change of one rounding point is caught


def _tie_problem() -> Problem:
    """Exact quantisation ties: a row with amax = 127/8 and values (2n+1)/16, so that
    x / fl(amax/127) = x · fl(127/amax) = n + 1/2 (both quantiser formulas), plus a zero row."""
    cfg = OpConfig(ep_size=1, experts_per_rank=2, top_k=2, hidden=32, intermediate=16,
                   tokens_per_rank=(4,))
    return random_problem(cfg, seed=3, x=_special_rows(cfg, 3))


def _long_combine_problem() -> Problem:
    """fp16 x, top_k = 4, 64 tokens of K = 1024: enough values for a float32 sum order to
    straddle an fp16 rounding boundary somewhere."""
    cfg = OpConfig(ep_size=1, experts_per_rank=4, top_k=4, hidden=1024, intermediate=16,
                   tokens_per_rank=(64,), x_dtype="float16")
    return random_problem(cfg, seed=0)


#: The vLLM mutants are judged with the reciprocal pinned to IEEE (as the profile was before
#: issue 24): they change a rounding point of the pipeline, which is what this test is about.
#: Under the profile's declared 2-ulp reciprocal every exact tie may round either way, element
#: by element, and a flipped q widens its whole row; measured at this budget: fp16 intermediates
#: caught on 5 of 10 differing examples, silu not rounded 15 of 23, routed weight in the combine
#: 20 of 21, ties away 0 of 16; with the ``ties`` row family left out 18/18, 32/36, 36/36.
#: (A kernel's reciprocal is one value per row: judging each token row against the reciprocal
#: below, at and above IEEE separately would pin exact ties again; not built yet.)
_V = VLLM_TRITON.map_steps(("quantise", "requantise"), lambda q: replace(q, div_ulps=0))
_A = ASCEND_A3
_VI, _VF = _V.pipeline("w8a8"), _V.pipeline("float")
_AI, _AF = _A.pipeline("w8a8"), _A.pipeline("float")
#: (profile, mutant differing from it in one rounding point, constructed problem or None).
MUTANTS: dict[str, tuple[KernelProfile, KernelProfile, Problem | None]] = {
    "vllm-triton: fp16 intermediates for bf16 x": (_V, _V.with_steps(
        "w8a8", gemm1=replace(_VI.gemm1, epilogue=("row", "col", "fp16"))).with_steps(
        "float", gemm1=replace(_VF.gemm1, epilogue=("fp16",))), None),
    "vllm-triton: silu not rounded": (_V, _V.map_steps(
        "swiglu", lambda s: replace(s, silu_store=None)), None),
    "vllm-triton: routed weight in the combine": (_V, replace(_V.with_steps(
        "w8a8", gemm2=replace(_VI.gemm2, epilogue=("row", "col", "x"))).with_steps(
        "float", gemm2=replace(_VF.gemm2, epilogue=("x",))),
        combine=replace(_V.combine, weight="combine")), None),
    "vllm-triton: float32 top-k sum": (_V, replace(
        _V, combine=replace(_V.combine, x_dtype_topk=())), _long_combine_problem()),
    "vllm-triton: quantiser ties away": (_V, _V.map_steps(
        "quantise", lambda q: replace(q, ties="away")), _tie_problem()),
    "ascend-a3: bf16 instead of fp16 intermediates": (_A, _A.with_steps(
        "w8a8", gemm1=replace(_AI.gemm1, epilogue=("col", "x", "row")),
        gemm2=replace(_AI.gemm2, epilogue=("col", "x", "row", "x"))), None),
    "ascend-a3: step 1 ties even": (_A, _A.map_steps(
        "quantise", lambda q: replace(q, ties="even")), _tie_problem()),
    "ascend-a3: BF16 SwiGLU cast ties even": (_A, _A.with_steps(
        "float", swiglu=replace(_AF.swiglu, store="x")), _bf16_swiglu_ties()),
    "ascend-a3: combine in reverse k order": (_A, replace(_A, combine=_ReversedCombine()),
                                              _long_combine_problem()),
}


def mutant_differs(problem: Problem, profile: KernelProfile, mutant: KernelProfile) -> bool:
    """The mutant's out differs in value on a defined row (−0 and +0 are one value: a judge
    compares numbers; an example where only a zero's sign moved was counted as missed)."""
    got = oracle.run(problem, numerics=Numerics(kernel=mutant))
    want = oracle.run(problem, numerics=Numerics(kernel=profile))
    return any(not np.array_equal(g.out[w.defined].astype(np.float32),
                                  w.out[w.defined].astype(np.float32), equal_nan=True)
               for g, w in zip(got.ranks, want.ranks))


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_a_one_rounding_change_is_caught(name: str) -> None:
    """On W8A8 problems (plus the constructed one), every example where the mutant's out
    differs on a defined row is rejected, and such an example exists. Float-weight problems
    are left out: there the envelope of "any float32 order" is interval arithmetic over every
    stored intermediate flipping by one ulp, wide enough at top_k = 8 to hide a sub-ulp change
    such as an unrounded silu (measured: 12 of 13 differing examples caught)."""
    profile, mutant, constructed = MUTANTS[name]
    seen = {"differ": 0, "caught": 0}

    def judge(problem: Problem) -> None:
        if mutant_differs(problem, profile, mutant):
            seen["differ"] += 1
            verdict = compare(problem, run_outputs(problem, mutant),
                              numerics=Numerics(kernel=profile))
            seen["caught"] += not verdict.ok

    @search(40)
    @given(domain_problems(profile, VISIBLE_ROWS, weight_dtypes=st.just("int8")))
    def check(problem: Problem) -> None:
        judge(problem)

    check()
    if constructed is not None:
        judge(constructed)
    assert seen["differ"] >= 1, "no example where the mutant changes the output"
    assert seen["caught"] == seen["differ"], f"caught {seen['caught']} of {seen['differ']}"


# ---------------------------------------------------------------------------------------------
# 4. A third profile is one record

#: CUTLASS/TensorRT-LLM style (kernels.md, "Other kernels"): SiLU on the second half, a top-k
#: finalize in float32 in any order; otherwise vLLM's Triton numerics.
CUTLASS = replace(
    VLLM_TRITON.map_steps("swiglu", lambda s: replace(s, gate_first=False)),
    name="cutlass-test", summary="CUTLASS-style MoE: SiLU on the second half",
    sources="kernels.md, 'Other kernels' [code]",
    combine=replace(VLLM_TRITON.combine, x_dtype_topk=()),
)


def test_a_third_profile_runs_judges_and_round_trips() -> None:
    kernels.register(CUTLASS)
    try:
        problem = random_problem(OpConfig(ep_size=2, experts_per_rank=2, top_k=3, hidden=64,
                                          intermediate=32, tokens_per_rank=(3, 2)), seed=9)
        mine = outputs(oracle.run(problem, numerics="cutlass-test"))
        assert compare(problem, mine, numerics="cutlass-test").ok
        assert compare(problem, run_outputs(problem, CUTLASS),
                       numerics=Numerics(kernel=CUTLASS)).ok
        # gate/up swapped is structural: neither the Ascend nor the vLLM judge accepts it
        assert not compare(problem, mine).ok
        assert not compare(problem, mine, numerics="vllm-triton").ok
        # The ideal judge reads the mathematics of the named kernel (the gate second), and
        # rejects the same output as the mathematics of a gate-first kernel.
        assert compare(problem, mine, numerics=Numerics("ideal", kernel=CUTLASS)).ok
        assert not compare(problem, mine, numerics="ideal").ok
        assert profile_from_dict(CUTLASS.to_dict()) == CUTLASS
        num = Numerics(kernel=CUTLASS)
        assert Numerics.from_dict(num.to_dict()).profile == CUTLASS
        assert "up first" in CUTLASS.describe()
    finally:
        kernels.PROFILES.pop("cutlass-test")


@search(30)
@given(domain_problems(ASCEND_A3, VISIBLE_ROWS))
def test_ascend_a3_rejects_the_third_profiles_output(problem: Problem) -> None:
    mine = run_outputs(problem, CUTLASS)
    if mutant_differs(problem, ASCEND_A3, CUTLASS):
        assert not compare(problem, mine).ok


# ---------------------------------------------------------------------------------------------
# 5. Generated shapes lie in the profile's domain


DOMAIN_PROFILES = [ASCEND_A3, VLLM_TRITON, TORCH_SCALED_GROUPED_MM, DEEPGEMM_SM100_FP8]


@pytest.mark.parametrize("profile", DOMAIN_PROFILES, ids=lambda p: p.name)
def test_generated_configs_lie_in_the_profile_domain(profile: KernelProfile) -> None:
    # DeepGEMM's K, I >= 128 make its problems 7x dearer to draw: 20 examples (3 s)
    @search(20 if profile is DEEPGEMM_SM100_FP8 else 100)
    @given(configs(domain=profile.domain), problems(domain=profile.domain))
    def check(cfg: OpConfig, problem: Problem) -> None:
        assert profile.domain.violations(problem) == [], problem.config
        for c in (cfg, problem.config):
            assert profile.domain.violations(c) == [], c
            if profile is ASCEND_A3:
                assert check_supported(c, A3_W8A8) == [], c
            else:
                assert c.max_output_size is None and c.swiglu_limit is None, c

    check()


@pytest.mark.parametrize("profile", DOMAIN_PROFILES, ids=lambda p: p.name)
def test_without_a_domain_violations_occur(profile: KernelProfile) -> None:
    seen = []

    @search(100)
    @given(configs())
    def check(cfg: OpConfig) -> None:
        seen.append(bool(profile.domain.violations(cfg)))

    check()
    assert any(seen), f"no config outside {profile.domain.describe()} without a domain"


def test_a_ue8m0_domain_names_scales_that_are_not_powers_of_two() -> None:
    """DeepGEMM's SM100 domain takes UE8M0 scales only: a drawn FP8 problem's float32 block
    scales (amax/448) are reported, rank, field and value named, and ``fit_problem`` rounds
    them up so that none is left; the domain's shapes alone cannot see it (the configuration
    is inside), and a domain without the field reports nothing."""
    domain = DEEPGEMM_SM100_FP8.domain
    drawn = random_problem(OpConfig(ep_size=1, experts_per_rank=1, top_k=1, hidden=128,
                                    intermediate=128, tokens_per_rank=(1,),
                                    weight_dtype="float8_e4m3fn"), seed=3)
    assert domain.violations(drawn.config) == []
    [found] = domain.violations(drawn)
    assert found.startswith("scales not UE8M0 (rank 0, scale1[0] at (0, 0, 0):"), found
    assert domain.violations(domain.fit_problem(drawn)) == []
    assert dataclasses.replace(domain, ue8m0_scales=False).violations(drawn) == []
    assert "scales UE8M0 (powers of two)" in domain.describe()


# ---------------------------------------------------------------------------------------------
# 6. The envelope contains the model's out and is tight where nothing is free


@pytest.mark.parametrize("profile", [ASCEND_A3, VLLM_TRITON], ids=lambda p: p.name)
def test_the_model_lies_in_its_own_envelope(profile: KernelProfile) -> None:
    """…and computing the envelope leaves the model's output as it is, bit for bit: the judge
    accepts that output without computing the envelope."""
    @search(50)
    @given(domain_problems(profile))
    def check(problem: Problem) -> None:
        res = oracle.run(problem, numerics=Numerics(kernel=profile), envelope=True)
        plain = oracle.run(problem, numerics=Numerics(kernel=profile))
        for r, p in zip(res.ranks, plain.ranks):
            assert np.array_equal(r.out.view(np.uint16), p.out.view(np.uint16))
            assert r.out_lo is not None and r.out_hi is not None
            out = r.out[r.defined].astype(F32)
            finite = np.isfinite(out)
            lo, hi = r.out_lo[r.defined], r.out_hi[r.defined]
            assert ((out >= lo) & (out <= hi))[finite].all()

    check()


def test_ascend_w8a8_envelope_is_pinned_almost_everywhere() -> None:
    """At small shapes the only ascend-a3 W8A8 freedom is SwiGLU's exp (3 ulp): it reaches an
    output only through a flipped int8 after requantisation. Measured: >= 99 % of the defined
    values have lo = hi = out (bitwise comparison there)."""
    pinned, total = [0], [0]

    @search(60)
    @given(domain_problems(ASCEND_A3, weight_dtypes=st.just("int8")))
    def check(problem: Problem) -> None:
        for r in oracle.run(problem, envelope=True).ranks:
            assert r.out_lo is not None and r.out_hi is not None
            d = r.defined
            out = r.out[d].astype(F32)
            pinned[0] += int(((r.out_lo[d] == out) & (r.out_hi[d] == out)).sum())
            total[0] += out.size

    check()
    assert total[0] > 0 and pinned[0] / total[0] >= 0.99, f"{pinned[0]} of {total[0]} pinned"


#: ascend-a3 and vllm-triton as counterexample files recorded them before profiles held one
#: pipeline per variant (flat step fields: quantise, ..., float_gemm1, split_gemm1).
PROFILES_V1 = json.loads((Path(__file__).parent / "data" / "profiles_v1.json").read_text())


def _before_issue_24(profile: KernelProfile) -> KernelProfile:
    """``profile`` without the knobs issue 24 added after those files were written: the
    quantisers' division freedom and source, and flush to zero."""
    return profile.with_ftz(False).map_steps(("quantise", "requantise"), lambda q: replace(
        q, div_ulps=0, scale_ulps=0, source=""))


@pytest.mark.parametrize("name", ["ascend-a3", "vllm-triton"])
def test_a_profile_recorded_before_pipelines_loads_as_it_was(name: str) -> None:
    """Its pipelines, combine and domain are today's; the knobs added since keep their
    defaults (vllm-triton's IEEE reciprocal, no flushing): an old counterexample replays with
    the numerics it failed under."""
    old = profile_from_dict(PROFILES_V1[name])
    assert old == _before_issue_24(old) and not old.ftz
    today = _before_issue_24(kernels.PROFILES[name])
    assert not old.domain.placement  # recorded before placed calls: never handed one
    assert old == replace(today, summary=old.summary, sources=old.sources, domain=replace(
        today.domain, sources=old.domain.sources, placement=False))
    assert profile_from_dict(kernels.PROFILES[name].to_dict()) == kernels.PROFILES[name]


def test_a_profile_without_a_variant_says_so() -> None:
    assert VLLM_TRITON.variants == ("w8a8", "float")
    with pytest.raises(ValueError, match=r"has no w4a8 pipeline.*profiles with one: ascend-a3"):
        VLLM_TRITON.pipeline("w4a8")
    cfg = OpConfig(ep_size=1, experts_per_rank=2, top_k=1, hidden=64, intermediate=32,
                   tokens_per_rank=(2,), weight_dtype="int32")
    with pytest.raises(ValueError, match="has no w4a8 pipeline"):
        oracle.run(random_problem(cfg, seed=0), numerics="vllm-triton")
    with pytest.raises(ValueError, match="unknown variants"):
        replace(VLLM_TRITON, pipelines={"fp8": VLLM_TRITON.pipeline("w8a8")})


def test_with_steps_replaces_a_step_in_the_named_pipelines_only() -> None:
    loose = ASCEND_A3.with_steps("float", swiglu=kernels.Swiglu(store="x"))
    assert loose.pipeline("float").swiglu.store == "x"
    assert loose.pipeline("w8a8") == ASCEND_A3.pipeline("w8a8")
    # a step the pipeline lacks stays absent: the float pipeline has no quantiser
    quantised = ASCEND_A3.with_steps(quantise=kernels.Quantiser(ties="even"))
    assert quantised.pipeline("float").quantise is None
    assert quantised.pipeline("w4a8").quantise == kernels.Quantiser(ties="even")
    with pytest.raises(ValueError, match="unknown steps"):
        ASCEND_A3.with_steps(float_swiglu=kernels.Swiglu())
