"""Positive controls: ``oracle.run(..., numerics="ideal")`` against Hugging Face transformers MoE
blocks (Mixtral, Qwen3-MoE, DeepSeek-V3), each with its three expert kernels, on CPU in float32.

The weight mapping and the dtype handling are stated once, in :mod:`.hf_mapping`.

**Tolerance.** The block evaluates, per token and slot ``s`` with expert ``e``,
``h = W1[e]ᵀx`` (gate half ``g``, up half ``v``), ``a = silu(g)·v``, ``y = W2[e]ᵀa`` and
``out = Σ_s p_s·y_s`` in float32 (unit roundoff ``u = 2⁻²⁴``); the ideal oracle evaluates the same
expression from the same values in float64 (``u = 2⁻⁵³``). For either, with
``γ_n = n·u / (1 − n·u)`` (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed.,
Lemma 3.1 and eq. (3.5): any summation order, with or without FMA), the computed values satisfy,
elementwise:

1. ``|ĥ − h| ≤ δh = γ_K · |x|ᵀ|W1|`` (dot products of length K);
2. ``â = silu(ĝ)·v̂·(1 + θ)``, ``|θ| ≤ γ_5``: SiLU is ``x / (1 + exp(−x))`` with ``exp`` within
   1 ulp (= 2u) plus one addition and one division, 4 roundings' worth (asserted on this
   machine by :func:`test_silu_rounding_assumption`), and one multiplication by ``v``. SiLU is
   Lipschitz with ``L = sup|silu'| = 1.0998…`` (at x ≈ 2.3994), bounded by 1.1. Hence
   ``|â − a| ≤ δa = L·δg·(|v| + δv) + |silu(g)|·δv + γ_5·(|silu(g)| + L·δg)·(|v| + δv)``;
3. ``|ŷ − y| ≤ δy = γ_I · |â|ᵀ|W2| + δaᵀ|W2|`` with ``|â| ≤ (1 + γ_5)(|silu(g)| + L·δg)(|v| + δv)``,
   and ``|ŷ| ≤ (1 + γ_I) · |â|ᵀ|W2|``;
4. the combine multiplies each ``ŷ_s`` by ``p_s`` and adds the top_k terms (the first onto an
   exact zero): ``|out̂ − out| ≤ δ = γ_topk · Σ_s |p_s||ŷ_s| + Σ_s |p_s|·δy_s``.

The routing weights, the tokens and the weights are identical on both sides (see the mapping),
so no other error enters. The oracle's float64 accumulator therefore agrees with the block within
``B = δ(2⁻²⁴) + δ(2⁻⁵³)``, and its output, rounded once to x's dtype (unit roundoff ``u_d``:
2⁻⁸ for bfloat16, 2⁻¹¹ for float16; absolute half-spacing ``s_d/2`` below the normal range),
within ``B + u_d·(|block| + B) + s_d/2``. Both are checked; the tests report the worst ratio
``|oracle − block| / bound``, which must be at most 1. ``B`` is a worst case (the measured
accumulator errors stay below 2 % of it) yet about 1e-4 of ``|out|``, so a wrong mapping (O(1)
errors) fails by orders of magnitude, as the mutant tests show.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="the transformers controls need torch: pip install -e '.[controls]'"
)
pytest.importorskip(
    "transformers",
    reason="the transformers controls need transformers: pip install -e '.[controls]'",
)

import ml_dtypes  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import oracle  # noqa: E402
from spec import DTYPES  # noqa: E402

from .hf_mapping import (  # noqa: E402
    BLOCK_KINDS,
    EXPERT_KERNELS,
    SIZE_MULTIPLE,
    BlockRun,
    TinyShape,
    build_block,
    run_block,
    stacked_weights,
    to_problem,
)

#: Unit roundoffs of the block's and the ideal oracle's arithmetic.
U_FLOAT32 = 2.0**-24
U_FLOAT64 = 2.0**-53
#: sup |silu'(x)| = 1.0998… (at x ≈ 2.3994), rounded up.
SILU_LIPSCHITZ = 1.1
#: Roundings' worth of error in one SiLU evaluation: exp within 1 ulp (2u), one add, one divide.
SILU_ROUNDINGS = 4

Mapping = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def gamma(n: int, u: float) -> float:
    """Higham's ``γ_n = n·u / (1 − n·u)``."""
    return n * u / (1 - n * u)


def error_bound(run: BlockRun, w1: np.ndarray, w2: np.ndarray, u: float) -> np.ndarray:
    """``δ`` of the module docstring: an elementwise bound (T, K) on ``|computed − exact|`` of
    ``out`` when the block's routed experts are evaluated in a format of unit roundoff ``u``."""
    x = run.x.astype(np.float64)
    w1g = w1.astype(np.float64)[run.expert_idx]  # (T, top_k, K, N)
    w2g = np.abs(w2.astype(np.float64)[run.expert_idx])  # (T, top_k, I, K)
    p = np.abs(run.probs.astype(np.float64))[..., None]
    k_hidden, i_size, top_k = x.shape[1], w2.shape[1], run.probs.shape[1]
    h = np.einsum("tc,tscn->tsn", x, w1g)
    dh = gamma(k_hidden, u) * np.einsum("tc,tscn->tsn", np.abs(x), np.abs(w1g))
    gate, up, dgate, dup = h[..., :i_size], h[..., i_size:], dh[..., :i_size], dh[..., i_size:]
    silu = np.abs(gate / (1 + np.exp(-gate)))
    big_silu, big_up = silu + SILU_LIPSCHITZ * dgate, np.abs(up) + dup
    g5 = gamma(SILU_ROUNDINGS + 1, u)
    da = SILU_LIPSCHITZ * dgate * big_up + silu * dup + g5 * big_silu * big_up
    a_abs = (1 + g5) * big_silu * big_up
    a_w2 = np.einsum("tsi,tsik->tsk", a_abs, w2g)
    dy = gamma(i_size, u) * a_w2 + np.einsum("tsi,tsik->tsk", da, w2g)
    y_abs = (1 + gamma(i_size, u)) * a_w2
    return np.asarray(gamma(top_k, u) * (p * y_abs).sum(axis=1) + (p * dy).sum(axis=1))


def agreement(run: BlockRun, w1: np.ndarray, w2: np.ndarray, result: oracle.Result) -> float:
    """The worst ratio ``|oracle − block| / bound`` over the oracle's float64 accumulator and its
    output in x's dtype (the two checks of the module docstring); at most 1 means agreement."""
    bound = error_bound(run, w1, w2, U_FLOAT32) + error_bound(run, w1, w2, U_FLOAT64)
    finfo: Any = ml_dtypes.finfo  # untyped
    dtype = finfo(run.x.dtype)
    unit, half_subnormal = float(dtype.eps) / 2, float(dtype.smallest_subnormal) / 2
    rounding = unit * (np.abs(run.out) + bound) + half_subnormal
    combined = np.concatenate(result.trace.combined)
    out = np.concatenate([r.out for r in result.ranks]).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = (
            np.abs(combined - run.out) / bound,
            np.abs(out - run.out) / (bound + rounding),
        )
    return max(float(np.nan_to_num(r, nan=np.inf).max(initial=0.0)) for r in ratios)


def correct_mapping(w1: np.ndarray, w2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return w1, w2


@dataclass(frozen=True)
class Case:
    """One control: a block kind and kernel, its tiny shape, the dtype, the simulated ranks'
    token counts (their number is EP), the TensorList form, and the seed of every value.
    ``repr(case)`` is a reproduction: ``evaluate(Case(...))``."""

    kind: str
    shape: TinyShape
    tokens_per_rank: tuple[int, ...]
    dtype: str = "bfloat16"
    kernel: str = "eager"
    weight_form: str = "stacked"
    seed: int = 0


def evaluate(case: Case, mapping: Mapping = correct_mapping) -> float:
    """Run the case's block, map it (through ``mapping`` after :func:`stacked_weights`), run the
    ideal oracle, and return :func:`agreement`."""
    block = build_block(
        case.kind, case.shape, dtype=case.dtype, seed=case.seed, kernel=case.kernel
    )
    rng = np.random.default_rng(case.seed)
    tokens = sum(case.tokens_per_rank)
    x = rng.standard_normal((tokens, case.shape.hidden)).astype(DTYPES[case.dtype])
    run = run_block(block, x)
    w1, w2 = mapping(*stacked_weights(block, dtype=case.dtype))
    problem = to_problem(
        run, w1, w2, tokens_per_rank=case.tokens_per_rank, weight_form=case.weight_form
    )
    return agreement(run, w1, w2, oracle.run(problem, numerics="ideal"))


def assert_agrees(case: Case) -> None:
    ratio = evaluate(case)
    assert ratio <= 1, (
        f"oracle.run(numerics='ideal') vs transformers {case.kind} ({case.kernel} experts): "
        f"got |oracle - block| = {ratio:.3g} x the float32 bound; expected <= 1; "
        f"reproduce: evaluate({case!r})"
    )


SHAPE = TinyShape(hidden=32, intermediate=16, experts=8, top_k=2)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("kernel", EXPERT_KERNELS)
@pytest.mark.parametrize("kind", sorted(BLOCK_KINDS))
def test_block_agrees_with_ideal_oracle(kind: str, kernel: str, dtype: str) -> None:
    assert_agrees(Case(kind, SHAPE, (16,), dtype=dtype, kernel=kernel))


@pytest.mark.parametrize("kind", sorted(BLOCK_KINDS))
def test_expert_parallel_split_keeps_every_token(kind: str) -> None:
    """Four simulated ranks with two experts each, uneven token counts including an empty rank:
    every token's row still equals the single-device block's (per-expert TensorLists)."""
    assert_agrees(Case(kind, SHAPE, (5, 0, 3, 8), weight_form="list"))


@st.composite
def cases(draw: st.DrawFn) -> Case:
    """Tiny controls of every kind: structure first (kind, kernel, EP, experts, top_k, sizes),
    then the token split (cut points, so the total is at least 1 by construction), then the
    seed."""
    kind = draw(st.sampled_from(sorted(BLOCK_KINDS)))
    kernel = draw(st.sampled_from(EXPERT_KERNELS))
    step = SIZE_MULTIPLE[kernel]
    ep = draw(st.integers(1, 4))
    min_local = -(-BLOCK_KINDS[kind].min_experts // ep)
    e_local = draw(st.integers(min_local, max(min_local, 4)))
    experts = ep * e_local
    shape = TinyShape(
        hidden=step * draw(st.integers(1, 48 // step)),
        intermediate=step * draw(st.integers(1, 24 // step)),
        experts=experts,
        top_k=draw(st.integers(1, min(experts, 4))),
    )
    tokens = draw(st.integers(1, 12))
    cuts = sorted(draw(st.lists(st.integers(0, tokens), min_size=ep - 1, max_size=ep - 1)))
    split = tuple(int(c) for c in np.diff([0, *cuts, tokens]))
    form = draw(st.sampled_from(["stacked", "list"])) if e_local > 1 else "stacked"
    return Case(
        kind, shape, split,
        dtype=draw(st.sampled_from(["bfloat16", "float16"])),
        kernel=kernel,
        weight_form=form,
        seed=draw(st.integers(0, 2**16)),
    )


@settings(deadline=None)  # torch's first call of a kernel is slow; timing is not the subject
@given(cases())
def test_block_agrees_on_generated_tiny_configs(case: Case) -> None:
    assert_agrees(case)


def gate_up_swapped(w1: np.ndarray, w2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reads ``gate_up_proj`` as [up; gate]."""
    i_size = w2.shape[1]
    return np.concatenate([w1[..., i_size:], w1[..., :i_size]], axis=-1), w2


def down_not_transposed(w1: np.ndarray, w2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Passes ``down_proj[g]`` (K, I) as ``w2[g]`` (fits the Problem only when K == I)."""
    return w1, np.ascontiguousarray(np.swapaxes(w2, 1, 2))


def ranks_swapped(w1: np.ndarray, w2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """At EP = 2, gives rank 0 the experts of rank 1 and vice versa."""
    half = w1.shape[0] // 2
    return np.roll(w1, half, axis=0), np.roll(w2, half, axis=0)


@pytest.mark.parametrize("mutant", [gate_up_swapped, down_not_transposed, ranks_swapped])
@pytest.mark.parametrize("kind", sorted(BLOCK_KINDS))
def test_wrong_weight_mapping_fails_the_control(kind: str, mutant: Mapping) -> None:
    """The same case passes with the mapping of :mod:`.hf_mapping` and fails with a deliberately
    wrong one (by a factor of about 1e5 here). K == I so that the untransposed down projection
    fits the Problem; EP = 2 so that swapping the ranks' experts moves them."""
    case = Case(kind, TinyShape(hidden=16, intermediate=16, experts=4, top_k=2), (5, 3))
    assert evaluate(case) <= 1
    assert evaluate(case, mutant) > 1


def test_silu_rounding_assumption() -> None:
    """The bound's premise: torch's float32 SiLU on this machine is within SILU_ROUNDINGS·u of
    the exact value (relative), over a dense grid of the range the controls reach."""
    grid = torch.linspace(-40.0, 40.0, 200_001, dtype=torch.float32)
    got = torch.nn.functional.silu(grid).double().numpy()
    x = grid.double().numpy()
    exact = x / (1 + np.exp(-x))
    nonzero = exact != 0
    worst = np.max(np.abs(got - exact)[nonzero] / np.abs(exact)[nonzero]) / U_FLOAT32
    assert worst <= SILU_ROUNDINGS, f"torch silu is off by {worst:.2f} u; the bound assumes <= 4"
