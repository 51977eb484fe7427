"""The modular split: dispatch, experts and combine gated one at a time, as vLLM's modular
kernels (prepare/finalize around fused experts) and DeepEP (dispatch, a grouped GEMM, combine)
split the fused call (``docs/routing.md``, "Gating one stage").

Each stage is called with a :class:`StageCall` and returns one entry per rank:

- **dispatch** gets the call's tokens and ids and returns, per destination rank, a
  :class:`Received` buffer: the received token rows, which ``(source rank, token, slot)``
  each came from, and the rows per local expert (``counts``).
- **experts** gets each rank's received token rows (``StageCall.received``, as the reference
  dispatch lays them out) and returns the expert outputs ``y`` in the same layout: a grouped
  GEMM (gate/up, SwiGLU, down) of every row with its local expert's weights.
- **combine** gets each rank's expert outputs in the receive layout (``received``: ``x``
  holds the outputs, ``source`` says whose they are) and returns per rank ``out`` (M_r, K):
  ``Σ_k p_k · y_k`` over each token's slots, the routing weights applied here (DeepEP's
  combine takes ``topk_weights``).

Two layouts of a receive buffer (:data:`LAYOUTS`):

- ``contiguous``: ``x`` (rows, K), ``source`` (rows, 3); the rows of local expert 0 first,
  then expert 1, … (segment sizes ``counts``), exactly the routed rows (vLLM's permuted rows,
  DeepEP normal mode) [inferred from both].
- ``batched``: ``x`` (E_local, C, K), ``source`` (E_local, C, 3), C = :attr:`StageCall.capacity`
  = ``max_tokens_per_rank · EP`` rows per local expert; expert ``e``'s rows are
  ``x[e, :counts[e]]`` and the rest is padding, never judged (DeepEP's ``low_latency_dispatch``
  returns ``recv_x`` shaped ``[num_local_experts, num_max_dispatch_tokens_per_rank *
  num_ranks, hidden]`` and ``recv_count`` per local expert, "not all tokens are valid":
  deepseek-ai/DeepEP ``deep_ep/buffer.py``) [code].

Freedom [inferred]: inside one expert's segment the row order is free in both layouts (DeepEP
fills a low-latency segment with atomics, in arrival order); a dispatch is judged as a
permutation: the segment's source triples are the expert's routed slots, each once, in any
order, and each row holds its source token's bits exactly. The experts and combine stages are
handed the reference's order (expert-major, then source rank, then the source's slot order,
``docs/contract/dispatch_ffn_combine.md`` §5) and read ``source`` for the rest.

Slots routed nowhere: a call made from a placed call (:meth:`StageCall.from_placed`) carries
``routed``, per rank (M_r, top_k) bool: a slot whose logical id is −1 is False there and its
``expert_idx`` reads 0 (:class:`spec.placement.PlacedCall`). A dispatch sends it nowhere and
counts it nowhere, a combine adds nothing for it (``docs/contract/placement.md`` rule 6:
clamping an invalid id to expert 0 is a real bug).

>>> from spec import OpConfig, random_problem
>>> p = random_problem(OpConfig(ep_size=2, experts_per_rank=2, top_k=2, hidden=16,
...                             intermediate=8, tokens_per_rank=(3, 1)))
>>> StageCall(stage="dispatch", problem=p, layout="batched", max_tokens_per_rank=3).capacity
6
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from spec.errors import ConfigError, ShapeError
from spec.placement import PlacedCall
from spec.problem import Problem

__all__ = ["LAYOUTS", "SOURCE_FIELDS", "STAGES", "Received", "StageCall", "valid_rows"]

STAGES = ("dispatch", "experts", "combine")
LAYOUTS = ("contiguous", "batched")
#: The columns of a receive buffer's ``source``: where each row came from.
SOURCE_FIELDS = ("src_rank", "token", "slot")

Array = np.ndarray[Any, Any]


@dataclass(frozen=True)
class Received:
    """One rank's receive buffer in a layout of :data:`LAYOUTS` (module doc): ``x`` the rows
    (tokens after a dispatch, expert outputs before a combine), ``source`` their
    ``(src_rank, token, slot)``, ``counts`` (E_local,) int32 the valid rows per local expert."""

    x: Array
    source: Array
    counts: Array


def valid_rows(buffer: Received, layout: str) -> tuple[Array, Array, Array]:
    """``(x rows, source rows, local expert of each row)`` of the valid rows, expert by expert,
    in buffer order; batched padding left out. The buffer's shapes are the caller's to check
    (the judge does, before this).

    >>> b = Received(x=np.arange(8.0).reshape(2, 2, 2), source=np.zeros((2, 2, 3), int),
    ...              counts=np.array([1, 0], np.int32))
    >>> [a.tolist() for a in valid_rows(b, "batched")]
    [[[0.0, 1.0]], [[0, 0, 0]], [0]]
    """
    counts = np.asarray(buffer.counts, dtype=np.int64)
    expert = np.repeat(np.arange(counts.shape[0]), counts)
    if layout == "contiguous":
        return buffer.x, buffer.source, expert
    within = np.arange(expert.shape[0]) - np.repeat(np.cumsum(counts) - counts, counts)
    return buffer.x[expert, within], buffer.source[expert, within], expert


@dataclass(frozen=True, kw_only=True)
class StageCall:
    """One call of one stage (module doc). ``problem``: the whole call (tokens, ids, routing
    weights, every rank's expert weights); GPU stacks size receive buffers for every token, so
    it has no ``max_output_size``. ``max_tokens_per_rank``: DeepEP's
    ``num_max_dispatch_tokens_per_rank`` for the batched layout (None: the smallest that fits
    the call). ``received``: per rank, the buffer the stage reads (experts, combine; empty for
    a dispatch). ``routed``: per rank (M_r, top_k) bool, the slots routed to an expert (module
    doc; empty: every slot of an active token)."""

    stage: str
    problem: Problem
    layout: str = "contiguous"
    max_tokens_per_rank: int | None = None
    received: tuple[Received, ...] = ()
    routed: tuple[Array, ...] = ()

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ConfigError(field="stage", given=repr(self.stage),
                              allowed=" or ".join(map(repr, STAGES)),
                              fix="name the stage the implementation computes")
        if self.layout not in LAYOUTS:
            raise ConfigError(field="layout", given=repr(self.layout),
                              allowed=" or ".join(map(repr, LAYOUTS)),
                              fix="contiguous (vLLM permuted rows, DeepEP normal) or batched "
                              "(DeepEP low latency)")
        cfg = self.problem.config
        if cfg.max_output_size is not None:
            raise ConfigError(field="max_output_size", given=repr(cfg.max_output_size),
                              allowed="None: a stage call drops no row",
                              fix="judge truncation with the fused call (oracle.compare)")
        if self.routed:
            self._check_routed()
        need = self.fitting_tokens()
        given = self.max_tokens_per_rank
        if given is not None and (isinstance(given, bool) or not isinstance(given, int)
                                  or given < need):
            raise ShapeError(field="max_tokens_per_rank", given=repr(given),
                             allowed=f"an int >= {need}: the most rows one source rank sends "
                             "one expert", fix="size the batched buffer for the busiest "
                             "(source rank, expert) pair, or pass None")
        if len(self.received) not in (0, cfg.ep_size) or (self.received and
                                                          self.stage == "dispatch"):
            raise ShapeError(field="received", given=f"{len(self.received)} buffers",
                             allowed=f"one per rank ({cfg.ep_size}) for the experts and the "
                             "combine, none for a dispatch (none: not built yet)",
                             fix="build the stage's input with oracle.model.modular.stage_inputs")

    def _check_routed(self) -> None:
        cfg = self.problem.config
        shapes = [(m, cfg.top_k) for m in cfg.tokens_per_rank]
        given = [np.shape(r) for r in self.routed]
        if given != shapes or not all(np.asarray(r).dtype == np.bool_ for r in self.routed):
            raise ShapeError(field="routed", given=f"{len(given)} masks of shapes {given}"[:200],
                             allowed=f"one bool mask per rank of shapes {shapes} (True: the "
                             "slot is routed to its expert)", fix="build the call with "
                             "StageCall.from_placed, or pass routed=() (every slot routed)")

    def slot_mask(self) -> Array:
        """Every rank's slots on one axis, (sum M_r · top_k,) bool: routed to an expert (an
        active token's slot, and True in ``routed`` when given)."""
        top_k = self.problem.config.top_k
        active: Array = np.concatenate([np.zeros(0, bool), *(
            np.repeat(r.is_active(), top_k) for r in self.problem.ranks)])
        if self.routed:
            active = active & np.concatenate([np.asarray(r).reshape(-1) for r in self.routed])
        return active

    @classmethod
    def from_placed(cls, stage: str, placed: PlacedCall, *, layout: str = "contiguous",
                    max_tokens_per_rank: int | None = None) -> StageCall:
        """The ``stage`` call of a placed call's routed experts: the physical ids as
        ``expert_idx``, its ``routed`` mask, and as ``probs`` the weights the combine
        multiplies by (:meth:`spec.placement.RoutingWeights.combine_weights`: renormalised,
        routed scaling factor applied; the router's business, not the stage's). The
        all-to-all split only: shared experts (added beside the routed ones) and weights on
        the input are refused, a ConfigError naming the field."""
        if placed.shared is not None:
            raise ConfigError(field="shared", given=f"{placed.shared.count} shared experts",
                              allowed="none: the stage split gates the routed experts",
                              fix="judge the shared experts with the fused placed call")
        if placed.weights.on_input:
            raise ConfigError(field="weights.on_input", given="True",
                              allowed="False: a stage call's combine applies the weights",
                              fix="judge weights on the input with the fused placed call")
        ranks = [dataclasses.replace(r, probs=placed.weights.combine_weights(r.probs, routed))
                 for r, routed in zip(placed.problem.ranks, placed.routed)]
        problem = Problem.from_validated(ranks, placed.problem.config)
        return cls(stage=stage, problem=problem, layout=layout,
                   max_tokens_per_rank=max_tokens_per_rank, routed=placed.routed)

    def fitting_tokens(self) -> int:
        """The smallest ``max_tokens_per_rank`` that fits the call: the most tokens on one
        rank (at least 1), or more where a token sends one expert several slots (DeepEP's
        top-k ids are distinct per token; the oracle's duplicates need room) [inferred]."""
        cfg = self.problem.config
        most = max((1, *cfg.tokens_per_rank))
        mask = self.slot_mask()
        bounds = np.cumsum((0, *cfg.tokens_per_rank)) * cfg.top_k
        for r, lo, hi in zip(self.problem.ranks, bounds[:-1], bounds[1:]):
            ids = r.expert_idx.reshape(-1)[mask[lo:hi]]
            if ids.size:
                most = max(most, int(np.bincount(ids).max()))
        return most

    @property
    def capacity(self) -> int:
        """Rows per local expert in the batched layout: ``max_tokens_per_rank · EP``."""
        m = self.max_tokens_per_rank
        return (self.fitting_tokens() if m is None else m) * self.problem.config.ep_size

    def summary(self) -> str:
        cap = f" capacity={self.capacity}" if self.layout == "batched" else ""
        unrouted = int((~self.slot_mask()).sum()) - sum(
            int((~r.is_active()).sum()) * self.problem.config.top_k for r in self.problem.ranks)
        tail = f" -1 slots={unrouted}" if unrouted else ""
        return f"{self.stage} {self.layout}{cap}: {self.problem.config.summary()}{tail}"
