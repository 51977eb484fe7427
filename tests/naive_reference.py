"""A second, deliberately naive model of one ``dispatch_ffn_combine`` call, for cross-checking.

Written from ``docs/contract/dispatch_ffn_combine.md`` §4–§6, not from
``oracle/model/reference.py``: plain Python loops per rank, per token, per slot; each destination's
receive buffer is a Python list; every received row goes through its own FFN with per-row NumPy
operations; W8A8 GEMMs are
exact integer dot products in int64. Slow on purpose and obvious on purpose: it is the second
opinion that :func:`oracle.run` must agree with (bitwise in faithful mode).

>>> from spec import OpConfig, random_problem
>>> cfg = OpConfig(ep_size=2, experts_per_rank=2, top_k=2, hidden=8, intermediate=4,
...                tokens_per_rank=(2, 1))
>>> result = naive_run(random_problem(cfg, seed=0))
>>> [len(r.rows) for r in result.receive] == [int(n.sum()) for n in result.expert_token_nums]
True
"""


from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from spec import DTYPES, Problem, RankInputs

__all__ = ["NaiveReceive", "NaiveResult", "naive_run"]

F32 = np.float32
Array = np.ndarray[Any, Any]


class Numerics(Protocol):
    """The switches this model reads; an ``oracle.Numerics`` has them. The model imports nothing
    of ``oracle``: it is a second opinion on it."""

    mode: str
    truncate_scales: bool
    zero_rows: str


@dataclass(frozen=True)
class _Defaults:
    mode: str
    truncate_scales: bool = False
    zero_rows: str = "zero"


@dataclass(frozen=True)
class NaiveReceive:
    """One destination's receive buffer: ``(src_rank, token, slot, local_expert)`` per row in
    buffer order (all rows, including those past ``max_output_size``); ``kept`` rows survive."""

    rows: list[tuple[int, int, int, int]]
    kept: int


@dataclass(frozen=True)
class NaiveResult:
    """Per rank: ``out``, ``expert_token_nums``, ``defined``, per-token scales ``token_scale``
    (σ1, float32), per-slot expert outputs ``y`` (NaN where not computed) and the combine
    accumulator ``combined`` before the final cast (NaN on undefined rows). Plus the count
    matrix ``counts[s][g]`` and each destination's :class:`NaiveReceive`."""

    out: list[Array]
    expert_token_nums: list[Array]
    defined: list[Array]
    token_scale: list[Array]
    y: list[Array]
    combined: list[Array]
    counts: Array
    receive: list[NaiveReceive]


def _local_tensor(tensors: Sequence[Array] | None, e: int) -> Array | None:
    """§3: a list of one tensor is stacked (E first); a longer list holds one tensor per expert."""
    if tensors is None:
        return None
    return tensors[0][e] if len(tensors) == 1 else tensors[e]


def _chop_to_19_bits(value: float) -> float:
    """The official converter's scale encoding, ``bits & 0xFFFFE000`` (§6 step 2)."""
    (bits,) = struct.unpack("<I", struct.pack("<f", value))
    (chopped,) = struct.unpack("<f", struct.pack("<I", bits & 0xFFFFE000))
    return float(chopped)


def _round_half_away(v: float) -> int:
    """Nearest integer, ties away from zero (§6 step 1). Python floats are float64, where
    ``|v| + 0.5`` is exact for a float32 ``v``."""
    return int(math.copysign(math.floor(abs(v) + 0.5), v))


def _quantise_token(row: Array) -> tuple[Array, F32]:
    """§6 step 1: ``σ1 = amax/127`` and ``q = round_half_away(x/σ1)``, per element."""
    xf = row.astype(F32)
    amax = F32(0)
    for v in xf:
        amax = max(amax, abs(v))
    sigma1 = F32(amax / F32(127))
    if sigma1 == 0:
        return np.zeros(row.shape[0], dtype=np.int64), sigma1
    q = np.array([_round_half_away(float(v / sigma1)) for v in xf], dtype=np.int64)
    return q, sigma1


def _dequant_fp16(acc: Array, scale: Array) -> Array:
    """§6 steps 2 and 6, pinned: ``float16(float32(acc) · float32(scale))``, as float32."""
    with np.errstate(over="ignore"):
        return (acc.astype(F32) * scale.astype(F32)).astype(np.float16).astype(F32)


def _oai(alpha: float | None) -> bool:
    """SwigluOAI's mode switch (PR #11916): the float32 attribute is positive."""
    return alpha is not None and bool(F32(alpha) > 0)


def _swiglu_f32(h: Array, i: int, alpha: float | None) -> Array:
    """§6 step 4 in float32: ``gate / (1 + exp(−gate)) · up``, gate = first I columns; with
    SwigluOAI ``gate / (1 + exp(−α·gate)) · (up + 1)``, α as float32."""
    gate, up = h[:i], h[i:]
    with np.errstate(over="ignore"):
        if _oai(alpha):
            return gate / (F32(1) + np.exp(-(F32(alpha) * gate))) * (up + F32(1))
        return gate / (F32(1) + np.exp(-gate)) * up


def _unpack_nibbles(words: Array) -> Array:
    """W4A8 weights (variants.md): element n of a row is the signed nibble at bits 4·(n mod 8)
    of int32 word n // 8; unpacked one element at a time with Python's integer bit operations."""
    rows = []
    for row in words:
        values = []
        for word in row:
            for n in range(8):
                nibble = (int(word) >> (4 * n)) & 0xF
                values.append(nibble - 16 if nibble >= 8 else nibble)
        rows.append(values)
    return np.array(rows, dtype=np.int64).reshape(words.shape[0], words.shape[1] * 8)


class _Expert:
    """One local expert's tensors, converted once: int64 weights and float32 scales (W8A8,
    W4A8 with its weights unpacked and its float32 biases), float64 weights (BF16/FP16
    variant), dequantised float64 weights (ideal)."""

    def __init__(self, inputs: RankInputs, e: int, numerics: Numerics) -> None:
        w1, w2 = _local_tensor(inputs.w1, e), _local_tensor(inputs.w2, e)
        s1, s2 = _local_tensor(inputs.scale1, e), _local_tensor(inputs.scale2, e)
        assert w1 is not None and w2 is not None
        self.w4a8 = w1.dtype == np.int32
        if self.w4a8:
            w1, w2 = _unpack_nibbles(w1), _unpack_nibbles(w2)
            b1, b2 = _local_tensor(inputs.bias1, e), _local_tensor(inputs.bias2, e)
            assert b1 is not None and b2 is not None
            self.b1, self.b2 = b1.astype(F32), b2.astype(F32)
        self.w8a8 = w1.dtype == np.int8 or self.w4a8
        self.w1_int, self.w2_int = w1.astype(np.int64), w2.astype(np.int64)
        self.w1_f64, self.w2_f64 = w1.astype(np.float64), w2.astype(np.float64)
        if s1 is not None and s2 is not None:
            self.s1_ideal, self.s2_ideal = s1.astype(np.float64), s2.astype(np.float64)
            if numerics.truncate_scales:
                s1 = np.array([_chop_to_19_bits(float(v)) for v in s1], dtype=F32)
                s2 = np.array([_chop_to_19_bits(float(v)) for v in s2], dtype=F32)
            self.s1, self.s2 = s1.astype(F32), s2.astype(F32)
            self.w1_ideal = self.w1_f64 * self.s1_ideal
            self.w2_ideal = self.w2_f64 * self.s2_ideal
        else:
            self.w1_ideal, self.w2_ideal = self.w1_f64, self.w2_f64


def _gemm_w8a8(q: Array, w: Array, scale: Array, bias: Array | None) -> Array:
    """§6 steps 2 and 6 before the per-token scale: ``fp16(q @ W · s)``. int64 holds any
    int8 × int8 dot product here exactly; a non-finite ``q`` spreads as IEEE inf/NaN."""
    if np.isfinite(q).all():
        return _dequant_fp16(q.astype(np.int64) @ w, scale)
    with np.errstate(invalid="ignore"):
        return _dequant_fp16(q.astype(np.float64) @ w.astype(np.float64), scale)


def _gemm_w4a8(q: Array, w: Array, scale: Array, bias: Array | None) -> Array:
    """W4A8's GMM before the per-token scale (variants.md): each int8 value splits as
    ``q = 16·hi + lo + 8`` (``hi = q >> 4``, ``lo = (q & 0xF) − 8``, Python integers); two
    int4 GEMMs, each through the fp16 dequant; then ``(16·C_hi + C_lo) + bias`` in float32."""
    assert bias is not None
    if not np.isfinite(q).all():
        return np.full(w.shape[1], np.nan, F32)
    ints = [int(v) for v in q]
    hi = np.array([v >> 4 for v in ints], dtype=np.int64)
    lo = np.array([(v & 0xF) - 8 for v in ints], dtype=np.int64)
    c_hi, c_lo = _dequant_fp16(hi @ w, scale), _dequant_fp16(lo @ w, scale)
    with np.errstate(over="ignore", invalid="ignore"):
        return (F32(16) * c_hi + c_lo) + bias


def _ffn_w8a8(
    q: Array, sigma1: F32, ex: _Expert, limit: float | None, alpha: float | None,
    numerics: Numerics, out: Any,
) -> Array:
    """§6 steps 2–7 for one received row, in float32 with exact int64 GEMMs (W4A8's split
    GEMMs where the expert's weights are int4)."""
    i = ex.w2_int.shape[0]
    gemm = _gemm_w4a8 if ex.w4a8 else _gemm_w8a8
    bias1, bias2 = (ex.b1, ex.b2) if ex.w4a8 else (None, None)
    # An all-zero row (0/0 in step 1 or 5) with the "zero" policy: W8A8's GEMM of q = 0 is 0.
    # W4A8's is not (lo = −8, and the bias cancels it only up to the fp16 rounding): the
    # kernel's residual times σ = 0 is a zero whose sign is the residual's, so compute it.
    literal = ex.w4a8 and numerics.zero_rows == "zero"
    if sigma1 == 0 and not literal:
        return np.full(ex.w2_int.shape[1], np.nan if numerics.zero_rows == "nan" else 0, F32)
    h = gemm(q, ex.w1_int, ex.s1, bias1) * sigma1
    if limit is not None:
        h = np.minimum(h, F32(limit))
        h[i:] = np.maximum(h[i:], -F32(limit))
    a = _swiglu_f32(h, i, alpha)
    amax2 = F32(0)
    for v in a:
        amax2 = np.maximum(amax2, abs(v))  # np.maximum: a NaN must win, as in a max reduction
    if amax2 == 0 and not literal:  # step 5 divides by amax2
        return np.full(ex.w2_int.shape[1], np.nan if numerics.zero_rows == "nan" else 0, F32)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        inv = F32(127) / amax2
    if amax2 == 0:
        q2 = np.zeros(a.shape[0])
    elif np.isinf(inv):  # amax2 < 127/FLT_MAX: the float32 scale overflows (a degenerate row)
        if numerics.zero_rows == "nan":
            return np.full(ex.w2_int.shape[1], np.nan, F32)
        q2 = np.rint(a.astype(np.float64) * (127.0 / float(amax2)))
    else:
        with np.errstate(invalid="ignore"):
            q2 = np.rint(a * inv)  # rint: round half to even
    sigma2 = F32(amax2 / F32(127))
    with np.errstate(over="ignore", invalid="ignore"):
        return np.asarray((gemm(q2, ex.w2_int, ex.s2, bias2) * sigma2).astype(out).astype(F32))


def _exact_dot_f32(v: Array, w: Array) -> Array:
    """Column-wise dot products summed exactly (``math.fsum``) and rounded to float32."""
    return np.array([math.fsum(v * w[:, n]) for n in range(w.shape[1])], dtype=F32)


def _cast_ties_away(values: Array, out: Any) -> Array:
    """Round each float32 value to ``out`` (bfloat16 / float16), ties away from zero: take the
    nearest-even candidate and its neighbour on the other side of the value (one step of the
    16-bit pattern, sign-magnitude), and pick the farther from zero on an exact tie."""
    result = []
    for v in values.astype(np.float64):
        near = np.array(v).astype(out)
        if not math.isfinite(v) or float(near) == v:
            result.append(float(near))
            continue
        bits = int(near.view(np.uint16))
        step = 1 if abs(v) > abs(float(near)) else -1  # towards v, in magnitude
        other = float(np.array(bits + step, dtype=np.uint16).view(out))
        tie = abs(v - float(near)) == abs(other - v)
        result.append(other if tie and abs(other) > abs(float(near)) else float(near))
    return np.array(result, dtype=F32)


def _ffn_float(x: Array, ex: _Expert, out: Any) -> Array:
    """The BF16/FP16-weight variant of the ``ascend-a3`` profile (variants.md): exact products,
    float32 accumulation of the exact sum, GMM1 output stored in x's dtype, the SwiGLU result
    cast to x's dtype with ties away from zero."""
    i = ex.w2_f64.shape[0]
    h = _exact_dot_f32(x.astype(np.float64), ex.w1_f64).astype(out).astype(F32)
    a = _cast_ties_away(_swiglu_f32(h, i, None), out).astype(np.float64)
    return np.asarray(_exact_dot_f32(a, ex.w2_f64).astype(out).astype(F32))


def _ffn_ideal(x: Array, ex: _Expert, limit: float | None, alpha: float | None) -> Array:
    """The mathematics (float64, dequantised weights, no activation quantisation)."""
    i = ex.w2_ideal.shape[0]
    h = x.astype(np.float64) @ ex.w1_ideal
    if limit is not None:
        h = np.minimum(h, limit)
        h[i:] = np.maximum(h[i:], -limit)
    gate, up = h[:i], h[i:]
    with np.errstate(over="ignore"):
        if _oai(alpha):
            a = gate / (1.0 + np.exp(-float(F32(alpha)) * gate)) * (up + 1.0)
        else:
            a = gate / (1.0 + np.exp(-gate)) * up
    return np.asarray(a @ ex.w2_ideal)


def naive_run(problem: Problem, numerics: str | Numerics = "faithful") -> NaiveResult:
    """Every rank's outputs of one call, computed slot by slot (§4–§6)."""
    num = _Defaults(numerics) if isinstance(numerics, str) else numerics
    cfg = problem.config
    ep, n_local, top_k, hidden = cfg.ep_size, cfg.experts_per_rank, cfg.top_k, cfg.hidden
    out_dtype = DTYPES[cfg.x_dtype]
    sentinel = ep * n_local
    ideal = num.mode == "ideal"
    acc_dtype = np.float64 if ideal else F32

    # §4–§5 on each source rank: masked slots take the sentinel; sort the slots by expert id.
    counts = np.zeros((ep, sentinel), dtype=np.int64)
    sorted_slots: list[list[tuple[int, int, int]]] = []  # per source: (expert, token, slot)
    for s, inputs in enumerate(problem.ranks):
        slots = []
        for t in range(inputs.x.shape[0]):
            active = inputs.active_mask is None or bool(inputs.active_mask[t])
            for k in range(top_k):
                g = int(inputs.expert_idx[t, k]) if active else sentinel
                slots.append((g, t, k))  # appended in flat slot order t·top_k + k
        slots.sort(key=lambda slot: slot[0])  # list.sort is stable: ties keep flat order
        slots = [slot for slot in slots if slot[0] != sentinel]
        for g, _, _ in slots:
            counts[s, g] += 1
        sorted_slots.append(slots)

    # Each destination's buffer: expert-major, then source rank, then the source's order.
    receive = []
    expert_token_nums = []
    for d in range(ep):
        rows = []
        for e in range(n_local):
            for s in range(ep):
                for g, t, k in sorted_slots[s]:
                    if g == d * n_local + e:
                        rows.append((s, t, k, e))
        cap = cfg.max_output_size
        receive.append(NaiveReceive(rows, len(rows) if cap is None else min(len(rows), cap)))
        expert_token_nums.append(
            np.array([sum(int(counts[s, d * n_local + e]) for s in range(ep))
                      for e in range(n_local)], dtype=np.int32)
        )

    # Step 1 once per token on its source rank.
    quantised = [[_quantise_token(row) for row in inputs.x] for inputs in problem.ranks]
    token_scale = [np.array([sig for _, sig in qs], dtype=F32) for qs in quantised]

    # FFN of every kept row, written back to its source slot.
    y = [np.full((inputs.x.shape[0], top_k, hidden), np.nan, dtype=acc_dtype)
         for inputs in problem.ranks]
    computed = [np.zeros((inputs.x.shape[0], top_k), dtype=bool) for inputs in problem.ranks]
    experts: dict[tuple[int, int], _Expert] = {}
    for d, buffer in enumerate(receive):
        for s, t, k, e in buffer.rows[: buffer.kept]:
            ex = experts.get((d, e))
            if ex is None:
                ex = experts[(d, e)] = _Expert(problem.ranks[d], e, num)
            x_row = problem.ranks[s].x[t]
            if ideal:
                y[s][t, k] = _ffn_ideal(x_row, ex, cfg.swiglu_limit, cfg.swiglu_alpha)
            elif ex.w8a8:
                q, sigma1 = quantised[s][t]
                y[s][t, k] = _ffn_w8a8(q, sigma1, ex, cfg.swiglu_limit, cfg.swiglu_alpha, num,
                                          out_dtype)
            else:
                y[s][t, k] = _ffn_float(x_row, ex, out_dtype)
            computed[s][t, k] = True

    # Step 8 on each source rank: sequential combine in k order.
    outs, defined, combined = [], [], []
    for s, inputs in enumerate(problem.ranks):
        m = inputs.x.shape[0]
        out = np.zeros((m, hidden), dtype=out_dtype)
        acc_rows = np.full((m, hidden), np.nan, dtype=acc_dtype)
        ok = np.zeros(m, dtype=bool)
        for t in range(m):
            active = inputs.active_mask is None or bool(inputs.active_mask[t])
            if not (active and computed[s][t].all()):
                continue  # masked, or a slot lost to truncation: the row is undefined
            acc = y[s][t, 0] * acc_dtype(inputs.probs[t, 0])
            for k in range(1, top_k):
                acc = acc + y[s][t, k] * acc_dtype(inputs.probs[t, k])
            acc_rows[t] = acc
            out[t] = acc.astype(out_dtype)
            ok[t] = True
        outs.append(out)
        defined.append(ok)
        combined.append(acc_rows)
    return NaiveResult(outs, expert_token_nums, defined, token_scale, y, combined, counts, receive)
