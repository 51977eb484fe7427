"""The row test's "Rows together" (:mod:`oracle.judge.rowtest`): the sum of the rows' squared
projections, each in units of its legitimate spread, against a sound limit. It catches an
error spread thinly over every row that no single row's projection shows, passes the
legitimate kernels, and counts bitwise-equal tokens as one variable (without that, equal
rows' equal errors would add up as if independent). "Rows in line", the same projections
added with their signs, catches an error that moves every row the same way (an output scale)
where neither of the others does, and its limit combines parts that share their variables
by Hölder's inequality."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import numpy as np
import pytest

import oracle
import oracle.judge.rowtest as rowtest
from oracle.judge.rowtest import row_thresholds
from spec import OpConfig, Problem, random_problem

Array = np.ndarray[Any, Any]


def _problem(x: Array | None = None) -> Problem:
    """64 tokens on one rank (int8 weights, bf16 x): enough rows for the sum to matter."""
    cfg = OpConfig(ep_size=1, experts_per_rank=2, top_k=2, hidden=256, intermediate=128,
                   tokens_per_rank=(64,))
    return random_problem(cfg, seed=3, **({} if x is None else {"x": [x]}))


def _scaled(outs: list[Array], factor: float, rows: slice = slice(None)) -> list[Array]:
    scaled = [o.copy() for o in outs]
    for o, s in zip(scaled, outs):
        o[rows] = (s[rows].astype(np.float32) * factor).astype(s.dtype)
    return scaled


def test_an_output_two_percent_high_on_every_row_is_caught_by_the_rows_together() -> None:
    """Every row 2 % high: each row's projection stays within its threshold (about 0.6 of
    it), their sum of squares does not; the same error on one row passes, and the
    legitimate kernels pass both tests."""
    problem = _problem()
    th = row_thresholds(problem, oracle.run(problem, numerics="ideal"))
    model = [r.out for r in oracle.run(problem).ranks]
    everywhere = th.judge(_scaled(model, 1.02))
    assert not everywhere.ok and everywhere.projection < 1 < everywhere.together
    assert "the rows together" in everywhere.message
    assert "false-alarm probability 1e-09" in everywhere.message
    assert th.judge(_scaled(model, 1.02, slice(5, 6))).ok
    for kernel in ("ascend-a3", "vllm-triton"):
        verdict = th.judge([r.out for r in oracle.run(problem, numerics=kernel).ranks])
        assert verdict.ok and max(verdict.projection, verdict.together, verdict.line) < 0.3, (
            kernel, verdict)


def test_an_output_one_percent_off_on_every_row_is_caught_in_line_alone() -> None:
    """Every row 1 % high, or 1 % low: neither the worst row's projection (about 0.3 of its
    threshold) nor the rows' sum of squares (about 0.8 of its limit) rejects it; their signed
    sum does (about 1.4 of its limit), and the verdict names the common relative error. The
    same judge without "Rows in line" (its limit infinite, a judge's mutant) passes it."""
    problem = _problem()
    th = row_thresholds(problem, oracle.run(problem, numerics="ideal"))
    model = [r.out for r in oracle.run(problem).ranks]
    without = dataclasses.replace(th, line_limits=(math.inf, math.inf))
    for factor in (1.01, 0.99):
        verdict = th.judge(_scaled(model, factor))
        assert not verdict.ok and max(verdict.projection, verdict.together) < 1 < verdict.line
        assert "in line" in verdict.message, verdict.message
        found = re.search(r"off along themselves by ([-+0-9.e]+) x \|row\|", verdict.message)
        assert found and float(found.group(1)) == pytest.approx(factor - 1, abs=0.002)
        assert verdict.common == pytest.approx(factor - 1, abs=0.002)
        assert without.judge(_scaled(model, factor)).ok


def test_compare_rejects_it_in_ideal_mode() -> None:
    problem = _problem()
    result = oracle.run(problem)
    outs = _scaled([r.out for r in result.ranks], 1.02)
    verdict = oracle.compare(problem, [(o, r.expert_token_nums)
                                       for o, r in zip(outs, result.ranks)], numerics="ideal")
    assert not verdict.ok and "rows together" in verdict.message


def test_equal_tokens_count_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """64 copies of one token err alike: an output whose rows are all 2 spreads off along
    the ideal row (one legitimate draw at 2σ, repeated) passes; counting the copies as
    independent rows (their multiplicity dropped, a judge's mutant) rejects it."""
    x = np.repeat(_problem().ranks[0].x[:1], 64, axis=0)
    problem = _problem(x)
    ideal = oracle.run(problem, numerics="ideal")

    def two_spreads(th: rowtest.RowThresholds) -> list[Array]:
        return [(want + ((shift + 2 * spread) * norm)[:, None] * w).astype(np.float32)
                for want, w, norm, spread, shift in zip(th.ideal, th.direction, th.norm,
                                                        th.spread, th.shift)]

    right = row_thresholds(problem, ideal)
    monkeypatch.setattr(rowtest, "_equal_rows", lambda x: np.ones(x.shape[0]))
    monkeypatch.setattr(rowtest, "_shared_rows", lambda x, group, *_: (
        np.ones(int(group.max(initial=-1)) + 1), np.arange(int(group.max(initial=-1)) + 1)))
    counted_apart = row_thresholds(problem, ideal)
    outs = two_spreads(counted_apart)
    assert right.judge(outs).ok
    verdict = counted_apart.judge(outs)
    assert not verdict.ok and verdict.projection < 1 < min(verdict.together, verdict.line)


def test_the_limit_is_chernoffs_for_a_chi_square() -> None:
    """``n/2·(x − 1 − ln x) = ln(1/δ)`` at ``x = q/n``; one row needs more than the
    per-row Gaussian quantile, many rows little more than their count."""
    for rows, delta in ((1, 1e-9), (16, 1e-10), (4096, 1e-3)):
        x = rowtest._chi_square_limit(rows, delta) / rows
        assert rows / 2 * (x - 1 - np.log(x)) == pytest.approx(np.log(1 / delta), rel=1e-9)
    assert rowtest._chi_square_limit(1, 1e-9) > 2 * np.log(2 / 1e-9)
    assert rowtest._chi_square_limit(4096, 1e-3) < 1.2 * 4096


def test_parts_that_share_their_variables_are_combined_by_hoelder() -> None:
    """``X`` sub-Gaussian with proxy ``V`` and ``Y = k·X`` (sub-gamma with ``ν = k²V``, no
    scale): ``X + Y = (1 + k)·X``, whose tail bound is ``(1 + k)·sqrt(2V·L)``. Taken as
    independent parts (:func:`_chernoff`, as a row's remainder is) the bound is
    ``sqrt(2(1 + k²)V·L)``, below it; Hölder's combination (:func:`_dependent_chernoff`,
    which "Rows in line" uses) never is, and meets it where ``p = 1 + k`` is on its grid."""
    var, log = 3.0, 20.0
    for k in (0.25, 1.0, 2.0):
        held = float(rowtest._dependent_chernoff(np.asarray(var), np.asarray(k * k * var),
                                                 np.asarray(0.0), log))
        independent = float(rowtest._chernoff(np.asarray(var), np.asarray(k * k * var),
                                              np.asarray(0.0), log))
        true = (1 + k) * math.sqrt(2 * var * log)
        assert independent < 0.95 * true
        assert held == pytest.approx(true, rel=1e-12) and held >= true * (1 - 1e-15)
    # no remainder: the sub-Gaussian bound itself, not its Hölder widening
    assert float(rowtest._dependent_chernoff(np.asarray(var), np.asarray(0.0), np.asarray(0.0),
                                             log)) == math.sqrt(2 * var * log)


def _chopped_tile_sums(a: Array, w: Array, bits: int) -> Array:
    """``a @ w`` with the partial sum chopped toward zero to ``bits`` significant bits after
    every add, in float32 (tests/test_fp8.py's ``TruncatedDotGemm`` on one tile)."""
    mask = np.uint32((0xFFFFFFFF << (24 - bits)) & 0xFFFFFFFF)
    part = np.zeros((a.shape[0], w.shape[1]), np.float32)
    for j in range(a.shape[1]):
        part = part + a[:, j, None] * w[j]
        part = (part.view(np.uint32) & mask).view(np.float32)
    return part


def test_the_truncation_shrink_covers_a_chopping_accumulator() -> None:
    """:func:`rowtest._truncation_shrink` bounds how much a tile's sum shrinks along itself
    when every partial sum is chopped to 13 bits: over 128 x 256 tiles of 128 and of 40
    float32 products (every add chops), the shrink ``−Σ(chopped − exact)·exact / Σ exact²``
    is 0.72 of it (the chop's mean is about 0.72 of its bound ``2^-13·|S|``: partial sums
    spread over their binade); the shrink of a single rounding, ``2^-13`` (a mutant
    bound), does not cover it."""
    rng = np.random.default_rng(0)
    for m in (128, 40):
        a = rng.standard_normal((128, m)).astype(np.float32)
        w = rng.standard_normal((m, 256)).astype(np.float32)
        exact = a.astype(np.float64) @ w.astype(np.float64)
        chopped = _chopped_tile_sums(a, w, rowtest.FP8_DOT_BITS).astype(np.float64)
        shrink = -((chopped - exact) * exact).sum() / (exact**2).sum()
        bound = rowtest._truncation_shrink(m)
        assert 2.0**-rowtest.FP8_DOT_BITS < 0.6 * bound < shrink < 0.8 * bound, (m, shrink)


def test_a_truncating_fp8_kernel_stays_inside_the_line_as_rows_grow(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The 13-bit truncating FP8 kernel (``TruncatedDotGemm``) at K = 1024, I = 256, 512 rows:
    its rows in line at about 0.16 of the limit below; without the truncation's slack (the
    shrink taken as 0, a judge's mutant) at about 0.47, a ratio that grows like the square
    root of the rows (about 1 at 2 500 rows), while the profile's own model stays at 0.1 or
    below either way."""
    from test_fp8 import PROFILE, TRUNCATED

    cfg = OpConfig(ep_size=2, experts_per_rank=4, top_k=8, hidden=1024, intermediate=256,
                   tokens_per_rank=(256, 256), weight_dtype="float8_e4m3fn")
    problem = random_problem(cfg, seed=0)
    ideal = oracle.run(problem, numerics="ideal")
    outs = {p.name: [r.out for r in oracle.run(problem, numerics=oracle.Numerics(
        kernel=p)).ranks] for p in (PROFILE, TRUNCATED)}
    right = row_thresholds(problem, ideal)
    monkeypatch.setattr(rowtest, "_truncation_shrink", lambda n: 0.0)
    without = row_thresholds(problem, ideal)
    truncated = right.judge(outs[TRUNCATED.name])
    assert truncated.ok and truncated.line < 0.25
    assert without.judge(outs[TRUNCATED.name]).line > 0.4
    assert max(right.judge(outs[PROFILE.name]).line,
               without.judge(outs[PROFILE.name]).line) < 0.12


def test_the_lines_proxy_takes_a_shared_variable_once_with_its_signs() -> None:
    """Two rows share one activation variable (``α = ±1``, ``c = 1``) and each has an own
    part of proxy 1, so each row's spread counts the shared one twice: ``σ² = 1 + 2``.
    Coefficients of one sign: the line's proxy is the vector bound's ``n = 2`` exactly;
    of opposite signs: only the own parts, 2/3. Taken as two variables (a judge's mutant
    that forgets the sharing) it would be 4/3, below the truth when the signs agree. The
    coefficients' own error (``widen``) adds ``γ·Σ|α|/σ`` before squaring."""
    rows, own = np.ones(2, dtype=bool), np.ones(2)
    outright = np.full(2, math.sqrt(3.0))
    owner, bound = np.array([0, 1]), np.ones(2)

    def proxy(alpha: list[float], variable: list[int], widen: float = 1.0) -> float:
        return rowtest._line_proxy(rows, outright, own, widen, owner, np.array(variable),
                                   np.array(alpha), bound, 1.0)

    assert proxy([1.0, 1.0], [0, 0]) == pytest.approx(2.0)
    assert proxy([1.0, -1.0], [0, 0]) == pytest.approx(2 / 3)
    assert proxy([1.0, 1.0], [0, 1]) == pytest.approx(4 / 3)
    assert proxy([1.0, 1.0], [0, 1]) < proxy([1.0, 1.0], [0, 0])
    gamma = 0.01
    widened = 2 / 3 + ((0 + gamma * 2 / math.sqrt(3)) / (1 + gamma)) ** 2
    assert proxy([1.0, -1.0], [0, 0], 1 + gamma) == pytest.approx(widened)
