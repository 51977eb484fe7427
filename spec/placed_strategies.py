"""Hypothesis strategies for placement-aware calls (:class:`spec.placement.PlacedCall`).

Structure first (EP, slots, replica family, routing-weight settings), then bulk values from a
drawn seed (:mod:`spec.synth`), so a failure shrinks to few ranks, few tokens and the simplest
placement. What the families reach: replica counts 0, 1 and R = EP; a hot expert with many
replicas on one rank or on distinct ranks; −1 ids; shared experts on and off; rsf ≠ 1 with
renormalize on and off; weights on the input; top_k = 1; ragged token counts with empty ranks;
EP up to 32; int32 and int64 ids; both dispatch modes and both replica choices; every weight
format (:data:`PLACED_KINDS`), its row selected as :class:`spec.OpConfig` selects it (the call's
``act_scheme``, the selecting inputs of :class:`spec.fields.Selector`).

>>> from hypothesis import find
>>> call = find(placed_calls(), lambda c: c.placement.redundant > 0)
>>> call.placement.redundant, call.config.ep_size
(1, 1)
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from spec.config import MAX_EP_SIZE, OpConfig
from spec.fields import GATE_VARIANTS, VARIANTS, Variant
from spec.placement import NO_EXPERT, PlacedCall, Placement, RoutingWeights, SharedExperts
from spec.problem import RankInputs
from spec.synth import expert_weights, normal_tokens, softmax_probs

__all__ = ["PLACED_KINDS", "REPLICA_FAMILIES", "placed_calls", "placements"]

#: How the redundant slots are drawn: none, one, R = EP (one per rank), a hot expert 0 with
#: every redundant slot on as few ranks as possible or on distinct ranks, or at random.
REPLICA_FAMILIES = ("none", "one", "per-rank", "hot-same-rank", "hot-distinct-ranks", "random")


#: The weight kinds :func:`placed_calls` draws: ``float`` (weights in x's dtype: the gate's
#: ``bf16``/``fp16``) and every other gate variant by name (:data:`spec.fields.GATE_VARIANTS`).
PLACED_KINDS: dict[str, Variant] = {
    "float": next(v for v in VARIANTS if v.weight_dtype == "x"),
    **{g.name: g.variant for g in GATE_VARIANTS if g.variant.weight_dtype != "x"}}


def _row(family: str, ep: int, e: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """``phy2log`` of one layer and the number of logical experts, for a replica family."""
    slots = ep * e
    redundant = {"none": 0, "one": 1, "per-rank": ep}.get(
        family, int(rng.integers(1, slots)) if slots > 1 else 0)
    if family == "hot-distinct-ranks":
        redundant = min(redundant, ep - 1)
    redundant = min(redundant, slots - 1)
    logical = slots - redundant
    if family == "hot-same-rank":  # slots 0..R hold expert 0: rank 0 first
        return np.concatenate([np.zeros(redundant + 1, np.int64),
                               np.arange(1, logical)]), logical
    if family == "hot-distinct-ranks":  # the first slot of ranks 0..R holds expert 0
        row = np.full(slots, -1, np.int64)
        row[np.arange(redundant + 1) * e] = 0
        row[row < 0] = np.arange(1, logical)
        return row, logical
    extra = rng.integers(0, logical, redundant)
    return rng.permutation(np.concatenate([np.arange(logical), extra])), logical


@st.composite
def placements(draw: st.DrawFn, *, max_ep: int = MAX_EP_SIZE, min_ep: int = 1,
               max_slots_per_rank: int = 4) -> Placement:
    """A valid :class:`Placement`: EP mostly small (``min_ep``..4), up to ``max_ep``; 1 to
    ``max_slots_per_rank`` slots per rank; a replica family of :data:`REPLICA_FAMILIES`; one or
    two layers; a replica choice and dispatch mode the contract allows."""
    if not 1 <= min_ep <= max_ep <= MAX_EP_SIZE:
        raise InvalidArgument(f"placements(min_ep={min_ep}, max_ep={max_ep}): pass "
                              f"1 <= min_ep <= max_ep <= {MAX_EP_SIZE}")
    ep = draw(st.integers(min_ep, max(min_ep, min(4, max_ep))) | st.integers(min_ep, max_ep))
    e = draw(st.integers(1, max_slots_per_rank))
    family = draw(st.sampled_from(REPLICA_FAMILIES))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    row, logical = _row(family, ep, e, rng)
    layers = draw(st.integers(1, 2))
    table = np.stack([row] + [rng.permutation(row) for _ in range(layers - 1)])
    dispatch = draw(st.sampled_from(("all_to_all", "all_gather")))
    choice = draw(st.sampled_from(("token", "rank") if dispatch == "all_to_all" or
                                  logical == ep * e else ("token",)))
    return Placement(phy2log=table, num_logical=logical, ep_size=ep,
                     layer=draw(st.integers(0, layers - 1)), replica_choice=choice,
                     dispatch=dispatch)


#: The default of :func:`placed_calls` (its keyword shadows the function's name).
_PLACEMENTS = placements()


def _form(stacked: np.ndarray, form: str) -> list[np.ndarray]:
    return [stacked] if form == "stacked" else [np.ascontiguousarray(t) for t in stacked]


@st.composite
def placed_calls(draw: st.DrawFn, *, placements: st.SearchStrategy[Placement] | None = None,
                 max_tokens: int = 3, shared: st.SearchStrategy[int] | None = None,
                 variants: tuple[str, ...] = ("w8a8", "float")) -> PlacedCall:
    """A valid :class:`PlacedCall` (the docstring of the module says what the families reach).

    ``placements``: the placement strategy (default :func:`placements`); ``max_tokens`` per
    rank; ``shared``: how many shared experts (default 0, 1 or 2); ``variants``: weight
    kinds of :data:`PLACED_KINDS` (``w8a8``: int8 with scales, ``float``: x's dtype, ...).
    """
    unknown = [v for v in variants if v not in PLACED_KINDS]
    if unknown or not variants:
        raise InvalidArgument(f"placed_calls(variants={variants!r}): pass a non-empty tuple of "
                              f"{', '.join(PLACED_KINDS)}")
    pl = draw(placements if placements is not None else _PLACEMENTS)
    ep, e = pl.ep_size, pl.slots_per_rank
    top_k = draw(st.integers(1, min(4, pl.num_logical)))
    tokens = draw(st.lists(st.integers(0, max_tokens), min_size=ep, max_size=ep))
    x_dtype = draw(st.sampled_from(("bfloat16", "float16")))
    selection = PLACED_KINDS[draw(st.sampled_from(variants))].selection(x_dtype)
    hidden = draw(st.sampled_from((32, 64)))
    n_shared = draw(shared if shared is not None else st.sampled_from((0, 1, 2)))
    renormalize = draw(st.booleans())
    rsf = draw(st.sampled_from((1.0, 2.5, 0.5)))
    on_input = top_k == 1 and n_shared == 0 and draw(st.booleans())
    unrouted = draw(st.booleans())
    id_dtype = draw(st.sampled_from(("int32", "int64")))
    form = "list" if e > 1 and draw(st.booleans()) else "stacked"
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))

    def config(experts: int, m: int = 0) -> OpConfig:
        return OpConfig(ep_size=1, experts_per_rank=experts, top_k=1, hidden=hidden,
                        intermediate=16, tokens_per_rank=(m,), **asdict(selection))

    logical = expert_weights(config(pl.num_logical), rng)  # stacked over logical experts
    ranks = []
    for r, m in enumerate(tokens):
        slots = pl.row[r * e:(r + 1) * e]
        ids = np.argsort(rng.random((m, pl.num_logical)), axis=1)[:, :top_k]
        if unrouted:
            ids = np.where(rng.random(ids.shape) < 0.3, NO_EXPERT, ids)
        lists: dict[str, Any] = {name: _form(w[0][slots], form) for name, w in logical.items()}
        ranks.append(RankInputs(x=normal_tokens(config(1), rng, m),
                                expert_idx=ids.astype(id_dtype),
                                probs=softmax_probs(rng, m, top_k), **lists))
    shared_experts = None
    if n_shared:
        weights = expert_weights(config(n_shared), rng)
        shared_form = "stacked" if n_shared == 1 else form  # one per-expert tensor is stacked
        shared_experts = SharedExperts(lists={name: _form(w[0], shared_form)
                                              for name, w in weights.items()})
    return PlacedCall(ranks, placement=pl, shared=shared_experts,
                      weights=RoutingWeights(renormalize=renormalize, routed_scaling_factor=rsf,
                                             on_input=on_input), act_scheme=selection.act_scheme)
