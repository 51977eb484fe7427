"""Numerics mutants: defects in the W8A8 arithmetic and the combine (§6).

Each class is a :class:`DispatchFfnCombine` with one stage changed; its docstring names the bug
class and its source where one exists.
"""

from __future__ import annotations

import numpy as np

from benchmarks.mutants.correct import (
    F32,
    QMAX,
    DispatchFfnCombine,
    round_half_away,
    round_half_even,
)
from spec import DTYPES

__all__ = [
    "ClampWrongHalf",
    "CombineBf16Accumulator",
    "CombineReverseOrder",
    "Fp16IntermediateSkipped",
    "PerTensorActivationScale",
    "PerTokenScale",
    "ProbsIgnored",
    "ProbsRenormalised",
    "QuantiseDoubleRounded",
    "QuantiseHalfEven",
    "QuantiseTruncated",
    "RequantiseByDivision",
    "RequantiseHalfAway",
    "SwigluHalvesSwapped",
    "ZeroRowNaN",
]


class SwigluHalvesSwapped(DispatchFfnCombine):
    """SwiGLU halves swapped: up taken as the first I columns, gate as the last (weight1 is
    gate first, then up, §2; checkpoints differ on this order)."""

    def gate_up(self, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        gate, up = super().gate_up(h)
        return up, gate


class QuantiseHalfEven(DispatchFfnCombine):
    """Token quantisation rounds ties to even where the kernel rounds half away from zero
    (§6 step 1): differs exactly on rows with ``x/σ1`` at n + ½."""

    round_tokens = staticmethod(round_half_even)


class QuantiseTruncated(DispatchFfnCombine):
    """Token quantisation truncates ``x/σ1`` toward zero instead of rounding it (§6 step 1): a
    C cast ``(int8_t)v`` where a rounding cast was due. Every int8 value moves toward zero by
    the fraction it drops (half a step on average): a bias, not noise."""

    round_tokens = staticmethod(np.trunc)


class QuantiseDoubleRounded(DispatchFfnCombine):
    """Token quantisation rounds twice: ``x/σ1`` is stored in bfloat16 (a division done in the
    activations' dtype, as ``x.bfloat16() / scale`` gives in torch) and only then rounded to
    int8 (§6 step 1 rounds the float32 quotient once). Above 64 bfloat16 keeps half steps, so
    a quotient with a fraction in (¼, ½) becomes a tie and moves one step away from zero."""

    def quantise_tokens(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        sigma = np.abs(x).max(axis=1) / QMAX
        with np.errstate(divide="ignore", invalid="ignore"):
            stored = (x / sigma[:, None]).astype(DTYPES["bfloat16"]).astype(F32)
        q = self.round_tokens(stored)
        return np.where(sigma[:, None] > 0, q, F32(0)).astype(F32), sigma


class PerTensorActivationScale(DispatchFfnCombine):
    """One activation scale for every token of the call (the largest |x| over all of them)
    instead of one per token (§6 step 1 is per token): a token far smaller than the largest
    one keeps only a few int8 levels, or none."""

    def quantise_tokens(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        sigma = np.full(x.shape[0], np.abs(x).max(initial=F32(0)) / QMAX, dtype=F32)
        with np.errstate(divide="ignore", invalid="ignore"):
            q = self.round_tokens(x / sigma[:, None])
        return np.where(sigma[:, None] > 0, q, F32(0)).astype(F32), sigma


class RequantiseHalfAway(DispatchFfnCombine):
    """Requantisation rounds ties away from zero where the kernel rounds half to even (§6 step
    5): the reverse of :class:`QuantiseHalfEven`."""

    round_requantised = staticmethod(round_half_away)


class RequantiseByDivision(DispatchFfnCombine):
    """Requantisation by division ``a / (amax2 / 127)`` instead of the kernel's multiplication
    ``a · (127 / amax2)`` (§6 step 5): one rounding apart, visible where ``a`` lands near a tie."""

    def requantise_scaled(self, a: np.ndarray, amax: np.ndarray) -> np.ndarray:
        return a / (amax / QMAX)[:, None]


class PerTokenScale(DispatchFfnCombine):
    """A per-token (one scalar per row) dequant scale where a per-channel one is due (§6 steps
    2 and 6): every output channel uses the first channel's scale."""

    def dequantise(self, acc: np.ndarray, scale: np.ndarray) -> np.ndarray:
        return super().dequantise(acc, np.full_like(scale, scale[0]))


class Fp16IntermediateSkipped(DispatchFfnCombine):
    """The fp16 intermediates skipped: the dequantised GEMM outputs stay float32 where the
    kernel stores fp16 (§6 steps 2 and 6, "fp16 even when x is bf16")."""

    def dequantise(self, acc: np.ndarray, scale: np.ndarray) -> np.ndarray:
        return np.asarray(acc.astype(F32) * scale)


class ClampWrongHalf(DispatchFfnCombine):
    """The SwiGLU lower clamp ``max(·, −L)`` applied to the gate half instead of the up half
    (§6 step 3: the gate half has no lower clamp; the gpt-oss clamp convention)."""

    lower_clamped_half = 0


class CombineBf16Accumulator(DispatchFfnCombine):
    """The combine accumulates in bf16 instead of float32 (§6 step 8): every partial sum is
    rounded to 8 significant bits."""

    def combine(self, y: np.ndarray, probs: np.ndarray) -> np.ndarray:
        bf16 = DTYPES["bfloat16"]
        acc = (y[:, 0] * probs[:, 0, None]).astype(bf16)
        for k in range(1, y.shape[1]):
            acc = (acc.astype(F32) + y[:, k] * probs[:, k, None]).astype(bf16)
        return np.asarray(acc, dtype=F32)


class CombineReverseOrder(DispatchFfnCombine):
    """The combine sums the slots in reverse k order (§6 step 8 is sequential in k order):
    float32 addition is not associative, so low bits differ (edge_cases.md, accumulation
    order)."""

    def combine(self, y: np.ndarray, probs: np.ndarray) -> np.ndarray:
        return super().combine(y[:, ::-1], probs[:, ::-1])


class ProbsRenormalised(DispatchFfnCombine):
    """Routing weights renormalised to sum 1 before the combine; the kernel uses them as given
    (§2). Several MoE layers renormalise top-k weights, so a port may do it twice or wrongly."""

    def combine(self, y: np.ndarray, probs: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return super().combine(y, probs / probs.sum(axis=1, keepdims=True))


class ProbsIgnored(DispatchFfnCombine):
    """Routing weights ignored: ``out = Σ_k y`` (§1: ``out[t] = Σ_k probs[t,k] · y[t,k]``)."""

    def combine(self, y: np.ndarray, probs: np.ndarray) -> np.ndarray:
        return super().combine(y, np.ones_like(probs))


class ZeroRowNaN(DispatchFfnCombine):
    """No guard for an all-zero token row: ``x / (0/127)`` is 0/0 = NaN and the NaN reaches the
    token's output. This is the kernel's own behaviour [inferred, §6 step 1]; a correct
    implementation gives the row's contribution exactly 0 (edge_cases.md: zero rows)."""

    def quantise_tokens(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        sigma = np.abs(x).max(axis=1) / QMAX
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.round_tokens(x / sigma[:, None]).astype(F32), sigma
