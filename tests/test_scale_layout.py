"""Scale layouts (``spec/scale_layout.py``; ``docs/contract/formats.md``): every layout
round-trips, the 128 × 4 swizzle puts each scale where cuBLAS' block-scale layout says, and a
kernel that reads a swizzled buffer as linear fails the same properties (the mutant, vllm PR
#54773's class: loader and kernel disagreeing on the swizzle).

DeepGEMM's packed UE8M0 layout (SM100) round-trips both ways, puts block ``4w + j`` in byte
``j`` of word ``w`` (checked against DeepGEMM's shifts on the float32 bits), holds only
powers of two, and two readers that disagree with it are found: one reading the MN-major words
as K-major (the layout SM120 also accepts) and one reading the bytes in reverse order.

The search through the torch adapter (the kernel receiving physical buffers, the judge
comparing with the logical scales) is in ``tests/test_torch_formats.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import find, given, settings
from hypothesis import strategies as st
from hypothesis.errors import NoSuchExample
from hypothesis.extra.numpy import arrays

from spec import OpConfig, Problem, random_problem
from spec.fp8 import BLOCK, ue8m0_up
from spec.mxfp4 import e8m0_values
from spec.scale_layout import (
    LAYOUTS,
    kernel_rows,
    physical_scales,
    storage_shape,
    swizzle_128x4,
    to_logical,
    to_physical,
    unpack_ue8m0,
    unswizzle_128x4,
    with_ue8m0_scales,
)

Array = np.ndarray[Any, Any]
PACKED = "packed-ue8m0"
FAST = settings(max_examples=40, deadline=None, derandomize=True, database=None)


@st.composite
def scale_matrices(draw: Any) -> Array:
    """``(…, mn, kb)`` float32 scales, no two equal (a misplaced one shows), up to one batch
    axis, mn across the 128-row tiles and kb across the 4-column ones."""
    batch = draw(st.lists(st.integers(1, 3), max_size=1))
    mn, kb = draw(st.integers(1, 260)), draw(st.integers(1, 9))
    return np.arange(1, 1 + int(np.prod(batch)) * mn * kb, dtype=np.float32).reshape(
        *batch, mn, kb)


def linear_read(buf: Array, mn: int, kb: int) -> Array:
    """The mutant: the kernel reads the swizzled buffer as if it were row-major, its first
    ``mn·kb`` elements as ``(mn, kb)``."""
    flat = buf.reshape(*buf.shape[:-2], -1)
    return np.array(flat[..., : mn * kb].reshape(*buf.shape[:-2], mn, kb))


def round_trips(s: Array, unswizzle: Callable[[Array, int, int], Array]) -> bool:
    mn, kb = s.shape[-2:]
    return bool(np.array_equal(unswizzle(swizzle_128x4(s), mn, kb), s))


@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name != PACKED])
@FAST
@given(s=scale_matrices())
def test_every_layout_round_trips(layout: str, s: Array) -> None:
    before = s.copy()
    buf = to_physical(s, layout)
    mn, kb = s.shape[-2:]
    assert buf.flags.c_contiguous and buf.shape[-2:] == storage_shape(layout, mn, kb)
    assert np.array_equal(to_logical(buf, layout, mn, kb), s)
    assert np.array_equal(s, before)  # the caller's array untouched
    # every scale stored once, the rest padding (zero)
    assert np.array_equal(np.sort(buf[buf != 0]), np.sort(s.reshape(-1)))


@FAST
@given(s=scale_matrices())
def test_swizzle_puts_each_scale_where_cublas_says(s: Array) -> None:
    """Element ``(r, c)`` of tile ``(r div 128, c div 4)`` at offset
    ``(r mod 32)·16 + ((r mod 128) div 32)·4 + c mod 4`` of its 512-element tile, the tiles
    row-major (cuBLAS "1D block scaling factors layout"; torchao ``to_blocked``)."""
    *batch, mn, kb = s.shape
    flat = swizzle_128x4(s).reshape(*batch, -1)
    r, c = np.meshgrid(np.arange(mn), np.arange(kb), indexing="ij")
    col_tiles = -(-kb // 4)
    offset = ((r // 128) * col_tiles + c // 4) * 512 + (r % 32) * 16 + (r % 128) // 32 * 4 + c % 4
    assert np.array_equal(flat[..., offset], s)


def test_a_swizzled_buffer_read_as_linear_fails_the_round_trip() -> None:
    """Both outcomes on the same search: the real unswizzle passes every draw; the linear read
    is found, at a minimum of two rows (one row of at most four scales sits at the start of its
    tile either way, so a single-row weight hides the bug)."""
    with pytest.raises(NoSuchExample):
        find(scale_matrices(), lambda s: not round_trips(s, unswizzle_128x4), settings=FAST)
    found = find(scale_matrices(), lambda s: not round_trips(s, linear_read), settings=FAST)
    assert found.shape[-2] >= 2
    assert all(round_trips(m, linear_read) for m in (np.ones((1, 4), np.float32),
                                                      np.arange(1, 5, dtype=np.float32)[None]))


def test_to_logical_names_a_buffer_of_the_wrong_shape() -> None:
    with pytest.raises(ValueError, match=r"swizzle-128x4 buffer of \(3, 2\) scales has last "
                                         r"axes \(128, 4\), not \(3, 2\)"):
        to_logical(np.zeros((3, 2), np.float32), "swizzle-128x4", 3, 2)
    with pytest.raises(ValueError, match="'blocked' is not one of row-major"):
        to_physical(np.zeros((3, 2)), "blocked")


def test_physical_scales_of_a_rank() -> None:
    """FP8 block scales ``(E, KB, NB)`` reach the kernel as ``S[nb, kb]`` in the layout;
    per-channel scales (W8A8) have none, and the error says so."""
    cfg = OpConfig(ep_size=1, experts_per_rank=2, top_k=1, hidden=160, intermediate=96,
                   tokens_per_rank=(1,), weight_dtype="float8_e4m3fn")
    rank = random_problem(cfg).ranks[0]
    got = physical_scales(rank, "column-major")
    assert np.array_equal(got["scale1"][0], rank.scale1[0])  # MN-major is the held orientation
    row = physical_scales(rank, "row-major")["scale2"][0]
    assert np.array_equal(row, np.swapaxes(rank.scale2[0], -1, -2))
    w8a8 = random_problem(OpConfig(ep_size=1, experts_per_rank=2, top_k=1, hidden=32,
                                   intermediate=16, tokens_per_rank=(1,))).ranks[0]
    with pytest.raises(ValueError, match="w8a8 has no block scales"):
        physical_scales(w8a8, "row-major")


def test_docstring_examples_run() -> None:
    import doctest

    import spec.scale_layout

    assert doctest.testmod(spec.scale_layout).failed == 0


# ---------------------------------------------------------------------------------------------
# DeepGEMM's packed UE8M0 layout

@st.composite
def e8m0_matrices(draw: Any) -> Array:
    """``(…, mn, kb)`` powers of two (UE8M0 bytes 1 to 254), up to one batch axis, kb across
    one to four words, several not a multiple of 4."""
    batch = draw(st.lists(st.integers(1, 2), max_size=1))
    shape = (*batch, draw(st.integers(1, 12)), draw(st.integers(1, 13)))
    return e8m0_values(draw(arrays(np.uint8, shape, elements=st.integers(1, 254))))


def deepgemm_words(s: Array) -> Array:
    """The packed storage built as DeepGEMM's ``transpose_and_pack_fp32_into_ue8m0`` does,
    without :mod:`spec.scale_layout`: per word, the float32 bits ``v0..v3`` of blocks ``4w ..
    4w + 3`` (0 past the end) as ``(v0 >> 23) | (v1 >> 15) | (v2 >> 7) | (v3 << 1)``, stored
    MN-major with mn zero-padded to 4."""
    *batch, mn, kb = s.shape
    words = -(-kb // 4)
    v = np.zeros((*batch, mn, 4 * words), np.uint32)
    v[..., :kb] = s.view(np.uint32)
    v = v.reshape(*batch, mn, words, 4)
    packed = (v[..., 0] >> 23) | (v[..., 1] >> 15) | (v[..., 2] >> 7) | (v[..., 3] << 1)
    out = np.zeros((*batch, words, -(-mn // 4) * 4), np.uint32)
    out[..., :mn] = np.swapaxes(packed, -1, -2)
    return out.view(np.int32)


def packed_linear(buf: Array, mn: int, kb: int) -> Array:
    """Mutant: the MN-major words read as K-major, the first ``mn·words`` as ``(mn, words)``."""
    return unpack_ue8m0(linear_read(buf, mn, -(-kb // 4)), kb)


def packed_reversed(buf: Array, mn: int, kb: int) -> Array:
    """Mutant: block ``4w + j`` read from byte ``3 − j`` (the byte order reversed)."""
    return to_logical(buf.byteswap(), PACKED, mn, kb)


def packed_round_trips(s: Array, read: Callable[[Array, int, int], Array]) -> bool:
    mn, kb = s.shape[-2:]
    return bool(np.array_equal(read(to_physical(s, PACKED), mn, kb), s))


@FAST
@given(s=e8m0_matrices())
def test_packed_ue8m0_round_trips_and_matches_deepgemm_words(s: Array) -> None:
    """Logical -> physical -> logical is the identity; the storage is the words DeepGEMM's
    shifts make, padding bytes and padding rows zero (what DeepGEMM's ``torch.zeros`` padding
    holds), int32 and C-contiguous."""
    before = s.copy()
    mn, kb = s.shape[-2:]
    buf = to_physical(s, PACKED)
    assert buf.dtype == np.int32 and buf.flags.c_contiguous
    assert buf.shape[-2:] == storage_shape(PACKED, mn, kb)
    assert np.array_equal(buf, deepgemm_words(s))
    assert np.array_equal(to_logical(buf, PACKED, mn, kb), s)
    assert np.array_equal(s, before)


@FAST
@given(s=e8m0_matrices())
def test_packed_ue8m0_physical_round_trips(s: Array) -> None:
    """Physical -> logical -> physical is the identity on every buffer whose data bytes are
    UE8M0 codes 1 to 254 and whose padding is zero (the buffers :func:`to_physical` makes:
    codes 0 and 255, 2^-127 and NaN, are not powers of two it packs)."""
    mn, kb = s.shape[-2:]
    buf = deepgemm_words(s)
    assert np.array_equal(to_physical(to_logical(buf, PACKED, mn, kb), PACKED), buf)


def test_packed_ue8m0_byte_order() -> None:
    """Block 0 in the low byte: 1.0 (127), 2.0 (128), 0.5 (126), 4.0 (129) make 0x817e807f, as
    DeepGEMM's ``(v0 >> 23) | (v1 >> 15) | (v2 >> 7) | (v3 << 1)``; a fifth block starts the
    next word, whose three missing blocks are zero bytes."""
    s = np.array([[1.0, 2.0, 0.5, 4.0, 8.0]], np.float32)
    words = to_physical(s, PACKED).view(np.uint32)
    assert words[:, 0].tolist() == [0x817E807F, 0x82]
    assert words[:, 1:].tolist() == [[0, 0, 0], [0, 0, 0]]


@pytest.mark.parametrize("value", [3.0, 0.0, -1.0, 2.0**-127, np.inf, np.nan, 1.5 * 2.0**-100])
def test_packed_ue8m0_rejects_what_is_not_a_power_of_two(value: float) -> None:
    """DeepGEMM's shifts would spill a mantissa or sign bit into the next block's byte: such a
    value is refused, naming the field and where it is; 2^-127 (subnormal) and 0 too, whose
    exponent byte 0 the kernel reads as 2^-127."""
    s = np.ones((2, 3), np.float32)
    s[1, 2] = value
    with pytest.raises(ValueError, match=r"scale2\[1\]: the packed-ue8m0 layout holds UE8M0 "
                                         r"scales.*at \(…, mn, kb\) index \(1, 2\)"):
        to_physical(s, PACKED, field="scale2[1]")
    with pytest.raises(ValueError, match="32-bit integers"):
        to_logical(np.zeros((1, 4), np.float32), PACKED, 1, 1)


def test_a_packed_buffer_read_wrong_fails_the_round_trip() -> None:
    """Both outcomes on the same search: DeepGEMM's reader passes every draw, both mutants are
    found. Reading the words K-major needs two words per row to differ (five K blocks or
    more): with one word per row MN-major and K-major storage coincide. Reversing the byte
    order is found at any size: a lone block sits in the low byte and the reversed read takes
    the high one, padding."""
    def correct(buf: Array, mn: int, kb: int) -> Array:
        return to_logical(buf, PACKED, mn, kb)

    with pytest.raises(NoSuchExample):
        find(e8m0_matrices(), lambda s: not packed_round_trips(s, correct), settings=FAST)
    linear = find(e8m0_matrices(), lambda s: not packed_round_trips(s, packed_linear),
                  settings=FAST)
    assert linear.shape[-1] >= 5
    assert all(packed_round_trips(m, packed_linear)
               for m in (np.ones((3, 4), np.float32), e8m0_values(np.arange(1, 9, dtype=np.uint8)
                                                                  .reshape(2, 4))))
    assert find(e8m0_matrices(), lambda s: not packed_round_trips(s, packed_reversed),
                settings=FAST) is not None
    assert not packed_round_trips(np.ones((1, 1), np.float32), packed_reversed)


def test_packed_scales_of_a_rank_are_one_per_output_row() -> None:
    """FP8 block scales rounded up to powers of two reach a packed-ue8m0 kernel one per row of
    the weight (W1's N, W2's K), each 128-row block's scale repeated, as DeepGEMM's
    ``transform_sf_into_required_layout`` broadcasts them; float32 scales that are not powers
    of two, and MXFP4's e8m0 bytes, are refused with the field named."""
    cfg = OpConfig(ep_size=1, experts_per_rank=2, top_k=1, hidden=640, intermediate=96,
                   tokens_per_rank=(1,), weight_dtype="float8_e4m3fn")
    rank = random_problem(cfg).ranks[0]
    with pytest.raises(ValueError, match=r"scale1\[0\]: the packed-ue8m0 layout"):
        physical_scales(rank, PACKED)
    pow2 = with_ue8m0_scales(Problem([rank])).ranks[0]
    assert all(np.array_equal(a, ue8m0_up(b)) for a, b in zip(pow2.scale1, rank.scale1))
    assert np.array_equal(pow2.w1[0], rank.w1[0])
    got = physical_scales(pow2, PACKED)
    for field, weight in (("scale1", pow2.w1[0]), ("scale2", pow2.w2[0])):
        rows, kb = weight.shape[-1], weight.shape[-2] // BLOCK + (weight.shape[-2] % BLOCK > 0)
        assert kernel_rows(pow2, field, 0, PACKED) == rows
        want = np.repeat(np.swapaxes(getattr(pow2, field)[0], -1, -2), BLOCK, axis=-2)[:, :rows]
        assert np.array_equal(to_logical(got[field][0], PACKED, rows, kb), want), field
    assert got["scale1"][0].shape == (2, 2, 192)  # K = 640: 5 blocks in 2 words; N = 192 rows
    mx = random_problem(OpConfig(ep_size=1, experts_per_rank=2, top_k=1, hidden=64,
                                 intermediate=32, tokens_per_rank=(1,),
                                 weight_dtype="uint8")).ranks[0]
    with pytest.raises(ValueError, match="e8m0 bytes already"):
        physical_scales(mx, PACKED)
