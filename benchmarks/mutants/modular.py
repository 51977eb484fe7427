"""Stage implementations of the modular split (:mod:`spec.modular`): a correct one per stage,
written from ``docs/routing.md`` ("Gating one stage") without the oracle's model, and one
mutant per bug of the split. Each is ``impl(call: StageCall) -> one entry per rank``.

- dispatch: per rank ``(x, source, counts)``; rows sorted by (expert, source rank, token,
  slot), or shuffled inside each expert (``dispatch_shuffled``: the layout's freedom).
- experts: per rank ``y``: float64 mathematics on dequantised weights, one rounding.
- combine: per rank ``out``: each slot's row located **from the top-k ids** (as MoRI and
  DeepEP low-latency do: the position of a slot in its expert's rows is its rank among that
  expert's slots in (source rank, token, slot) order), ``Σ_k p_k·y_k`` in float32 in k order.

>>> sorted(STAGE_MUTANTS)[:2]
['combine_dispatched_ids', 'combine_ignores_weights']
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import numpy as np

from benchmarks.mutants.placement import _ffn
from spec.modular import Received, StageCall, valid_rows

__all__ = ["CORRECT", "PLACED_STAGE_MUTANTS", "STAGE_MUTANTS", "combine_by_ids",
           "dispatch_shuffled"]

Array = np.ndarray[Any, Any]


def _slots(call: StageCall, ids: list[Array],
           routed: bool = True) -> tuple[Array, Array, Array, Array]:
    """Every slot of every rank in (source rank, token, slot) order: source rank, token,
    slot, and its expert id under ``ids`` (−1 where the token is masked, the id is −1, or
    the slot is routed nowhere in ``call.routed`` unless ``routed`` is False)."""
    cfg = call.problem.config
    k = cfg.top_k
    src = np.repeat(np.arange(cfg.ep_size), np.array(cfg.tokens_per_rank) * k)
    tok = np.concatenate([np.repeat(np.arange(m), k) for m in cfg.tokens_per_rank])
    slot = np.tile(np.arange(k), sum(cfg.tokens_per_rank))
    active = np.concatenate([np.repeat(r.is_active(), k) for r in call.problem.ranks])
    if routed and call.routed:
        active &= np.concatenate([m.reshape(-1) for m in call.routed])
    g = np.concatenate([i.reshape(-1) for i in ids]).astype(np.int64)
    return src, tok, slot, np.where(active, g, -1)


def _pad(rows: Array, source: Array, counts: Array, call: StageCall) -> Received:
    if call.layout == "contiguous":
        return Received(x=rows, source=source, counts=counts.astype(np.int32))
    e_local, cap = counts.shape[0], call.capacity
    x = np.zeros((e_local, cap, rows.shape[1]), rows.dtype)
    src = np.full((e_local, cap, 3), -1, np.int64)
    expert = np.repeat(np.arange(e_local), counts)
    within = np.arange(expert.size) - np.repeat(np.cumsum(counts) - counts, counts)
    x[expert, within], src[expert, within] = rows, source
    return Received(x=x, source=src, counts=counts.astype(np.int32))


def dispatch_sorted(call: StageCall, shuffle: bool = False,
                    routed: bool = True) -> list[Received]:
    cfg = call.problem.config
    e = cfg.experts_per_rank
    src, tok, slot, g = _slots(call, [r.expert_idx for r in call.problem.ranks], routed)
    x_all = np.concatenate([r.x for r in call.problem.ranks])
    starts = np.cumsum((0, *cfg.tokens_per_rank))[:-1]
    rng = np.random.default_rng(0)
    out = []
    for d in range(cfg.ep_size):
        sel = np.flatnonzero((g >= 0) & (g // e == d))
        local = g[sel] % e
        key = rng.random(sel.size) if shuffle else np.zeros(sel.size)
        sel = sel[np.lexsort((key, local))]  # stable: (src, tok, slot) order unless shuffled
        source = np.stack([src[sel], tok[sel], slot[sel]], axis=1)
        out.append(_pad(x_all[starts[src[sel]] + tok[sel]], source,
                        np.bincount(g[sel] % e, minlength=e), call))
    return out


def dispatch_shuffled(call: StageCall) -> list[Received]:
    """Correct: each expert's rows in a random order (the layout's freedom)."""
    return dispatch_sorted(call, shuffle=True)


def dispatch_clamps_unrouted(call: StageCall) -> list[Received]:
    """The real vllm-ascend bug (placement.md rule 6): a slot whose logical id is −1 is
    clamped to expert 0 and dispatched there (the ids of a placed call's −1 slots read 0),
    instead of going nowhere."""
    return dispatch_sorted(call, routed=False)


def dispatch_drops_last_row_of_full_expert(call: StageCall) -> list[Received]:
    """Batched layout: an expert whose rows reach the capacity loses its last row (an
    off-by-one bound check, ``pos < capacity - 1``); its count still says full."""
    out = dispatch_sorted(call)
    for b in out:
        full = np.flatnonzero(b.counts == call.capacity)
        b.x[full, -1] = 0
        b.source[full, -1] = -1
    return out


def dispatch_counts_padding_row(call: StageCall) -> list[Received]:
    """Batched layout: the count of every expert below capacity includes one padding row
    (what vLLM PR #38128 keeps out of the load, placement.md rule 6)."""
    out = dispatch_sorted(call)
    return [Received(x=b.x, source=b.source,
                     counts=np.where(b.counts < call.capacity, b.counts + 1, b.counts)
                     .astype(np.int32)) for b in out]


def experts_rows(call: StageCall, shift: int = 0) -> list[Array]:
    """Correct with ``shift = 0``: each valid row through its local expert's FFN (float64 on
    dequantised weights, one rounding); padding rows left 0."""
    cfg = call.problem.config
    out = []
    for r, b in enumerate(call.received):
        rows, _, expert = valid_rows(b, call.layout)
        y = np.zeros(rows.shape, np.float64)
        for e in np.unique(expert):
            mine = expert == e
            lists = call.problem.ranks[r].expert_lists(int((e + shift) % cfg.experts_per_rank))
            y[mine] = _ffn(rows[mine].astype(np.float64), lists, cfg.swiglu_limit,
                           cfg.oai_alpha)
        full = np.zeros(b.x.shape, b.x.dtype)
        if call.layout == "contiguous":
            full[:] = y.astype(b.x.dtype)
        else:
            within = np.arange(expert.size) - np.repeat(np.cumsum(b.counts) - b.counts,
                                                        b.counts)
            full[expert, within] = y.astype(b.x.dtype)
        out.append(full)
    return out


def experts_next_expert_weights(call: StageCall) -> list[Array]:
    """The grouped GEMM indexes expert ``e + 1``'s weights for expert ``e``'s rows (an
    off-by-one expert offset)."""
    return experts_rows(call, shift=1)


def combine_by_ids(call: StageCall, ids: list[Array] | None = None,
                   weighted: bool = True) -> list[Array]:
    """Correct with the call's own ids: each slot's row found from the top-k ids alone."""
    problem = call.problem
    cfg = problem.config
    e = cfg.experts_per_rank
    g = _slots(call, ids if ids is not None else [r.expert_idx for r in problem.ranks])[3]
    routed = np.flatnonzero(g >= 0)
    order = routed[np.argsort(g[routed], kind="stable")]  # expert-major, then slot order
    per_expert = np.bincount(g[routed], minlength=cfg.num_experts)
    within = np.empty(g.size, np.int64)
    within[order] = np.arange(order.size) - np.repeat(np.cumsum(per_expert) - per_expert,
                                                      per_expert)
    seg = per_expert.reshape(cfg.ep_size, e)
    seg_start = (np.cumsum(seg, axis=1) - seg).reshape(-1)
    y = np.zeros((g.size, cfg.hidden), np.float32)
    for d, b in enumerate(call.received):
        mine = routed[g[routed] // e == d]
        if call.layout == "contiguous":
            pos = seg_start[g[mine]] + within[mine]
            ok = pos < b.x.shape[0]
            y[mine[ok]] = b.x[pos[ok]].astype(np.float32)
        else:
            ok = within[mine] < b.x.shape[1]
            y[mine[ok]] = b.x[g[mine[ok]] % e, within[mine[ok]]].astype(np.float32)
    probs = np.concatenate([r.probs.reshape(-1) for r in problem.ranks])
    terms = (y * probs[:, None] if weighted else y).reshape(-1, cfg.top_k, cfg.hidden)
    acc = terms[:, 0]
    for k in range(1, cfg.top_k):
        acc = acc + terms[:, k]
    out = acc.astype(problem.ranks[0].x.dtype)
    bounds = np.cumsum((0, *cfg.tokens_per_rank))
    return [out[lo:hi] for lo, hi in pairwise(bounds)]


def combine_ignores_weights(call: StageCall) -> list[Array]:
    """Sums the expert outputs without the routing weights."""
    return combine_by_ids(call, weighted=False)


def combine_dispatched_ids(call: StageCall) -> list[Array]:
    """MoRI's bug (vllm PR #52639, placement.md "Invariances that catch EP-only bugs"): each
    rank's combine is given the dispatched ids (the top-k ids of the tokens it *received*,
    one row per received token in (source rank, token) order) instead of its own tokens'
    top-k ids; a row past the received tokens reads −1 (no expert)."""
    cfg = call.problem.config
    ids_all = np.concatenate([r.expert_idx for r in call.problem.ranks]).astype(np.int64)
    starts = np.cumsum((0, *cfg.tokens_per_rank))[:-1]
    ids = []
    for r, b in enumerate(call.received):
        source = valid_rows(b, call.layout)[1]
        tokens = np.unique(source[:, :2], axis=0) if source.size else np.zeros((0, 2), int)
        table = np.full((cfg.tokens_per_rank[r], cfg.top_k), -1, np.int64)
        n = min(len(tokens), cfg.tokens_per_rank[r])
        if n:
            table[:n] = ids_all[starts[tokens[:n, 0]] + tokens[:n, 1]]
        ids.append(table)
    return combine_by_ids(call, ids)


#: The correct implementation of each stage.
CORRECT = {"dispatch": dispatch_sorted, "experts": experts_rows, "combine": combine_by_ids}
#: The mutants searched with placed stage calls
#: (:func:`spec.modular_strategies.placed_stage_calls`): name -> (stage, implementation).
PLACED_STAGE_MUTANTS = {"dispatch_clamps_unrouted": ("dispatch", dispatch_clamps_unrouted)}
#: name -> (stage, the layouts it is searched in, implementation).
STAGE_MUTANTS = {
    "dispatch_drops_last_row_of_full_expert":
        ("dispatch", ("batched",), dispatch_drops_last_row_of_full_expert),
    "dispatch_counts_padding_row": ("dispatch", ("batched",), dispatch_counts_padding_row),
    "experts_next_expert_weights":
        ("experts", ("contiguous", "batched"), experts_next_expert_weights),
    "combine_ignores_weights": ("combine", ("contiguous", "batched"), combine_ignores_weights),
    "combine_dispatched_ids": ("combine", ("contiguous", "batched"), combine_dispatched_ids),
}
