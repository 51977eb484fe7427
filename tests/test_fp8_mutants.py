"""The remaining FP8 block-scale bugs of issue 25 (``docs/contract/formats.md``, "Real bugs"),
beside those of ``tests/test_fp8.py`` and built from its profiles: each is found by the search
(a slow test, both outcomes) and its minimum is judged directly here (both outcomes, cheap).

- The scale window advanced four times too fast for tiles narrower than 128 columns
  (ROCm/rocm-libraries PR #7920, at intermediate size 160).
- The clamp before the e4m3 cast missing (ml_dtypes: NaN beyond 464), under scales rounded
  **down** to a power of two (OCP MX's floor rule, triton_kernels' round-down mode,
  formats.md, MXFP4): the rule that needs the clamp, since ``amax/σ`` reaches 896. With scales
  from the group's amax the clamp never acts (``tests/test_fp8.py``).
- GEMM1's output scale never written, all-zero output with return code 0 (flashinfer #5053).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
from gate_search import model_impl, shrunk
from hypothesis import HealthCheck, Phase, settings
from test_fp8 import (
    FP8_PROBLEMS,
    PROFILE,
    TiledGemm,
    Unclamped,
    _rejected,
    _with,
    _witness,
)

import oracle
from oracle import Numerics
from oracle.model.kernels import BlockGemm, Env, GroupQuantiser, KernelProfile, _apply_epilogue

Array = np.ndarray[Any, Any]
F32 = np.float32
#: The search of tests/test_fp8.py without Hypothesis' explain phase (most of its time).
SEARCH = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck),
                  phases=[Phase.explicit, Phase.generate, Phase.shrink])


# ---------------------------------------------------------------------------------------------
# The scale window advanced four times too fast


@dataclasses.dataclass(frozen=True)
class FastWindowGemm(TiledGemm):
    """ROCm PR #7920's class: K tiles of ``tile`` = 32 columns, the scale window advanced once
    per **tile** instead of once per 128 columns (4× too fast); a window past the last block
    reads the last one [inferred: the kernel reads beyond the row]. Tile sums in float32, the
    rest as :class:`BlockGemm`. ``fast=False``: the window right (a legitimate tiled kernel)."""

    tile: int = 32
    fast: bool = True

    def __call__(self, q: Any, sigma: Any, w: Array, w_scale: Array, slot: Array | None,
                 x_dtype: Any) -> Any:
        rows, k = q.mid.shape
        sw = self.scales(w_scale, k, w.shape[1])
        acc = np.zeros((rows, w.shape[1]), F32)
        for t, start in enumerate(range(0, k, self.tile)):
            cols = slice(start, start + self.tile)
            part = (q.mid[:, cols].astype(np.float64) @ w[cols].astype(np.float64)).astype(F32)
            b = min(t, sw.shape[0] - 1) if self.fast else start // self.block
            acc = (acc + (part * sigma.mid[:, b, None]).astype(F32) * sw[b]).astype(F32)
        return _apply_epilogue(self.epilogue, Env(acc), col=None, row=None, slot=slot,
                               x_dtype=x_dtype, ftz=False)


def _tiled(fast: bool) -> KernelProfile:
    return _with(PROFILE, f"tile 32{', fast window' if fast else ''}",
                 gemm1=FastWindowGemm(("x",), dot_bits=13, fast=fast),
                 gemm2=FastWindowGemm(("slot", "x"), dot_bits=13, fast=fast))


def test_a_scale_window_four_times_too_fast_is_rejected() -> None:
    """ROCm's shape, I = 160 (EP=1 E=1 top_k=1 K=64 M=[4]): GEMM2's K has two blocks, the
    second of 32 columns, and tiles 1–3 read its activation and weight scales. The witness
    plants amax 8 in every token (its group's scale far from the other's). Rejected by the row
    test, at a ratio of 1.63: the envelope is wide and the bug's margin thin (1.0–2.3 over
    seeds and shapes), the kind accuracy evals find days later. The same tiles with the window
    right pass; where K is one block (I = 128) the bug changes no bit."""
    witness = _witness("1 1 1 64 160 4", amax=8.0)
    assert _rejected(model_impl(_tiled(True)), PROFILE, witness)
    assert not _rejected(model_impl(_tiled(False)), PROFILE, witness)
    one_block = _witness("1 1 1 64 128 4", amax=8.0)
    fast, right = (model_impl(_tiled(f))(one_block)[0][0] for f in (True, False))
    assert np.array_equal(fast.view(np.uint16), right.view(np.uint16))


@pytest.mark.slow
def test_search_kills_a_scale_window_four_times_too_fast() -> None:
    assert shrunk(model_impl(_tiled(False)), PROFILE, FP8_PROBLEMS, SEARCH) is None
    found = shrunk(model_impl(_tiled(True)), PROFILE, FP8_PROBLEMS, SEARCH)
    assert found is not None
    c = found.config
    assert c.hidden > 128 or c.intermediate > 128  # only a K of two blocks or more shows it


# ---------------------------------------------------------------------------------------------
# The missing clamp, under scales rounded down


@dataclasses.dataclass(frozen=True)
class FloorUe8m0(GroupQuantiser):
    """σ = amax/448 rounded **down** to a power of two (OCP MX's floor rule; triton_kernels'
    round-down mode truncates, formats.md): ``amax/σ`` reaches 896 and the clamp saturates it
    at 448. A legitimate kernel of its own profile."""

    def _sigma(self, amax: Array) -> Array:
        s = (np.maximum(amax, F32(self.amax_floor)) / F32(448)).astype(F32)
        return np.asarray((s.view(np.uint32) & np.uint32(0x7F800000)).view(F32))


@dataclasses.dataclass(frozen=True)
class UnclampedFloor(Unclamped, FloorUe8m0):
    """The same without the clamp: NaN wherever ``a/σ`` rounds beyond 464."""


FLOOR = _with(PROFILE, "floor-ue8m0", quantise=FloorUe8m0(ue8m0=True, div_ulps=2),
              requantise=FloorUe8m0(ue8m0=True, div_ulps=2))
UNCLAMPED = _with(FLOOR, "floor-ue8m0, no clamp", quantise=UnclampedFloor(ue8m0=True),
                  requantise=UnclampedFloor(ue8m0=True))


def test_a_missing_clamp_is_reported_non_finite_at_its_rows() -> None:
    """The witness plants amax = 7.5 = 448·1.0714·2^-6 in every token's first group: σ rounds
    down to 2^-6 and 7.5/2^-6 = 480 is NaN unclamped (448 clamped). The judge names the first
    NaN row of the first rank that has one, and counts that rank's NaN values; the clamped
    kernel passes."""
    witness = _witness("1 2 1 64 32 3", amax=7.5)
    assert not _rejected(model_impl(FLOOR), FLOOR, witness)
    got = model_impl(UNCLAMPED)(witness)
    verdict = oracle.compare(witness, got, numerics=Numerics(kernel=FLOOR))
    assert not verdict.ok and verdict.stage == "non_finite"
    nan_rows = [np.flatnonzero(np.isnan(out).any(axis=1)) for out, _ in got]
    rank = next(r for r, rows in enumerate(nan_rows) if rows.size)
    assert verdict.rank == rank and verdict.where is not None
    assert verdict.where[0] == nan_rows[rank][0]
    assert f"({int(np.isnan(got[rank][0]).sum())} such values)" in verdict.message


@pytest.mark.slow
def test_search_kills_a_missing_clamp() -> None:
    assert shrunk(model_impl(FLOOR), FLOOR, FP8_PROBLEMS, SEARCH) is None
    found = shrunk(model_impl(UNCLAMPED), FLOOR, FP8_PROBLEMS, SEARCH)
    assert found is not None
    verdict = oracle.compare(found, model_impl(UNCLAMPED)(found), numerics=Numerics(kernel=FLOOR))
    assert verdict.stage == "non_finite"


# ---------------------------------------------------------------------------------------------
# GEMM1's output scale never written


@dataclasses.dataclass(frozen=True)
class UnwrittenScaleGemm(BlockGemm):
    """flashinfer #5053's class: the GEMM's output scale left in its zero-initialised buffer,
    so every partial sum is scaled by 0 and the whole output is 0, return code 0."""

    def scales(self, w_scale: Array, k: int, n: int) -> Array:
        return np.zeros_like(super().scales(w_scale, k, n))


UNWRITTEN = _with(PROFILE, "gemm1 scale unwritten",
                  gemm1=UnwrittenScaleGemm(("x",), dot_bits=13))


def test_an_unwritten_gemm1_scale_is_rejected() -> None:
    """EP=1 E=1 top_k=1 K=64 I=32 M=[1]: the output is all zero where the model's is not."""
    witness = _witness("1 1 1 64 32 1")
    got = model_impl(UNWRITTEN)(witness)
    assert not np.any(got[0][0].astype(F32))
    verdict = oracle.compare(witness, got, numerics=Numerics(kernel=PROFILE))
    assert not verdict.ok and verdict.stage == "out"
    assert not _rejected(model_impl(PROFILE), PROFILE, witness)


@pytest.mark.slow
def test_search_kills_an_unwritten_gemm1_scale() -> None:
    found = shrunk(model_impl(UNWRITTEN), PROFILE, FP8_PROBLEMS, SEARCH)
    assert found is not None
    c = found.config
    assert (c.ep_size, c.experts_per_rank, c.top_k) == (1, 1, 1)  # no routing needed
