"""The reference of a placement-aware call (:class:`spec.placement.PlacedCall`): the call mapped
onto the existing model, which then computes it (``docs/routing.md``).

The mapping is exact, not an approximation: rank ``r`` of the mapped :class:`spec.Problem`
holds ``E' = P/EP + S + 1`` local experts — its ``P/EP`` physical slots, then the ``S`` shared
experts (replicated: every rank runs them on its own tokens), then a *null* expert (a copy of
slot 0, weight 0) that −1 slots go to. Each token's ids become its chosen physical slots
followed by one slot per shared expert on its own rank, and its weights the combine weights of
:class:`spec.placement.RoutingWeights` followed by 1.0: the combine adds, in k order, the
routed sum (with rsf) and then the shared outputs. With ``on_input`` the token is ``w·x`` in
x's dtype, the weight rounded to x's dtype first (vLLM's ``a1 * topk_weights.to(a1.dtype)``).
The identity placement with default weights and no shared expert maps a problem onto itself
(E' = E + 1, an unused null expert).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from oracle.model.numerics import Numerics
from oracle.model.reference import RankResult, Result, run
from spec import DTYPES, Problem
from spec.fields import FIELDS
from spec.placement import PlacedCall

__all__ = ["PlacedResult", "mapped_problem", "run_placed"]

Array = np.ndarray[Any, Any]


def _local_lists(call: PlacedCall, r: int) -> dict[str, Any]:
    """Rank ``r``'s TensorLists of the mapped problem: its slots, the shared experts, the
    null expert, in the call's TensorList form."""
    rank = call.problem.ranks[r]
    shared = call.shared.lists if call.shared is not None else {}
    out: dict[str, Any] = {}
    for f in FIELDS:
        if not f.tensor_list or (tensors := getattr(rank, f.name)) is None:
            continue
        given = [np.asarray(t) for t in shared.get(f.name, ())]
        extra = list(given[0]) if len(given) == 1 else given  # per shared expert, either form
        out[f.name] = ([np.concatenate([tensors[0], *(t[None] for t in extra), tensors[0][:1]])]
                       if len(tensors) == 1 else [*tensors, *extra, tensors[0]])
    return out


def mapped_problem(call: PlacedCall) -> Problem:
    """The :class:`spec.Problem` whose ``out`` is the placed call's ``out`` (module doc)."""
    cfg = call.config
    e, s = cfg.experts_per_rank, 0 if call.shared is None else call.shared.count
    e_mapped = e + s + 1
    null = e + s
    ranks = []
    for r, (rank, phys, routed) in enumerate(zip(call.problem.ranks, call.physical, call.routed)):
        m = rank.num_tokens
        routed_ids = np.where(routed, (phys // e) * e_mapped + phys % e, r * e_mapped + null)
        shared_ids = np.broadcast_to(r * e_mapped + e + np.arange(s), (m, s))
        probs = call.weights.combine_weights(rank.probs, routed)
        x = rank.x
        if call.weights.on_input:
            dtype = DTYPES[cfg.x_dtype]
            w = call.weights.normalised(rank.probs, routed)[:, :1].astype(dtype)
            x = (x.astype(np.float32) * w.astype(np.float32)).astype(dtype)  # exact product
        ranks.append(dataclasses.replace(
            rank, x=x, expert_idx=np.concatenate([routed_ids, shared_ids], axis=1).astype(np.int32),
            probs=np.concatenate([probs, np.ones((m, s), np.float32)], axis=1),
            **_local_lists(call, r)))
    return Problem(ranks, **cfg.call_attributes())


@dataclass(frozen=True)
class PlacedResult:
    """The placed call's outputs: per rank ``out`` and ``expert_token_nums`` over its ``P/EP``
    physical slots (−1 slots and shared experts not counted), plus the mapped problem and its
    full :class:`oracle.model.reference.Result` (trace included)."""

    ranks: tuple[RankResult, ...]
    mapped: Problem
    result: Result


def run_placed(
    call: PlacedCall, *, numerics: str | Numerics = "faithful", envelope: bool = False
) -> PlacedResult:
    """:func:`oracle.model.reference.run` of :func:`mapped_problem`, its counts cut to the
    physical slots.

    >>> import numpy as np
    >>> from spec import OpConfig, random_problem
    >>> from spec.placement import PlacedCall, RoutingWeights
    >>> p = random_problem(OpConfig(ep_size=2, experts_per_rank=2, top_k=2, hidden=32,
    ...                             intermediate=16, tokens_per_rank=(3, 1)))
    >>> call = PlacedCall(p.ranks, weights=RoutingWeights(routed_scaling_factor=2.5))
    >>> [r.expert_token_nums.shape for r in run_placed(call).ranks]
    [(2,), (2,)]
    """
    mapped = mapped_problem(call)
    result = run(mapped, numerics=numerics, envelope=envelope)
    e = call.config.experts_per_rank
    ranks = tuple(dataclasses.replace(r, expert_token_nums=r.expert_token_nums[:e])
                  for r in result.ranks)
    return PlacedResult(ranks, mapped, result)
