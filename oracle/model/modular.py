"""The reference of each stage of the modular split (:mod:`spec.modular`, ``docs/routing.md``
"Gating one stage"), built from the fused call's model rather than beside it:

- the dispatch is :func:`oracle.model.reference.route`'s receive layout, laid out as asked;
- the experts of one rank are the fused model run on a one-rank problem whose tokens are the
  rank's received rows, each routed to its local expert with weight 1 (every step of §6 works
  row by row, so this is the fused call's ``y``);
- the combine is the profile's :class:`oracle.model.kernels.Combine` with the weights applied
  in it, on the given expert outputs, as an envelope of every value a legitimate kernel may
  return; in ideal mode, every float32-or-finer sum in any order or an x-dtype sum.
"""

from __future__ import annotations

import dataclasses
from itertools import pairwise
from typing import Any

import numpy as np

from oracle.model.kernels import Combine, Env, IdealAssumptions, cast
from oracle.model.numerics import Numerics, resolve_numerics
from oracle.model.reference import route
from spec import DTYPES, Problem
from spec.modular import Received, StageCall, valid_rows
from spec.synth import normal_tokens

__all__ = ["CombineEnvelope", "combine_envelope", "dispatch_reference", "experts_problem",
           "stage_inputs"]

Array = np.ndarray[Any, Any]

#: What a batched buffer's padding holds in the inputs the oracle hands a stage: NaN rows
#: (an implementation that reads padding into a valid row shows it) and source −1. DeepEP
#: leaves the padding as the last call wrote it [inferred].
PAD_SOURCE = -1


def _tokens(problem: Problem) -> tuple[Array, Array]:
    """Every rank's x on one axis, and where each rank's tokens start on it."""
    cfg = problem.config
    x = np.concatenate([r.x for r in problem.ranks])
    starts = np.concatenate([[0], np.cumsum(cfg.tokens_per_rank)[:-1]]).astype(np.int64)
    return x, starts


def _laid_out(rows: Array, source: Array, counts: Array, layout: str, capacity: int) -> Received:
    """Expert-major rows as a :class:`Received` in ``layout`` (batched: padded to
    ``capacity`` rows per expert with NaN rows and source −1)."""
    counts32 = counts.astype(np.int32)
    if layout == "contiguous":
        return Received(x=rows, source=source, counts=counts32)
    e_local = counts.shape[0]
    expert = np.repeat(np.arange(e_local), counts)
    within = np.arange(expert.shape[0]) - np.repeat(np.cumsum(counts) - counts, counts)
    x = np.full((e_local, capacity, rows.shape[1]), np.nan, dtype=np.float32).astype(rows.dtype)
    src = np.full((e_local, capacity, 3), PAD_SOURCE, dtype=np.int64)
    x[expert, within] = rows
    src[expert, within] = source
    return Received(x=x, source=src, counts=counts32)


def dispatch_reference(call: StageCall) -> tuple[Received, ...]:
    """Per destination rank, what the dispatch delivers, in the reference's row order
    (expert-major, then source rank, then the source's slot order) and the call's layout;
    a slot ``call.routed`` leaves out is delivered nowhere."""
    problem = call.problem
    cfg = problem.config
    routing = route(problem)
    x, starts = _tokens(problem)
    routed = call.slot_mask()  # the −1 slots of a placed call go nowhere (module doc)
    out = []
    for lay in routing.receive:
        keep = routed[(starts[lay.src_rank] + lay.token) * cfg.top_k + lay.slot]
        source = np.stack([lay.src_rank, lay.token, lay.slot], axis=1).astype(np.int64)[keep]
        rows = x[starts[source[:, 0]] + source[:, 1]]
        counts = np.bincount(lay.local_expert[keep], minlength=cfg.experts_per_rank)
        out.append(_laid_out(rows, source, counts, call.layout, call.capacity))
    return tuple(out)


def stage_inputs(call: StageCall, seed: int = 0) -> StageCall:
    """``call`` with ``received`` filled as its stage reads it: the reference dispatch's
    buffers for the experts; for the combine, the same buffers holding expert outputs drawn
    from N(0, 1) in x's dtype (seeded: any values are a combine's legitimate input). A
    dispatch reads none."""
    if call.stage == "dispatch":
        return call
    buffers = dispatch_reference(call)
    if call.stage == "combine":
        rng = np.random.default_rng(seed)
        cfg = call.problem.config
        buffers = tuple(
            _laid_out(normal_tokens(cfg, rng, int(b.counts.sum())), valid_rows(b, call.layout)[1],
                      b.counts.astype(np.int64), call.layout, call.capacity)
            for b in buffers)
    return dataclasses.replace(call, received=buffers)


def experts_problem(call: StageCall, rank: int) -> tuple[Problem, Array]:
    """Rank ``rank``'s experts stage as a one-rank fused call: its valid received rows as
    tokens, each routed to its local expert with weight 1, the rank's weights; and the local
    expert of each row."""
    problem = call.problem
    inputs = problem.ranks[rank]
    rows, _, expert = valid_rows(call.received[rank], call.layout)
    n = expert.shape[0]
    one = dataclasses.replace(inputs, x=np.ascontiguousarray(rows),
                              expert_idx=expert.astype(np.int32)[:, None],
                              probs=np.ones((n, 1), np.float32), active_mask=None)
    return Problem([one], **problem.config.call_attributes()), expert


@dataclasses.dataclass(frozen=True)
class CombineEnvelope:
    """Per rank, the combine's ``out`` as the model computes it (``mid``, x's dtype) and the
    bounds ``[lo, hi]`` of every ``out`` a legitimate kernel may return; ``defined``: the
    rows judged (active tokens)."""

    mid: tuple[Array, ...]
    lo: tuple[Array, ...]
    hi: tuple[Array, ...]
    defined: tuple[Array, ...]


def _combines(num: Numerics) -> tuple[Combine, ...]:
    """The combines a legitimate kernel may run, weights applied here: the profile's sum
    order and dtype; in ideal mode without a profile, a float32 sum in any order or (for the
    top_k of :class:`oracle.model.kernels.IdealAssumptions`) an x-dtype sum, either flushing
    subnormals or not."""
    if num.mode == "ideal" and num.kernel is None:
        coarse = IdealAssumptions()
        base = Combine("combine", "moe_sum", (), ftz=coarse.ftz)
        return base, dataclasses.replace(base, x_dtype_topk=coarse.x_dtype_combine_topk)
    return (dataclasses.replace(num.profile.combine, weight="combine"),)


def _any_float32(y: Array, probs: Array, ftz: bool) -> Env:
    """Every ``Σ_k p_k·y_k`` a combine computes in float32 or finer, products and sums in any
    order, fused multiply-adds included: the float64 sum ± ``γ_2k·Σ|p_k·y_k|`` (Higham §3.1),
    plus ``2^-126`` per rounding where subnormals may flush."""
    terms = y.astype(np.float64) * probs[:, :, None].astype(np.float64)
    exact, mag = terms.sum(axis=1), np.abs(terms).sum(axis=1)
    n = 2 * y.shape[1]
    u = float(np.finfo(np.float32).eps) / 2
    slack = n * u / (1 - n * u) * mag + (n * float(np.finfo(np.float32).tiny) if ftz else 0.0)
    return Env(exact, exact - slack, exact + slack)


def combine_envelope(call: StageCall, numerics: str | Numerics = "ideal") -> CombineEnvelope:
    """The combine's reference on ``call.received`` (expert outputs) and the problem's
    routing weights (module doc)."""
    num = resolve_numerics(numerics)
    problem = call.problem
    cfg = problem.config
    dtype = DTYPES[cfg.x_dtype]
    _, starts = _tokens(problem)
    y = np.zeros((sum(cfg.tokens_per_rank), cfg.top_k, cfg.hidden), np.float32)
    for buffer in call.received:
        rows, source, _ = valid_rows(buffer, call.layout)
        y[starts[source[:, 0]] + source[:, 1], source[:, 2]] = rows.astype(np.float32)
    # A slot routed nowhere adds nothing: its y is 0 and its weight too.
    routed = call.slot_mask().reshape(-1, cfg.top_k)
    probs = np.where(routed, np.concatenate([r.probs for r in problem.ranks]), np.float32(0))
    envelopes = [c(Env(y, y, y), probs, dtype) for c in _combines(num)]
    if num.mode == "ideal" and num.kernel is None:  # a finer kernel is legitimate too
        envelopes.append(_any_float32(y, probs, IdealAssumptions().ftz))
    to_x = cast(dtype)
    mid = to_x(envelopes[0].mid)
    lo = to_x(np.min([e.mid if e.lo is None else e.lo for e in envelopes], axis=0))
    hi = to_x(np.max([e.mid if e.hi is None else e.hi for e in envelopes], axis=0))
    defined = np.concatenate([r.is_active() for r in problem.ranks])
    bounds = np.cumsum((0, *cfg.tokens_per_rank))

    def split(a: Array) -> tuple[Array, ...]:
        return tuple(a[lo_:hi_] for lo_, hi_ in pairwise(bounds))

    return CombineEnvelope(split(mid), split(lo), split(hi), split(defined))
