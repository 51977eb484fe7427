"""Diagnosis (issue 13): every catalogue defect, planted in an implementation written without
the oracle, is named; a conforming output gets no diagnosis; garbage matches nothing.

The planted implementations are the benchmark catalogue's (``benchmarks.mutants``, an
independent implementation with one stage changed), the independent naive vLLM model, and
:func:`skeleton`, the README's skeleton with one knob per defect the others cannot express.
None of them is built from :func:`oracle.run`, so the diagnosis cannot see how they were made.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from naive_vllm import naive_vllm_run
from test_reference import _bf16_swiglu_ties, _special_rows

import oracle
from oracle.cli import main
from oracle.explain.diagnose import CATALOGUE, diagnose
from spec import DTYPES, OpConfig, Problem, random_problem

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a plain folder, as tests/test_mutants.py does it
    sys.path.insert(0, str(ROOT))

from benchmarks.mutants import MUTANTS, correct  # noqa: E402
from benchmarks.mutants.correct import F32, DispatchFfnCombine  # noqa: E402

Array = np.ndarray[Any, Any]
Outputs = list[tuple[Array, Array]]
F16 = np.float16


# ---------------------------------------------------------------- the README skeleton, with knobs


def skeleton(problem: Problem, *, weight: str = "combine", ids: int = 0, cap: int = 0,
             mid: Any = F16, last_slot: bool = True, swiglu_away: bool = True,
             swiglu_rounded: bool = True) -> Outputs:
    """The README's skeleton (W8A8 and float weights). Knobs: ``weight`` where the routed weight
    is applied ("combine", "gemm2", "twice"); ``ids`` added to every expert id (mod EP·E);
    ``cap`` added to max_output_size; ``mid`` the GEMM intermediates' dtype; ``last_slot``
    whether the combine sums the last slot; the float path's SwiGLU cast (ties away, rounded)."""
    cfg = problem.config
    num, limit = cfg.num_experts, cfg.max_output_size
    limit = None if limit is None else limit + cap
    slots = sorted(((int(g) + ids) % num, s, int(t), k) for s, r in enumerate(problem.ranks)
                   for t in np.flatnonzero(r.is_active()) for k, g in enumerate(r.expert_idx[t]))
    y = {}
    used = np.zeros(cfg.ep_size, int)
    in_gemm2 = weight in ("gemm2", "twice")
    for g, s, t, k in slots:
        dest, e = divmod(g, cfg.experts_per_rank)
        used[dest] += 1
        if limit is None or used[dest] <= limit:
            r = problem.ranks[s]
            p = r.probs[t, k] if in_gemm2 else F32(1)
            w1, w2, s1, s2 = problem.ranks[dest].expert_weights(e)
            y[s, t, k] = (_ffn_w8a8(r.x[t], w1, w2, s1, s2, cfg.swiglu_limit, p, mid)
                          if s1 is not None else
                          _ffn_float(r.x[t], w1, w2, p, swiglu_away, swiglu_rounded))
    counts = np.bincount([g for g, *_ in slots], minlength=num).astype(np.int32)
    in_combine = weight in ("combine", "twice")
    summed = cfg.top_k - (0 if last_slot else 1)
    results = []
    for s, r in enumerate(problem.ranks):
        out = np.zeros(r.x.shape, r.x.dtype)
        for t in range(r.num_tokens):
            if all((s, t, k) in y for k in range(cfg.top_k)):
                w = r.probs[t] if in_combine else np.ones(cfg.top_k, F32)
                acc = y[s, t, 0] * w[0] if summed else np.zeros(cfg.hidden, F32)
                for k in range(1, summed):
                    acc = acc + y[s, t, k] * w[k]
                out[t] = acc.astype(r.x.dtype)
        results.append((out, counts.reshape(cfg.ep_size, -1)[s]))
    return results


def _quantise(v: Array) -> tuple[Array, Any]:
    sigma = np.abs(v).max() / F32(127)
    t = np.abs(v / sigma).astype(np.float64) if sigma else np.zeros(v.shape)
    return (np.sign(v) * np.floor(t + 0.5)).astype(F32), sigma


def _ffn_w8a8(x: Array, w1: Array, w2: Array, s1: Array, s2: Array, limit: float | None,
              p: Any, mid: Any) -> Array:
    q, sigma = _quantise(x.astype(F32))
    h = (q @ w1.astype(np.float64)).astype(F32) * s1
    h = h.astype(mid).astype(F32) * sigma
    i = w2.shape[0]
    if limit is not None:
        h = np.minimum(h, F32(limit))
        h[i:] = np.maximum(h[i:], F32(-limit))
    a = h[:i] / (F32(1) + np.exp(-h[:i])) * h[i:]
    amax = np.abs(a).max()
    with np.errstate(over="ignore"):
        inv = F32(127) / amax if amax else F32(0)
    q2 = np.rint(a * inv) if np.isfinite(inv) else np.rint(a * (127 / np.float64(amax)))
    c2 = (q2 @ w2.astype(np.float64)).astype(F32) * s2
    y = c2.astype(mid).astype(F32) * (amax / F32(127)) * p
    return np.asarray(y.astype(x.dtype).astype(F32))


def _ffn_float(x: Array, w1: Array, w2: Array, p: Any, away: bool, rounded: bool) -> Array:
    h = (x.astype(F32) @ w1.astype(F32)).astype(x.dtype).astype(F32)
    i = w2.shape[0]
    a = h[:i] / (F32(1) + np.exp(-h[:i])) * h[i:]
    if rounded:
        near = a.astype(x.dtype)
        step = (near.view(np.uint16) + 1).view(x.dtype)
        tie = 2 * np.abs(a - near.astype(F32)) == np.abs(step.astype(F32) - near.astype(F32))
        a = np.where(away & tie & (np.abs(a) > np.abs(near.astype(F32))), step, near)
    return np.asarray(((a.astype(F32) @ w2.astype(F32)) * p).astype(x.dtype).astype(F32))


class _Bf16Intermediates(DispatchFfnCombine):
    def dequantise(self, acc: Array, scale: Array) -> Array:
        return np.asarray(acc.astype(F32) * scale).astype(DTYPES["bfloat16"])


# ---------------------------------------------------------------- problems


def _problem(seed: int = 1, **fields: Any) -> Problem:
    """W8A8 bf16, EP 2, top_k 3, truncated at 8 rows, routing weights that do not sum to 1."""
    cfg = OpConfig(**{**dict(ep_size=2, experts_per_rank=2, top_k=3, hidden=32, intermediate=16,
                             tokens_per_rank=(4, 3), max_output_size=8), **fields})
    rng = np.random.default_rng(seed)
    probs = [rng.uniform(0.1, 0.6, (m, cfg.top_k)).astype(np.float32)
             for m in cfg.tokens_per_rank]
    return random_problem(cfg, seed=seed, probs=probs)


def _ties() -> Problem:
    cfg = OpConfig(ep_size=1, experts_per_rank=2, top_k=2, hidden=32, intermediate=16,
                   tokens_per_rank=(4,))
    return random_problem(cfg, seed=3, x=_special_rows(cfg, 3))


def _long_combine() -> Problem:
    cfg = OpConfig(ep_size=1, experts_per_rank=4, top_k=4, hidden=1024, intermediate=16,
                   tokens_per_rank=(64,), x_dtype="float16")
    return random_problem(cfg, seed=0)


def _vllm() -> Problem:
    return _problem(max_output_size=None)


def _vllm_naive(**knobs: Any) -> Callable[[Problem], Outputs]:
    def impl(problem: Problem) -> Outputs:
        outs, nums, _ = naive_vllm_run(problem, **knobs)
        return list(zip(outs, nums))

    return impl


#: catalogue key -> (planted implementation, problem, kernel profile judged against).
PLANTED: dict[str, tuple[Callable[[Problem], Outputs], Callable[[], Problem], str]] = {
    "gate_up_swapped": (MUTANTS["swiglu_halves_swapped"], _problem, "ascend-a3"),
    "probs_ignored": (MUTANTS["probs_ignored"], _problem, "ascend-a3"),
    "probs_renormalised": (MUTANTS["probs_renormalised"], _problem, "ascend-a3"),
    "weight_twice": (lambda p: skeleton(p, weight="twice"), _problem, "ascend-a3"),
    "weight_in_gemm2": (lambda p: skeleton(p, weight="gemm2"), _problem, "ascend-a3"),
    "last_slot_dropped": (lambda p: skeleton(p, last_slot=False), _problem, "ascend-a3"),
    "combine_bf16": (MUTANTS["combine_bf16_accumulator"], _problem, "ascend-a3"),
    "combine_reversed": (MUTANTS["combine_reverse_order"], _long_combine, "ascend-a3"),
    "step1_ties": (MUTANTS["quantise_half_even"], _ties, "ascend-a3"),
    "swiglu_cast_ties": (lambda p: skeleton(p, swiglu_away=False), _bf16_swiglu_ties,
                         "ascend-a3"),
    "bf16_intermediates": (_Bf16Intermediates(), _problem, "ascend-a3"),
    "f32_intermediates": (MUTANTS["fp16_intermediate_skipped"], _problem, "ascend-a3"),
    "silu_unrounded": (_vllm_naive(silu_rounded=False), _vllm, "vllm-triton"),
    "swiglu_unrounded": (lambda p: skeleton(p, swiglu_rounded=False), _bf16_swiglu_ties,
                         "ascend-a3"),
    "ids_plus_one": (lambda p: skeleton(p, ids=1), _problem, "ascend-a3"),
    "ids_minus_one": (lambda p: skeleton(p, ids=-1), _problem, "ascend-a3"),
    "cap_minus_one": (lambda p: skeleton(p, cap=-1), _problem, "ascend-a3"),
    "counts_after_truncation": (MUTANTS["counts_after_truncation"], _problem, "ascend-a3"),
    "experts_round_robin": (MUTANTS["expert_rank_modulo"], _problem, "ascend-a3"),
}


#: Planted on a constructed problem where other entries give the very same bits (the BF16 tie
#: problem's gate and up columns are constant): the diagnosis lists them as equally consistent.
UNDISTINGUISHED = {"swiglu_cast_ties", "swiglu_unrounded"}


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("key", sorted(PLANTED))
def test_a_planted_defect_is_named(key: str) -> None:
    impl, make, kernel = PLANTED[key]
    problem = make()
    found = diagnose(problem, impl(problem), numerics=kernel)
    assert not found.conforms, "the planted defect changes nothing judged on this problem"
    named = [d.key for d in found.exact]
    assert named[:1] == [key] or (key in named and key in UNDISTINGUISHED), found.describe()
    assert found.describe().startswith("diagnosis: your output equals the reference"), (
        found.describe())


def test_every_catalogue_entry_is_planted_or_invisible() -> None:
    """Each entry has a planted test, except max_output_size + 1, which changes only rows the
    contract leaves undefined (see the next test), step 5's tie rule (no constructed problem
    here hits an exact tie of a·127/amax after SwiGLU: not covered), and the routed
    weight moved into the combine, which applies to vllm-triton only and has no independent
    planted vLLM implementation here (not covered)."""
    assert {d.key for d in CATALOGUE} == set(PLANTED) | set(ISSUE21) | {
        "cap_plus_one", "step5_ties", "weight_in_combine"}


def test_one_row_too_many_is_invisible_to_the_judge() -> None:
    """max_output_size + 1 only defines a row the contract leaves undefined: it conforms."""
    problem = _problem()
    found = diagnose(problem, skeleton(problem, cap=1))
    assert found.conforms and found.defect is None


def test_an_output_off_by_a_freedom_is_matched_within_tolerance_not_bitwise() -> None:
    """The routing weights left out, then one value moved by one ulp where the profile's
    float32 GEMM order leaves that much freedom: no entry equals it bit for bit, the closest
    within the judge's tolerance is named, and the diagnosis says which kind of match it is."""
    problem = _problem(weight_dtype="bfloat16", hidden=256, max_output_size=None, masked=False)
    outputs = skeleton(problem, weight="none")
    ignored = next(d for d in CATALOGUE if d.key == "probs_ignored")
    entry = ignored.outputs(problem, oracle.Numerics())  # only to pick where to move a value
    assert entry is not None
    rank = entry.ranks[0]
    assert rank.out_lo is not None and rank.out_hi is not None
    t, c = np.unravel_index(np.argmax(rank.out_hi - rank.out.astype(np.float64)), rank.out.shape)
    out = outputs[0][0].copy()
    bits = out.view(np.uint16)
    b = int(bits[t, c])  # one step up in value: sign and magnitude
    bits[t, c] = b + 1 if b < 0x8000 else (1 if b == 0x8000 else b - 1)
    found = diagnose(problem, [(out, outputs[0][1]), *outputs[1:]])
    assert not found.exact and found.close is not None, found.describe()
    assert found.close[0].key == "probs_ignored", found.describe()
    assert "within the judge's tolerance" in found.describe()


def test_a_conforming_output_gets_no_diagnosis() -> None:
    problem = _problem()
    found = diagnose(problem, correct(problem))
    assert found.conforms and found.defect is None
    assert found.describe() == "diagnosis: none needed, the outputs conform"


def test_garbage_matches_no_known_defect() -> None:
    problem = _problem()
    rng = np.random.default_rng(0)
    garbage = [(rng.standard_normal(out.shape).astype(out.dtype), nums)
               for out, nums in correct(problem)]
    found = diagnose(problem, garbage)
    assert not found.conforms and found.defect is None
    assert found.describe().startswith("diagnosis: no known defect matches"), found.describe()


def test_malformed_outputs_get_no_diagnosis() -> None:
    found = diagnose(_problem(), [])
    assert found.verdict.stage == "ranks" and "before any value" in found.describe()


def test_explain_prints_the_diagnosis_of_a_saved_counterexample(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    problem = _problem()
    with pytest.raises(oracle.ConformanceError) as failure:
        oracle.check_implementation(MUTANTS["probs_ignored"], problems=_just(problem),
                                    save_dir=tmp_path, isolate=False)
    assert main(["explain", str(failure.value.path)]) == 0
    printed = capsys.readouterr().out
    assert ("diagnosis: your output equals the reference (ascend-a3) with the routing weights "
            "ignored") in printed, printed


def test_explain_says_when_the_file_holds_no_outputs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from oracle.files.counterexample import save

    path = save(tmp_path / "bare.npz", _problem(), meta={"stage": "timeout"})
    assert main(["explain", str(path)]) == 0
    assert "no outputs of the implementation" in capsys.readouterr().out


def _just(problem: Problem) -> Any:
    from hypothesis import strategies as st

    return st.just(problem)


def test_the_catalogue_keys_are_unique() -> None:
    keys = [d.key for d in CATALOGUE]
    assert len(keys) == len(set(keys))
    assert all(replace(d).advice for d in CATALOGUE)


def test_ideal_mode_speaks_of_no_profile_the_user_did_not_choose(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Judged ideal without a kernel: the routing weights ignored are named against the ideal
    mathematics, within its tolerance; no rounding-point entry is tried and no stage walk of a
    profile is printed. With the kernel named, the profile's bitwise diagnosis."""
    problem = _problem()
    outputs = MUTANTS["probs_ignored"](problem)
    found = diagnose(problem, outputs, numerics="ideal")
    assert found.close is not None and found.close[0].key == "probs_ignored"
    said = found.describe()
    assert "the reference (the ideal mathematics) with the routing weights ignored" in said
    assert "ascend-a3" not in said
    # no rounding-point entry, nor a receive-row entry (the ideal judge has no rows to shift)
    assert len(found.tried) == sum(d.kernel is None and d.reads is None for d in CATALOGUE)
    named = diagnose(problem, outputs, numerics=oracle.Numerics("ideal", kernel="ascend-a3"))
    assert "(ascend-a3)" in named.describe()
    with pytest.raises(oracle.ConformanceError) as failure:
        oracle.check_implementation(MUTANTS["probs_ignored"], problems=_just(problem),
                                    numerics="ideal", save_dir=tmp_path, isolate=False)
    assert main(["explain", str(failure.value.path)]) == 0
    printed = capsys.readouterr().out
    assert "ascend-a3" not in printed.split("judged with")[1], printed
    assert "stages: none, judged in ideal mode without a kernel profile" in printed


# ---------------------------------------------------------------- issue 21's classes


def _varied(seed: int = 1) -> Problem:
    """_problem with token rows 10^0..10^-3 apart (the ideal judge's varied_norms family)."""
    from spec.strategies import RowPlan
    from spec.synth import normal_tokens

    cfg = _problem(seed).config
    rng = np.random.default_rng(seed)
    x = [normal_tokens(cfg, rng, m) for m in cfg.tokens_per_rank]
    RowPlan("varied_norms").plant(cfg, rng, x)
    return random_problem(cfg, seed=seed, x=x, probs=[r.probs for r in _problem(seed).ranks])


class _ProbsTwice(DispatchFfnCombine):
    def combine(self, y: Array, probs: Array) -> Array:
        return super().combine(y, probs * probs)


def _skipping(seed: int = 1) -> Problem:
    """_problem without truncation, rank 0 sending expert 0 nothing (every token picks experts
    1, 2, 3): rank 1's block of expert 0 follows an empty one."""
    base = _problem(seed, max_output_size=None)
    rng = np.random.default_rng(seed)
    ids = [np.tile(np.array([1, 2, 3], np.int32), (4, 1)),
           np.argsort(rng.random((3, 4)), axis=1)[:, :3].astype(np.int32)]
    return random_problem(base.config, seed=seed, probs=[r.probs for r in base.ranks],
                          expert_idx=ids)


#: issue 21: entry -> (a mutant it names, a mutant of another class it must not name).
ISSUE21 = {
    "rows_shifted_by_empty_rank": (MUTANTS["empty_source_row_shift"],
                                   MUTANTS["receive_offset_off_by_one"], _skipping),
    "probs_twice": (_ProbsTwice(), MUTANTS["probs_renormalised"], _problem),
    "step1_truncated": (MUTANTS["quantise_truncated"], MUTANTS["quantise_double_rounded"],
                        _problem),
    "per_tensor_scale": (MUTANTS["per_tensor_activation_scale"], MUTANTS["quantise_truncated"],
                         _varied),
}


@pytest.mark.parametrize("key", sorted(ISSUE21))
def test_an_issue21_class_is_named_and_another_is_not(key: str) -> None:
    named, other, make = ISSUE21[key]
    problem = make()
    found = diagnose(problem, named(problem))
    assert [d.key for d in found.exact][:1] == [key], found.describe()
    found = diagnose(problem, other(problem))
    assert not found.conforms and key not in [d.key for d in found.exact], found.describe()


def test_a_row_shifted_by_an_empty_rank_is_not_read_as_a_dropped_slot() -> None:
    """The issue's misreading: the shifted rows read other tokens' results, not zeros, so
    "last slot left out" does not match; on the smallest problem (rank 0 has no token, rank 1's
    one row is read past the buffer: zeros) both match bit for bit and the shift is named."""
    mutant = MUTANTS["empty_source_row_shift"]
    problem = _skipping()
    found = diagnose(problem, mutant(problem))
    assert [d.key for d in found.exact] == ["rows_shifted_by_empty_rank"], found.describe()
    smallest = random_problem(OpConfig(ep_size=2, experts_per_rank=1, top_k=1, hidden=32,
                                       intermediate=16, tokens_per_rank=(0, 1)), seed=0)
    found = diagnose(smallest, mutant(smallest))
    assert [d.key for d in found.exact] == ["rows_shifted_by_empty_rank", "last_slot_dropped"]
    assert "equally consistent on this problem: the last top-k slot" in found.describe()
    without = diagnose(problem, mutant(problem), catalogue=[
        d for d in CATALOGUE if d.key != "rows_shifted_by_empty_rank"])
    assert without.exact == () and "no known defect" in without.describe()


def test_no_known_defect_says_which_were_tried() -> None:
    problem = _problem()
    rng = np.random.default_rng(0)
    garbage = [(rng.standard_normal(out.shape).astype(out.dtype), nums)
               for out, nums in correct(problem)]
    text = diagnose(problem, garbage).describe()
    assert "no known defect" in text and "step1_truncated" in text and "probs_twice" in text
