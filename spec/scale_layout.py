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

Every storage array is C-contiguous: its memory is what the kernel's pointer reads.

>>> s = np.arange(6, dtype=np.float32).reshape(3, 2)            # S[mn, kb]
>>> to_physical(s, "column-major").tolist()
[[0.0, 2.0, 4.0], [1.0, 3.0, 5.0]]
>>> buf = to_physical(s, "swizzle-128x4")
>>> buf.shape, buf.reshape(-1)[[0, 1, 16, 17, 32]].tolist()
((128, 4), [0.0, 1.0, 2.0, 3.0, 4.0])
>>> np.array_equal(to_logical(buf, "swizzle-128x4", 3, 2), s)
True
"""

from __future__ import annotations

from typing import Any

import numpy as np

from spec.fields import scale_dims_of, variant_for

__all__ = [
    "LAYOUTS",
    "SCALE_FIELDS",
    "TILE_COLS",
    "TILE_ROWS",
    "TMA_ALIGN",
    "check_layout",
    "physical_scales",
    "storage_shape",
    "swizzle_128x4",
    "to_logical",
    "to_physical",
    "unswizzle_128x4",
]

Array = np.ndarray[Any, Any]
#: The declared layouts (module docstring).
LAYOUTS = ("row-major", "column-major", "tma-aligned", "swizzle-128x4")
#: float32 elements per 16 bytes: DeepGEMM pads MN-major scales to it for TMA.
TMA_ALIGN = 4
#: The tile of Blackwell's block-scale layout: 128 rows (``mn``) by 4 columns (``kb``).
TILE_ROWS, TILE_COLS = 128, 4
#: The TensorList fields that hold block scales.
SCALE_FIELDS = ("scale1", "scale2")


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
    """
    shapes = {"row-major": (mn, kb), "column-major": (kb, mn),
              "tma-aligned": (kb, _round_up(mn, TMA_ALIGN)),
              "swizzle-128x4": (_round_up(mn, TILE_ROWS), _round_up(kb, TILE_COLS))}
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


def to_physical(s: Array, layout: str) -> Array:
    """The C-contiguous storage of the scale matrices ``s`` (…, mn, kb) in ``layout`` (a new
    array; ``s`` is not modified)."""
    s = np.asarray(s)
    *batch, mn, kb = s.shape
    check_layout(layout)
    if layout == "row-major":
        return np.array(s, order="C")
    if layout == "swizzle-128x4":
        return swizzle_128x4(s)
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
    return np.array(np.swapaxes(buf[..., :mn], -1, -2))


def physical_scales(inputs: Any, layout: str) -> dict[str, list[Array]]:
    """The block scales of one rank's inputs (a :class:`spec.RankInputs`) as a kernel reading
    ``layout`` receives them: for ``scale1`` and ``scale2``, each tensor of the TensorList
    (stacked ``(E, KB, MN)`` or one ``(KB, MN)`` per expert) transposed to ``S[mn, kb]`` and
    stored in ``layout`` (:func:`to_physical`). Only variants with block scales have a layout
    (their per-expert scales are 2-D): per-channel scales raise ``ValueError``.

    >>> from spec import OpConfig, random_problem
    >>> cfg = OpConfig(ep_size=1, experts_per_rank=2, top_k=1, hidden=160, intermediate=64,
    ...                tokens_per_rank=(1,), weight_dtype="float8_e4m3fn")
    >>> rank = random_problem(cfg).ranks[0]
    >>> [b.shape for b in physical_scales(rank, "swizzle-128x4")["scale1"]]
    [(2, 128, 4)]
    """
    check_layout(layout)
    w1 = inputs.w1[0]
    variant = variant_for(str(w1.dtype), str(inputs.x.dtype),
                          scale_dims_of(inputs.w1, inputs.scale1), inputs.a1_gscale is not None)
    dims = variant.scale_dims if variant else 0
    if dims != 2:
        name = variant.name if variant else f"weights of dtype {w1.dtype}"
        raise ValueError(f"scale layout {layout!r}: {name} has no block scales (only variants "
                         "with 2-D per-expert scales, fp8_block and mxfp4_w4a16, have a "
                         "layout); leave the layout undeclared")
    return {f: [to_physical(np.swapaxes(t, -1, -2), layout) for t in getattr(inputs, f)]
            for f in SCALE_FIELDS}
