"""oracle.adapters.torch_io's poisoned workspaces, padded batches and the CUDA-graph mode's
refusal without CUDA (issue 26); the padding of real drivers is tested with the GPU controls
(tests/controls/gpu/test_gpu_controls.py, on the CPU too)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="oracle.adapters.torch_io needs the optional extra 'torch'")

import oracle  # noqa: E402
from oracle.adapters import torch_io as ot  # noqa: E402
from spec import OpConfig, Problem, random_problem  # noqa: E402
from spec.config import CALL_ATTRIBUTES  # noqa: E402

CFG = OpConfig(ep_size=2, experts_per_rank=2, top_k=2, hidden=32, intermediate=16,
               tokens_per_rank=(3, 2))


def _reference(ranks: list[ot.TorchRankInputs]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The model's outputs, a padded rank's poisoned tail (masked) read as zeros: the model
    refuses NaN inputs even where masked."""
    def clean(r: ot.TorchRankInputs) -> ot.TorchRankInputs:
        if r.x_active_mask is None:
            return r
        keep = r.x_active_mask.bool()[:, None]
        return dataclasses.replace(r, x=torch.where(keep, r.x, 0),
                                   probs=torch.where(keep, r.probs, 0))

    problem = Problem([ot.from_torch(clean(r)) for r in ranks],
                      **{name: getattr(ranks[0], name) for name in CALL_ATTRIBUTES})
    return [(ot.to_tensor(r.out), torch.from_numpy(r.expert_token_nums))
            for r in oracle.run(problem).ranks]


def _declare(ranks: list[ot.TorchRankInputs]) -> dict[str, Any]:
    return {"rows": ((sum(len(r.x) for r in ranks), ranks[0].x.shape[1]), ranks[0].x.dtype)}


def _through_workspace(skip: int | None = None, once: bool = False) -> Any:
    """A kernel that stages every output row in the workspace and reads them back: it skips
    row ``skip``, or writes the workspace only on its first call (``once``)."""
    calls = [0]

    def fn(ranks: list[ot.TorchRankInputs], workspace: dict[str, torch.Tensor]) -> list[Any]:
        calls[0] += 1
        wanted = _reference(ranks)
        staged = torch.cat([out for out, _ in wanted])
        keep = torch.ones(len(staged), dtype=torch.bool)
        if skip is not None:
            keep[skip] = False
        if not once or calls[0] == 1:
            workspace["rows"][keep] = staged[keep]
        rows = workspace["rows"].split([len(r.x) for r in ranks])
        return [(row, nums) for row, (_, nums) in zip(rows, wanted)]

    return fn


def test_workspace_rows_never_written_are_caught_and_a_correct_kernel_passes() -> None:
    problem = random_problem(CFG, seed=5)
    good = ot.implementation(_through_workspace(), workspaces=_declare)
    assert oracle.compare(problem, good(problem)).ok
    verdict = oracle.compare(problem, ot.implementation(
        _through_workspace(skip=1), workspaces=_declare)(problem))
    assert verdict.stage == "non_finite" and verdict.rank == 0 and verdict.where[0] == 1


@pytest.mark.parametrize("poison", ot.POISONS)
def test_a_kernel_reading_the_previous_calls_workspace_fails_on_the_next_call(
        poison: str) -> None:
    # The workspace comes poisoned on every call, with a value that changes from call to
    # call: data a kernel relies on from an earlier call is gone.
    problem = random_problem(CFG, seed=5)
    stale = ot.implementation(_through_workspace(once=True), workspaces=_declare,
                              poison=poison)
    assert oracle.compare(problem, stale(problem)).ok
    assert not oracle.compare(problem, stale(problem)).ok


def test_poison_changes_with_the_call_and_fits_the_dtype() -> None:
    first, second = ot._Poison("pattern", 1), ot._Poison("pattern", 2)
    assert first.value(torch.float32) != second.value(torch.float32)
    assert np.isfinite(first.value(torch.bfloat16))
    assert np.isnan(ot._Poison("nan", 1).value(np.float32))
    assert first.value(torch.int32) != second.value(torch.int32) < -2**30
    assert first.value(np.dtype(np.uint8)) >= 150


def test_padded_batch_hands_masked_poisoned_rows_and_judges_the_real_ones() -> None:
    problem = random_problem(CFG, seed=5)
    seen: list[ot.TorchRankInputs] = []

    def fn(ranks: list[ot.TorchRankInputs]) -> list[Any]:
        seen.extend(ranks)
        return _reference(ranks)

    outputs = ot.implementation(fn, pad_to=(2, 4, 8))(problem)
    assert [len(r.x) for r in seen] == [4, 4]  # the bucket of the largest rank, every rank
    tail = seen[1]
    assert tail.x_active_mask is not None and tail.x_active_mask.tolist() == [1, 1, 0, 0]
    assert torch.isnan(tail.x[2:].float()).all() and torch.isnan(tail.probs[2:]).all()
    assert (tail.expert_idx[2:] < CFG.num_experts).all()  # valid ids: routed if not masked
    assert [o.shape[0] for o, _ in outputs] == [3, 2] and oracle.compare(problem, outputs).ok
    seen.clear()
    ot.implementation(fn, pad_to=2)(problem)  # above the largest bucket: unpadded
    assert [len(r.x) for r in seen] == [3, 2]


def test_graph_mode_and_bad_buckets_are_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match=r"device must be a CUDA device.*pad_to=\.\.\. alone"):
        ot.implementation(_reference, graph=True, device="cpu")
    with pytest.raises(ValueError, match=r"pad_to=\[0\] must be a positive int"):
        ot.implementation(_reference, pad_to=[0])
    with pytest.raises(ValueError, match="poison='zeros' must be one of"):
        ot.implementation(_reference, poison="zeros")
