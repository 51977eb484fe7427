"""Value-preserving reduction of a counterexample after Hypothesis has shrunk it (issue 24).

Hypothesis shrinks by redrawing: a failure that depends on the drawn values (a near tie of
one quantisation, a tiny row) is lost when a smaller shape redraws them, so the shrinker stops
at a large call (measured: EP = 24, M = [1]·24, for one failing token). One output row of
``dispatch_ffn_combine`` reads only its own token (x, expert ids, routing weights) and the
experts that token routes to (§4–§6 of docs/contract/dispatch_ffn_combine.md): every other
rank, token and expert can go. :func:`reduce_counterexample` builds the one-token call that
keeps exactly those values, bit for bit, re-judges the implementation on it and keeps it only
if it still fails: the re-judgement, not the analysis, is the evidence.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from oracle.judge.verdict import Verdict
from spec import Problem, RankInputs
from spec.errors import SpecError
from spec.fields import FIELDS
from spec.limits import ShapeDomain

__all__ = ["VALUE_STAGES", "Reduction", "reduce_counterexample", "token_call"]

#: The stages whose failure sits on one output row, which the reduction can isolate.
VALUE_STAGES = ("out", "non_finite")


@dataclasses.dataclass(frozen=True)
class Reduction:
    """The smaller failing call, its verdict and outputs, and what was removed."""

    problem: Problem
    verdict: Verdict
    outputs: object
    before: str
    after: str

    def describe(self) -> str:
        return (f"reduced after shrinking, the failing row's values kept bit for bit: "
                f"{self.before} -> {self.after}")


def _size(problem: Problem) -> str:
    cfg = problem.config
    return f"EP={cfg.ep_size} E={cfg.experts_per_rank} M={list(cfg.tokens_per_rank)}"


def token_call(problem: Problem, rank: int, token: int, extra_experts: int = 0) -> Problem:
    """The one-rank, one-token call that computes row ``token`` of rank ``rank`` from the same
    values: its x row, routing weights and experts (renumbered 0, 1, … in global order), plus
    ``extra_experts`` unused ones (the lowest global ids it does not route to), for shape
    domains that ask for more experts. Raises :class:`spec.SpecError` if it is not a valid
    call (a ``max_output_size`` too small for one token's slots)."""
    cfg = problem.config
    src = problem.ranks[rank]
    ids = src.expert_idx[token].astype(np.int64)
    used = np.unique(ids)
    spare = np.setdiff1d(np.arange(cfg.num_experts), used)[:extra_experts]
    experts = np.concatenate([used, spare])
    stacked = len(src.w1) == 1 or experts.size == 1  # one tensor per expert of one: stacked
    lists: dict[str, Any] = {}
    for f in FIELDS:
        if not f.tensor_list or getattr(src, f.name) is None:
            continue
        tensors = [problem.ranks[g // cfg.experts_per_rank].expert_lists(
            int(g % cfg.experts_per_rank))[f.name] for g in experts]
        lists[f.name] = [np.stack(tensors)] if stacked else [t.copy() for t in tensors]
    local = np.searchsorted(experts[: used.size], ids).astype(np.int32)
    inputs = RankInputs(x=src.x[token:token + 1].copy(), expert_idx=local[None, :],
                        probs=src.probs[token:token + 1].copy(), **lists)
    return Problem([inputs], max_output_size=problem.max_output_size,
                   swiglu_limit=problem.swiglu_limit, swiglu_alpha=problem.swiglu_alpha)


def reduce_counterexample(
    problem: Problem, verdict: Verdict, judge: Callable[[Problem], tuple[Verdict, object]],
    domain: ShapeDomain | None = None,
) -> Reduction | None:
    """The smallest one-token call (:func:`token_call`, inside ``domain`` if given) on which
    ``judge`` still fails at a value stage, or ``None``: the failure is not on one row, the
    call is already that small, or no reduced call fails."""
    if verdict.stage not in VALUE_STAGES or verdict.rank is None or not verdict.where:
        return None
    cfg = problem.config
    if cfg.ep_size == 1 and sum(cfg.tokens_per_rank) == 1:
        return None
    rank, token = verdict.rank, verdict.where[0]
    routed = np.unique(problem.ranks[rank].expert_idx[token]).size
    extra = 0 if domain is None else max(0, domain.min_experts_per_rank - routed)
    try:
        small = token_call(problem, rank, token, extra)
    except SpecError:
        return None
    if domain is not None and domain.violations(small):
        return None
    got, outputs = judge(small)
    if got.ok or got.stage not in VALUE_STAGES:
        return None
    return Reduction(small, got, outputs, _size(problem), _size(small))
