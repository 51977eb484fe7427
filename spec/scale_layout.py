"""Scale layouts: how a kernel's scale buffer lays out the logical block scales in memory
(``docs/contract/formats.md``: FP8 block scale, "Scale layouts"; NVFP4 and MXFP4, "Scale
layout").

The values are the data model's (:class:`spec.RankInputs` holds them **logically**); the layout
is a declared property of the kernel's input, as DeepGEMM's ``column_major_scales`` and
``tma_aligned_scales`` flags and Blackwell's block-scale layout are. Layouts are defined on the
scales as the kernels index them, ``S[mn, kb]``: one row per output channel (or channel block)
``mn``, one column per reduction block ``kb``. This project holds weight scales
reduction-first, ``(…, KB, MN)`` (``scale1`` of FP8 block scale is ``(ceil(K/128),
ceil(N/128))``), so ``S`` is their transpose (:func:`physical_scales` does it).

- ``"row-major"``: ``S`` itself, ``kb`` contiguous (K-major).
- ``"column-major"``: ``mn`` contiguous (MN-major; DeepGEMM's per-token activation scales):
  the storage is ``(…, KB, MN)``.
- ``"tma-aligned"``: MN-major with ``mn`` padded to a multiple of :data:`TMA_ALIGN` (16 bytes
  of float32, DeepGEMM's ``get_tma_aligned_size``): storage ``(…, KB, round_up(MN, 4))``.
- ``"swizzle-128x4"``: Blackwell's block-scale layout (cuBLAS "1D block scaling factors
  layout"; torchao's ``to_blocked``, vLLM's ``swizzle_blockscale``): ``S`` padded to 128 rows
  and 4 columns, cut into 128 × 4 tiles stored one after another (row tiles outer), each tile of
  512 elements holding ``(r, c)`` at ``(r mod 32)·16 + (r div 32)·4 + c``. Storage ``(…,
  round_up(MN, 128), round_up(KB, 4))``, padding zero.
- ``"packed-ue8m0"``: DeepGEMM's SM100 scale layout (``get_mn_major_tma_aligned_packed_ue8m0_
  tensor``, ``docs/scale_layouts.md``): each scale, a power of two, kept as its UE8M0 byte (the
  float32 exponent field), four bytes per int32 word along ``kb``, block ``4w + j`` in byte ``j``
  (``j = 0`` the low byte); the words MN-major and TMA-aligned as ``"tma-aligned"``: storage
  ``(…, ceil(KB/4), round_up(MN, 4))`` int32, padding bytes zero. Its scales are one per output
  row (the kernel's recipe ``(1, 128)``): :func:`physical_scales` repeats a 128-row block scale
  on each of its rows, as DeepGEMM's ``transform_sf_into_required_layout`` does.

Every storage array is C-contiguous: its memory is what the kernel's pointer reads.

>>> s = np.arange(6, dtype=np.float32).reshape(3, 2)            # S[mn, kb]
>>> to_physical(s, "column-major").tolist()
[[0.0, 2.0, 4.0], [1.0, 3.0, 5.0]]
>>> buf = to_physical(s, "swizzle-128x4")
>>> buf.shape, buf.reshape(-1)[[0, 1, 16, 17, 32]].tolist()
((128, 4), [0.0, 1.0, 2.0, 3.0, 4.0])
>>> np.array_equal(to_logical(buf, "swizzle-128x4", 3, 2), s)
True
>>> words = to_physical(np.array([[1.0, 2.0, 0.5, 4.0, 8.0]], np.float32), "packed-ue8m0")
>>> words.shape, [hex(w) for w in words.view(np.uint32)[:, 0]]
((2, 4), ['0x817e807f', '0x82'])
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from spec.fields import selection_of, variant_for
from spec.fp8 import BLOCK, ue8m0_up
from spec.mxfp4 import e8m0_values
from spec.problem import Problem

__all__ = [
    "LAYOUTS",
    "MN_MAJOR",
    "PACK",
    "PER_ROW",
    "SCALE_FIELDS",
    "TILE_COLS",
    "TILE_ROWS",
    "TMA_ALIGN",
    "check_layout",
    "first_non_ue8m0",
    "kernel_rows",
    "not_ue8m0",
    "pack_ue8m0",
    "physical_scales",
    "storage_shape",
    "swizzle_128x4",
    "to_logical",
    "to_physical",
    "unpack_ue8m0",
    "unswizzle_128x4",
    "with_ue8m0_scales",
]

Array = np.ndarray[Any, Any]
#: The declared layouts (module docstring).
LAYOUTS = ("row-major", "column-major", "tma-aligned", "swizzle-128x4", "packed-ue8m0")
#: float32 elements per 16 bytes: DeepGEMM pads MN-major scales to it for TMA.
TMA_ALIGN = 4
#: The tile of Blackwell's block-scale layout: 128 rows (``mn``) by 4 columns (``kb``).
TILE_ROWS, TILE_COLS = 128, 4
#: Layouts whose storage is ``(…, KB or words, MN padded)``: DeepGEMM hands them to its kernels
#: as ``(…, MN, KB or words)`` views with strides ``(…, 1, MN padded)``.
MN_MAJOR = ("column-major", "tma-aligned", "packed-ue8m0")
#: UE8M0 bytes per int32 word of ``"packed-ue8m0"``.
PACK = 4
#: Layouts holding one scale per output row, not per 128-row block (:func:`physical_scales`).
PER_ROW = ("packed-ue8m0",)
#: The TensorList fields that hold block scales.
SCALE_FIELDS = ("scale1", "scale2")
_WEIGHT_OF = {"scale1": "w1", "scale2": "w2"}


def _round_up(size: int, multiple: int) -> int:
    return -(-size // multiple) * multiple


def check_layout(layout: str) -> str:
    """``layout`` if it is one of :data:`LAYOUTS`, else a ``ValueError`` naming them."""
    if layout not in LAYOUTS:
        raise ValueError(f"scale layout {layout!r} is not one of {', '.join(LAYOUTS)}; "
                         "declare the layout your kernel reads its scales in")
    return layout


def storage_shape(layout: str, mn: int, kb: int) -> tuple[int, int]:
    """The last two axes of the storage of an ``(mn, kb)`` scale matrix in ``layout``.

    >>> storage_shape("tma-aligned", 5, 3), storage_shape("swizzle-128x4", 130, 5)
    ((3, 8), (256, 8))
    >>> storage_shape("packed-ue8m0", 5, 9)
    (3, 8)
    """
    shapes = {"row-major": (mn, kb), "column-major": (kb, mn),
              "tma-aligned": (kb, _round_up(mn, TMA_ALIGN)),
              "swizzle-128x4": (_round_up(mn, TILE_ROWS), _round_up(kb, TILE_COLS)),
              "packed-ue8m0": (-(-kb // PACK), _round_up(mn, TMA_ALIGN))}
    return shapes[check_layout(layout)]


def swizzle_128x4(s: Array) -> Array:
    """``s`` (…, mn, kb) in 128 × 4 tiles (module docstring): padded with zeros, each tile's
    row ``r = 32·i + j`` stored at ``16·j + 4·i``; shape ``(…, round_up(mn, 128),
    round_up(kb, 4))``, C-contiguous. :func:`unswizzle_128x4` inverts it."""
    *batch, mn, kb = s.shape
    rows, cols = storage_shape("swizzle-128x4", mn, kb)
    padded = np.zeros((*batch, rows, cols), s.dtype)
    padded[..., :mn, :kb] = s
    n = len(batch)
    # (…, row tile, i, j, col tile, c) -> (…, row tile, col tile, j, i, c)
    tiles = padded.reshape(*batch, rows // TILE_ROWS, 4, 32, cols // TILE_COLS, TILE_COLS)
    order = (*range(n), n, n + 3, n + 2, n + 1, n + 4)
    return np.ascontiguousarray(tiles.transpose(order)).reshape(*batch, rows, cols)


def unswizzle_128x4(buf: Array, mn: int, kb: int) -> Array:
    """The ``(…, mn, kb)`` scales held in a 128 × 4 swizzled buffer (a copy)."""
    *batch, rows, cols = buf.shape
    n = len(batch)
    tiles = buf.reshape(*batch, rows // TILE_ROWS, cols // TILE_COLS, 32, 4, TILE_COLS)
    order = (*range(n), n, n + 3, n + 2, n + 1, n + 4)
    logical = tiles.transpose(order).reshape(*batch, rows, cols)
    return np.array(logical[..., :mn, :kb])


def pack_ue8m0(s: Array, *, field: str = "scales") -> Array:
    """The ``(…, mn, ceil(kb/4))`` int32 words of the UE8M0 bytes of ``s`` (…, mn, kb): block
    ``4w + j`` in byte ``j`` of word ``w`` (bits ``8j`` to ``8j + 7``), missing blocks zero
    bytes. The byte of a power of two is its float32 exponent field; DeepGEMM takes it by
    shifting the float32 bits (``>> 23``, ``>> 15``, ``>> 7``, ``<< 1``), so a scale with
    mantissa or sign bits would spill into its neighbours: ``s`` must hold normal positive
    powers of two (``2^-126`` to ``2^127``); anything else is a ``ValueError`` naming
    ``field``."""
    values = np.asarray(s)
    s32 = values.astype(np.float32, copy=False)
    exponent = s32.view(np.uint32) >> np.uint32(23)
    bad = not_ue8m0(values)
    if bad.any():
        at = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{field}: the packed-ue8m0 layout holds UE8M0 scales, positive powers of two from "
            f"2^-126 to 2^127; {values[at]!r} at (…, mn, kb) index {at} is not one. Round the "
            "scales up to powers of two (DeepGEMM's ceil_to_ue8m0: spec.fp8.ue8m0_up; for "
            "drawn problems, a kernel profile whose domain has ue8m0_scales, such as "
            "deepgemm-sm100-fp8, or strategy.map(spec.scale_layout.with_ue8m0_scales)), or "
            "declare a float32 layout")
    *batch, mn, kb = s32.shape
    padded = np.zeros((*batch, mn, -(-kb // PACK) * PACK), np.uint8)
    padded[..., :kb] = exponent
    # byte j of a word is its bits 8j to 8j + 7: the bytes read little-endian
    return np.asarray(padded.view("<i4").astype(np.int32, copy=False))


def not_ue8m0(s: Array) -> Array:
    """Where ``s`` holds no UE8M0 scale (a normal positive power of two, ``2^-126`` to
    ``2^127``, that float32 holds exactly): a bool array of ``s``'s shape."""
    values = np.asarray(s)
    s32 = values.astype(np.float32, copy=False)
    bits = s32.view(np.uint32)
    exponent = bits >> np.uint32(23)
    bad = (bits & np.uint32(0x807FFFFF) != 0) | (exponent == 0) | (exponent == 255)
    if values.dtype != np.float32:
        bad |= s32 != values
    return np.asarray(bad)


def first_non_ue8m0(problem: Problem) -> str | None:
    """The first float32 block or channel scale of ``problem`` that is not UE8M0
    (:func:`not_ue8m0`), named with its rank, field, tensor and index; ``None`` where every one
    is (the calls :func:`with_ue8m0_scales` makes)."""
    for r, inputs in enumerate(problem.ranks):
        for f in SCALE_FIELDS:
            for i, t in enumerate(getattr(inputs, f) or ()):
                bad = not_ue8m0(t) if t.dtype == np.float32 else np.zeros(0, bool)
                if bad.any():
                    at = tuple(int(j) for j in np.argwhere(bad)[0])
                    return f"rank {r}, {f}[{i}] at {at}: {t[at]!r} is not a power of two"
    return None


def unpack_ue8m0(words: Array, kb: int) -> Array:
    """The float32 scales ``(…, mn, kb)`` of packed words ``(…, mn, w)`` (:func:`pack_ue8m0`'s
    inverse): byte ``j`` of word ``w`` is block ``4w + j``, read as e8m0 (``2^(b - 127)``; 0 is
    ``2^-127``, 255 NaN: :func:`spec.mxfp4.e8m0_values`)."""
    w = np.asarray(words)
    if w.dtype.kind not in "iu" or w.dtype.itemsize != 4:
        raise ValueError(f"packed UE8M0 words are 32-bit integers (torch.int32), not {w.dtype}; "
                         "pass the int32 buffer the layout stores")
    le = np.ascontiguousarray(w, dtype="<i4")
    codes = le.view(np.uint8).reshape(*le.shape[:-1], le.shape[-1] * PACK)
    return e8m0_values(codes[..., :kb])


def to_physical(s: Array, layout: str, *, field: str = "scales") -> Array:
    """The C-contiguous storage of the scale matrices ``s`` (…, mn, kb) in ``layout`` (a new
    array; ``s`` is not modified). ``field`` names ``s`` in the error of a value the layout
    cannot hold (``"packed-ue8m0"``: powers of two only, :func:`pack_ue8m0`)."""
    s = np.asarray(s)
    *batch, mn, kb = s.shape
    check_layout(layout)
    if layout == "row-major":
        return np.array(s, order="C")
    if layout == "swizzle-128x4":
        return swizzle_128x4(s)
    if layout == "packed-ue8m0":
        s = pack_ue8m0(s, field=field)
    out = np.zeros((*batch, *storage_shape(layout, mn, kb)), s.dtype)
    out[..., :mn] = np.swapaxes(s, -1, -2)
    return out


def to_logical(buf: Array, layout: str, mn: int, kb: int) -> Array:
    """The scale matrices ``(…, mn, kb)`` held in ``layout``'s storage ``buf`` (a copy): the
    inverse of :func:`to_physical`. A buffer of another shape than ``layout`` stores for
    ``(mn, kb)``: ``ValueError``."""
    buf = np.asarray(buf)
    want = storage_shape(layout, mn, kb)
    if buf.ndim < 2 or tuple(buf.shape[-2:]) != want:
        raise ValueError(f"a {layout} buffer of ({mn}, {kb}) scales has last axes {want}, "
                         f"not {tuple(buf.shape[-2:])}; pass the buffer the layout stores")
    if layout == "row-major":
        return np.array(buf)
    if layout == "swizzle-128x4":
        return unswizzle_128x4(buf, mn, kb)
    if layout == "packed-ue8m0":
        return unpack_ue8m0(np.swapaxes(buf[..., :mn], -1, -2), kb)
    return np.array(np.swapaxes(buf[..., :mn], -1, -2))


def physical_scales(inputs: Any, layout: str) -> dict[str, list[Array]]:
    """The block scales of one rank's inputs (a :class:`spec.RankInputs`) as a kernel reading
    ``layout`` receives them: for ``scale1`` and ``scale2``, each tensor of the TensorList
    (stacked ``(E, KB, MN)`` or one ``(KB, MN)`` per expert) transposed to ``S[mn, kb]`` and
    stored in ``layout`` (:func:`to_physical`); for :data:`PER_ROW` layouts ``S`` first takes
    one row per output channel (:func:`kernel_rows`), each 128-row block's scale repeated.
    Only variants with block scales have a layout (their per-expert scales are 2-D):
    per-channel scales raise ``ValueError``; ``"packed-ue8m0"`` takes fp8_block only, its
    scales powers of two (:func:`with_ue8m0_scales`).

    >>> from spec import OpConfig, random_problem
    >>> cfg = OpConfig(ep_size=1, experts_per_rank=2, top_k=1, hidden=160, intermediate=64,
    ...                tokens_per_rank=(1,), weight_dtype="float8_e4m3fn")
    >>> rank = random_problem(cfg).ranks[0]
    >>> [b.shape for b in physical_scales(rank, "swizzle-128x4")["scale1"]]
    [(2, 128, 4)]
    """
    check_layout(layout)
    w1 = inputs.w1[0]
    sel = selection_of(inputs)
    variant = variant_for(sel) if sel is not None else None
    dims = variant.scale_dims if variant else 0
    if dims != 2:
        name = variant.name if variant else f"weights of dtype {w1.dtype}"
        raise ValueError(f"scale layout {layout!r}: {name} has no block scales (only variants "
                         "with 2-D per-expert scales, fp8_block and mxfp4_w4a16, have a "
                         "layout); leave the layout undeclared")
    if layout in PER_ROW and variant is not None and variant.name != "fp8_block":
        raise ValueError(f"scale layout {layout!r} packs float32 power-of-two block scales "
                         f"(fp8_block with UE8M0 scales); {variant.name}'s scales are e8m0 "
                         "bytes already: declare another layout for them")

    def kernel_scales(field: str, i: int, t: Array) -> Array:
        s = np.swapaxes(t, -1, -2)
        if layout in PER_ROW:  # each 128-row block's scale on each of its rows
            s = np.repeat(s, BLOCK, axis=-2)[..., :kernel_rows(inputs, field, i, layout), :]
        return to_physical(s, layout, field=f"{field}[{i}]")

    return {f: [kernel_scales(f, i, t) for i, t in enumerate(getattr(inputs, f))]
            for f in SCALE_FIELDS}


def kernel_rows(inputs: Any, field: str, i: int, layout: str) -> int:
    """``mn``, the rows of ``S`` a kernel reading ``layout`` indexes, for tensor ``i`` of the
    scale ``field`` of ``inputs``: its output channels (the rows of the weight ``field``
    scales: W1's ``N`` for ``scale1``, W2's ``K`` for ``scale2``) for :data:`PER_ROW` layouts,
    its channel blocks otherwise."""
    if layout in PER_ROW:
        return int(getattr(inputs, _WEIGHT_OF[field])[i].shape[-1])
    return int(getattr(inputs, field)[i].shape[-1])


def with_ue8m0_scales(problem: Problem) -> Problem:
    """``problem`` with its float32 scales rounded **up** to powers of two
    (:func:`spec.fp8.ue8m0_up`, DeepGEMM's ``ceil_to_ue8m0``), the weights as they were: the
    calls a ``"packed-ue8m0"`` kernel takes (what a domain with ``ue8m0_scales`` draws:
    :meth:`spec.limits.ShapeDomain.fit_problem`).

    >>> from spec import OpConfig, random_problem
    >>> p = random_problem(OpConfig(ep_size=1, experts_per_rank=1, top_k=1, hidden=64,
    ...                             intermediate=32, tokens_per_rank=(1,),
    ...                             weight_dtype="float8_e4m3fn"))
    >>> rank = with_ue8m0_scales(p).ranks[0]
    >>> [b.shape for b in physical_scales(rank, "packed-ue8m0")["scale1"]]
    [(1, 1, 64)]
    """
    def rounded(inputs: Any) -> Any:
        return replace(inputs, **{f: [ue8m0_up(t) if t.dtype == np.float32 else t
                                      for t in getattr(inputs, f)]
                                  for f in SCALE_FIELDS if getattr(inputs, f) is not None})

    return Problem([rounded(r) for r in problem.ranks], **problem.config.call_attributes())
