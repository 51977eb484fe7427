"""The data model of one collective call: ``RankInputs`` per rank, ``Problem`` for the call.

Sources: §2–§4 of ``docs/contract/dispatch_ffn_combine.md`` (vllm-ascend ``main`` at
``182b75ea84``). ``Problem`` validates everything on construction and never writes into the
caller's arrays: it keeps read-only copies of them, so neither the oracle nor anything handed the
problem can modify what the caller passed, and nothing the caller does later changes the
problem.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

from spec.config import MAX_EP_SIZE, OpConfig
from spec.errors import (
    AmbiguousTensorList,
    BiasError,
    DTypeError,
    ExpertIdError,
    MaskError,
    NonFiniteError,
    RankCountError,
    ShapeError,
    SpecError,
    TensorListError,
    describe,
)
from spec.fields import FIELDS, SELECTING_INPUTS, VARIANTS, Selection, selection_of, variant_for
from spec.int4 import compensation_bias, unpack_int4
from spec.memory import copy_array

__all__ = ["DTYPES", "Problem", "RankInputs", "dtype_name"]

#: The NumPy dtypes behind the names used in :class:`spec.OpConfig`.
DTYPES: dict[str, np.dtype[Any]] = {
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
    "int8": np.dtype(np.int8),
    "int32": np.dtype(np.int32),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "uint8": np.dtype(np.uint8),
    "uint4": np.dtype(ml_dtypes.uint4),
    "float4_e2m1fn": np.dtype(ml_dtypes.float4_e2m1fn),
}


def dtype_name(dtype: np.dtype[Any]) -> str:
    """The spec's name of a NumPy dtype (``"bfloat16"``, ``"float16"``, ``"int8"``, …)."""
    return str(np.dtype(dtype))


@dataclass(frozen=True, kw_only=True)
class RankInputs:
    """One rank's arrays for a ``dispatch_ffn_combine`` call (the rows of
    :data:`spec.fields.FIELDS`; which TensorLists a variant reads is
    :data:`spec.fields.VARIANTS`).

    ``w1``, ``w2``, ``scale1``, ``scale2``, ``bias1`` and ``bias2`` are TensorLists: a list
    holding one stacked tensor (``[(E, K, N)]``, ``[(E, I, K)]``, ``[(E, N)]``, ``[(E, K)]``) or
    one tensor per expert (``E × (K, N)``, …). ``N = 2I`` with the gate columns first. W8A8 has
    int8 weights and float32 scales; W4A8 int4 weights packed in int32 (``(K, N/8)``,
    ``(I, K/8)``, :mod:`spec.int4`), float32 scales and the compensation biases; the
    BF16/FP16-weight variant has weights in x's dtype and no scales.
    """

    x: np.ndarray
    expert_idx: np.ndarray
    probs: np.ndarray
    w1: Sequence[np.ndarray]
    w2: Sequence[np.ndarray]
    scale1: Sequence[np.ndarray] | None = None
    scale2: Sequence[np.ndarray] | None = None
    active_mask: np.ndarray | None = None
    bias1: Sequence[np.ndarray] | None = None
    bias2: Sequence[np.ndarray] | None = None
    zero1: Sequence[np.ndarray] | None = None
    zero2: Sequence[np.ndarray] | None = None
    gscale1: Sequence[np.ndarray] | None = None
    gscale2: Sequence[np.ndarray] | None = None
    a1_gscale: Sequence[np.ndarray] | None = None
    a2_gscale: Sequence[np.ndarray] | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.x.shape[0])

    def expert_weights(
        self, e: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
        """``(w1 (K, N), w2 (I, K), scale1 (N,) or None, scale2 (K,) or None)`` of local expert e.

        Reads the stacked and the per-expert form alike (views, no copies).
        """
        lists = self.expert_lists(e)
        return lists["w1"], lists["w2"], lists.get("scale1"), lists.get("scale2")

    def expert_lists(self, e: int) -> dict[str, np.ndarray]:
        """Every TensorList's tensor of local expert ``e`` by field name (views, no copies;
        ``None`` fields left out), from the stacked and the per-expert form alike."""
        stacked = len(self.w1) == 1
        return {f.name: tensors[0][e] if stacked else tensors[e] for f in FIELDS
                if f.tensor_list and (tensors := getattr(self, f.name)) is not None}

    def is_active(self) -> np.ndarray:
        """``(M,)`` bool: True for the tokens the kernel computes."""
        if self.active_mask is None:
            return np.ones(self.num_tokens, dtype=bool)
        return np.asarray(self.active_mask, dtype=bool)

    def arrays(self, *, binding: bool = False) -> dict[str, np.ndarray]:
        """Every array by name: ``field`` for a plain array, ``field.i`` for TensorList entry i;
        the field names of :data:`spec.fields.FIELDS`, or with ``binding`` the torch binding's
        argument names. ``None`` fields are left out.

        >>> from spec import OpConfig, random_problem
        >>> p = random_problem(OpConfig(ep_size=1, experts_per_rank=2, top_k=1, hidden=32,
        ...                             intermediate=16, tokens_per_rank=(2,)))
        >>> sorted(p.ranks[0].arrays(binding=True))[:4]
        ['expert_idx', 'probs', 'scale1.0', 'scale2.0']
        """
        out: dict[str, np.ndarray] = {}
        for f in FIELDS:
            key = f.binding if binding else f.name
            value = getattr(self, f.name)
            if value is None:
                continue
            if f.tensor_list:
                out.update((f"{key}.{i}", t) for i, t in enumerate(value))
            else:
                out[key] = value
        return out

    @classmethod
    def from_arrays(
        cls, arrays: Mapping[str, np.ndarray], *, binding: bool = False
    ) -> RankInputs:
        """The inverse of :meth:`arrays` (the arrays as given, not copied; other keys are
        ignored). A missing required TensorList becomes an empty list and a missing required
        array a ``TypeError``: callers that read files check for them first; validation is
        :class:`Problem`'s."""
        values: dict[str, Any] = {}
        for f in FIELDS:
            key = f.binding if binding else f.name
            if f.tensor_list:
                items: list[np.ndarray] = []
                while (t := arrays.get(f"{key}.{len(items)}")) is not None:
                    items.append(t)
                values[f.name] = items if items or f.required else None
            elif key in arrays:
                values[f.name] = arrays[key]
        return cls(**values)

    def map_arrays(
        self, fn: Callable[[np.ndarray], np.ndarray], *, lists: bool = False
    ) -> RankInputs:
        """A copy with ``fn`` applied to every array. TensorLists become tuples, or with
        ``lists`` Python lists (an implementation's writable copy, as the operator gets)."""
        changes: dict[str, Any] = {}
        for f in FIELDS:
            value = getattr(self, f.name)
            if value is not None:
                changes[f.name] = (
                    (list if lists else tuple)(fn(t) for t in value) if f.tensor_list
                    else fn(value))
        return dataclasses.replace(self, **changes)


def _readonly(a: np.ndarray) -> np.ndarray:
    copy = copy_array(a)  # the layout class too: a kernel must cope with strided weights
    copy.flags.writeable = False
    return copy


def _require_array(value: object, *, rank: int, field: str, allowed: str) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise DTypeError(
            rank=rank, field=field, given=describe(value), allowed=f"a NumPy array, {allowed}",
            fix=f"pass {field} as a NumPy array (the torch adapter converts tensors)",
        )
    if type(value) is not np.ndarray:
        # A masked array hides NaN and -1 ids from validation; np.matrix changes what * means.
        kind = f"{type(value).__module__}.{type(value).__qualname__}"
        raise DTypeError(
            rank=rank, field=field, given=f"a {kind} (an ndarray subclass)",
            allowed=f"a plain NumPy array, {allowed}",
            fix=f"pass np.asarray({field}) (fill masked values first; mask padding tokens "
            "with active_mask)",
        )
    return value


def _is_float(dtype: np.dtype[Any]) -> bool:
    return dtype.kind == "f" or dtype in (DTYPES["bfloat16"], DTYPES["float8_e4m3fn"])


#: The bits that are all set in exactly the non-finite values of a narrow float dtype (the
#: exponent: inf and NaN; e4m3fn has no inf and one NaN per sign), and the bits below the
#: sign: a value is non-finite exactly where its bits below the sign are at least the
#: exponent's. A test on the bits, not a float32 copy (0.77 of 2.0 s of a BF16 rank's
#: synthesis at K = 7168 was that copy).
_NONFINITE_BITS = {np.dtype(np.float16): (np.uint16, 0x7C00, 0x7FFF),
                   DTYPES["bfloat16"]: (np.uint16, 0x7F80, 0x7FFF),
                   DTYPES["float8_e4m3fn"]: (np.uint8, 0x7F, 0x7F)}
#: Large arrays are tested this many values at a time into buffers that stay in cache: one
#: read of the array, no temporaries of its size (1.42 of a BF16 DeepSeek-V3 call's 5.2 s of
#: synthesis went on those temporaries; ``benchmarks/PRODUCTION_SHAPES.md``).
_FINITE_PIECE = 1 << 16
#: Arrays of at least twice this many values are tested in slices of at least this many, one
#: per core.
_PARALLEL_VALUES = 1 << 21


def _first_nonfinite(a: np.ndarray) -> tuple[int, ...] | None:
    """The index of ``a``'s first non-finite value (C order), or ``None``."""
    if ((a.flags.c_contiguous or a.flags.f_contiguous) and a.size > _FINITE_PIECE
            and _all_finite(a.ravel(order="K"))):
        return None
    return _first_nonfinite_whole(a)


def _all_finite(flat: np.ndarray) -> bool:
    """Whether every value of the 1-D ``flat`` is finite: from :data:`_PARALLEL_VALUES`
    values up, in one slice per core (NumPy's loops release the GIL), each a piece at a
    time."""
    parts = min(os.cpu_count() or 1, flat.size // _PARALLEL_VALUES)
    if parts < 2:
        return _all_finite_pieces(flat)
    cuts = [flat.size * j // parts for j in range(parts + 1)]
    with ThreadPoolExecutor(parts) as pool:
        return all(pool.map(lambda j: _all_finite_pieces(flat[cuts[j]:cuts[j + 1]]),
                            range(parts)))


def _all_finite_pieces(flat: np.ndarray) -> bool:
    """Whether every value of the 1-D ``flat`` is finite, a piece at a time."""
    narrow = _NONFINITE_BITS.get(flat.dtype)
    if narrow is not None:
        view, bits, magnitude = narrow
        values, mask = flat.view(view), np.asarray(magnitude, view)
        buf = np.empty(_FINITE_PIECE, view)
        for start in range(0, values.size, _FINITE_PIECE):
            piece = buf[:min(_FINITE_PIECE, values.size - start)]
            np.bitwise_and(values[start:start + piece.size], mask, out=piece)
            if piece.max() >= bits:
                return False
        return True
    ok = np.empty(_FINITE_PIECE, bool)
    for start in range(0, flat.size, _FINITE_PIECE):
        piece = ok[:min(_FINITE_PIECE, flat.size - start)]
        np.isfinite(flat[start:start + piece.size], out=piece)
        if not piece.all():
            return False
    return True


def _first_nonfinite_whole(a: np.ndarray) -> tuple[int, ...] | None:
    if a.dtype in _NONFINITE_BITS:
        view, bits, _ = _NONFINITE_BITS[a.dtype]
        bad = (a.view(view) & view(bits)) == bits
    else:
        bad = ~np.isfinite(a)
    if not bad.any():
        return None
    return tuple(int(i) for i in np.argwhere(bad)[0])


def _require_finite(a: np.ndarray, *, rank: int, field: str) -> None:
    where = _first_nonfinite(a)
    if where is not None:
        raise NonFiniteError(
            rank=rank, field=f"{field}{list(where)}", given=repr(float(a[where])),
            allowed="finite values",
            fix=f"replace NaN/inf in {field}; mask a padding token with active_mask instead",
        )


@dataclass(frozen=True)
class _ListShape:
    form: str
    num_experts: int
    shape: tuple[int, ...]  # per-expert shape
    dtype: np.dtype[Any]


def _read_tensor_list(value: object, *, rank: int, field: str, per_expert: str) -> _ListShape:
    """Classify a TensorList by the kernel's rule (§3): one tensor is stacked, E > 1 per-expert."""
    if isinstance(value, np.ndarray) or not isinstance(value, (list, tuple)):
        raise TensorListError(
            rank=rank, field=field, given=describe(value),
            allowed=f"a list: [stacked (E, {per_expert})] or E x ({per_expert})",
            fix=f"wrap the tensor in a list: {field}=[{field}]",
        )
    if len(value) == 0:
        raise TensorListError(
            rank=rank, field=field, given="an empty list",
            allowed=f"[stacked (E, {per_expert})] or E x ({per_expert})",
            fix="pass at least one tensor",
        )
    for i, t in enumerate(value):
        _require_array(t, rank=rank, field=f"{field}[{i}]", allowed=f"of shape ({per_expert})")
    want_ndim = per_expert.count(",") + 1
    first = value[0]
    if len(value) == 1:
        if first.ndim == want_ndim and want_ndim >= 2:
            raise AmbiguousTensorList(
                rank=rank, field=field,
                given=f"a list of one {want_ndim}-D tensor of shape {first.shape}",
                allowed=f"[stacked (E, {per_expert})] when E = 1",
                fix=f"the kernel reads a one-entry list as stacked, so E would become "
                f"{first.shape[0]}; pass [{field}[0][None]] (shape {(1, *first.shape)})",
            )
        if first.ndim != want_ndim + 1:
            raise ShapeError(
                rank=rank, field=f"{field}[0]", given=describe(first),
                allowed=f"stacked (E, {per_expert})",
                fix=f"stack the experts along a new first axis: shape (E, {per_expert})",
            )
        return _ListShape("stacked", int(first.shape[0]), tuple(first.shape[1:]), first.dtype)
    for i, t in enumerate(value):
        if t.ndim != want_ndim or t.shape != first.shape or t.dtype != first.dtype:
            raise TensorListError(
                rank=rank, field=f"{field}[{i}]", given=describe(t),
                allowed=f"{describe(first)} like {field}[0] (every expert the same)",
                fix=f"give all {len(value)} per-expert tensors one shape ({per_expert}) and dtype",
            )
    return _ListShape("list", len(value), tuple(first.shape), first.dtype)


def _expect_list(
    got: _ListShape, *, rank: int, field: str, like: _ListShape, shape: tuple[int, ...], dtype: str
) -> None:
    if got.form != like.form or got.num_experts != like.num_experts:
        raise TensorListError(
            rank=rank, field=field, given=f"{got.form} form with E={got.num_experts}",
            allowed=f"{like.form} form with E={like.num_experts}, like weight1",
            fix=f"give {field} the same TensorList form and expert count as weight1",
        )
    if got.shape != shape:
        raise ShapeError(
            rank=rank, field=field, given=f"per-expert shape {got.shape}",
            allowed=f"per-expert shape {shape}", fix=f"reshape {field} to {shape} per expert",
        )
    if dtype_name(got.dtype) != dtype:
        raise DTypeError(
            rank=rank, field=field, given=f"dtype {got.dtype}", allowed=dtype,
            fix=f"cast {field} to {dtype}",
        )


@dataclass(frozen=True)
class _RankShape:
    tokens: int
    top_k: int
    hidden: int
    x_dtype: str
    weights: _ListShape
    intermediate: int
    masked: bool
    selection: Selection  # of the row the rank's arrays were validated against


def _check_rank(r: int, inputs: RankInputs, act_scheme: str | None) -> _RankShape:
    """One rank's arrays, validated against the row they and the call's ``act_scheme``
    select (the row they alone select where the scheme is not one of theirs:
    :class:`spec.OpConfig` then names the schemes they have)."""
    x = _require_array(inputs.x, rank=r, field="x", allowed="bfloat16 or float16 of shape (M, K)")
    if x.ndim != 2:
        raise ShapeError(
            rank=r, field="x", given=describe(x), allowed="2-D (M, K)",
            fix="pass the rank's tokens as a (tokens, hidden) matrix",
        )
    x_dtype = dtype_name(x.dtype)
    if x_dtype not in ("bfloat16", "float16"):
        raise DTypeError(
            rank=r, field="x", given=f"dtype {x.dtype}", allowed="bfloat16 or float16",
            fix="cast x with .astype(ml_dtypes.bfloat16) or .astype(np.float16)",
        )
    m, k = (int(s) for s in x.shape)
    idx = _require_array(
        inputs.expert_idx, rank=r, field="expert_idx", allowed="int32 of shape (M, top_k)"
    )
    if idx.ndim != 2 or idx.shape[0] != m or idx.shape[1] < 1:
        raise ShapeError(
            rank=r, field="expert_idx", given=describe(idx),
            allowed=f"(M, top_k) with M = {m} (x's rows) and top_k >= 1",
            fix="give every token of x one row of top_k global expert ids",
        )
    if idx.dtype != np.int32:
        raise DTypeError(
            rank=r, field="expert_idx", given=f"dtype {idx.dtype}", allowed="int32",
            fix="cast with expert_idx.astype(np.int32)",
        )
    probs = _require_array(inputs.probs, rank=r, field="probs", allowed="float32 (M, top_k)")
    if probs.shape != idx.shape:
        raise ShapeError(
            rank=r, field="probs", given=describe(probs),
            allowed=f"shape {idx.shape} like expert_idx",
            fix="give one routing weight per (token, slot)",
        )
    if probs.dtype != np.float32:
        raise DTypeError(
            rank=r, field="probs", given=f"dtype {probs.dtype}", allowed="float32",
            fix="cast with probs.astype(np.float32)",
        )
    w1 = _read_tensor_list(inputs.w1, rank=r, field="weight1", per_expert="K, N")
    w_dtype = dtype_name(w1.dtype)
    sel = selection_of(inputs, act_scheme=act_scheme)
    assert sel is not None  # weight1 and x are arrays
    variant = variant_for(sel, strict=False)
    if variant is None:
        raise DTypeError(
            rank=r, field="weight1", given=f"dtype {w1.dtype}",
            allowed=" or ".join(f"{v.lists['w1'].dtype_given(x_dtype)} ({v.name})"
                                for v in VARIANTS),
            fix="quantise the weights to int8 with float32 scales, or cast them to x's dtype",
        )
    if w1.shape[0] != k:
        raise ShapeError(
            rank=r, field="weight1", given=f"per-expert shape {w1.shape}",
            allowed=f"(K, N) with K = {k} (x's columns)",
            fix="weight1 is (hidden, 2*intermediate) per expert; transpose it if it is (N, K)",
        )
    n = w1.shape[1] * variant.lists["w1"].packing
    if n % 2:
        raise ShapeError(
            rank=r, field="weight1", given=f"N = {n} columns", allowed="an even N = 2I (gate, up)",
            fix="concatenate the gate and up projections: gate columns first, then up",
        )
    i_size = n // 2
    if variant.n_le_k and n > k:
        raise ShapeError(
            rank=r, field="weight1", given=f"N = {n} columns with K = {k}",
            allowed=f"N <= K for {variant.name} (GMM1's output rows overlap otherwise, PR #9927)",
            fix="use an intermediate size I <= K/2",
        )
    for f in FIELDS:
        value, want = getattr(inputs, f.name), variant.lists.get(f.name)
        if not f.tensor_list or f.name == "w1":
            continue
        if want is None:
            if value is not None:
                raise TensorListError(
                    rank=r, field=f.binding, given=describe(value),
                    allowed=f"None with {w_dtype} weights ({variant.name} reads no {f.binding})",
                    fix=f"drop {f.binding}, or use weights of a variant that reads it",
                )
            continue
        if (bad := want.indivisible(k=k, n=n, i=i_size)) is not None:
            raise ShapeError(
                rank=r, field=f.binding, given=f"{bad[0]} = {bad[1]}",
                allowed=f"{bad[0]} a multiple of {bad[2]} ({f.binding} packs {bad[2]} per word)",
                fix=f"pad {bad[0]} to a multiple of {bad[2]}",
            )
        shape, dtype = want.dims(k=k, n=n, i=i_size), want.dtype_given(x_dtype)
        if value is None:
            raise TensorListError(
                rank=r, field=f.binding, given="None",
                allowed=f"{dtype} {f.role} {shape} per expert",
                fix=f"the {variant.name} variant reads {f.binding}: pass {f.binding}",
            )
        got = _read_tensor_list(value, rank=r, field=f.binding, per_expert=", ".join(want.shape))
        _expect_list(got, rank=r, field=f.binding, like=w1, shape=shape, dtype=dtype)
    mask = inputs.active_mask
    if mask is not None:
        mask = _require_array(mask, rank=r, field="active_mask", allowed=f"bool of shape ({m},)")
        if mask.dtype != np.bool_ or mask.shape != (m,):
            raise MaskError(
                rank=r, field="active_mask", given=describe(mask), allowed=f"bool of shape ({m},)",
                fix="pass one bool per token (False = inactive), or None",
            )
        if not variant.masked:
            raise MaskError(
                rank=r, field="active_mask", given=f"a mask with {w_dtype} weights",
                allowed=f"None (the {variant.name} variant has no x_active_mask)",
                fix="drop active_mask, or use weights of a variant that reads it "
                f"({', '.join(v.name for v in VARIANTS if v.masked)})",
            )
    _require_finite(x, rank=r, field="x")
    _require_finite(probs, rank=r, field="probs")
    for f in FIELDS:
        tensors = getattr(inputs, f.name)
        if f.tensor_list and tensors is not None and _is_float(tensors[0].dtype):
            for t in tensors:
                _require_finite(t, rank=r, field=f.binding)
    if "bias1" in variant.lists:
        _check_compensation(r, inputs, w1.num_experts)
    return _RankShape(m, int(idx.shape[1]), k, x_dtype, w1, i_size, mask is not None,
                      variant.selection(x_dtype))


#: How far a W4A8 bias may lie from the compensation, relative to ``8·Σ_k |W[k, n]|·|s[n]|``:
#: a float32 sum of up to 2^16 terms in any order stays within 2^-8 [inferred: vLLM computes
#: the bias on one checkpoint path and loads it precomputed on another].
BIAS_TOLERANCE = 2.0**-8


def _check_compensation(r: int, inputs: RankInputs, experts: int) -> None:
    """``bias1``/``bias2`` must be ``8·Σ W·s`` of their weights (variants.md, W4A8)."""
    for e in range(experts):
        lists = inputs.expert_lists(e)
        for bias, weight, scale in (("bias1", "w1", "scale1"), ("bias2", "w2", "scale2")):
            w = unpack_int4(lists[weight])
            want = compensation_bias(w, lists[scale])
            room = BIAS_TOLERANCE * 8 * (np.abs(w).astype(np.float64).sum(axis=0)
                                         * np.abs(lists[scale].astype(np.float64)))
            wrong = np.abs(lists[bias].astype(np.float64) - want) > room
            if wrong.any():
                n = int(np.argmax(wrong))
                raise BiasError(
                    rank=r, field=f"{bias}[expert {e}][{n}]",
                    given=f"{float(lists[bias][n])!r}",
                    allowed=f"8·Σ W·s = {float(want[n])!r} (the compensation of the activation "
                    f"split q = 16·hi + lo + 8), within {BIAS_TOLERANCE:g} relative",
                    fix=f"compute {bias} as 8 * {weight}.sum(over the reduction axis) * {scale} "
                    "on the unpacked int4 weights (spec.int4.compensation_bias)",
                )


def _check_expert_ids(r: int, inputs: RankInputs, num_experts: int, ep: int, e: int) -> None:
    """Ids of active tokens must lie in ``[0, EP·E)`` (§4). Masked tokens' ids are not read:
    the kernel overwrites them with the sentinel before routing."""
    idx = inputs.expert_idx
    if idx.size == 0:
        return
    bad = ((idx < 0) | (idx >= num_experts)) & inputs.is_active()[:, None]
    if not bad.any():
        return
    t, k = (int(v) for v in np.argwhere(bad)[0])
    value = int(idx[t, k])
    if value == num_experts:
        why = f"{value} = EP·E, the kernel's internal sentinel for masked slots"
        fix = "mark the token inactive with active_mask instead of writing the sentinel"
    elif value < 0:
        why = f"{value} (negative ids, e.g. -1 padding, are not supported)"
        fix = "mark padding tokens inactive with active_mask and give them any valid id"
    else:
        why = f"{value} (a stale or foreign id: the call has only {num_experts} experts)"
        fix = "map ids to this call's experts; global expert g lives on rank g // E"
    raise ExpertIdError(
        rank=r, field=f"expert_idx[{t}, {k}]", given=why,
        allowed=f"0..{num_experts - 1} (EP={ep} x E={e})", fix=fix,
    )


class Problem:
    """One collective ``dispatch_ffn_combine`` call: every rank's inputs and the call's attributes.

    Validates everything on construction (raising a :class:`spec.SpecError` subclass whose message
    names the rank, the field, what was given, what is allowed and what to change) and exposes
    ``ranks`` (read-only views of the caller's arrays), ``max_output_size`` (``None``: no
    truncation; the kernel's defaults have been 65536, then 131072), ``swiglu_limit``,
    ``swiglu_alpha`` (SwigluOAI, open PR #11916: ``None`` is not passed, the kernel's default 0),
    ``act_scheme`` (the activation quantisation where the inputs cannot tell it:
    ``"mxfp8"`` with MXFP4 weights, :class:`spec.OpConfig`) and ``config``. The EP size is
    ``len(ranks)``, from 1 to 32.
    """

    def __init__(
        self,
        ranks: Sequence[RankInputs],
        *,
        max_output_size: int | None = None,
        swiglu_limit: float | None = None,
        swiglu_alpha: float | None = None,
        act_scheme: str | None = None,
    ) -> None:
        checked = self._validate(ranks, max_output_size, swiglu_limit, swiglu_alpha, act_scheme)
        # Copies, read-only: independent of the caller's arrays from here on.
        self._ranks = tuple(_freeze(inputs) for inputs in checked)

    @classmethod
    def adopt(
        cls,
        ranks: Sequence[RankInputs],
        *,
        max_output_size: int | None = None,
        swiglu_limit: float | None = None,
        swiglu_alpha: float | None = None,
        act_scheme: str | None = None,
    ) -> Problem:
        """``Problem(ranks, ...)``, validated alike, that keeps the arrays of ``ranks`` (made
        read-only) instead of copying them: only for arrays nothing else holds, such as
        :func:`spec.random_problem`'s own draws (a copy of the weights at production shapes
        costs a third of drawing them)."""
        self = cls.__new__(cls)
        checked = self._validate(ranks, max_output_size, swiglu_limit, swiglu_alpha, act_scheme)
        self._ranks = tuple(inputs.map_arrays(_sealed) for inputs in checked)
        return self

    def _validate(
        self,
        ranks: Sequence[RankInputs],
        max_output_size: int | None,
        swiglu_limit: float | None,
        swiglu_alpha: float | None,
        act_scheme: str | None,
    ) -> tuple[RankInputs, ...]:
        """Check every rank and the call's attributes (a :class:`spec.SpecError` naming what
        to change otherwise), set the configuration, and return the ranks as a tuple."""
        if isinstance(ranks, RankInputs) or not isinstance(ranks, Sequence):
            raise RankCountError(
                field="ranks", given=describe(ranks), allowed="a sequence of RankInputs",
                fix="pass one RankInputs per rank in a list",
            )
        ranks = tuple(ranks)
        if not 1 <= len(ranks) <= MAX_EP_SIZE:
            raise RankCountError(
                field="ranks", given=f"{len(ranks)} ranks", allowed=f"1..{MAX_EP_SIZE} ranks",
                fix=f"split the call into groups of at most {MAX_EP_SIZE} ranks (PR #5787)",
            )
        for r, inputs in enumerate(ranks):
            if not isinstance(inputs, RankInputs):
                raise SpecError(
                    rank=r, field="ranks", given=describe(inputs), allowed="spec.RankInputs",
                    fix="wrap each rank's arrays in spec.RankInputs(...)",
                )
        shapes = [_check_rank(r, inputs, act_scheme) for r, inputs in enumerate(ranks)]
        first = shapes[0]
        for r, s in enumerate(shapes[1:], start=1):
            for what, got, want in (
                ("x's hidden size K", s.hidden, first.hidden),
                ("x's dtype", s.x_dtype, first.x_dtype),
                ("top_k (expert_idx columns)", s.top_k, first.top_k),
                ("experts per rank E", s.weights.num_experts, first.weights.num_experts),
                ("intermediate size I", s.intermediate, first.intermediate),
                ("weight dtype", dtype_name(s.weights.dtype), dtype_name(first.weights.dtype)),
                ("TensorList form", s.weights.form, first.weights.form),
                ("scale1's per-expert dimensions", s.selection.scale_dims,
                 first.selection.scale_dims),
                (f"activation global scales ({', '.join(SELECTING_INPUTS)}) given",
                 s.selection.activation_scales, first.selection.activation_scales),
            ):
                if got != want:
                    raise SpecError(
                        rank=r, field=what, given=repr(got), allowed=f"{want!r} as on rank 0",
                        fix=f"every rank of one call must agree on {what}",
                    )
        ep, e = len(ranks), first.weights.num_experts
        for r, inputs in enumerate(ranks):
            _check_expert_ids(r, inputs, ep * e, ep, e)
        self._config = OpConfig(
            ep_size=ep,
            experts_per_rank=e,
            top_k=first.top_k,
            hidden=first.hidden,
            intermediate=first.intermediate,
            tokens_per_rank=tuple(s.tokens for s in shapes),
            weight_form=first.weights.form,
            max_output_size=max_output_size,
            swiglu_limit=swiglu_limit,
            swiglu_alpha=swiglu_alpha,
            masked=any(s.masked for s in shapes),
            **{**dataclasses.asdict(first.selection), "act_scheme": act_scheme},
        )
        return ranks

    @classmethod
    def from_validated(cls, ranks: Sequence[RankInputs], config: OpConfig) -> Problem:
        """A problem holding ``ranks`` as given (writable, no views), trusted to match
        ``config``: only for copies of an already validated problem, such as the one handed to
        an implementation under test."""
        self = cls.__new__(cls)
        self._ranks = tuple(ranks)
        self._config = config
        return self

    @property
    def ranks(self) -> tuple[RankInputs, ...]:
        return self._ranks

    @property
    def config(self) -> OpConfig:
        return self._config

    @property
    def max_output_size(self) -> int | None:
        return self._config.max_output_size

    @property
    def swiglu_limit(self) -> float | None:
        return self._config.swiglu_limit

    @property
    def swiglu_alpha(self) -> float | None:
        return self._config.swiglu_alpha

    @property
    def act_scheme(self) -> str | None:
        return self._config.act_scheme

    @property
    def ep_size(self) -> int:
        return self._config.ep_size

    def __repr__(self) -> str:
        return f"Problem({self._config.summary()})"


def _freeze(inputs: RankInputs) -> RankInputs:
    return inputs.map_arrays(_readonly)


def _sealed(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a
