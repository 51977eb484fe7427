"""The error hierarchy of the specification.

Every error a bad input can cause is a :class:`SpecError`, and every message follows one
template, so that a kernel engineer can act on it without reading this code::

    rank 1, expert_idx: got int64 array of shape (4, 2); allowed: int32 of shape (M, top_k). \
Fix: cast with expert_idx.astype(np.int32).

The structured parts stay available as attributes (``rank``, ``field``, ``given``, ``allowed``,
``fix``) for tools that want to render them differently.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "AmbiguousTensorList",
    "BiasError",
    "ConfigError",
    "CounterexampleFileError",
    "DTypeError",
    "ExpertIdError",
    "HcclBufferTooSmall",
    "MaskError",
    "NonFiniteError",
    "PlacementError",
    "RankCountError",
    "ShapeError",
    "SpecError",
    "TensorListError",
    "describe",
]


def describe(value: Any) -> str:
    """A short, human description of a given value: dtype and shape for arrays."""
    if isinstance(value, np.ndarray):
        return f"{value.dtype} array of shape {tuple(value.shape)}"
    if hasattr(value, "dtype") and hasattr(value, "shape"):  # torch tensors and the like
        return f"{type(value).__name__} of dtype {value.dtype} and shape {tuple(value.shape)}"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__} of {len(value)} entries"
    return repr(value)


class SpecError(ValueError):
    """An input violates the operator's contract.

    The message names the rank (when the error is about one rank's arrays), the field, what was
    given, what is allowed, and what to change.
    """

    def __init__(
        self,
        *,
        field: str,
        given: str,
        allowed: str,
        fix: str,
        rank: int | None = None,
    ) -> None:
        self.rank = rank
        self.field = field
        self.given = given
        self.allowed = allowed
        self.fix = fix
        where = f"rank {rank}, " if rank is not None else ""
        super().__init__(f"{where}{field}: got {given}; allowed: {allowed}. Fix: {fix}")


class RankCountError(SpecError):
    """The number of ranks (the EP size) is outside 1..32."""


class ShapeError(SpecError):
    """An array has the wrong number of dimensions or a size that disagrees with another."""


class DTypeError(SpecError):
    """An array has a dtype the operator does not accept."""


class TensorListError(SpecError):
    """A TensorList (weight1, weight2, scale1, scale2) is malformed or inconsistent."""


class AmbiguousTensorList(TensorListError):
    """A per-expert list of one 2-D tensor: the kernel reads it as stacked (E becomes K)."""


class BiasError(SpecError):
    """A W4A8 bias is not the compensation ``8·Σ_k W[k, n]·s[n]`` its weights need."""


class ExpertIdError(SpecError):
    """An expert id outside ``[0, EP·E)``: the sentinel ``EP·E``, a negative or a stale id."""


class NonFiniteError(SpecError):
    """NaN or infinity in an input that must be finite."""


class MaskError(SpecError):
    """``active_mask`` has the wrong dtype or shape, or is given where the variant has none."""


class PlacementError(SpecError):
    """An expert placement, local map, replica or routing-weight setting breaks a rule of
    ``docs/contract/placement.md``."""


class ConfigError(SpecError):
    """A field of :class:`spec.OpConfig` or an attribute of the call is out of range."""


class HcclBufferTooSmall(SpecError):
    """The HCCL window (``HCCL_BUFFSIZE``) is smaller than the operator's host check requires."""


class CounterexampleFileError(SpecError):
    """A saved counterexample file is missing, malformed or fails validation."""
