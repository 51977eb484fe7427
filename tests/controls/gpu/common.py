"""What the GPU controls share: the whole call's inputs gathered on one device, the contract's
counts, and the planted bugs every control must be caught with.

A control runs the collective on one GPU: every rank's tokens are concatenated (rank-major),
every rank's local experts stacked into the global expert list (expert ``g`` lives on rank
``g // E``, reference notes §4), so one grouped kernel computes the whole call; the outputs are
split back per rank.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from oracle.adapters.torch_io import TorchRankInputs, float32_scales

Driver = Callable[..., list[tuple[torch.Tensor, torch.Tensor]]]

#: Bugs a gate must catch, planted around a correct driver (issue 26).
PLANTED = ("routed_weight_twice", "expert_offset", "dropped_slot")
#: Bugs only a padded batch shows (``implementation(..., pad_to=...)`` or graph replay): the
#: padding rows routed and counted, as a driver that ignores ``x_active_mask`` does; and a
#: per-batch dynamic scale (a power of two from the amax of every row of ``x``, padding
#: included, folded into ``x`` and out of ``w1``: exact on real rows, NaN once a poisoned
#: padding row enters the amax), as a per-tensor dynamic quantiser computes it.
PADDING_PLANTED = ("padding_counted", "batch_amax")


@dataclass(frozen=True)
class Call:
    """One call's inputs on one device: ``x`` (T, K), ``expert_idx`` (T, top_k) int64 global
    ids, ``probs`` (T, top_k) float32, ``active`` (T,) bool, ``w1`` (G, K, 2I) and ``w2``
    (G, I, K) stacked over the G = EP·E global experts, each rank's token count, and the
    weights' scales stacked the same way (per channel or per block), if any."""

    x: torch.Tensor
    expert_idx: torch.Tensor
    probs: torch.Tensor
    active: torch.Tensor
    w1: torch.Tensor
    w2: torch.Tensor
    tokens: tuple[int, ...]
    scale1: torch.Tensor | None = None
    scale2: torch.Tensor | None = None

    @classmethod
    def of(cls, ranks: Sequence[TorchRankInputs]) -> Call:
        def stacked(tensors: list[torch.Tensor]) -> torch.Tensor:
            # One tensor is the stacked form (E, ·, ·); several are one per expert (§3).
            return tensors[0] if len(tensors) == 1 else torch.stack(tensors)

        def scales(lists: list[list[torch.Tensor] | None]) -> torch.Tensor | None:
            # per-channel scales (G, N) and (G, K), or FP8 block scales (G, K/128, N/128) and
            # (G, I/128, K/128), float32 whatever their encoding
            return None if lists[0] is None else torch.cat([
                stacked([float32_scales(s) for s in one or []]) for one in lists])

        x = torch.cat([r.x for r in ranks])
        return cls(
            x=x,
            expert_idx=torch.cat([r.expert_idx for r in ranks]).long(),
            probs=torch.cat([r.probs for r in ranks]).float(),
            active=torch.cat([
                torch.ones(len(r.x), dtype=torch.bool, device=x.device)
                if r.x_active_mask is None else r.x_active_mask.bool() for r in ranks]),
            w1=torch.cat([stacked(r.weight1) for r in ranks]),
            w2=torch.cat([stacked(r.weight2) for r in ranks]),
            tokens=tuple(len(r.x) for r in ranks),
            scale1=scales([r.scale1 for r in ranks]),
            scale2=scales([r.scale2 for r in ranks]),
        )

    @property
    def num_experts(self) -> int:
        return int(self.w1.shape[0])

    def active_slots(self) -> torch.Tensor:
        """(T·top_k,) bool: the slots that route somewhere (masked tokens' do not, §4)."""
        return self.active[:, None].expand(self.expert_idx.shape).reshape(-1)

    def by_expert(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The active slots sorted by expert (stable), their tokens, and each expert's end
        offset into them (int32): a grouped GEMM's ``offs``."""
        slots = torch.where(self.active_slots(), self.expert_idx.reshape(-1), self.num_experts)
        order = torch.argsort(slots, stable=True)
        counts = torch.bincount(slots, minlength=self.num_experts + 1)[:self.num_experts]
        order = order[:int(counts.sum())]
        return order, order // self.expert_idx.shape[1], torch.cumsum(counts, 0).to(torch.int32)

    def combine(self, y: torch.Tensor, order: torch.Tensor,
                token: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each sorted slot's ``y`` (x's dtype) times its routed weight in float32, rounded to
        x's dtype, summed per token in float32, one cast; split per rank."""
        y = (y.float() * self.probs.reshape(-1)[order, None]).to(self.x.dtype)
        out = torch.zeros(self.x.shape, dtype=torch.float32, device=self.x.device)
        out.index_add_(0, token, y.float())
        return self.per_rank(out.to(self.x.dtype))

    def per_rank(self, out: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``out`` (T, K) split per rank, each with its local experts' counts (every active
        slot counted, §5)."""
        # no host synchronisation (a CUDA graph captures this): inactive slots count in a spare
        slots = torch.where(self.active_slots(), self.expert_idx.reshape(-1), self.num_experts)
        counts = torch.zeros(self.num_experts + 1, dtype=torch.int32, device=slots.device)
        counts.scatter_add_(0, slots, torch.ones_like(slots, dtype=torch.int32))
        local = counts[:-1].reshape(len(self.tokens), -1)
        return [(o, local[r]) for r, o in enumerate(out.split(list(self.tokens)))]


def plant(driver: Driver, bug: str) -> Driver:
    """``driver`` with one of :data:`PLANTED` or :data:`PADDING_PLANTED` put in front of it
    (new tensors; the given ones are not written): the routed weight applied twice (``p²``),
    every expert id moved to the next expert, each rank's last slot of its first token dropped
    from the combine, the mask ignored, or the batch's power-of-two scale."""
    if bug not in PLANTED + PADDING_PLANTED:
        raise ValueError(f"bug={bug!r} must be one of {PLANTED + PADDING_PLANTED}")

    def planted(ranks: list[TorchRankInputs], **kw: Any) -> list[
            tuple[torch.Tensor, torch.Tensor]]:
        if bug == "batch_amax":
            amax = torch.cat([r.x for r in ranks]).float().abs().amax()
            scale = torch.exp2(-torch.floor(torch.log2(amax.clamp_min(1e-30))))
            return driver([dataclasses.replace(
                r, x=(r.x * scale).to(r.x.dtype),
                weight1=[(w / scale).to(w.dtype) for w in r.weight1]) for r in ranks], **kw)
        num_experts = sum(len(r.weight1) if len(r.weight1) > 1 else r.weight1[0].shape[0]
                          for r in ranks)
        changed: list[TorchRankInputs] = []
        for r in ranks:
            fields: dict[str, Any] = {}
            if bug == "routed_weight_twice":
                fields["probs"] = r.probs * r.probs
            elif bug == "expert_offset":
                fields["expert_idx"] = (r.expert_idx + 1) % num_experts
            elif bug == "padding_counted":
                fields["x_active_mask"] = None
            elif len(r.probs):
                probs = r.probs.clone()
                probs[0, -1] = 0
                fields["probs"] = probs
            changed.append(dataclasses.replace(r, **fields))
        return driver(changed, **kw)

    return planted
