"""Placement-aware implementations: a correct one, written from ``docs/routing.md`` without the
oracle's model, and one mutant per real bug of ``docs/contract/placement.md``.

Each is ``impl(call: spec.placement.PlacedCall) -> [(out, expert_token_nums) per rank]``:
float64 mathematics on dequantised weights, rounded once to x's dtype; ``expert_token_nums``
counts the slots each local physical slot computed. Every mutant overrides one hook.

>>> sorted(PLACED_MUTANTS)[:2]
['clamp_invalid_to_zero', 'rank_choice_without_all_to_all']
"""

from __future__ import annotations

from typing import Any

import numpy as np

from spec.placement import NO_EXPERT, PlacedCall

__all__ = ["PLACED_MUTANTS", "PlacedMoe", "placed_correct"]

Array = np.ndarray[Any, Any]


def _ffn(x: Array, lists: dict[str, Array], limit: float | None, alpha: float | None) -> Array:
    """One expert on rows ``x`` (float64): ``W2ᵀ(silu(gate)·up)`` on dequantised weights."""
    w1 = lists["w1"].astype(np.float64) * lists.get("scale1", np.float64(1))
    w2 = lists["w2"].astype(np.float64) * lists.get("scale2", np.float64(1))
    h = x @ w1
    i = w2.shape[0]
    gate, up = h[:, :i], h[:, i:]
    if limit is not None:
        gate, up = np.minimum(gate, limit), np.clip(up, -limit, limit)
    if alpha is None:
        act = gate / (1 + np.exp(-gate)) * up
    else:  # SwigluOAI
        act = gate / (1 + np.exp(-alpha * gate)) * (up + 1)
    return np.asarray(act @ w2)


class PlacedMoe:
    """The correct placement-aware MoE (module doc); each method is one rule a mutant breaks."""

    def logical_ids(self, call: PlacedCall) -> Array:
        """(T, k) logical ids of every token of every rank; −1 routes nowhere."""
        return np.concatenate([np.where(r.is_active()[:, None], ids.astype(np.int64), NO_EXPERT)
                               for r, ids in zip(call.problem.ranks, call.logical)])

    def choice(self, call: PlacedCall) -> str:
        """The replica choice in use: the placement's."""
        return call.placement.replica_choice

    def replica(self, call: PlacedCall, logical: Array, gtoken: Array, row: Array,
                rank: Array | int) -> Array:
        """The physical slot serving each slot: replica ``gtoken % count`` (by token) or
        ``(row + rank + id) % count`` (by rank) of the logical expert's ascending slots;
        ``row`` is the token's row as the choosing rank sees it."""
        pl = call.placement
        lid = np.maximum(logical, 0)
        counts = np.bincount(pl.row, minlength=pl.num_logical)
        j = (gtoken[:, None] % counts[lid] if self.choice(call) == "token"
             else (row[:, None] + np.asarray(rank)[..., None] + lid) % counts[lid])
        slots = np.argsort(pl.row, kind="stable")  # logical-major, ascending slots
        first = np.cumsum(counts) - counts
        return np.where(logical == NO_EXPERT, NO_EXPERT, slots[first[lid] + j])

    def normalised(self, call: PlacedCall, logical: Array, probs: Array) -> Array:
        """The router's weight of each slot (float64), renormalised over routed slots if asked."""
        w = np.where(logical != NO_EXPERT, probs.astype(np.float64), 0.0)
        if call.weights.renormalize:
            total = w.sum(axis=1, keepdims=True)
            w = np.divide(w, total, out=np.zeros_like(w), where=total > 0)
        return np.asarray(w)

    def routed_scales(self, call: PlacedCall, logical: Array, probs: Array) -> Array:
        """What the combine multiplies each slot by: rsf · weight (rsf alone, weights on the
        input)."""
        w = (logical != NO_EXPERT) * 1.0 if call.weights.on_input else self.normalised(
            call, logical, probs)
        return np.asarray(w * call.weights.routed_scaling_factor)

    def output_scale(self, call: PlacedCall) -> float:
        """A factor on the routed sum: 1 (rsf is already in the weights)."""
        return 1.0

    def shared_copies(self, call: PlacedCall) -> int:
        """How many times the shared experts' output is added: once."""
        return 1

    def slot_lists(self, call: PlacedCall, slot: int) -> dict[str, Array]:
        """The weights, scales and biases physical slot ``slot`` computes with: its rank's."""
        e = call.config.experts_per_rank
        return dict(call.problem.ranks[slot // e].expert_lists(slot % e))

    def __call__(self, call: PlacedCall) -> list[tuple[Array, Array]]:
        cfg, pl = call.config, call.placement
        ep, e = cfg.ep_size, cfg.experts_per_rank
        ranks = call.problem.ranks
        x = np.concatenate([r.x for r in ranks]).astype(np.float64)
        probs = np.concatenate([r.probs for r in ranks])
        src = np.repeat(np.arange(ep), cfg.tokens_per_rank)
        gtoken = np.arange(x.shape[0])
        row = gtoken - np.cumsum((0, *cfg.tokens_per_rank))[src]
        logical = self.logical_ids(call)
        scale = self.routed_scales(call, logical, probs)
        x_in = x
        if call.weights.on_input:  # top_k = 1; vLLM: a1 * topk_weights.to(a1.dtype)
            dtype = ranks[0].x.dtype
            w = self.normalised(call, logical, probs)[:, :1].astype(dtype).astype(np.float64)
            x_in = (x * w).astype(dtype).astype(np.float64)
        # Who computes which slot: under all-to-all the source's choice, once; under
        # all-gather every rank chooses for every token and computes what is local to it.
        if pl.dispatch == "all_to_all":
            passes = [(self.replica(call, logical, gtoken, row, src), None)]
        else:
            passes = [(self.replica(call, logical, gtoken, gtoken, r), r) for r in range(ep)]
        routed = np.zeros_like(x)
        counts = np.zeros(pl.slots, np.int64)
        for phys, rank in passes:
            mine = phys != NO_EXPERT if rank is None else (phys // e == rank) & (phys >= 0)
            counts += np.bincount(phys[mine], minlength=pl.slots)
            for p in np.unique(phys[mine]):
                t, k = np.nonzero(mine & (phys == p))
                y = _ffn(x_in[t], self.slot_lists(call, int(p)), cfg.swiglu_limit,
                         cfg.oai_alpha)
                np.add.at(routed, t, y * scale[t, k, None])
        out = routed * self.output_scale(call)
        if call.shared is not None:
            lists = {name: list(v[0]) if len(v) == 1 else list(v)
                     for name, v in call.shared.lists.items()}
            for s in range(call.shared.count):
                one = {name: np.asarray(v[s]) for name, v in lists.items()}
                out += self.shared_copies(call) * _ffn(x, one, cfg.swiglu_limit, cfg.oai_alpha)
        out_x = out.astype(ranks[0].x.dtype)
        bounds = np.cumsum((0, *cfg.tokens_per_rank))
        return [(out_x[bounds[r]:bounds[r + 1]], counts[r * e:(r + 1) * e].astype(np.int32))
                for r in range(ep)]


class RankChoiceWithoutAllToAll(PlacedMoe):
    """Every rank sees every token and picks replicas by ``(row + ep_rank + id) % count``: a
    slot is computed on no rank or on several (sglang PR #32962, GSM8K 0.63 → 0.42; correct
    only without redundant experts)."""

    def choice(self, call: PlacedCall) -> str:
        return "rank" if call.placement.dispatch == "all_gather" else super().choice(call)


class ClampInvalidToZero(PlacedMoe):
    """An invalid logical id (−1) clamped to 0 before the lookup: the slot runs expert 0 with
    its weight (vllm-ascend ``map_and_record``)."""

    def logical_ids(self, call: PlacedCall) -> Array:
        return np.maximum(super().logical_ids(call), 0)


class RsfTwice(PlacedMoe):
    """The routed scaling factor applied in the router and again on the output (vllm PR
    #45037, GSM8K 25 % → 92 % after the fix; sglang PR #35152)."""

    def output_scale(self, call: PlacedCall) -> float:
        return call.weights.routed_scaling_factor


class RsfSkippedWithoutRenormalize(PlacedMoe):
    """The routed scaling factor applied only on the renormalising path (sglang-jax PR #1282,
    sglang PR #31449)."""

    def routed_scales(self, call: PlacedCall, logical: Array, probs: Array) -> Array:
        scales = super().routed_scales(call, logical, probs)
        return scales if call.weights.renormalize else scales / call.weights.routed_scaling_factor


class SharedPerRank(PlacedMoe):
    """The replicated shared expert's output added before the all-reduce: counted world-size
    times (TensorRT-LLM PR #15922)."""

    def shared_copies(self, call: PlacedCall) -> int:
        return call.config.ep_size


class ReplicasNeverLoaded(PlacedMoe):
    """Only each logical expert's first slot is loaded; a redundant replica computes with the
    zeros it was allocated with (vllm PR #37322, GSM8K 0.95 → 0.08)."""

    def slot_lists(self, call: PlacedCall, slot: int) -> dict[str, Array]:
        lists = super().slot_lists(call, slot)
        pl = call.placement
        if pl.log2phy()[pl.row[slot], 0] == slot:
            return lists
        return {name: np.zeros_like(a) for name, a in lists.items()}


class ScalesMovedWithoutWeights(PlacedMoe):
    """The rebalance moved each slot's scales to its new logical expert but left the weights
    of the slot's old one, logical ``slot % num_logical`` before the move (vllm PR #47588);
    without scales (float weights) the weights alone stayed behind."""

    def slot_lists(self, call: PlacedCall, slot: int) -> dict[str, Array]:
        pl = call.placement
        lists = super().slot_lists(call, slot)
        old = super().slot_lists(call, int(pl.log2phy()[slot % pl.num_logical, 0]))
        return {name: old[name] if name in ("w1", "w2") else a for name, a in lists.items()}


placed_correct = PlacedMoe()

#: Mutant name -> implementation; each stands for one real bug of placement.md.
PLACED_MUTANTS: dict[str, PlacedMoe] = {
    "rank_choice_without_all_to_all": RankChoiceWithoutAllToAll(),
    "clamp_invalid_to_zero": ClampInvalidToZero(),
    "rsf_twice": RsfTwice(),
    "rsf_skipped_without_renormalize": RsfSkippedWithoutRenormalize(),
    "shared_per_rank": SharedPerRank(),
    "replicas_never_loaded": ReplicasNeverLoaded(),
    "scales_moved_without_weights": ScalesMovedWithoutWeights(),
}
