"""Routing mutants: defects in placement, counting, receive layout and truncation (§4–§5).

Each class is a :class:`DispatchFfnCombine` with one stage changed; its docstring names the bug
class and, where one exists, a real occurrence (issue numbers are the named project's own).
"""

from __future__ import annotations

import numpy as np

from benchmarks.mutants.correct import DispatchFfnCombine, Slots
from spec import RankInputs

__all__ = [
    "CountsAfterTruncation",
    "DuplicatesDeduplicated",
    "ExpertRankModulo",
    "MaskedSlotsCounted",
    "ReceiveOffsetOffByOne",
    "TieOrderSlotMajor",
    "TileRemainderDropped",
    "TruncateAtGreater",
    "ZeroTokenRankCrash",
]

#: Rows per epilogue tile in :class:`TileRemainderDropped` (a typical cube tile height).
TILE_ROWS = 16


class ExpertRankModulo(DispatchFfnCombine):
    """Round-robin placement: global expert g on rank ``g % EP`` instead of ``g // E`` (§4).

    The two placements agree only when EP = 1 or E = 1; Megatron-LM and DeepEP both place
    contiguous blocks, round-robin is the classic mix-up when porting between them.
    """

    def placement(self, expert: np.ndarray, ep: int, e: int) -> tuple[np.ndarray, np.ndarray]:
        return expert % ep, expert // ep


class ReceiveOffsetOffByOne(DispatchFfnCombine):
    """Off-by-one in the receive offsets: block (e, s > 0) starts one row early (an
    inclusive/exclusive prefix-sum mix-up), so its first row overwrites the row before it and
    the last row of the expert's range is never written (§5's ``Σ_{s'<s} c(s', e)``)."""

    def block_starts(self, cnt: np.ndarray, totals: np.ndarray) -> np.ndarray:
        starts = super().block_starts(cnt, totals).copy()
        starts[1:] -= 1
        return np.asarray(np.maximum(starts, 0))


class TileRemainderDropped(DispatchFfnCombine):
    """A slot dropped when an expert's count hits a boundary: the epilogue's tile count is
    ``(T + B − 2) // B`` instead of ``(T + B − 1) // B`` (B = 16 rows), so an expert whose count
    is one past a multiple of B (1, 17, 33, …) never computes its last row, and that slot's
    token reads stale memory (here: zeros). The ceil-division slip behind vllm-xpu-kernels #453
    and the M-tail bugs of grouped GEMMs."""

    def computed_rows(self, count: int) -> int:
        return min(count, TILE_ROWS * ((count + TILE_ROWS - 2) // TILE_ROWS))


class DuplicatesDeduplicated(DispatchFfnCombine):
    """Duplicate ids within a token de-duplicated: a token is sent once per expert and the one
    result reused for every slot naming that expert. The combined value is unchanged but
    ``expert_token_nums`` and the receive layout (hence truncation) are not. The kernel
    dispatches each slot on its own (§4); DeepEP de-duplicates (per rank)."""

    def primary_slots(self, slots: Slots) -> np.ndarray:
        key = slots.gtoken * (int(slots.expert.max(initial=0)) + 1) + slots.expert
        _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
        return first[inverse]


class MaskedSlotsCounted(DispatchFfnCombine):
    """Masked slots counted: the mask is applied after routing, so inactive tokens' slots (with
    an in-range id) are counted, occupy receive rows and shift truncation; only their results
    are dropped. §4: the kernel turns them into the sentinel ``EP·E`` first. (Megatron-LM #1421:
    padding tokens changing other tokens' results.)"""

    def routed_ids(self, inputs: RankInputs, sentinel: int) -> np.ndarray:
        ids = np.asarray(inputs.expert_idx)
        return np.where((ids >= 0) & (ids < sentinel), ids, sentinel)


class TieOrderSlotMajor(DispatchFfnCombine):
    """Wrong tie order within an expert: ``expert_idx`` flattened column-major (``k·M + t``), so
    rows of one (expert, source) block arrive slot-major instead of in flat-index order and
    truncation keeps different slots (§5's tie order, [inferred] ascending ``t·topK + k``)."""

    def order_keys(self, tokens: int, top_k: int) -> np.ndarray:
        return np.arange(tokens * top_k, dtype=np.int64).reshape(top_k, tokens).T.reshape(-1)


class ZeroTokenRankCrash(DispatchFfnCombine):
    """Crash on a rank with zero (active) tokens: a host-side range check takes the max of the
    routed ids, which NumPy refuses on an empty array. The most frequent real failure of EP
    kernels (DeepEP #374, #379, #356; sglang #25397; Megatron-LM #1877; vLLM #43547)."""

    def routed_ids(self, inputs: RankInputs, sentinel: int) -> np.ndarray:
        active_ids = np.asarray(inputs.expert_idx)[inputs.is_active()]
        if int(active_ids.max()) >= sentinel:  # ValueError on a rank without active tokens
            raise ValueError("expert id out of range")
        return super().routed_ids(inputs, sentinel)


class TruncateAtGreater(DispatchFfnCombine):
    """Truncation at ``>`` instead of ``≥``: receive index ``max_output_size`` is kept, one row
    past the buffer's end. The model places that row on the buffer's first row (a wrapped
    write), which then belongs to the overflowing token [inferred model of the overrun]."""

    def kept_rows(self, total: int, capacity: int | None) -> int:
        return total if capacity is None else min(total, capacity + 1)

    def buffer_rows(self, pos: np.ndarray, capacity: int | None) -> np.ndarray:
        return pos if capacity is None else np.where(pos == capacity, 0, pos)


class CountsAfterTruncation(DispatchFfnCombine):
    """``expert_token_nums`` counted after truncation (the rows actually kept) instead of before
    (§5: ``T(e)`` excludes only masked slots)."""

    def reported_counts(self, totals: np.ndarray, kept: np.ndarray) -> np.ndarray:
        return kept


class EmptySourceRowShift(DispatchFfnCombine):
    """A row shifted by an empty rank: the combine recomputes where each (expert, source) block
    starts as the previous source's last row + 1, taking an empty block's last row as its start
    (an unsigned ``count − 1`` clamped at 0), so for every source rank before it that sends the
    expert nothing, a block is read one row late: another token's result, the next expert's
    first row, or past the buffer (zeros). The dispatch writes the right rows; only EP ≥ 2 with
    a rank that skips an expert shows it (issue 21: misread as "last slot left out")."""

    def read_rows(self, row: np.ndarray, cnt: np.ndarray, src: np.ndarray,
                  col: np.ndarray) -> np.ndarray:
        empty = cnt == 0
        return row + (np.cumsum(empty, axis=0) - empty)[src, col]
