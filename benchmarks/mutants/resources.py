"""Resource mutants: defects in reading the weight TensorLists (§3) and the count exchange (§8).

Each class is a :class:`DispatchFfnCombine` with one stage changed; its docstring names the bug
class and its source.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from benchmarks.mutants.correct import DispatchFfnCombine
from spec import Problem, RankInputs

__all__ = [
    "ListReadReversed", "PreFixCountStride", "SingleExpertListAsStacked",
    "WeightsReadAsContiguous",
]

#: int32 words per 512-byte hardware block: the receiver polls the first word of each (§8).
WORDS_PER_BLOCK = 128


def _list_length(inputs: RankInputs) -> int:
    """Experts in a TensorList by the kernel's rule: one tensor is stacked (§3)."""
    return len(inputs.w1) if len(inputs.w1) > 1 else int(inputs.w1[0].shape[0])


class SingleExpertListAsStacked(DispatchFfnCombine):
    """A TensorList with E = 1 read as stacked: the framework hands the kernel per-expert lists,
    and a list of one 2-D tensor ``[(K, N)]`` is read as stacked, so E becomes K (§3,
    [inferred]). Modelled as routing with E := K (global expert g to rank g // K), every
    "expert" of a rank reading that rank's only weights."""

    def experts_per_rank(self, problem: Problem) -> int:
        cfg = problem.config
        return cfg.hidden if cfg.experts_per_rank == 1 else cfg.experts_per_rank

    def expert_weights(self, inputs: RankInputs, local: int) -> tuple[Any, ...]:
        return super().expert_weights(inputs, local % _list_length(inputs))


class ListReadReversed(DispatchFfnCombine):
    """A per-expert weight list read in the wrong order (last expert first), as after a
    placement table is applied in the wrong direction. Per-expert lists exist so that expert
    load balancing can place and replace experts one by one (§3, [pr])."""

    def expert_weights(self, inputs: RankInputs, local: int) -> tuple[Any, ...]:
        if len(inputs.w1) > 1:
            local = len(inputs.w1) - 1 - local
        return super().expert_weights(inputs, local)


class WeightsReadAsContiguous(DispatchFfnCombine):
    """Weights read from their first element as if they were C-contiguous, whatever their
    strides: the operator declares its weights ``IgnoreContiguous()``, and a kernel that takes
    the data pointer of a transposed or sliced view computes with other elements of memory
    (intel-xpu-backend-for-triton #7455, Liger-Kernel PR #1377; edge_cases.md). Contiguous
    weights, all that the default strategy draws, hide it."""

    def expert_weights(self, inputs: RankInputs, local: int) -> tuple[Any, ...]:
        w1, w2, s1, s2 = super().expert_weights(inputs, local)
        return _as_contiguous(w1), _as_contiguous(w2), s1, s2


def _as_contiguous(a: np.ndarray) -> np.ndarray:
    """The elements a C-order walk from ``a``'s first element meets: ``a`` itself when it is
    contiguous; inside the buffer for the layouts of :mod:`spec.memory` (Fortran order, or every
    other element of a buffer twice as wide)."""
    c_strides = tuple(int(np.prod(a.shape[i + 1:])) * a.itemsize for i in range(a.ndim))
    return np.lib.stride_tricks.as_strided(a, a.shape, c_strides, writeable=False)


class PreFixCountStride(DispatchFfnCombine):
    """The pre-fix count-row stride ``S = EP·E`` of PR #5665 (fixed by PR #6156, now
    ``AlignUp(EP·E + 1, 128)``, PR #8560). The receiver polls the first int32 of every 128 words
    from each row's start; with unaligned rows a 512-byte block holding none of a row's polled
    words is never waited for. Modelled as the worst race outcome: those counts read as 0, so
    their rows are neither counted nor placed where the sender wrote them (§8, [inferred])."""

    def visible_counts(self, cnt: np.ndarray) -> np.ndarray:
        ep, stride = cnt.shape
        starts = np.arange(ep)[:, None] * stride
        words = starts + np.arange(stride)[None, :]
        polls = -(-stride // WORDS_PER_BLOCK)  # one polled word per 128 words of the row
        last_polled_block = (starts + WORDS_PER_BLOCK * (polls - 1)) // WORDS_PER_BLOCK
        return np.where(words // WORDS_PER_BLOCK <= last_polled_block, cnt, 0)
