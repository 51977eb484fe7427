"""A correct, vectorised ``dispatch_ffn_combine``, written from §4–§6 of the reference notes.

This is the catalogue's baseline, independent of ``oracle/`` (it shares none of its code), so a
mutant that the oracle kills is killed by the oracle's own reading of the contract, not by a
shared code path. :class:`DispatchFfnCombine` computes the whole collective call the way the
kernel does: a count matrix, a receive buffer per destination rank filled at offsets computed
from the counts, each expert's FFN over its range of buffer rows, the results read back by each
slot and combined in k order. Each stage is one method; a mutant is a subclass that overrides
one of them (``benchmarks.mutants.routing``, ``.numerics``, ``.resources``).

Sources (``docs/contract/dispatch_ffn_combine.md``): §4 placement and masking, §5 the receive
layout, truncation and ``expert_token_nums``, §6 the W8A8 numerics. The BF16/FP16-weight variant
is not described there beyond "float32 accumulation": its GEMMs are modelled as exact products
rounded once to float32, and both intermediates (GMM1 output, SwiGLU output) are stored in the
weight dtype, as W8A8 stores its GMM1 output in 16 bits (§6 step 2) [inferred].

>>> from spec import OpConfig, random_problem
>>> cfg = OpConfig(ep_size=2, experts_per_rank=2, top_k=2, hidden=32, intermediate=16,
...                tokens_per_rank=(3, 0))
>>> [out.shape for out, _ in DispatchFfnCombine()(random_problem(cfg, seed=1))]
[(3, 32), (0, 32)]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from spec import DTYPES, Problem, RankInputs

__all__ = ["DispatchFfnCombine", "Slots", "int_matmul", "round_half_away", "round_half_even"]

F32 = np.float32
#: int8 range of the dynamic quantisation (§6 steps 1 and 5).
QMAX = F32(127)
#: Reduction length whose int8·int8 partial sums (|q·w| <= 127·128) stay below 2**24, so a
#: float32 GEMM over it is exact in any summation order.
EXACT_F32_CHUNK = 1024


def round_half_away(v: np.ndarray) -> np.ndarray:
    """Round to integers, ties away from zero (§6 step 1), exactly in v's float type.

    ``v − trunc(v)`` is exact, so ``0.49999997`` is not pushed over a tie as ``floor(v + 0.5)``
    would be.

    >>> round_half_away(np.array([0.5, -2.5, 1.49999, 2.0], dtype=np.float32)).tolist()
    [1.0, -3.0, 1.0, 2.0]
    """
    t = np.trunc(v)
    return np.asarray(np.where(np.abs(v - t) >= 0.5, t + np.sign(v), t))


def int_matmul(q: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The exact int32 product of integer-valued q (|q| <= 127) and int8 w, as float64.

    Float32 GEMMs over chunks of 1024 (exact), chunks summed in float64 (exact below 2**53).

    >>> int_matmul(np.full((1, 3000), 127, np.float32), np.full((3000, 1), -128, np.int8))
    array([[-48768000.]])
    """
    acc = np.zeros((q.shape[0], w.shape[1]), dtype=np.float64)
    for lo in range(0, q.shape[1], EXACT_F32_CHUNK):
        hi = lo + EXACT_F32_CHUNK
        acc += q[:, lo:hi].astype(F32) @ w[lo:hi].astype(F32)
    return acc


def cast_half_away(v: np.ndarray, dtype: Any) -> np.ndarray:
    """Cast float32 values to a 16-bit float type rounding ties away from zero (the Ascend
    BF16 kernel's SwiGLU cast, ``CAST_ROUND``, variants.md): round to even, then, where the
    value lay exactly halfway and even went towards zero, take the neighbour away from zero.

    >>> cast_half_away(np.array([261.0, -261.0, 259.0], np.float32), np.float16).tolist()
    [261.0, -261.0, 259.0]
    """
    near = v.astype(dtype)
    away = (near.view(np.uint16) + np.uint16(1)).view(dtype)  # sign-magnitude: one step out
    gap = np.abs(away.astype(np.float64) - near.astype(np.float64))
    tie = (np.abs(v.astype(np.float64) - near.astype(np.float64)) * 2 == gap) & (
        np.abs(v.astype(np.float64)) > np.abs(near.astype(np.float64)))
    return np.asarray(np.where(tie, away, near))


def round_half_even(v: np.ndarray) -> np.ndarray:
    """Round to integers, ties to even (§6 step 5)."""
    return np.asarray(np.rint(v))


@dataclass(frozen=True)
class Slots:
    """Every (token, top-k slot) of the call, flattened over source ranks in (rank, t, k) order.

    ``expert`` is the routed global id, the sentinel ``EP·E`` for a slot that is not dispatched
    (masked token, §4). ``order`` is the tie key inside one (source, expert) block (§5).
    """

    src: np.ndarray
    token: np.ndarray  # index of the token on its source rank
    gtoken: np.ndarray  # index of the token over all ranks
    expert: np.ndarray
    order: np.ndarray


class DispatchFfnCombine:
    """The correct implementation: ``impl(problem) -> [(out, expert_token_nums) per rank]``.

    Out rows of masked tokens and of tokens that lost a slot to truncation are undefined (§4,
    §5); here they hold NaN.
    """

    # ---- routing (§4) -------------------------------------------------------------------

    def experts_per_rank(self, problem: Problem) -> int:
        """``E``, the local experts of every rank (from the weights, §2)."""
        return problem.config.experts_per_rank

    def placement(self, expert: np.ndarray, ep: int, e: int) -> tuple[np.ndarray, np.ndarray]:
        """``(rank, local index)`` of global experts, in contiguous blocks: ``(g // E, g % E)``."""
        return expert // e, expert % e

    def routed_ids(self, inputs: RankInputs, sentinel: int) -> np.ndarray:
        """The ids the kernel routes: masked tokens' slots become the sentinel ``EP·E`` (§4)."""
        return np.where(inputs.is_active()[:, None], inputs.expert_idx, sentinel)

    def order_keys(self, tokens: int, top_k: int) -> np.ndarray:
        """Tie key of each slot within one expert: the flat index ``t·top_k + k`` (§5)."""
        return np.arange(tokens * top_k, dtype=np.int64)

    def primary_slots(self, slots: Slots) -> np.ndarray:
        """For each slot, the slot whose result it uses: itself (every slot is dispatched on its
        own, duplicates included, §4)."""
        return np.arange(slots.expert.size)

    # ---- count exchange and receive layout (§5, §8) ---------------------------------------

    def visible_counts(self, cnt: np.ndarray) -> np.ndarray:
        """The count matrix as every rank reads it after the exchange: exact (PR #8560)."""
        return cnt

    def block_starts(self, cnt: np.ndarray, totals: np.ndarray) -> np.ndarray:
        """``(EP, EP·E_pad)`` first receive row of block (expert g, source s):
        ``Σ_{e'<e} T(e') + Σ_{s'<s} c(s', g)`` on g's rank (§5)."""
        expert_base = (np.cumsum(totals, axis=1) - totals).reshape(1, -1)
        source_base = np.cumsum(cnt, axis=0) - cnt
        return np.asarray(expert_base + source_base)

    def read_rows(self, row: np.ndarray, cnt: np.ndarray, src: np.ndarray,
                  col: np.ndarray) -> np.ndarray:
        """The buffer row the combine reads each kept slot's result from (source rank ``src``,
        column ``col`` of the count matrix ``cnt``): the row it was written to."""
        return row

    def kept_rows(self, total: int, capacity: int | None) -> int:
        """Rows of the receive buffer that are kept: indices ``< max_output_size`` (§5)."""
        return total if capacity is None else min(total, capacity)

    def buffer_rows(self, pos: np.ndarray, capacity: int | None) -> np.ndarray:
        """The buffer row that a kept receive index is written to: the index itself."""
        return pos

    def computed_rows(self, count: int) -> int:
        """Rows of an expert's block that its FFN computes: all of them."""
        return count

    def reported_counts(self, totals: np.ndarray, kept: np.ndarray) -> np.ndarray:
        """``expert_token_nums``: rows per local expert **before** truncation (§5)."""
        return totals

    # ---- expert FFN, W8A8 (§6) ---------------------------------------------------------

    #: Step 1 rounds ties away from zero; step 5 rounds ties to even (§6).
    round_tokens = staticmethod(round_half_away)
    round_requantised = staticmethod(round_half_even)
    #: Which of ``gate_up``'s halves gets the lower clamp ``max(·, −L)``: the up half (§6 step 3).
    lower_clamped_half = 1

    def quantise_tokens(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Step 1: ``(q, σ1)``, q integer-valued float32. A zero row gives q = 0 and σ1 = 0, so
        it contributes exactly 0 (the kernel's 0/0 is a defect, §6)."""
        amax = np.abs(x).max(axis=1)
        sigma = amax / QMAX
        with np.errstate(divide="ignore", invalid="ignore"):
            q = self.round_tokens(x / sigma[:, None])
        return np.where(sigma[:, None] > 0, q, F32(0)).astype(F32), sigma

    def dequantise(self, acc: np.ndarray, scale: np.ndarray) -> np.ndarray:
        """Steps 2 and 6: ``fp16(float32(acc) · float32(scale))`` per output channel."""
        return np.asarray(acc.astype(F32) * scale).astype(np.float16)

    def clamp(self, h: np.ndarray, limit: float) -> np.ndarray:
        """Step 3 with a limit L: ``min(h, L)`` on the row, then ``max(up, −L)`` on the up half."""
        h = np.minimum(h, F32(limit))
        half = self.gate_up(h)[self.lower_clamped_half]  # a view into h
        np.maximum(half, F32(-limit), out=half)
        return h

    def gate_up(self, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(gate, up)``: gate first, then up (§2)."""
        i = h.shape[1] // 2
        return h[:, :i], h[:, i:]

    def swiglu(self, gate: np.ndarray, up: np.ndarray, alpha: float | None = None) -> np.ndarray:
        """Step 4, float32: ``gate / (1 + exp(−gate)) · up``; SwigluOAI (``alpha``, the call's
        ``oai_alpha``; variants.md, open PR #11916): ``gate / (1 + exp(−α·gate)) · (up + 1)``."""
        with np.errstate(over="ignore"):
            if alpha is None:
                return np.asarray(gate / (F32(1) + np.exp(-gate)) * up)
            return np.asarray(gate / (F32(1) + np.exp(-(gate * F32(alpha)))) * (up + F32(1)))

    def requantise(self, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Step 5: ``q2 = round_half_even(a · (127 / amax2))``, ``σ2 = amax2 / 127``; a zero row
        gives 0."""
        amax = np.abs(a).max(axis=1, initial=F32(0))
        with np.errstate(divide="ignore", invalid="ignore"):
            q = self.round_requantised(self.requantise_scaled(a, amax))
        return np.where(amax[:, None] > 0, q, F32(0)).astype(F32), amax / QMAX

    def requantise_scaled(self, a: np.ndarray, amax: np.ndarray) -> np.ndarray:
        """Step 5 before rounding: a multiplication by ``127 / amax2`` (where step 1 divides).
        Where ``127 / amax2`` overflows float32 (``amax2`` below about 3.7e-37), the
        mathematical value in float64, as a correct kernel must give (the oracle's "zero"
        policy), not inf·a."""
        with np.errstate(over="ignore"):
            inv = QMAX / amax
        scaled = a * inv[:, None]
        tiny = np.isinf(inv) & (amax > 0)
        if tiny.any():
            scaled = scaled.astype(np.float64)
            exact = 127.0 / amax[tiny, None].astype(np.float64)
            scaled[tiny] = a[tiny].astype(np.float64) * exact
        return scaled

    def ffn_w8a8(
        self, q: np.ndarray, sigma: np.ndarray, weights: tuple[Any, ...], limit: float | None,
        alpha: float | None, out_dtype: np.dtype[Any],
    ) -> np.ndarray:
        """Steps 2–7 for one expert's rows, with exact integer GEMMs."""
        w1, w2, s1, s2 = weights
        c1 = self.dequantise(int_matmul(q, w1), s1)
        h = c1.astype(F32) * sigma[:, None]
        if limit is not None:
            h = self.clamp(h, limit)
        q2, sigma2 = self.requantise(self.swiglu(*self.gate_up(h), alpha))
        c2 = self.dequantise(int_matmul(q2, w2), s2)
        return np.asarray(c2.astype(F32) * sigma2[:, None]).astype(out_dtype)

    def ffn_float(
        self, x: np.ndarray, weights: tuple[Any, ...], out_dtype: np.dtype[Any]
    ) -> np.ndarray:
        """BF16/FP16 weights (variants.md): float32 GEMMs and SwiGLU, intermediates stored in
        the weight dtype, the SwiGLU result cast with ties away from zero."""
        w1, w2, _, _ = weights
        h = (x.astype(np.float64) @ w1.astype(np.float64)).astype(F32)
        a = cast_half_away(self.swiglu(*self.gate_up(h.astype(out_dtype).astype(F32))),
                           out_dtype)
        acc2 = np.asarray(a.astype(np.float64) @ w2.astype(np.float64))
        return acc2.astype(F32).astype(out_dtype)

    def expert_weights(self, inputs: RankInputs, local: int) -> tuple[Any, ...]:
        """``(w1, w2, s1, s2)`` of a local expert (views of the rank's TensorLists)."""
        return inputs.expert_weights(local)

    # ---- combine (§6 step 8) -----------------------------------------------------------

    def combine(self, y: np.ndarray, probs: np.ndarray) -> np.ndarray:
        """``(M, top_k, K)`` float32 slot outputs -> float32 ``Σ_k probs·y``, sequential in k."""
        acc: np.ndarray = y[:, 0] * probs[:, 0, None]
        for k in range(1, y.shape[1]):
            acc = acc + y[:, k] * probs[:, k, None]
        return acc

    # ---- the call ----------------------------------------------------------------------

    def slots(self, problem: Problem) -> Slots:
        """Every slot of the call with its routed id and tie key."""
        cfg = problem.config
        sentinel, top_k = cfg.num_experts, cfg.top_k
        ms = np.array(cfg.tokens_per_rank, dtype=np.int64)
        src = np.repeat(np.arange(cfg.ep_size), ms * top_k)
        token = np.concatenate([np.repeat(np.arange(m), top_k) for m in ms])
        first = np.cumsum(ms) - ms
        expert = np.concatenate(
            [self.routed_ids(r, sentinel).reshape(-1) for r in problem.ranks]
        ).astype(np.int64)
        order = np.concatenate([self.order_keys(int(m), top_k) for m in ms])
        return Slots(src, token, first[src] + token, expert, order)

    def __call__(self, problem: Problem) -> list[tuple[np.ndarray, np.ndarray]]:
        cfg = problem.config
        ep, num_experts = cfg.ep_size, cfg.num_experts
        e = self.experts_per_rank(problem)
        out_dtype = DTYPES[cfg.x_dtype]
        slots = self.slots(problem)
        primary = self.primary_slots(slots)
        routed = (slots.expert < num_experts) & (primary == np.arange(primary.size))
        src, g = slots.src[routed], slots.expert[routed]
        dest, local = self.placement(g, ep, e)

        # Count matrix cnt[s][g] over EP·E_pad columns (E_pad = e may exceed the true E).
        cols = ep * e
        cnt = np.zeros((ep, cols), dtype=np.int64)
        np.add.at(cnt, (src, dest * e + local), 1)
        seen = self.visible_counts(cnt)
        totals = seen.sum(axis=0).reshape(ep, e)  # T_d(e)
        starts = self.block_starts(seen, totals)

        # Index of each slot inside its (source, expert) block, in tie-key order.
        col = dest * e + local
        by_block = np.lexsort((slots.order[routed], col, src))
        block_id = (src * cols + col)[by_block]
        step = np.arange(by_block.size)
        block_first = np.maximum.accumulate(np.where(np.diff(block_id, prepend=-1) != 0, step, 0))
        within = np.empty_like(by_block)
        within[by_block] = step - block_first
        pos = starts[src, col] + within

        rows = np.array(
            [self.kept_rows(int(totals[d].sum()), cfg.max_output_size) for d in range(ep)],
            dtype=np.int64,
        )
        offset = np.cumsum(rows) - rows
        kept = pos < rows[dest]
        row = offset[dest[kept]] + self.buffer_rows(pos[kept], cfg.max_output_size)
        writer = slots.gtoken[routed][kept]
        y_buf = self._expert_outputs(problem, writer, pos[kept], row, rows, offset, totals, e)

        y = np.full((slots.expert.size, cfg.hidden), np.nan, dtype=F32)
        y_routed = y[routed]
        read = self.read_rows(row, seen, src[kept], col[kept])
        y_routed[kept] = np.vstack([y_buf, np.zeros((1, cfg.hidden), F32)])[
            np.minimum(read, y_buf.shape[0])]  # a row past the buffer reads zeros
        y[routed] = y_routed
        y = y[primary]

        outputs = []
        kept_totals = np.zeros((ep, e), dtype=np.int64)
        np.add.at(kept_totals, (dest[kept], local[kept]), 1)
        for r, inputs in enumerate(problem.ranks):
            y_r = y[slots.src == r].reshape(inputs.num_tokens, cfg.top_k, cfg.hidden)
            with np.errstate(invalid="ignore"):
                out = self.combine(y_r, np.asarray(inputs.probs)).astype(out_dtype)
            counts = self.reported_counts(totals[r], kept_totals[r]).astype(np.int32)
            outputs.append((out, counts))
        return outputs

    def _expert_outputs(
        self, problem: Problem, writer: np.ndarray, pos: np.ndarray, row: np.ndarray,
        rows: np.ndarray, offset: np.ndarray, totals: np.ndarray, e: int,
    ) -> np.ndarray:
        """Float32 FFN output of every receive-buffer row of every rank (zeros where unwritten).

        ``writer[j]`` is the global token of the j-th kept slot, written at receive index
        ``pos[j]`` into buffer row ``row[j]`` (rows of all ranks concatenated, rank d from
        ``offset[d]``, ``rows[d]`` rows)."""
        cfg = problem.config
        out_dtype = DTYPES[cfg.x_dtype]
        x = np.concatenate([np.asarray(r.x, dtype=F32) for r in problem.ranks])
        x = np.concatenate([x, np.zeros((1, cfg.hidden), dtype=F32)])  # the unwritten row
        w8a8 = cfg.weight_dtype == "int8"
        if w8a8:
            x, sigma = self.quantise_tokens(x)
        # Buffer row -> token written there. Rows collide only in a defective layout; there the
        # write of the later receive index (then the later source rank) wins.
        token_of_row = np.full(int(rows.sum()), x.shape[0] - 1, dtype=np.int64)
        writes = np.lexsort((writer, pos))
        token_of_row[row[writes]] = writer[writes]

        y_buf = np.zeros((token_of_row.size, cfg.hidden), dtype=F32)
        base = np.cumsum(totals, axis=1) - totals
        for d, inputs in enumerate(problem.ranks):
            for j in range(e):
                lo = int(base[d, j])
                hi = min(lo + self.computed_rows(int(totals[d, j])), int(rows[d]))
                if hi <= lo:
                    continue
                idx = token_of_row[offset[d] + lo : offset[d] + hi]
                weights = self.expert_weights(inputs, j)
                if w8a8:
                    block = self.ffn_w8a8(x[idx], sigma[idx], weights, cfg.swiglu_limit,
                                          cfg.oai_alpha, out_dtype)
                else:
                    block = self.ffn_float(x[idx], weights, out_dtype)
                y_buf[offset[d] + lo : offset[d] + hi] = block.astype(F32)
        return y_buf
