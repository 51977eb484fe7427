"""Torch implementations for the isolation tests: tensors in, tensors out through the adapter
(:func:`oracle.adapters.torch_io.implementation`), run in the isolation child. Importing this module
multiplies two matrices, so torch's intra-op thread pool is running in the child's template
process before it forks the worker that serves calls; every call multiplies again in the worker.
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch

from oracle.adapters.torch_io import TorchRankInputs, from_torch, implementation, to_tensor
from oracle.model.reference import run
from spec import Problem

_SIDE = 256  # large enough for torch to split the product over its threads
torch.ones(_SIDE, _SIDE) @ torch.ones(_SIDE, _SIDE)


def _model(ranks: list[TorchRankInputs], scale: float) -> list[tuple[torch.Tensor, Any]]:
    """The reference model's outputs as tensors, ``out`` multiplied by ``scale`` in torch (1:
    unchanged, bit for bit), after a thread-pool-sized product in this process."""
    product = torch.ones(_SIDE, _SIDE) @ torch.ones(_SIDE, _SIDE)
    assert float(product[0, 0]) == _SIDE
    problem = Problem([from_torch(r) for r in ranks], max_output_size=ranks[0].max_output_size,
                      swiglu_limit=ranks[0].swiglu_limit, swiglu_alpha=ranks[0].swiglu_alpha)
    return [(to_tensor(r.out) * scale, to_tensor(r.expert_token_nums))
            for r in run(problem).ranks]


def _correct(ranks: list[TorchRankInputs]) -> list[tuple[torch.Tensor, Any]]:
    return _model(ranks, 1.0)


def _doubled(ranks: list[TorchRankInputs]) -> list[tuple[torch.Tensor, Any]]:
    return _model(ranks, 2.0)


def _segfaults(ranks: list[TorchRankInputs]) -> list[tuple[torch.Tensor, Any]]:
    _model(ranks, 1.0)
    ctypes.string_at(0)  # reads address 0: SIGSEGV
    raise AssertionError("unreachable")


correct = implementation(_correct)
doubled = implementation(_doubled)
segfaults = implementation(_segfaults)
#: Declares DeepGEMM's packed UE8M0 scales: a call whose scales are not powers of two is
#: refused by the adapter before ``_correct`` is entered.
packed_ue8m0 = implementation(_correct, scale_layout="packed-ue8m0")
