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

from oracle.adapters.torch_io import TorchRankInputs

Driver = Callable[[list[TorchRankInputs]], list[tuple[torch.Tensor, torch.Tensor]]]

#: Bugs a gate must catch, planted around a correct driver (issue 26).
PLANTED = ("routed_weight_twice", "expert_offset", "dropped_slot")


@dataclass(frozen=True)
class Call:
    """One call's inputs on one device: ``x`` (T, K), ``expert_idx`` (T, top_k) int64 global
    ids, ``probs`` (T, top_k) float32, ``active`` (T,) bool, ``w1`` (G, K, 2I) and ``w2``
    (G, I, K) stacked over the G = EP·E global experts, and each rank's token count."""

    x: torch.Tensor
    expert_idx: torch.Tensor
    probs: torch.Tensor
    active: torch.Tensor
    w1: torch.Tensor
    w2: torch.Tensor
    tokens: tuple[int, ...]

    @classmethod
    def of(cls, ranks: Sequence[TorchRankInputs]) -> Call:
        def stacked(tensors: list[torch.Tensor]) -> torch.Tensor:
            # One tensor is the stacked form (E, ·, ·); several are one per expert (§3).
            return tensors[0] if len(tensors) == 1 else torch.stack(tensors)

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
        )

    @property
    def num_experts(self) -> int:
        return int(self.w1.shape[0])

    def active_slots(self) -> torch.Tensor:
        """(T·top_k,) bool: the slots that route somewhere (masked tokens' do not, §4)."""
        return self.active.repeat_interleave(self.expert_idx.shape[1])

    def per_rank(self, out: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``out`` (T, K) split per rank, each with its local experts' counts (every active
        slot counted, §5)."""
        flat = self.expert_idx.reshape(-1)[self.active_slots()]
        counts = torch.bincount(flat, minlength=self.num_experts).to(torch.int32)
        local = counts.reshape(len(self.tokens), -1)
        return [(o, local[r]) for r, o in enumerate(out.split(list(self.tokens)))]


def plant(driver: Driver, bug: str) -> Driver:
    """``driver`` with one of :data:`PLANTED` put in front of it (new tensors; the given ones
    are not written): the routed weight applied twice (``p²``), every expert id moved to the
    next expert, or each rank's last slot of its first token dropped from the combine."""
    if bug not in PLANTED:
        raise ValueError(f"bug={bug!r} must be one of {PLANTED}")

    def planted(ranks: list[TorchRankInputs]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        num_experts = sum(len(r.weight1) if len(r.weight1) > 1 else r.weight1[0].shape[0]
                          for r in ranks)
        changed: list[TorchRankInputs] = []
        for r in ranks:
            fields: dict[str, Any] = {}
            if bug == "routed_weight_twice":
                fields["probs"] = r.probs * r.probs
            elif bug == "expert_offset":
                fields["expert_idx"] = (r.expert_idx + 1) % num_experts
            elif len(r.probs):
                probs = r.probs.clone()
                probs[0, -1] = 0
                fields["probs"] = probs
            changed.append(dataclasses.replace(r, **fields))
        return driver(changed)

    return planted
