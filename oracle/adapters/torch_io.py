"""Torch tensors in and out of the oracle (the optional extra ``torch``).

The operator's torch binding (vllm-ascend ``csrc/torch_binding.cpp``) takes, per rank::

    dispatch_ffn_combine(x, weight1, weight2, expert_idx, scale1, scale2, bias1, bias2, probs,
                         group, max_output_size, out, expert_token_nums, x_active_mask=None,
                         swiglu_limit=1e6)

and, with the SwigluOAI variant (open PR #11916), ``swiglu_alpha=0.0`` after it.

:class:`TorchRankInputs` holds one rank's arguments under those names. The dequant scales travel
as int64 tensors holding the float32 bits, sign-extended (``s.view(torch.int32).to(torch.int64)``;
§2 of the reference notes): :func:`to_torch` produces that encoding by default and
:func:`from_torch` reads it back, checking that every value is a sign-extended 32-bit pattern.
bfloat16 crosses bit for bit through ``ml_dtypes`` (NumPy has no bfloat16 of its own).

``torch`` is imported only inside the functions that need it: ``import oracle`` and the NumPy
helpers here (:func:`to_numpy` on arrays, :func:`scales_from_int64`) work without it.

Wrapping a torch implementation of the whole call is one line::

    oracle.check_implementation(oracle.adapters.torch_io.implementation(my_torch_fn))

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
from spec.fields import FIELDS, VARIANTS, Field, Variant, variant_for

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

    ``weight1``/``weight2``/``scale1``/``scale2``/``bias1``/``bias2``/``zero1``/``zero2``/
    ``gscale1``/``gscale2`` are TensorLists (one stacked tensor or one per expert, §3).
    ``max_output_size`` ``None`` means no truncation;
    ``swiglu_limit`` ``None`` means no clamp (the binding's default 1e6 is effectively none);
    ``swiglu_alpha`` ``None`` means not passed (the PR #11916 binding's default 0: standard
    SwiGLU). ``out`` and ``expert_token_nums``: the output buffers to write into, poisoned (NaN,
    -1), when the implementation was wrapped with ``out_buffers=True``; else ``None``.
    """

    x: torch.Tensor
    weight1: list[torch.Tensor]
    weight2: list[torch.Tensor]
    expert_idx: torch.Tensor
    scale1: list[torch.Tensor] | None
    scale2: list[torch.Tensor] | None
    probs: torch.Tensor
    x_active_mask: torch.Tensor | None = None
    bias1: list[torch.Tensor] | None = None
    bias2: list[torch.Tensor] | None = None
    zero1: list[torch.Tensor] | None = None
    zero2: list[torch.Tensor] | None = None
    gscale1: list[torch.Tensor] | None = None
    gscale2: list[torch.Tensor] | None = None
    max_output_size: int | None = None
    swiglu_limit: float | None = None
    swiglu_alpha: float | None = None
    out: torch.Tensor | None = None
    expert_token_nums: torch.Tensor | None = None


def _torch() -> Any:
    try:
        import torch
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "oracle.adapters.torch_io needs PyTorch: pip install 'dfc-oracle[torch]'"
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


def scales_to_int64(scales: Array, *, extension: str = "sign") -> Array:
    """float32 scales as vLLM passes them: the float32 bits in int64, sign-extended (W8A8) or
    zero-extended (W4A8, ``extension="zero"``; :attr:`spec.fields.Variant.scale_extension`).

    >>> scales_to_int64(np.array([1.0, -2.0], np.float32)).tolist()
    [1065353216, -1073741824]
    >>> scales_to_int64(np.array([-2.0], np.float32), extension="zero").tolist()
    [3221225472]
    """
    bits = np.ascontiguousarray(scales, dtype=np.float32)
    return bits.view(np.int32 if extension == "sign" else np.uint32).astype(np.int64)


def scales_from_int64(
    encoded: Array, *, field: str = "scale", rank: int | None = None, extension: str = "sign"
) -> Array:
    """The float32 scales behind int64 values holding their bits (the inverse of
    :func:`scales_to_int64` with the same ``extension``). A value outside int32's range
    (sign) or uint32's (zero) is not such an encoding (e.g. bits extended the other way, or a
    value cast rather than bit-copied): :class:`spec.DTypeError`.

    >>> scales_from_int64(np.array([1065353216, -1073741824])).tolist()
    [1.0, -2.0]
    """
    encoded = np.asarray(encoded)
    bits = np.iinfo(np.int32 if extension == "sign" else np.uint32)
    bad = (encoded < bits.min) | (encoded > bits.max)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        how = ("s.view(torch.int32).to(torch.int64), not & 0xFFFFFFFF or a cast"
               if extension == "sign" else "s.view(torch.int32).to(torch.int64) & 0xFFFFFFFF")
        raise DTypeError(
            rank=rank, field=f"{field}{list(where)}", given=f"int64 value {int(encoded[where])}",
            allowed=f"int64 holding float32 bits {extension}-extended (within {bits.dtype}'s "
            "range)",
            fix=f"encode with {how}",
        )
    return encoded.astype(bits.dtype).view(np.float32)


def float32_scales(scales: torch.Tensor) -> torch.Tensor:
    """A scale tensor as float32, decoding the int64 encoding (:func:`scales_from_int64`)."""
    torch = _torch()
    if scales.dtype != torch.int64:
        return scales
    return to_tensor(scales_from_int64(to_numpy(scales)), device=scales.device)


def _variant(weight1: Sequence[Any], x: Any) -> Variant:
    """The variant weight1's dtype selects (W8A8 when it names none: validation, later,
    says why)."""
    names = [str(t.dtype).removeprefix("torch.") for t in (*weight1[:1], x)]
    return (variant_for(names[0], names[-1]) if len(names) == 2 else None) or VARIANTS[0]


def from_torch(inputs: TorchRankInputs, *, rank: int | None = None) -> RankInputs:
    """The :class:`spec.RankInputs` (NumPy, float32 scales) of one rank's torch arguments.

    Scales may be int64 (vLLM's encoding, extended as weight1's variant says) or float32; an
    optional TensorList passed empty (vLLM's ``torch.tensor([])`` for W8A8's biases) is absent.
    Values are copied; shapes and dtypes are validated later, by :class:`spec.Problem`.
    """
    extension = _variant(inputs.weight1, inputs.x).scale_extension

    def convert(f: Field, value: Any, i: int = 0) -> Array:
        a = to_numpy(value)
        if f.float32_bits and a.dtype == np.int64:
            return scales_from_int64(a, field=f"{f.binding}[{i}]", rank=rank,
                                     extension=extension)
        return a

    values: dict[str, Any] = {}
    for f in FIELDS:
        value = getattr(inputs, f.binding)
        # vLLM passes the lists a variant does not read as torch.tensor([]) (W8A8's bias1/2).
        if value is not None and (f.required or not f.tensor_list or len(value)):
            values[f.name] = ([convert(f, t, i) for i, t in enumerate(value)] if f.tensor_list
                              else convert(f, value))
    return RankInputs(**values)


def to_torch(
    inputs: RankInputs,
    *,
    max_output_size: int | None = None,
    swiglu_limit: float | None = None,
    swiglu_alpha: float | None = None,
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

    extension = _variant(inputs.w1, inputs.x).scale_extension

    def convert(f: Field, a: Array) -> torch.Tensor:
        encode = f.float32_bits and scales == "int64"
        return to_tensor(scales_to_int64(a, extension=extension) if encode else a,
                         device=device)

    values: dict[str, Any] = {}
    for f in FIELDS:
        value = getattr(inputs, f.name)
        values[f.binding] = None if value is None else (
            [convert(f, t) for t in value] if f.tensor_list else convert(f, value))
    x = values["x"]
    torch = _torch()
    num_experts = inputs.w1[0].shape[0] if len(inputs.w1) == 1 else len(inputs.w1)  # §3
    return TorchRankInputs(
        **values, max_output_size=max_output_size, swiglu_limit=swiglu_limit,
        swiglu_alpha=swiglu_alpha,
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
            to_torch(r, **problem.config.call_attributes(), scales=scales, device=device,
                     out_buffers=out_buffers)
            for r in problem.ranks
        ]
        returned = fn(ranks)
        return [output_pair(o) for o in (ranks if out_buffers else returned)]

    return impl
