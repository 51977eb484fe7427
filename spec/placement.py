"""The routing contract of GPU MoE stacks: expert placement with replicas, shared experts and
routing-weight semantics, as data (``docs/contract/placement.md``; the table of what each
combination computes is ``docs/routing.md``).

A :class:`PlacedCall` is a call whose ranks hold *physical* expert slots and whose
``expert_idx`` hold *logical* expert ids (int32 or int64, ``-1`` for a slot routed nowhere).
:class:`Placement` says which logical expert each physical slot holds (``phy2log``, one row per
layer, as DeepSeek's EPLB returns it) and how a replica is chosen; :class:`RoutingWeights` how
the router's weights become the combine's; :class:`SharedExperts` the experts every token runs.
The Ascend operator's calls have none of it: :meth:`Placement.identity`, no shared expert,
``routed_scaling_factor = 1`` and ``renormalize = False`` make a :class:`PlacedCall` the plain
:class:`spec.Problem` of the same arrays (``oracle.model.routing`` maps one onto the other).

>>> import numpy as np
>>> pl = Placement(phy2log=np.array([[0, 1, 2, 0]]), num_logical=3, ep_size=2)
>>> pl.slots_per_rank, pl.redundant, pl.replica_counts().tolist()
(2, 1, [2, 1, 1])
>>> pl.local_map(1).tolist()
[-1, -1, 0, 1]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from spec.config import CALL_ATTRIBUTES, MAX_EP_SIZE, OpConfig
from spec.errors import ExpertIdError, PlacementError, SpecError, describe
from spec.fields import FIELDS
from spec.problem import DTYPES, Problem, RankInputs

__all__ = [
    "DISPATCH_MODES",
    "ID_DTYPES",
    "NO_EXPERT",
    "PLACED_ATTRIBUTES",
    "RECORD_FIELDS",
    "REPLICA_CHOICES",
    "PlacedCall",
    "Placement",
    "RoutingWeights",
    "SharedExperts",
    "check_local_map",
    "check_log2phy",
    "check_replicas",
    "placed_attributes",
]

#: A logical id routed nowhere (a padding slot), and the local map's "not on this rank"
#: (vLLM's ``expert_map``) [code]. Reading ``-1`` in ``topk_ids`` as "no expert" is [inferred]:
#: what a correct kernel must do with it is not contribute and not count it as load (rule 6).
NO_EXPERT = -1
#: ``topk_ids`` dtypes GPU stacks pass: vLLM's routers give int32, DeepEP's ``topk_idx`` int64.
ID_DTYPES = ("int32", "int64")
#: How a logical expert's replica is chosen for a slot: ``token`` by the global token index
#: (vllm-ascend's ``map_and_record`` hashes the token index), ``rank`` by
#: ``(row + ep_rank + logical_id) % replica_count`` (vLLM's EPLB variant, which depends on the
#: choosing rank) [code].
REPLICA_CHOICES = ("token", "rank")
#: ``all_to_all``: each token is dispatched once, from its own rank; ``all_gather``: every rank
#: sees every token and computes the slots whose replica is local (naive/sequence-parallel
#: dispatch), the partial outputs summed by a reduce.
DISPATCH_MODES = ("all_to_all", "all_gather")

Array = np.ndarray[Any, Any]

#: The JSON fields of a placement record (:meth:`PlacedCall.record`) and the type each holds;
#: its arrays are ``placement.phy2log``, ``placement.r{rank}.expert_idx`` (the logical ids) and
#: ``shared.{field}.{i}`` (the shared experts' TensorList entries).
RECORD_FIELDS: dict[str, type] = {
    "num_logical": int, "layer": int, "replica_choice": str, "dispatch": str,
    "renormalize": bool, "routed_scaling_factor": float, "on_input": bool, "shared": bool}


#: The call attributes a placed call takes (:data:`spec.config.CALL_ATTRIBUTES` but
#: ``max_output_size``: GPU stacks size their receive buffers for every token). ``act_scheme``
#: among them selects the row where the arrays are another row's (``mxfp4_mxfp8``).
PLACED_ATTRIBUTES = tuple(a for a in CALL_ATTRIBUTES if a != "max_output_size")


def placed_attributes(config: OpConfig) -> dict[str, Any]:
    """``config``'s :data:`PLACED_ATTRIBUTES` by name, for ``PlacedCall(ranks, **...)`` and
    :meth:`PlacedCall.from_record`: every door that rebuilds a placed call passes them so, and
    a call attribute added to :class:`spec.config.CallAttributes` reaches them all."""
    attrs: Mapping[str, Any] = config.call_attributes()
    return {name: attrs[name] for name in PLACED_ATTRIBUTES}


def _readonly(a: Array) -> Array:
    a = np.array(a, copy=True)
    a.flags.writeable = False
    return a


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclass(frozen=True, kw_only=True)
class Placement:
    """Which logical expert each physical slot holds, per layer, and how replicas are chosen.

    ``phy2log`` (L, P) or (P,): the logical expert of each physical slot (DeepSeek EPLB's
    output, rules 1 and 8 of placement.md); slot ``p`` lives on rank ``p // (P / EP)`` at local
    index ``p % (P / EP)``. ``layer`` picks the row this call runs. ``R = P − num_logical ≥ 0``
    redundant slots. Every rule is checked on construction (:class:`spec.PlacementError`).
    """

    phy2log: Array
    num_logical: int
    ep_size: int
    layer: int = 0
    replica_choice: str = "token"
    dispatch: str = "all_to_all"

    def __post_init__(self) -> None:
        table = self.phy2log
        if not isinstance(table, np.ndarray) or table.dtype.kind not in "iu" or table.ndim not in (
                1, 2) or table.shape[-1] < 1:
            raise PlacementError(
                field="phy2log", given=describe(table),
                allowed="an integer array (L, P) or (P,) of logical ids, P >= 1",
                fix="pass EPLB's phy2log (one row per layer) as a NumPy integer array")
        table = _readonly(np.atleast_2d(table).astype(np.int64))
        object.__setattr__(self, "phy2log", table)
        for name in ("num_logical", "ep_size"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise PlacementError(field=name, given=repr(value), allowed="an int >= 1",
                                     fix=f"pass a positive integer for {name}")
        if self.ep_size > MAX_EP_SIZE:
            raise PlacementError(field="ep_size", given=repr(self.ep_size),
                                 allowed=f"1..{MAX_EP_SIZE}",
                                 fix=f"use at most {MAX_EP_SIZE} ranks (spec.MAX_EP_SIZE)")
        slots = table.shape[1]
        if slots % self.ep_size:
            # EPLB asserts P % num_gpus == 0 (deepseek-ai/EPLB eplb.py, placement.md).
            raise PlacementError(
                field="phy2log", given=f"P = {slots} physical slots at EP = {self.ep_size}",
                allowed="P a multiple of EP (every rank holds P / EP slots)",
                fix="add redundant slots until P % EP == 0, or change EP")
        if slots < self.num_logical:
            raise PlacementError(
                field="phy2log", given=f"P = {slots} slots for {self.num_logical} logical experts",
                allowed="P >= num_logical (R = P - num_logical redundant slots, R >= 0)",
                fix="give every logical expert at least one physical slot")
        if not _is_int(self.layer) or not 0 <= self.layer < table.shape[0]:
            raise PlacementError(field="layer", given=repr(self.layer),
                                 allowed=f"0..{table.shape[0] - 1} (phy2log's rows)",
                                 fix="pick the layer this call runs")
        bad = (table < 0) | (table >= self.num_logical)
        if bad.any():
            layer, p = (int(v) for v in np.argwhere(bad)[0])
            raise PlacementError(
                field=f"phy2log[{layer}, {p}]", given=repr(int(table[layer, p])),
                allowed=f"a logical id 0..{self.num_logical - 1}",
                fix="every physical slot holds one logical expert; drop stale ids")
        for layer, row in enumerate(table):
            missing = np.flatnonzero(np.bincount(row, minlength=self.num_logical) == 0)
            if missing.size:
                # Rule 1: every logical expert has a replica (Σ logcnt = P).
                raise PlacementError(
                    field=f"phy2log[{layer}]", given=f"no slot for logical expert {missing[0]} "
                    f"({missing.size} missing)", allowed="every logical expert in at least "
                    "one physical slot (placement.md rule 1)",
                    fix="place the missing experts; a token routed to one would reach no weights")
        if self.replica_choice not in REPLICA_CHOICES:
            raise PlacementError(field="replica_choice", given=repr(self.replica_choice),
                                 allowed=" or ".join(map(repr, REPLICA_CHOICES)),
                                 fix="choose replicas per token or per rank")
        if self.dispatch not in DISPATCH_MODES:
            raise PlacementError(field="dispatch", given=repr(self.dispatch),
                                 allowed=" or ".join(map(repr, DISPATCH_MODES)),
                                 fix="say how tokens reach the experts' ranks")
        if self.replica_choice == "rank" and self.dispatch == "all_gather" and self.redundant:
            # Rule 3: without all-to-all every rank chooses for every token; a rank-dependent
            # choice computes a slot on 0 or several ranks (sglang PR #32962, GSM8K 0.63 -> 0.42).
            raise PlacementError(
                field="replica_choice", given="'rank' with dispatch='all_gather' and "
                f"{self.redundant} redundant slots",
                allowed="'token' (rank-independent) when every rank sees every token",
                fix="choose replicas by token, or dispatch with all-to-all")

    @classmethod
    def identity(cls, num_experts: int, ep_size: int) -> Placement:
        """The Ascend operator's placement: logical = physical expert ``g`` on rank
        ``g // E``, no replicas."""
        return cls(phy2log=np.arange(num_experts), num_logical=num_experts, ep_size=ep_size)

    @property
    def row(self) -> Array:
        """``phy2log`` of this call's layer, (P,)."""
        return np.asarray(self.phy2log[self.layer])

    @property
    def slots(self) -> int:
        return int(self.phy2log.shape[1])

    @property
    def slots_per_rank(self) -> int:
        return self.slots // self.ep_size

    @property
    def redundant(self) -> int:
        """``R = P − num_logical``."""
        return self.slots - self.num_logical

    def replica_counts(self) -> Array:
        """``logcnt`` (num_logical,): the replicas of each logical expert."""
        return np.bincount(self.row, minlength=self.num_logical)

    def log2phy(self) -> Array:
        """``(num_logical, X)``: each logical expert's slots ascending, padded with −1 (EPLB's
        ``log2phy``)."""
        counts = self.replica_counts()
        order = np.argsort(self.row, kind="stable")
        starts = np.cumsum(counts) - counts
        within = np.arange(self.slots) - np.repeat(starts, counts)
        out = np.full((self.num_logical, int(counts.max())), NO_EXPERT, dtype=np.int64)
        out[self.row[order], within] = order
        return out

    def local_map(self, rank: int) -> Array:
        """Rank ``rank``'s local map over physical ids (vLLM's ``expert_map``): the local index
        of each slot on this rank, −1 elsewhere (int32)."""
        p = np.arange(self.slots)
        mine = p // self.slots_per_rank == rank
        return np.where(mine, p % self.slots_per_rank, NO_EXPERT).astype(np.int32)

    def choose(self, logical: Array, *, token: Array, row: Array, rank: Array | int) -> Array:
        """The physical slot of each (token, slot) pair: ``logical`` (T, k) ids (−1 stays −1);
        ``token`` (T,) global token indices, ``row`` (T,) rows on their source rank, ``rank``
        the choosing rank (the source under all-to-all). int64."""
        counts = self.replica_counts()
        lid = np.where(logical == NO_EXPERT, 0, logical)
        if self.replica_choice == "token":
            pick = token[:, None] % counts[lid]
        else:
            pick = (row[:, None] + np.asarray(rank)[..., None] + lid) % counts[lid]
        return np.where(logical == NO_EXPERT, NO_EXPERT, self.log2phy()[lid, pick])


def check_log2phy(placement: Placement, log2phy: Array) -> None:
    """Rule 1: ``log2phy`` is ``phy2log``'s inverse (each logical expert's slots, −1 padded).

    >>> pl = Placement(phy2log=np.array([1, 0, 1]), num_logical=2, ep_size=1)
    >>> check_log2phy(pl, np.array([[1, -1], [0, 2]]))
    """
    want = placement.log2phy()
    got = np.asarray(log2phy)
    if got.ndim != 2 or got.shape[0] != placement.num_logical:
        raise PlacementError(field="log2phy", given=describe(got),
                             allowed=f"({placement.num_logical}, X) slot lists padded with -1",
                             fix="one row of physical slots per logical expert")
    for lid in range(placement.num_logical):
        have = sorted(int(p) for p in got[lid] if p != NO_EXPERT)
        slots = [int(p) for p in want[lid] if p != NO_EXPERT]
        if have != slots:
            raise PlacementError(
                field=f"log2phy[{lid}]", given=f"slots {have}",
                allowed=f"slots {slots}, those phy2log assigns to logical expert {lid}",
                fix="derive log2phy from phy2log (placement.md rule 1: they are inverse)")


def check_local_map(placement: Placement, rank: int, expert_map: Array) -> None:
    """Rules 2 and 7: rank ``rank``'s map over physical ids holds −1 or a local index
    ``0..P/EP−1``, each used once, and is the placement's own (one map on every path).

    >>> pl = Placement(phy2log=np.arange(4), num_logical=4, ep_size=2)
    >>> check_local_map(pl, 1, np.array([-1, -1, 0, 1]))
    """
    got = np.asarray(expert_map)
    e = placement.slots_per_rank
    if got.shape != (placement.slots,):
        raise PlacementError(rank=rank, field="expert_map", given=describe(got),
                             allowed=f"({placement.slots},): one entry per physical slot",
                             fix="map every physical expert id to a local index or -1")
    out = (got != NO_EXPERT) & ((got < 0) | (got >= e))
    if out.any():
        # vllm-ascend PR #4793: the last card's map indexed a missing expert.
        p = int(np.argmax(out))
        raise PlacementError(rank=rank, field=f"expert_map[{p}]", given=repr(int(got[p])),
                             allowed=f"-1 or a local index 0..{e - 1}",
                             fix="a rank holds P / EP slots; entries past them index no weights")
    used = got[got != NO_EXPERT]
    twice = np.flatnonzero(np.bincount(used, minlength=e) > 1)
    if twice.size:
        raise PlacementError(rank=rank, field="expert_map",
                             given=f"local index {twice[0]} used by several slots",
                             allowed="each local index used once",
                             fix="two physical slots cannot share one local weight")
    want = placement.local_map(rank)
    if (got != want).any():
        p = int(np.argmax(got != want))
        raise PlacementError(
            rank=rank, field=f"expert_map[{p}]", given=repr(int(got[p])),
            allowed=f"{int(want[p])}, the placement's own map (placement.md rule 7)",
            fix="build every path's map from the one phy2log (vllm-ascend PR #5806: the fused "
            "path skipped the mapping)")


def check_replicas(placement: Placement, tensors: Mapping[str, Array]) -> None:
    """Rules 4 and 5: every per-expert tensor (weights, scales, biases; each (P, …), indexed by
    physical slot) holds bit-identical values in every replica of one logical expert.

    >>> pl = Placement(phy2log=np.array([0, 1, 0]), num_logical=2, ep_size=1)
    >>> check_replicas(pl, {"scale1": np.array([[1.0], [2.0], [1.0]])})
    """
    first = placement.log2phy()[:, 0]
    for name, values in tensors.items():
        a = np.asarray(values)
        if a.shape[:1] != (placement.slots,):
            raise PlacementError(field=name, given=describe(a),
                                 allowed=f"(P = {placement.slots}, ...): one entry per slot",
                                 fix="stack the per-expert tensor over physical slots")
        bits = np.ascontiguousarray(a).reshape(placement.slots, -1).view(np.uint8)
        bad = np.flatnonzero((bits[first[placement.row]] != bits).any(axis=1))
        if bad.size:
            p = int(bad[0])
            lid = int(placement.row[p])
            raise PlacementError(
                field=f"{name}[slot {p}]", given=f"values unlike slot {int(first[lid])}, the "
                f"first replica of logical expert {lid}",
                allowed="bit-identical weights and scales in every replica (rule 4)",
                fix="load every redundant slot, and move scales with their weights (vllm PRs "
                "#37322, #47588)")


@dataclass(frozen=True, kw_only=True)
class RoutingWeights:
    """How the router's weights ``p`` become what the combine adds (docs/routing.md).

    ``renormalize``: ``w_k = p_k / Σ_j p_j`` over the token's routed slots (float32);
    ``routed_scaling_factor`` (rsf): multiplies the routed part once, whether or not it
    renormalises, never the shared experts (DeepSeek-V3: 2.5); ``on_input``: the weight scales
    the token before the expert (vLLM's ``apply_router_weight_on_input``, top_k = 1 only) and
    the combine adds ``rsf · y``. The default changes nothing: the Ascend operator's semantics.
    """

    renormalize: bool = False
    routed_scaling_factor: float = 1.0
    on_input: bool = False

    def __post_init__(self) -> None:
        for name in ("renormalize", "on_input"):
            if not isinstance(getattr(self, name), bool):
                raise PlacementError(field=name, given=repr(getattr(self, name)),
                                     allowed="True or False", fix=f"pass a bool for {name}")
        rsf = self.routed_scaling_factor
        if isinstance(rsf, bool) or not isinstance(rsf, (int, float)) or not (
                math.isfinite(rsf) and rsf > 0):
            raise PlacementError(field="routed_scaling_factor", given=repr(rsf),
                                 allowed="a finite float > 0 (1: no scaling)",
                                 fix="pass the model config's routed_scaling_factor, e.g. 2.5")

    @property
    def rsf(self) -> np.float32:
        return np.float32(self.routed_scaling_factor)

    def normalised(self, probs: Array, routed: Array) -> Array:
        """``w`` (T, k) float32: ``p`` on routed slots (0 elsewhere), renormalised if asked."""
        w = np.where(routed, probs, np.float32(0)).astype(np.float32)
        if self.renormalize:
            total = w.sum(axis=1, keepdims=True, dtype=np.float32)
            with np.errstate(invalid="ignore", divide="ignore"):
                w = np.where(total > 0, w / total, np.float32(0)).astype(np.float32)
        return w

    def combine_weights(self, probs: Array, routed: Array) -> Array:
        """What the combine multiplies each routed slot's output by (float32): ``rsf·w``, or
        ``rsf`` alone with ``on_input`` (the weight went into the token)."""
        w = self.normalised(probs, routed)
        base = np.where(routed, np.float32(1), np.float32(0)) if self.on_input else w
        return (base * self.rsf).astype(np.float32)


@dataclass(frozen=True, kw_only=True)
class SharedExperts:
    """Experts every token runs, replicated on every rank, their outputs added after the routed
    sum and not scaled by rsf (TensorRT-LLM PR #15922: added once, not once per rank).

    ``lists``: TensorLists by field name (``w1``, ``w2`` and the variant's others, as in
    :class:`spec.RankInputs`, stacked or per expert), S experts of the routed experts' variant
    and sizes.
    """

    lists: Mapping[str, Sequence[Array]] = field(default_factory=dict)

    @property
    def count(self) -> int:
        w1 = self.lists["w1"]
        return int(w1[0].shape[0]) if len(w1) == 1 else len(w1)


def _check_ids(r: int, inputs: RankInputs, num_logical: int) -> None:
    idx = inputs.expert_idx  # its shape is checked by Problem, on zeros of the same shape
    if not isinstance(idx, np.ndarray) or str(idx.dtype) not in ID_DTYPES:
        raise ExpertIdError(rank=r, field="expert_idx", given=describe(idx),
                            allowed="a NumPy array of int32 or int64 logical ids",
                            fix="cast the router's topk_ids with .astype(np.int64)")
    bad = ((idx < NO_EXPERT) | (idx >= num_logical)) & inputs.is_active()[:, None]
    if bad.any():
        t, k = (int(v) for v in np.argwhere(bad)[0])
        raise ExpertIdError(
            rank=r, field=f"expert_idx[{t}, {k}]", given=repr(int(idx[t, k])),
            allowed=f"a logical id 0..{num_logical - 1}, or -1 for a slot routed nowhere",
            fix="map ids to this layer's logical experts; never clamp an invalid id to 0")


class PlacedCall:
    """One call of a placement-aware MoE: ranks holding physical slots, logical ids, a
    :class:`Placement`, :class:`RoutingWeights` and optional :class:`SharedExperts`.

    ``ranks``: :class:`spec.RankInputs` whose ``expert_idx`` are logical ids (int32 or int64,
    −1 allowed) and whose TensorLists hold the rank's ``P / EP`` physical slots in local order.
    Validated on construction (a :class:`spec.SpecError` naming the field). ``problem`` is the
    validated call with every routed slot's physical id in place of its logical one (−1 slots
    read 0 there; ``routed`` says which slots are real); ``physical`` the physical ids, −1 kept.
    ``swiglu_limit``, ``swiglu_alpha`` and ``act_scheme`` are the call's attributes, as for
    :class:`spec.Problem` (:data:`PLACED_ATTRIBUTES`; ``act_scheme="mxfp8"`` makes MXFP4
    weights an ``mxfp4_mxfp8`` call). No ``max_output_size``: GPU stacks size their receive
    buffers for every token.
    """

    def __init__(
        self,
        ranks: Sequence[RankInputs],
        *,
        placement: Placement | None = None,
        weights: RoutingWeights | None = None,
        shared: SharedExperts | None = None,
        swiglu_limit: float | None = None,
        swiglu_alpha: float | None = None,
        act_scheme: str | None = None,
    ) -> None:
        ranks = tuple(ranks)
        if placement is not None and not isinstance(placement, Placement):
            raise PlacementError(field="placement", given=describe(placement),
                                 allowed="a spec.placement.Placement or None (identity)",
                                 fix="build one with Placement(phy2log=..., ...)")
        zero_ids = [dataclasses.replace(r, expert_idx=np.zeros(
            np.shape(r.expert_idx), np.int32)) if isinstance(r, RankInputs) else r for r in ranks]
        base = Problem(zero_ids, swiglu_limit=swiglu_limit, swiglu_alpha=swiglu_alpha,
                       act_scheme=act_scheme)
        cfg = base.config
        if placement is None:
            placement = Placement.identity(cfg.num_experts, cfg.ep_size)
        if placement.ep_size != cfg.ep_size or placement.slots_per_rank != cfg.experts_per_rank:
            raise PlacementError(
                field="placement", given=f"EP = {placement.ep_size}, P / EP = "
                f"{placement.slots_per_rank}",
                allowed=f"EP = {cfg.ep_size} ranks holding {cfg.experts_per_rank} slots each, "
                "as the weights are", fix="give each rank the weights of its P / EP slots")
        weights = RoutingWeights() if weights is None else weights
        if weights.on_input and cfg.top_k != 1:
            raise PlacementError(
                field="weights.on_input", given=f"True with top_k = {cfg.top_k}",
                allowed="top_k = 1 (vLLM asserts it for apply_router_weight_on_input)",
                fix="apply the weights on the output, or route each token to one expert")
        if shared is not None:
            _check_shared(shared, base)
            if weights.on_input:
                raise PlacementError(
                    field="shared", given="shared experts with weights.on_input",
                    allowed="no shared experts when the weight scales the input (not modelled: "
                    "the shared expert reads the unscaled token)",
                    fix="judge the routed part alone, or weights on the output")
        for r, inputs in enumerate(ranks):
            _check_ids(r, inputs, placement.num_logical)
        tokens = np.array(cfg.tokens_per_rank, dtype=np.int64)
        offsets = np.cumsum(tokens) - tokens
        physical, routed = [], []
        for r, inputs in enumerate(ranks):
            logical = np.where(inputs.is_active()[:, None], inputs.expert_idx.astype(np.int64),
                               NO_EXPERT)
            rows = np.arange(inputs.num_tokens, dtype=np.int64)
            physical.append(_readonly(placement.choose(logical, token=offsets[r] + rows,
                                                       row=rows, rank=r)))
            routed.append(_readonly(logical != NO_EXPERT))
        self.placement = placement
        self.weights = weights
        self.shared = shared
        self.physical: tuple[Array, ...] = tuple(physical)
        self.routed: tuple[Array, ...] = tuple(routed)
        self.logical: tuple[Array, ...] = tuple(_readonly(r.expert_idx) for r in ranks)
        self.problem = Problem.from_validated(
            [dataclasses.replace(r, expert_idx=_readonly(np.maximum(p, 0).astype(np.int32)))
             for r, p in zip(base.ranks, physical)], cfg)

    @property
    def config(self) -> Any:
        return self.problem.config

    @property
    def attributes(self) -> dict[str, Any]:
        """The call's attributes by name (:func:`placed_attributes`), for
        :meth:`from_record`."""
        return placed_attributes(self.config)

    def summary(self) -> str:
        """One line: the configuration and the routing contract's settings."""
        pl, w = self.placement, self.weights
        parts = [self.config.summary(), f"P={pl.slots}", f"logical={pl.num_logical}",
                 f"R={pl.redundant}", f"choice={pl.replica_choice}", f"dispatch={pl.dispatch}"]
        if w.renormalize:
            parts.append("renormalize")
        if w.routed_scaling_factor != 1:
            parts.append(f"rsf={w.routed_scaling_factor}")
        if w.on_input:
            parts.append("weights-on-input")
        if self.shared is not None:
            parts.append(f"shared={self.shared.count}")
        unrouted = sum(int((~r).sum()) for r in self.routed)
        if unrouted:
            parts.append(f"-1 slots={unrouted}")
        return " ".join(parts)

    def __repr__(self) -> str:
        return f"PlacedCall({self.summary()})"

    def record(self) -> tuple[dict[str, Any], dict[str, Array]]:
        """What :attr:`problem` lacks to make this call again: JSON fields
        (:data:`RECORD_FIELDS`) and arrays by name; :meth:`from_record` is the inverse. The
        counterexample files and the child process of the gate carry a placed call so.

        >>> from spec import OpConfig, random_problem
        >>> p = random_problem(OpConfig(ep_size=1, experts_per_rank=3, top_k=1, hidden=32,
        ...                             intermediate=16, tokens_per_rank=(0,)))
        >>> pl = Placement(phy2log=np.array([0, 1, 0]), num_logical=2, ep_size=1)
        >>> call = PlacedCall(p.ranks, placement=pl, weights=RoutingWeights(renormalize=True))
        >>> fields, arrays = call.record()
        >>> again = PlacedCall.from_record(call.problem.ranks, fields, arrays, **call.attributes)
        >>> again.summary() == call.summary()
        True
        """
        pl, w = self.placement, self.weights
        fields: dict[str, Any] = {
            "num_logical": pl.num_logical, "layer": pl.layer,
            "replica_choice": pl.replica_choice, "dispatch": pl.dispatch,
            "renormalize": w.renormalize, "routed_scaling_factor": float(w.routed_scaling_factor),
            "on_input": w.on_input, "shared": self.shared is not None}
        arrays = {"placement.phy2log": pl.phy2log}
        arrays.update((f"placement.r{r}.expert_idx", ids) for r, ids in enumerate(self.logical))
        for name, tensors in (self.shared.lists if self.shared is not None else {}).items():
            arrays.update((f"shared.{name}.{i}", np.asarray(t)) for i, t in enumerate(tensors))
        return fields, arrays

    @classmethod
    def from_record(cls, ranks: Sequence[RankInputs], fields: object,
                    arrays: Mapping[str, Array], *, swiglu_limit: float | None = None,
                    swiglu_alpha: float | None = None,
                    act_scheme: str | None = None) -> PlacedCall:
        """The call :meth:`record` describes, on ``ranks`` (their ``expert_idx`` replaced by
        the record's logical ids; :attr:`problem`'s ranks do), with the call's attributes (a
        door passes ``**placed_attributes(config)`` of the configuration it carries: the record
        holds only what :attr:`problem` lacks). Arrays outside the record's
        names are ignored; the record is validated field by field, then the call as any
        other (:class:`spec.PlacementError` naming the field)."""
        if not isinstance(fields, Mapping) or set(fields) != set(RECORD_FIELDS):
            given = sorted(fields) if isinstance(fields, Mapping) else describe(fields)
            raise PlacementError(field="placement record", given=f"fields {given}"[:200],
                                 allowed=f"exactly the fields {sorted(RECORD_FIELDS)}",
                                 fix="write the record with PlacedCall.record()")
        for key, kind in RECORD_FIELDS.items():
            value = fields[key]
            ok = (isinstance(value, bool) if kind is bool else
                  isinstance(value, (int, float)) and not isinstance(value, bool)
                  if kind is float else isinstance(value, kind) and not isinstance(value, bool))
            if not ok:
                raise PlacementError(field=f"placement record.{key}", given=repr(value)[:80],
                                     allowed=f"a JSON {kind.__name__}",
                                     fix="write the record with PlacedCall.record()")
        ranks = tuple(ranks)
        needed = ["placement.phy2log", *(f"placement.r{r}.expert_idx" for r in range(len(ranks)))]
        missing = [k for k in needed if k not in arrays]
        if missing:
            raise PlacementError(field="placement record", given=f"no array {missing[0]}",
                                 allowed=f"the arrays {needed}"[:200],
                                 fix="write the record with PlacedCall.record()")
        lists: dict[str, list[Array]] = {}
        for name in (f.name for f in FIELDS if f.tensor_list):
            entries: list[Array] = []
            while (entry := arrays.get(f"shared.{name}.{len(entries)}")) is not None:
                entries.append(_readonly(entry))
            if entries:
                lists[name] = entries
        known = {f"shared.{name}.{i}" for name, e in lists.items() for i in range(len(e))}
        stray = sorted(k for k in arrays if k.startswith("shared.") and k not in known)
        if stray:
            raise PlacementError(field=stray[0], given="an array the record does not define",
                                 allowed="shared.{field}.{i}, i = 0, 1, ... per TensorList",
                                 fix="write the record with PlacedCall.record()")
        if bool(lists) != fields["shared"]:
            raise PlacementError(field="placement record.shared", given=repr(fields["shared"]),
                                 allowed=f"{bool(lists)}: the record {'has' if lists else 'has no'}"
                                 " shared-expert arrays", fix="write the record with "
                                 "PlacedCall.record()")
        placement = Placement(phy2log=np.asarray(arrays["placement.phy2log"]),
                              num_logical=fields["num_logical"], ep_size=max(len(ranks), 1),
                              layer=fields["layer"], replica_choice=fields["replica_choice"],
                              dispatch=fields["dispatch"])
        weights = RoutingWeights(renormalize=fields["renormalize"],
                                 routed_scaling_factor=fields["routed_scaling_factor"],
                                 on_input=fields["on_input"])
        logical = [dataclasses.replace(r, expert_idx=arrays[f"placement.r{i}.expert_idx"])
                   if isinstance(r, RankInputs) else r for i, r in enumerate(ranks)]
        return cls(logical, placement=placement, weights=weights,
                   shared=SharedExperts(lists=lists) if lists else None,
                   swiglu_limit=swiglu_limit, swiglu_alpha=swiglu_alpha, act_scheme=act_scheme)


def _check_shared(shared: SharedExperts, base: Problem) -> None:
    """The shared experts' TensorLists, validated as one rank's weights next to the routed ones
    (same variant, under the call's ``act_scheme``, K and I); errors are re-raised under
    ``shared.<field>``."""
    cfg = base.config
    if not isinstance(shared, SharedExperts) or "w1" not in shared.lists:
        raise PlacementError(field="shared", given=describe(shared),
                             allowed="spec.placement.SharedExperts with lists['w1'], ['w2'], ...",
                             fix="pass the shared experts' TensorLists by field name")
    names = {f.name for f in FIELDS if f.tensor_list}
    unknown = sorted(set(shared.lists) - names)
    if unknown:
        raise PlacementError(field=f"shared.{unknown[0]}", given="an unknown TensorList",
                             allowed=", ".join(sorted(names)), fix="use RankInputs' field names")
    x = np.zeros((0, cfg.hidden), DTYPES[cfg.x_dtype])
    probe = RankInputs(x=x, expert_idx=np.zeros((0, 1), np.int32),
                       probs=np.zeros((0, 1), np.float32), **shared.lists)  # type: ignore[arg-type]
    try:
        got = Problem([probe], act_scheme=cfg.act_scheme).config
    except SpecError as exc:
        raise PlacementError(field=f"shared.{exc.field}", given=exc.given, allowed=exc.allowed,
                             fix=exc.fix) from None
    for what, have, want in (("weight dtype", got.weight_dtype, cfg.weight_dtype),
                             ("variant", got.variant, cfg.variant),
                             ("intermediate size I", got.intermediate, cfg.intermediate)):
        if have != want:
            raise PlacementError(field=f"shared ({what})", given=repr(have),
                                 allowed=f"{want!r} as the routed experts",
                                 fix=f"give the shared experts the routed experts' {what}")

