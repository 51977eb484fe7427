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

**GPU formats** (``docs/contract/formats.md``) cross with the dtypes kernels take, bit for bit:
e4m3 values (:mod:`spec.fp8`, ml_dtypes' ``float8_e4m3fn``) as ``torch.float8_e4m3fn``; packed
fp4 (:mod:`spec.mxfp4`: two e2m1 codes per byte, the even element in the low nibble) as
``torch.uint8``; e8m0 scales as ``torch.uint8`` bytes, or ``torch.float8_e8m0fnu`` with
``e8m0="float8_e8m0fnu"`` (torch 2.7 and later). Read back, ``torch.float8_e8m0fnu`` and
``torch.float4_e2m1fn_x2`` become the uint8 bytes the spec holds (:data:`TORCH_BYTES`); the
nibble order is the format's, not reinterpreted. Float32 scales take the int64 encoding only
where they are float32 (e8m0 bytes never). **Scale layouts** (``scale_layout=``,
:mod:`spec.scale_layout`): block scales reach the kernel in the layout it declares, as the
memory its pointer reads: ``"row-major"``, ``"column-major"`` and ``"tma-aligned"`` as an
``(…, MN, KB)`` view of that storage (DeepGEMM's strides), ``"swizzle-128x4"`` as the swizzled
buffer itself, ``"packed-ue8m0"`` as DeepGEMM's SM100 scales: a ``torch.int32`` ``(…, N,
ceil(KB/4))`` view of MN-major, TMA-aligned words, one row per output channel (the scales must
be powers of two); the judge keeps judging against the logical scales of the problem.

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

**Workspaces** (``implementation(fn, workspaces=declare)``): ``declare(ranks)`` names the
intermediate buffers the kernel wants handed to it (``{"h": ((T, top_k, 2 * I), torch.bfloat16)}``:
a receive buffer, an h buffer), and ``fn(ranks, workspace=buffers)`` gets them allocated on the
device and **poisoned** (``poison="nan"``: floats NaN; ``"pattern"``: a finite value that changes
from call to call; integers always a value that changes from call to call), so a kernel that
reads a workspace row it never wrote, or data left there by the previous call, fails.

**Padded batches and CUDA-graph replay** (``pad_to=``, ``graph=True``): serving stacks capture a
kernel once per batch-size bucket and replay it on smaller batches padded to the bucket. With
``pad_to`` (one size or the bucket sizes) every rank's tokens are padded to the smallest bucket
holding the call's largest rank (calls above the largest run unpadded, as serving runs them
eagerly): the padding rows' ``x`` and ``probs`` poisoned, their ``expert_idx`` valid ids (so a
kernel that routes them computes them) and ``x_active_mask`` ``False``; only the real rows are
judged, so padding that leaks into a real row, or counted in ``expert_token_nums``, fails. This
works on any device. ``graph=True`` (CUDA only) also captures ``fn`` once per input signature
(the bucket's shapes) into a ``torch.cuda.CUDAGraph`` and replays it for every call of that
signature, after copying the call's inputs into the captured buffers and re-poisoning the output
buffers and workspaces; ``fn`` must then be capturable (no host synchronisation, no
data-dependent shapes).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ml_dtypes
import numpy as np

from spec import DTypeError, Problem, RankInputs
from spec.errors import describe
from spec.fields import FIELDS, VARIANTS, Field, Variant, selection_of, variant_for
from spec.scale_layout import MN_MAJOR, kernel_rows, physical_scales

if TYPE_CHECKING:
    import torch
    from torch import Tensor

__all__ = [
    "E8M0_DTYPES",
    "POISONS",
    "SCALE_ENCODINGS",
    "TORCH_BYTES",
    "InputsRefused",
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
#: How e8m0 scale bytes reach the kernel: ``torch.uint8``, or torch's own e8m0 dtype.
E8M0_DTYPES = ("uint8", "float8_e8m0fnu")
_BF16 = np.dtype(ml_dtypes.bfloat16)
#: How never-written memory is filled (:func:`implementation`'s ``poison``).
POISONS = ("nan", "pattern")
#: Workspace declarations: name -> (shape, torch dtype).
Workspaces = Mapping[str, tuple[Sequence[int], Any]]
#: Torch dtypes NumPy lacks that cross as their bytes: the torch name -> the spec's dtype
#: (ml_dtypes' float8 types; e8m0 scales and packed fp4 as the uint8 bytes :mod:`spec.mxfp4`
#: holds).
TORCH_BYTES: dict[str, np.dtype[Any]] = {
    "bfloat16": _BF16,
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
    "float8_e8m0fnu": np.dtype(np.uint8),
    "float4_e2m1fn_x2": np.dtype(np.uint8),
}


class InputsRefused(ValueError):
    """The adapter of :func:`implementation` could not hand a call to the wrapped function in
    the form it declared (a ``scale_layout`` that cannot hold the call's scales, …): raised
    before that function is entered, so the gate reports the call it drew as refused, not the
    implementation as raising (:func:`oracle.check.isolation.failure_of`)."""


@dataclass(frozen=True)
class TorchRankInputs:
    """One rank's arguments of the operator, as torch tensors, named as in the torch binding.

    ``weight1``/``weight2``/``scale1``/``scale2``/``bias1``/``bias2``/``zero1``/``zero2``/
    ``gscale1``/``gscale2``/``a1_gscale``/``a2_gscale`` are TensorLists (one stacked tensor or
    one per expert, §3).
    ``max_output_size`` ``None`` means no truncation;
    ``swiglu_limit`` ``None`` means no clamp (the binding's default 1e6 is effectively none);
    ``swiglu_alpha`` ``None`` means not passed (the PR #11916 binding's default 0: standard
    SwiGLU). ``act_scheme``: the activation quantisation the call names where the weights
    cannot tell it (``"mxfp8"``: MXFP4 x MXFP8, vLLM's ``mxfp4_mxfp8``; ``None``: the row the
    weights select; not a kernel argument, a property of the call, :class:`spec.OpConfig`).
    ``out`` and ``expert_token_nums``: the output buffers to write into, poisoned (NaN,
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
    a1_gscale: list[torch.Tensor] | None = None
    a2_gscale: list[torch.Tensor] | None = None
    max_output_size: int | None = None
    swiglu_limit: float | None = None
    swiglu_alpha: float | None = None
    act_scheme: str | None = None
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
    name = str(t.dtype).removeprefix("torch.")
    if name in TORCH_BYTES:
        bits = torch.int16 if t.element_size() == 2 else torch.uint8
        return np.array(t.view(bits).numpy().view(TORCH_BYTES[name]))
    try:
        return np.array(t.numpy())
    except (TypeError, RuntimeError) as exc:  # float8, complex32, quantised: no NumPy dtype
        raise DTypeError(field="tensor", given=f"dtype {t.dtype} ({exc})",
                         allowed="a dtype NumPy holds (bfloat16, float16, float32, int*)",
                         fix="return the contract's dtypes (out like x, int32 counts)") from None


def to_tensor(a: Array, *, device: Any = None, dtype: str | None = None) -> torch.Tensor:
    """A torch tensor holding a copy of the array ``a``: bfloat16 and ml_dtypes' float8 types
    bit for bit as torch's own (:data:`TORCH_BYTES`). ``dtype``: a torch dtype name to view the
    bytes of a uint8 array as (``"float8_e8m0fnu"``: e8m0 scale bytes).

    >>> str(to_tensor(np.array([1.0, 500.0], np.float32).astype(ml_dtypes.float8_e4m3fn)).dtype)
    'torch.float8_e4m3fn'
    """
    torch = _torch()
    a = np.ascontiguousarray(a)
    own = {d: n for n, d in TORCH_BYTES.items() if d != np.uint8}  # NumPy lacks these
    target = dtype or own.get(a.dtype)
    t: Tensor
    if target is None:
        t = torch.from_numpy(a.copy())
    else:
        to = _torch_dtype(target)
        if a.dtype.itemsize != torch.empty((), dtype=to).element_size():
            raise ValueError(f"dtype={target!r}: an array of {a.dtype} does not hold its "
                             "bytes; pass the format's bytes (uint8 for e8m0)")
        bits = np.int16 if a.dtype.itemsize == 2 else np.uint8
        t = torch.from_numpy(a.view(bits).copy()).view(to)
    return t if device is None else t.to(device)


def _torch_dtype(name: str) -> Any:
    """torch's dtype called ``name``; one this torch lacks is a ``ValueError`` saying so."""
    torch = _torch()
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"torch {torch.__version__} has no dtype {name!r}; upgrade torch or "
                         "pass the bytes as uint8 (e8m0='uint8')")
    return dtype


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


def _variant(inputs: Any, act_scheme: str | None, *, binding: bool) -> Variant:
    """The variant one rank's arrays (or, with ``binding``, tensors) and the call's
    ``act_scheme`` select (:func:`spec.fields.selection_of`; W8A8 when they name none:
    validation, later, says why)."""
    sel = selection_of(inputs, binding=binding, act_scheme=act_scheme)
    return (variant_for(sel, strict=False) if sel is not None else None) or VARIANTS[0]


def from_torch(inputs: TorchRankInputs, *, rank: int | None = None) -> RankInputs:
    """The :class:`spec.RankInputs` (NumPy, float32 scales) of one rank's torch arguments.

    Scales may be int64 (vLLM's encoding, extended as weight1's variant says) or float32; an
    optional TensorList passed empty (vLLM's ``torch.tensor([])`` for W8A8's biases) is absent.
    Values are copied; shapes and dtypes are validated later, by :class:`spec.Problem`.
    """
    extension = _variant(inputs, inputs.act_scheme, binding=True).scale_extension

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
    act_scheme: str | None = None,
    scales: str = "int64",
    device: Any = None,
    out_buffers: bool = False,
    e8m0: str = "uint8",
    scale_layout: str | None = None,
) -> TorchRankInputs:
    """One rank's arguments as torch tensors (copies: an implementation may write into them, as
    the kernel writes the sentinel into ``expert_idx``). ``scales``: see :data:`SCALE_ENCODINGS`
    (float32 scales only). ``out_buffers``: also the poisoned output buffers (``out`` all NaN in
    x's dtype, ``expert_token_nums`` all -1, int32; see the module docstring). ``e8m0``: the
    torch dtype of e8m0 scale bytes (:data:`E8M0_DTYPES`). ``scale_layout``: the layout the
    kernel reads block scales in (:data:`spec.scale_layout.LAYOUTS`; ``None``: the logical
    ``(…, KB, MN)`` arrays as the problem holds them).

    >>> from spec import OpConfig, random_problem
    >>> p = random_problem(OpConfig(ep_size=1, experts_per_rank=2, top_k=1, hidden=32,
    ...                             intermediate=16, tokens_per_rank=(2,)))
    >>> t = to_torch(p.ranks[0])
    >>> str(t.x.dtype), str(t.scale1[0].dtype)
    ('torch.bfloat16', 'torch.int64')
    """
    if scales not in SCALE_ENCODINGS:
        raise ValueError(f"scales={scales!r} must be one of {SCALE_ENCODINGS}")
    if e8m0 not in E8M0_DTYPES:
        raise ValueError(f"e8m0={e8m0!r} must be one of {E8M0_DTYPES}")

    variant = _variant(inputs, act_scheme, binding=False)
    # e8m0 scales: a variant's uint8 scale lists (MXFP4's bytes of 2^(s - 127), spec.mxfp4).
    e8m0_fields = {name for name, spec in variant.lists.items()
                   if name.startswith("scale") and spec.dtype == "uint8"}
    physical = physical_scales(inputs, scale_layout) if scale_layout is not None else {}

    def convert(f: Field, a: Array, i: int = 0) -> torch.Tensor:
        if f.name in physical:
            a = physical[f.name][i]
        encode = f.float32_bits and scales == "int64" and a.dtype == np.float32
        t = to_tensor(scales_to_int64(a, extension=variant.scale_extension) if encode else a,
                      device=device,
                      dtype=e8m0 if f.name in e8m0_fields and e8m0 != "uint8" else None)
        if f.name in physical and scale_layout in MN_MAJOR:
            # the (…, KB, MNpad) storage seen as (…, MN, KB) with DeepGEMM's strides
            t = t.transpose(-1, -2)[..., :kernel_rows(inputs, f.name, i, scale_layout), :]
        return t

    values: dict[str, Any] = {}
    for f in FIELDS:
        value = getattr(inputs, f.name)
        values[f.binding] = None if value is None else (
            [convert(f, t, i) for i, t in enumerate(value)] if f.tensor_list
            else convert(f, value))
    x = values["x"]
    torch = _torch()
    num_experts = inputs.w1[0].shape[0] if len(inputs.w1) == 1 else len(inputs.w1)  # §3
    return TorchRankInputs(
        **values, max_output_size=max_output_size, swiglu_limit=swiglu_limit,
        swiglu_alpha=swiglu_alpha, act_scheme=act_scheme,
        out=torch.full_like(x, float("nan")) if out_buffers else None,
        expert_token_nums=(torch.full((num_experts,), -1, dtype=torch.int32, device=x.device)
                           if out_buffers else None),
    )


def _name(fn: Callable[..., Any]) -> str:
    """``module:qualname`` of ``fn``, or its repr."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    return f"{module}:{qualname}" if module and qualname else repr(fn)


def output_pair(output: Any) -> tuple[Array, Array]:
    """``(out, expert_token_nums)`` as NumPy arrays, from a pair or an object with ``.out`` and
    ``.expert_token_nums`` holding tensors or arrays."""
    if hasattr(output, "out") and hasattr(output, "expert_token_nums"):
        out, nums = output.out, output.expert_token_nums
    else:
        out, nums = output
    return to_numpy(out), to_numpy(nums)


@dataclass(frozen=True)
class _Poison:
    """What never-written memory holds in the ``call``-th call (1, 2, …): see :data:`POISONS`."""

    kind: str
    call: int

    def value(self, dtype: Any) -> float | int | bool:
        """The poison for a NumPy or torch ``dtype``: NaN or a call-dependent finite float; a
        call-dependent integer far from any valid id or count (``min + call % 97``)."""
        torch = _torch()
        if dtype in (bool, np.bool_, torch.bool) or str(dtype) == "bool":
            return bool(self.call % 2)
        if isinstance(dtype, torch.dtype) and not dtype.is_floating_point:
            info: Any = torch.iinfo(dtype)
        elif not isinstance(dtype, torch.dtype) and np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
        else:
            if self.kind == "nan":
                return float("nan")
            return (-1.0) ** self.call * 1.5 * 2.0 ** (4 + self.call % 5)
        return int(info.min) + self.call % 97 if info.min < 0 else int(info.max) - self.call % 97


def _bucket(pad_to: int | Sequence[int] | None, tokens: int) -> int | None:
    """The smallest bucket of ``pad_to`` holding ``tokens`` rows; ``None``: run unpadded."""
    if pad_to is None:
        return None
    sizes = sorted([pad_to] if isinstance(pad_to, int) else pad_to)
    return next((b for b in sizes if b >= tokens), None)


def _padded(inputs: RankInputs, rows: int, num_experts: int, poison: _Poison) -> RankInputs:
    """``inputs`` with ``rows`` tokens: the padding rows' ``x`` and ``probs`` poisoned, their
    ``expert_idx`` distinct valid ids that change with the call, ``active_mask`` ``False``."""
    m, top_k = inputs.expert_idx.shape
    extra = rows - m
    if extra <= 0:
        return inputs

    def grow(a: Array, tail: Array) -> Array:
        return np.concatenate([a, tail.astype(a.dtype)])

    def poisoned(a: Array) -> Array:
        return np.full((extra, *a.shape[1:]), poison.value(a.dtype), dtype=a.dtype)

    ids = (np.arange(extra * top_k).reshape(extra, top_k) + poison.call) % num_experts
    mask = np.ones(m, bool) if inputs.active_mask is None else inputs.active_mask
    return dataclasses.replace(
        inputs, x=grow(inputs.x, poisoned(inputs.x)), probs=grow(inputs.probs,
                                                                 poisoned(inputs.probs)),
        expert_idx=grow(inputs.expert_idx, ids), active_mask=grow(mask, np.zeros(extra, bool)))


def _tensors(ranks: Sequence[TorchRankInputs]) -> list[torch.Tensor]:
    """Every tensor the ranks hold, in a fixed order (TensorLists flattened)."""
    found: list[torch.Tensor] = []
    for r in ranks:
        for f in dataclasses.fields(r):
            value = getattr(r, f.name)
            found.extend(value if isinstance(value, list) else
                         [value] if hasattr(value, "data_ptr") else [])
    return found


def _signature(ranks: Sequence[TorchRankInputs], workspace: Mapping[str, Any]) -> tuple[Any, ...]:
    """What a captured graph depends on: every tensor's shape and dtype, the other arguments."""
    scalars = tuple(tuple(getattr(r, f.name) for f in dataclasses.fields(r)
                          if not isinstance(getattr(r, f.name), list)
                          and not hasattr(getattr(r, f.name), "data_ptr")) for r in ranks)
    return (tuple((tuple(t.shape), t.dtype) for t in _tensors(ranks)), scalars,
            tuple((name, tuple(t.shape), t.dtype) for name, t in workspace.items()))


class _Graphs:
    """CUDA graphs of ``call`` by input signature (the last :attr:`KEEP`): captured on the first
    call of a signature, then replayed with the inputs copied into the captured buffers."""

    KEEP = 4

    def __init__(self, call: Callable[[list[TorchRankInputs], dict[str, Any]], Any]) -> None:
        self.call = call
        self.captured: OrderedDict[tuple[Any, ...], tuple[Any, list[TorchRankInputs],
                                                          dict[str, Any], Any]] = OrderedDict()

    def _capture(self, ranks: list[TorchRankInputs], workspace: dict[str, Any]) -> tuple[
            Any, list[TorchRankInputs], dict[str, Any], Any]:
        torch = _torch()
        clones = iter([t.clone() for t in _tensors(ranks)])
        static: list[TorchRankInputs] = []
        for r in ranks:
            copied: dict[str, Any] = {}
            for f in dataclasses.fields(r):
                value = getattr(r, f.name)
                if isinstance(value, list) or hasattr(value, "data_ptr"):
                    copied[f.name] = ([next(clones) for _ in value] if isinstance(value, list)
                                      else next(clones))
            static.append(dataclasses.replace(r, **copied))
        static_ws = {name: t.clone() for name, t in workspace.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.stream(side):  # warm-up: compilation, autotuning, allocations
                self.call(static, static_ws)
            torch.cuda.current_stream().wait_stream(side)
            with torch.cuda.graph(graph):
                returned = self.call(static, static_ws)
        except RuntimeError as exc:
            raise RuntimeError(
                f"graph=True: the implementation could not be captured in a CUDA graph ({exc}); "
                "a capturable kernel does no host synchronisation (.item(), int(tensor), "
                ".cpu(), nonzero) and no data-dependent shapes; drop graph=True (pad_to= alone "
                "pads without capture)") from exc
        return graph, static, static_ws, returned

    def __call__(self, ranks: list[TorchRankInputs], workspace: dict[str, Any],
                 poison: _Poison) -> tuple[Any, list[TorchRankInputs]]:
        key = _signature(ranks, workspace)
        if key not in self.captured:
            self.captured[key] = self._capture(ranks, workspace)
            while len(self.captured) > self.KEEP:
                self.captured.popitem(last=False)
        self.captured.move_to_end(key)
        graph, static, static_ws, returned = self.captured[key]
        for dst, src in zip(_tensors(static), _tensors(ranks)):
            dst.copy_(src)
        for t in static_ws.values():
            t.fill_(poison.value(t.dtype))
        graph.replay()
        return returned, static


def implementation(
    fn: Callable[..., Sequence[Any] | None],
    *,
    scales: str = "int64",
    device: Any = None,
    out_buffers: bool = False,
    workspaces: Callable[[list[TorchRankInputs]], Workspaces] | None = None,
    poison: str = "nan",
    pad_to: int | Sequence[int] | None = None,
    graph: bool = False,
    e8m0: str = "uint8",
    scale_layout: str | None = None,
) -> Callable[[Problem], list[tuple[Array, Array]]]:
    """An implementation for :func:`oracle.check_implementation` from a torch function of all
    ranks: ``fn(ranks)`` takes one :class:`TorchRankInputs` per rank and returns one
    ``(out, expert_token_nums)`` per rank (tensors). With ``out_buffers=True`` it writes into
    each rank's poisoned ``out`` and ``expert_token_nums`` instead, and what it returns is
    ignored. ``workspaces``, ``poison``, ``pad_to`` and ``graph``: poisoned workspaces, padded
    batches and CUDA-graph replay (see the module docstring). ``e8m0``, ``scale_layout``: as
    :func:`to_torch` (the kernel gets block scales in its declared layout; the judge compares
    with the logical ones).

    >>> impl = implementation(lambda ranks: [(r.x, r.expert_idx[:0]) for r in ranks])
    >>> from spec import OpConfig, random_problem
    >>> p = random_problem(OpConfig(ep_size=2, experts_per_rank=2, top_k=1, hidden=32,
    ...                             intermediate=16, tokens_per_rank=(2, 1)))
    >>> [out.shape for out, _ in impl(p)]
    [(2, 32), (1, 32)]
    """
    if poison not in POISONS:
        raise ValueError(f"poison={poison!r} must be one of {POISONS}")
    sizes = [] if pad_to is None else [pad_to] if isinstance(pad_to, int) else list(pad_to)
    if any(not isinstance(b, int) or b < 1 for b in sizes) or (pad_to is not None and not sizes):
        raise ValueError(f"pad_to={pad_to!r} must be a positive int or a non-empty sequence of "
                         "them (the batch sizes a serving stack captures, e.g. (8, 16, 32))")
    if graph and not str(device).startswith("cuda"):
        raise ValueError(
            f"graph=True captures CUDA graphs, so device must be a CUDA device ('cuda', "
            f"'cuda:0'), not device={device!r}; without CUDA use pad_to=... alone, which pads "
            "and poisons the batch as a replay would, without the capture")

    def call(ranks: list[TorchRankInputs], workspace: dict[str, Any]) -> Any:
        return fn(ranks, workspace=workspace) if workspaces is not None else fn(ranks)

    graphs = _Graphs(call) if graph else None
    calls = 0

    def impl(problem: Problem) -> list[tuple[Array, Array]]:
        nonlocal calls
        calls += 1
        poisoned = _Poison(poison, calls)
        rows = _bucket(pad_to, max(r.num_tokens for r in problem.ranks))
        inputs = [r if rows is None else _padded(r, rows, problem.config.num_experts, poisoned)
                  for r in problem.ranks]
        try:
            ranks = [
                to_torch(r, **problem.config.call_attributes(), scales=scales, device=device,
                         out_buffers=out_buffers, e8m0=e8m0, scale_layout=scale_layout)
                for r in inputs
            ]
        except ValueError as exc:  # SpecError and DTypeError are ValueErrors
            raise InputsRefused(
                f"the torch adapter refused the gate's call before entering {_name(fn)}: "
                f"{exc}. The gate drew a call that the declared input form "
                f"(scale_layout={scale_layout!r}, scales={scales!r}, e8m0={e8m0!r}) cannot "
                "hold: gate with the kernel profile whose domain draws only calls the kernel "
                "takes (a packed-ue8m0 kernel: --kernel deepgemm-sm100-fp8, or "
                "check_implementation(kernel=...)), or declare the form the kernel reads"
            ) from exc
        workspace = {} if workspaces is None else {
            name: _torch().full(tuple(shape), poisoned.value(dtype), dtype=dtype, device=device)
            for name, (shape, dtype) in workspaces(ranks).items()}
        if graphs is not None:
            if not _torch().cuda.is_available():
                raise RuntimeError("graph=True needs CUDA, and torch.cuda.is_available() is "
                                   "False here: run on a GPU machine, or use pad_to= alone")
            returned, ranks = graphs(ranks, workspace, poisoned)
        else:
            returned = call(ranks, workspace)
        pairs = [output_pair(o) for o in (ranks if out_buffers else returned)]
        return [(out[:r.num_tokens], nums) for (out, nums), r in zip(pairs, problem.ranks)]

    return impl
