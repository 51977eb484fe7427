"""The mutant catalogue and the power benchmark (issue 5).

1. The independent implementation ``benchmarks.mutants.correct`` agrees with :func:`oracle.run`
   bit for bit (faithful numerics) on every defined out row, and exactly on
   ``expert_token_nums``, over the default problem strategy.
2. Every mutant differs from the oracle on a witness input built for its bug, on which the
   correct implementation agrees: no mutant is equivalent to the correct one.
3. ``benchmarks/power.py`` runs end to end on one mutant and one seed.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import oracle
from spec import OpConfig, Problem, RankInputs, random_problem
from spec.strategies import configs, problems

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # benchmarks/ is a plain folder, as power.py does it
    sys.path.insert(0, str(ROOT))

from benchmarks import power  # noqa: E402
from benchmarks.mutants import MUTANTS, correct  # noqa: E402


def disagreement(problem: Problem, impl: Callable[[Problem], Any]) -> str | None:
    """Where ``impl`` differs from the faithful oracle: None when counts are equal and every
    defined out row is bitwise equal; otherwise a one-line description."""
    expected = oracle.run(problem)
    try:
        outputs = impl(problem)
    except Exception as exc:
        return f"raised {type(exc).__name__}: {exc}"
    for r, ((out, nums), want) in enumerate(zip(outputs, expected.ranks)):
        nums = np.asarray(nums)
        if nums.shape != want.expert_token_nums.shape or (nums != want.expert_token_nums).any():
            return f"rank {r}: expert_token_nums {nums.tolist()} != {want.expert_token_nums}"
        got, ref = np.asarray(out)[want.defined], np.asarray(want.out)[want.defined]
        if got.dtype != ref.dtype or got.shape != ref.shape:
            return f"rank {r}: out {got.dtype}{got.shape} != {ref.dtype}{ref.shape}"
        bits = got.view(np.uint16) != ref.view(np.uint16)
        if bits.any():
            t, c = np.argwhere(bits)[0]
            return f"rank {r}, defined row {t}, column {c}: {got[t, c]} != {ref[t, c]}"
    return None


# ---- 1. the independent implementation agrees with the oracle ------------------------------


FAMILIES: dict[str, st.SearchStrategy[Problem]] = {
    "default": problems(),
    "truncation": problems(configs=configs(truncation=st.just(True))),
    "masked": problems(configs=configs(masked=st.just(True))),
    "per_expert_lists": problems(configs=configs(weight_forms=st.just("list"))),
    "swiglu_clamp": problems(configs=configs(swiglu_limits=st.sampled_from((0.5, 2.0)))),
    "bf16_weights": problems(configs=configs(
        x_dtypes=st.just("bfloat16"), weight_dtypes=st.just("bfloat16"))),
    "fp16_weights": problems(configs=configs(
        x_dtypes=st.just("float16"), weight_dtypes=st.just("float16"))),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_correct_agrees_with_oracle(family: str) -> None:
    @given(FAMILIES[family])
    def agrees(problem: Problem) -> None:
        assert disagreement(problem, correct) is None

    agrees()


# ---- 2. every mutant differs from the oracle on a witness --------------------------------


def one_token(x_row: list[float], w1_row1: list[int], s1: list[float]) -> Problem:
    """EP=1, E=1, top_k=1, K=32, I=2: one token whose SwiGLU input h is set by hand.

    ``x = [127, x_row..., 0...]`` quantises with σ1 = 1 exactly, so ``h = fp16(q[1]·w1_row1·s1)``
    for the columns (gate0, gate1, up0, up1). weight2 passes ``q2[1]`` to every output
    channel: ``y = q2[1] · σ2``.
    """
    k = 32
    x = np.zeros((1, k), dtype=np.float32)
    x[0, 0] = 127
    x[0, 1 : 1 + len(x_row)] = x_row
    w1 = np.zeros((1, k, 4), dtype=np.int8)
    w1[0, 1] = w1_row1
    w2 = np.zeros((1, 2, k), dtype=np.int8)
    w2[0, 1] = 1
    rank = RankInputs(
        x=x.astype(ml_dtypes.bfloat16), expert_idx=np.zeros((1, 1), np.int32),
        probs=np.ones((1, 1), np.float32), w1=[w1], w2=[w2],
        scale1=[np.array([s1], np.float32)], scale2=[np.ones((1, k), np.float32)],
    )
    return Problem([rank])


def cfg(**fields: Any) -> OpConfig:
    """A small configuration: EP=1, E=1, top_k=1, K=32, I=16, one token, unless overridden."""
    base: dict[str, Any] = dict(ep_size=1, experts_per_rank=1, top_k=1, hidden=32,
                                intermediate=16, tokens_per_rank=(1,))
    return OpConfig(**{**base, **fields})


def ids(*rows: list[list[int]], top_k: int = 1) -> list[np.ndarray]:
    """One int32 ``(M, top_k)`` expert_idx per rank from nested lists (``[]``: no tokens)."""
    return [np.array(r, dtype=np.int32).reshape(len(r), top_k) for r in rows]


WITNESSES: dict[str, Callable[[], Problem]] = {
    # routing: expert 1 lives on rank 0 (1 // 2), not on rank 1 (1 % 2)
    "expert_rank_modulo": lambda: random_problem(
        cfg(ep_size=2, experts_per_rank=2, tokens_per_rank=(1, 0)), expert_idx=ids([[1]], [])),
    # both ranks send to expert 0: rank 1's row overwrites rank 0's
    "receive_offset_off_by_one": lambda: random_problem(
        cfg(ep_size=2, tokens_per_rank=(1, 1)), expert_idx=ids([[0]], [[0]])),
    # an expert with exactly one row (1 = 16·0 + 1)
    "tile_remainder_dropped": lambda: random_problem(cfg()),
    "duplicates_deduplicated": lambda: random_problem(
        cfg(top_k=2), expert_idx=ids([[0, 0]], top_k=2)),
    "masked_slots_counted": lambda: random_problem(
        cfg(tokens_per_rank=(2,), masked=True), active_mask=[np.array([True, False])]),
    # capacity 2 keeps token 0's two slots, not (t0, k0) and (t1, k0)
    "tie_order_slot_major": lambda: random_problem(
        cfg(top_k=2, tokens_per_rank=(2,), max_output_size=2),
        expert_idx=ids([[0, 0], [0, 0]], top_k=2)),
    "zero_token_rank_crash": lambda: random_problem(cfg(ep_size=2, tokens_per_rank=(1, 0))),
    # receive index 2 is kept and lands on row 0, token 0's
    "truncate_at_greater": lambda: random_problem(cfg(tokens_per_rank=(3,), max_output_size=2)),
    "counts_after_truncation": lambda: random_problem(
        cfg(tokens_per_rank=(3,), max_output_size=1)),
    # rank 0 sends expert 0 nothing: rank 1's row is read one late (rank 0's token, expert 1)
    "empty_source_row_shift": lambda: random_problem(
        cfg(ep_size=2, tokens_per_rank=(1, 1)), expert_idx=ids([[1]], [[0]])),
    # numerics
    "swiglu_halves_swapped": lambda: random_problem(cfg()),
    # x[1] = 2.5 with σ1 = 1: a tie, 3 away from zero, 2 to even
    "quantise_half_even": lambda: one_token([2.5], [1, 1, 1, 1], [1, 1, 1, 1]),
    # x/σ1 = 2.75: rounds to 3, truncates to 2
    "quantise_truncated": lambda: one_token([2.75], [1, 1, 1, 1], [1, 1, 1, 1]),
    # random rows: some x/σ1 above 64 has a fraction in (1/4, 1/2), a bfloat16 tie
    "quantise_double_rounded": lambda: random_problem(cfg(hidden=256), seed=1),
    # two tokens, the second 64x smaller: the shared scale leaves it a few int8 levels
    "per_tensor_activation_scale": lambda: random_problem(
        cfg(tokens_per_rank=(2,)), seed=1,
        x=[np.array([[1.0] * 32, [2.0**-6] * 31 + [0.5]], dtype=ml_dtypes.bfloat16)]),
    # h = (gate 127, 20 | up 1, 0.125): a = (127, 2.5), requantised at 127/127 = 1: a tie
    "requantise_half_away": lambda: one_token([1], [127, 20, 1, 1], [1, 1, 1, 0.125]),
    # h = (gate 120, 20 | up 1, 3): a = (120, 60); 60·(127/120) and 60/(120/127) round apart
    "requantise_by_division": lambda: one_token([1], [120, 20, 1, 3], [1, 1, 1, 1]),
    "per_token_scale": lambda: random_problem(cfg()),
    # fp16 out keeps 11 significant bits, a bf16 accumulator 8
    "combine_bf16_accumulator": lambda: random_problem(cfg(top_k=2, x_dtype="float16")),
    # three slots with one y: (y − y) + y·2⁻³⁰ in k order, (y·2⁻³⁰ − y) + y = 0 in reverse
    "combine_reverse_order": lambda: random_problem(
        cfg(top_k=3), expert_idx=ids([[0, 0, 0]], top_k=3),
        probs=[np.array([[1, -1, 2**-30]], np.float32)]),
    "probs_renormalised": lambda: random_problem(
        cfg(top_k=2), probs=[np.array([[0.25, 0.25]], np.float32)]),
    "probs_ignored": lambda: random_problem(cfg(top_k=2)),
    "fp16_intermediate_skipped": lambda: random_problem(cfg()),
    "clamp_wrong_half": lambda: random_problem(cfg(swiglu_limit=0.5)),
    "zero_row_nan": lambda: random_problem(cfg(), x=[np.zeros((1, 32), ml_dtypes.bfloat16)]),
    # resources
    "single_expert_list_as_stacked": lambda: random_problem(
        cfg(ep_size=2, tokens_per_rank=(1, 0)), expert_idx=ids([[1]], [])),
    "list_read_reversed": lambda: random_problem(cfg(experts_per_rank=2, weight_form="list")),
    # S = EP·E = 40: rank 3's row spans words 120..159; words 128..159 (experts 8..39) are in a
    # 512-byte block holding none of its polled words
    # any non-contiguous weights; contiguous ones hide the bug
    "weights_read_as_contiguous": lambda: random_problem(cfg(), layout="fortran"),
    "pre_fix_count_stride": lambda: random_problem(
        cfg(ep_size=4, experts_per_rank=10, tokens_per_rank=(0, 0, 0, 1)),
        expert_idx=ids([], [], [], [[8]])),
}


def test_every_mutant_has_a_witness() -> None:
    assert sorted(WITNESSES) == sorted(MUTANTS)
    assert len(MUTANTS) >= 20


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_mutant_differs_where_correct_agrees(name: str) -> None:
    problem = WITNESSES[name]()
    assert disagreement(problem, correct) is None
    assert disagreement(problem, MUTANTS[name]) is not None


def test_mutants_are_documented() -> None:
    for name, mutant in MUTANTS.items():
        doc = type(mutant).__doc__ or ""
        assert len(doc.split()) >= 12, f"{name} needs a docstring naming its bug class"


# ---- 3. the benchmark script cannot rot ------------------------------------------------


def test_power_smoke(tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    assert power.main(["--quick", "--no-shrink", "--budget", "5", "--mutants", "probs_ignored",
                       "--out", str(out)]) == 0
    text = out.read_text()
    assert "| probs_ignored | numerics | 1/1 |" in text
    assert "| correct | — | 0/1 |" in text
    assert "examples/s" in text and "GEMM floor" in text
