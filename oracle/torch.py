"""Torch tensors in and out of the oracle (the optional extra ``torch``).

The operator's torch binding (vllm-ascend ``csrc/torch_binding.cpp``) takes, per rank::

    dispatch_ffn_combine(x, weight1, weight2, expert_idx, scale1, scale2, bias1, bias2, probs,
                         group, max_output_size, out, expert_token_nums, x_active_mask=None,
                         swiglu_limit=1e6)

:class:`TorchRankInputs` holds one rank's arguments under those names. The dequant scales travel
as int64 tensors holding the float32 bits, sign-extended (``s.view(torch.int32).to(torch.int64)``;
§2 of the reference notes): :func:`to_torch` produces that encoding by default and
:func:`from_torch` reads it back, checking that every value is a sign-extended 32-bit pattern.
bfloat16 crosses bit for bit through ``ml_dtypes`` (NumPy has no bfloat16 of its own).

``torch`` is imported only inside the functions that need it: ``import oracle`` and the NumPy
helpers here (:func:`to_numpy` on arrays, :func:`scales_from_int64`) work without it.

Wrapping a torch implementation of the whole call is one line::

    oracle.check_implementation(oracle.torch.implementation(my_torch_fn))

**Output buffers** (``implementation(fn, out_buffers=True)``): the binding writes into the
``out`` and ``expert_token_nums`` its caller allocates, and vLLM allocated ``out`` with
``torch.empty_like``, so a row the kernel never writes holds whatever the memory held (vllm-ascend
PR #9992, open: rows of local experts with no tokens, or of ranks with fewer tokens than cores,
are not written; issue #9170's corrupted first-step logits). With the option, each rank's
arguments carry those two buffers **poisoned**: ``out`` filled with NaN, ``expert_token_nums``
with -1, and the results are read from them. A row the contract defines and the implementation
never writes stays NaN and fails at stage ``non_finite``, named as a row never written; rows the
contract leaves undefined (masked tokens, tokens that lost a slot to ``max_output_size``) may
stay NaN, as the judge ignores them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ml_dtypes
import numpy as np

from spec import DTypeError, Problem, RankInputs
from spec.errors import describe

if TYPE_CHECKING:
    import torch
    from torch import Tensor

__all__ = [
    "SCALE_ENCODINGS",
    "TorchRankInputs",
    "float32_scales",
    "from_torch",
    "implementation",
    "output_pair",
    "scales_from_int64",
    "scales_to_int64",
    "to_numpy",
    "to_tensor",
    "to_torch",
]

Array = np.ndarray[Any, Any]
#: ``"int64"``: float32 bits sign-extended into int64, as vLLM passes them; ``"float32"``: plain.
SCALE_ENCODINGS = ("int64", "float32")
_BF16 = np.dtype(ml_dtypes.bfloat16)


@dataclass(frozen=True)
class TorchRankInputs:
    """One rank's arguments of the operator, as torch tensors, named as in the torch binding.

    ``weight1``/``weight2``/``scale1``/``scale2`` are TensorLists (one stacked tensor or one per
    expert, §3). ``max_output_size`` ``None`` means no truncation; ``swiglu_limit`` ``None`` means
    no clamp (the binding's default 1e6 is effectively none). ``out`` and ``expert_token_nums``:
    the output buffers to write into, poisoned (NaN, -1), when the implementation was wrapped
    with ``out_buffers=True``; else ``None``.
    """

    x: torch.Tensor
    weight1: list[torch.Tensor]
    weight2: list[torch.Tensor]
    expert_idx: torch.Tensor
    scale1: list[torch.Tensor] | None
    scale2: list[torch.Tensor] | None
    probs: torch.Tensor
    x_active_mask: torch.Tensor | None = None
    max_output_size: int | None = None
    swiglu_limit: float | None = None
    out: torch.Tensor | None = None
    expert_token_nums: torch.Tensor | None = None


def _torch() -> Any:
    try:
        import torch
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "oracle.torch needs PyTorch: pip install 'dfc-oracle[torch]'"
        ) from err
    return torch


def to_numpy(value: Any) -> Array:
    """A NumPy array with the same values as ``value`` (a torch tensor on any device, or an
    array), bfloat16 included bit for bit. Torch tensors are copied; arrays pass through.

    >>> to_numpy(np.arange(3)).tolist()
    [0, 1, 2]
    """
    if isinstance(value, np.ndarray):
        return value
    torch = _torch()
    if not isinstance(value, torch.Tensor):
        raise DTypeError(
            field="tensor", given=describe(value), allowed="a torch.Tensor or a NumPy array",
            fix="pass tensors or arrays",
        )
    if value.layout != torch.strided or value.is_meta:
        what = "a meta tensor (no data)" if value.is_meta else f"a {value.layout} tensor"
        raise DTypeError(field="tensor", given=what, allowed="a dense tensor with data",
                         fix="return dense tensors on a real device (e.g. .to_dense())")
    t = value.detach().to("cpu").resolve_conj().resolve_neg().contiguous()
    if t.dtype == torch.bfloat16:
        return np.array(t.view(torch.int16).numpy().view(_BF16))
    try:
        return np.array(t.numpy())
    except (TypeError, RuntimeError) as exc:  # float8, complex32, quantised: no NumPy dtype
        raise DTypeError(field="tensor", given=f"dtype {t.dtype} ({exc})",
                         allowed="a dtype NumPy holds (bfloat16, float16, float32, int*)",
                         fix="return the contract's dtypes (out like x, int32 counts)") from None


def to_tensor(a: Array, *, device: Any = None) -> torch.Tensor:
    """A torch tensor holding a copy of the array ``a`` (bfloat16 bit for bit)."""
    torch = _torch()
    a = np.ascontiguousarray(a)
    t: Tensor
    if a.dtype == _BF16:
        t = torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    else:
        t = torch.from_numpy(a.copy())
    return t if device is None else t.to(device)


def scales_to_int64(scales: Array) -> Array:
    """float32 scales as vLLM passes them: the float32 bits, sign-extended into int64.

    >>> scales_to_int64(np.array([1.0, -2.0], np.float32)).tolist()
    [1065353216, -1073741824]
    """
    return np.ascontiguousarray(scales, dtype=np.float32).view(np.int32).astype(np.int64)


def scales_from_int64(encoded: Array, *, field: str = "scale", rank: int | None = None) -> Array:
    """The float32 scales behind int64 values holding their bits sign-extended (the inverse of
    :func:`scales_to_int64`). A value outside int32's range is not such an encoding (e.g. bits
    zero-extended from a negative float, or a value cast rather than bit-copied):
    :class:`spec.DTypeError`.

    >>> scales_from_int64(np.array([1065353216, -1073741824])).tolist()
    [1.0, -2.0]
    """
    encoded = np.asarray(encoded)
    bad = (encoded < np.iinfo(np.int32).min) | (encoded > np.iinfo(np.int32).max)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise DTypeError(
            rank=rank, field=f"{field}{list(where)}", given=f"int64 value {int(encoded[where])}",
            allowed="int64 holding float32 bits sign-extended (within int32's range)",
            fix="encode with s.view(torch.int32).to(torch.int64), not & 0xFFFFFFFF or a cast",
        )
    return encoded.astype(np.int32).view(np.float32)


def float32_scales(scales: torch.Tensor) -> torch.Tensor:
    """A scale tensor as float32, decoding the int64 encoding (:func:`scales_from_int64`)."""
    torch = _torch()
    if scales.dtype != torch.int64:
        return scales
    return to_tensor(scales_from_int64(to_numpy(scales)), device=scales.device)


def _scales_as_float32(tensors: Sequence[Any] | None, field: str, rank: int | None) -> Any:
    if tensors is None:
        return None
    out = []
    for i, t in enumerate(tensors):
        a = to_numpy(t)
        out.append(scales_from_int64(a, field=f"{field}[{i}]", rank=rank)
                   if a.dtype == np.int64 else a)
    return out


def from_torch(inputs: TorchRankInputs, *, rank: int | None = None) -> RankInputs:
    """The :class:`spec.RankInputs` (NumPy, float32 scales) of one rank's torch arguments.

    Scales may be int64 (vLLM's encoding) or float32. Values are copied; shapes and dtypes are
    validated later, by :class:`spec.Problem`.
    """
    def many(tensors: Sequence[Any]) -> list[Array]:
        return [to_numpy(t) for t in tensors]

    return RankInputs(
        x=to_numpy(inputs.x),
        expert_idx=to_numpy(inputs.expert_idx),
        probs=to_numpy(inputs.probs),
        w1=many(inputs.weight1),
        w2=many(inputs.weight2),
        scale1=_scales_as_float32(inputs.scale1, "scale1", rank),
        scale2=_scales_as_float32(inputs.scale2, "scale2", rank),
        active_mask=None if inputs.x_active_mask is None else to_numpy(inputs.x_active_mask),
    )


def to_torch(
    inputs: RankInputs,
    *,
    max_output_size: int | None = None,
    swiglu_limit: float | None = None,
    scales: str = "int64",
    device: Any = None,
    out_buffers: bool = False,
) -> TorchRankInputs:
    """One rank's arguments as torch tensors (copies: an implementation may write into them, as
    the kernel writes the sentinel into ``expert_idx``). ``scales``: see :data:`SCALE_ENCODINGS`.
    ``out_buffers``: also the poisoned output buffers (``out`` all NaN in x's dtype,
    ``expert_token_nums`` all -1, int32; see the module docstring).

    >>> from spec import OpConfig, random_problem
    >>> p = random_problem(OpConfig(ep_size=1, experts_per_rank=2, top_k=1, hidden=32,
    ...                             intermediate=16, tokens_per_rank=(2,)))
    >>> t = to_torch(p.ranks[0])
    >>> str(t.x.dtype), str(t.scale1[0].dtype)
    ('torch.bfloat16', 'torch.int64')
    """
    if scales not in SCALE_ENCODINGS:
        raise ValueError(f"scales={scales!r} must be one of {SCALE_ENCODINGS}")

    def many(arrays: Sequence[Array]) -> list[torch.Tensor]:
        return [to_tensor(a, device=device) for a in arrays]

    def many_scales(arrays: Sequence[Array] | None) -> list[torch.Tensor] | None:
        if arrays is None:
            return None
        return many([scales_to_int64(a) if scales == "int64" else a for a in arrays])

    mask = inputs.active_mask
    x = to_tensor(inputs.x, device=device)
    torch = _torch()
    num_experts = inputs.w1[0].shape[0] if len(inputs.w1) == 1 else len(inputs.w1)  # §3
    return TorchRankInputs(
        x=x,
        weight1=many(inputs.w1),
        weight2=many(inputs.w2),
        expert_idx=to_tensor(inputs.expert_idx, device=device),
        scale1=many_scales(inputs.scale1),
        scale2=many_scales(inputs.scale2),
        probs=to_tensor(inputs.probs, device=device),
        x_active_mask=None if mask is None else to_tensor(mask, device=device),
        max_output_size=max_output_size,
        swiglu_limit=swiglu_limit,
        out=torch.full_like(x, float("nan")) if out_buffers else None,
        expert_token_nums=(torch.full((num_experts,), -1, dtype=torch.int32, device=x.device)
                           if out_buffers else None),
    )


def output_pair(output: Any) -> tuple[Array, Array]:
    """``(out, expert_token_nums)`` as NumPy arrays, from a pair or an object with ``.out`` and
    ``.expert_token_nums`` holding tensors or arrays."""
    if hasattr(output, "out") and hasattr(output, "expert_token_nums"):
        out, nums = output.out, output.expert_token_nums
    else:
        out, nums = output
    return to_numpy(out), to_numpy(nums)


def implementation(
    fn: Callable[[list[TorchRankInputs]], Sequence[Any]],
    *,
    scales: str = "int64",
    device: Any = None,
    out_buffers: bool = False,
) -> Callable[[Problem], list[tuple[Array, Array]]]:
    """An implementation for :func:`oracle.check_implementation` from a torch function of all
    ranks: ``fn(ranks)`` takes one :class:`TorchRankInputs` per rank and returns one
    ``(out, expert_token_nums)`` per rank (tensors). With ``out_buffers=True`` it writes into
    each rank's poisoned ``out`` and ``expert_token_nums`` instead, and what it returns is
    ignored (see the module docstring).

    >>> impl = implementation(lambda ranks: [(r.x, r.expert_idx[:0]) for r in ranks])
    >>> from spec import OpConfig, random_problem
    >>> p = random_problem(OpConfig(ep_size=2, experts_per_rank=2, top_k=1, hidden=32,
    ...                             intermediate=16, tokens_per_rank=(2, 1)))
    >>> [out.shape for out, _ in impl(p)]
    [(2, 32), (1, 32)]
    """
    def impl(problem: Problem) -> list[tuple[Array, Array]]:
        ranks = [
            to_torch(r, max_output_size=problem.max_output_size,
                     swiglu_limit=problem.swiglu_limit, scales=scales, device=device,
                     out_buffers=out_buffers)
            for r in problem.ranks
        ]
        returned = fn(ranks)
        return [output_pair(o) for o in (ranks if out_buffers else returned)]

    return impl
