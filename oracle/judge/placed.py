"""The judge of a placement-aware call: :func:`oracle.judge.verdict.compare` on the mapped
problem (:func:`oracle.model.routing.mapped_problem`), so the tolerance policy, the row test and
every message are those of the plain call.

An implementation returns, per rank, ``out`` (M_r, K) and ``expert_token_nums`` over its
``P/EP`` physical slots (−1 slots and shared experts not counted, placement.md rule 6).
"""

from __future__ import annotations

import numpy as np

from oracle.judge.verdict import Verdict, compare, structured_outputs
from oracle.model.numerics import Numerics
from oracle.model.routing import run_placed
from spec.placement import PlacedCall

__all__ = ["compare_placed"]


def compare_placed(
    call: PlacedCall, outputs: object, *, numerics: str | Numerics = "ideal", ulps: float = 0.0
) -> Verdict:
    """Judge ``outputs`` of a placed call; never raises for bad outputs. ``numerics``
    defaults to ``ideal``: GPU stacks have no Ascend kernel profile.

    >>> from spec import OpConfig, random_problem
    >>> p = random_problem(OpConfig(ep_size=1, experts_per_rank=2, top_k=1, hidden=16,
    ...                             intermediate=8, tokens_per_rank=(2,)))
    >>> call = PlacedCall(p.ranks)
    >>> compare_placed(call, [(r.out, r.expert_token_nums) for r in run_placed(call).ranks]).ok
    True
    """
    checked = structured_outputs(call.problem, outputs)
    if isinstance(checked, Verdict):
        return checked
    placed = run_placed(call, numerics=numerics)
    e = call.config.experts_per_rank
    # The mapped problem's shared and null experts are the model's bookkeeping: their counts
    # are not the implementation's to report.
    full = [(out, np.concatenate([nums, want.expert_token_nums[e:]]))
            for (out, nums), want in zip(checked, placed.result.ranks)]
    return compare(placed.mapped, full, numerics=numerics, expected=placed.result, ulps=ulps)
