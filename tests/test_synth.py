"""``spec.synth.int8_uniform`` is ``rng.integers(-128, 128, dtype=np.int8)`` bit for bit and
leaves the generator where NumPy's own draw leaves it (issue 26: a faster draw of the same
weights); each clause is shown failing on a mutant that breaks it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from spec.fp8 import quantise_channels
from spec.problem import DTYPES
from spec.synth import _fill_from_table, int8_uniform, normal_weights

Draw = Callable[[np.random.Generator, tuple[int, ...]], Any]
SHAPES = [(0,), (1,), (3,), (4,), (5,), (8,), (9,), (2, 3, 5), (1000, 7), (4097,)]


def _no_buffered_half(rng: np.random.Generator, shape: tuple[int, ...]) -> Any:
    """Mutant: the values, but the last word's high half is not kept for the next draw."""
    size = int(np.prod(shape))
    words = rng.bit_generator.random_raw(-(-size // 8))
    return (words.view(np.uint8)[:size] ^ np.uint8(0x80)).view(np.int8).reshape(shape)


def _unsigned(rng: np.random.Generator, shape: tuple[int, ...]) -> Any:
    """Mutant: the raw bytes without the -128 offset."""
    out: Any = int8_uniform(rng, shape)
    return out ^ np.int8(-128)


def _repeated_slices(rng: np.random.Generator, shape: tuple[int, ...]) -> Any:
    """Mutant: a draw split in two slices, the second not advanced past the first."""
    size = int(np.prod(shape))
    count = -(-size // 8)
    first = rng.bit_generator.random_raw(-(-count // 2))
    rng.bit_generator.random_raw(count - first.size)
    words = np.concatenate([first, first])[:count]
    return (words.view(np.uint8)[:size] ^ np.uint8(0x80)).view(np.int8).reshape(shape)


def _mismatch(draw: Draw) -> list[str]:
    """Where ``draw`` differs from ``rng.integers``: values, the state after, or the draws
    after (with and without a 32-bit half buffered beforehand)."""
    found = []
    for before in (0, 1, 2):
        for shape in SHAPES:
            a, b = np.random.default_rng(7), np.random.default_rng(7)
            a.integers(0, 10, before)
            b.integers(0, 10, before)
            want = a.integers(-128, 128, size=shape, dtype=np.int8)
            got = draw(b, shape)
            if not (got.dtype == np.int8 and np.array_equal(got, want)):
                found.append(f"values {shape} after {before}")
            if a.bit_generator.state != b.bit_generator.state:
                found.append(f"state {shape} after {before}")
            if not np.array_equal(a.integers(0, 2**31, 5), b.integers(0, 2**31, 5)):
                found.append(f"next draw {shape} after {before}")
    return found


@pytest.mark.parametrize("threaded", [False, True])
@pytest.mark.parametrize("pieces", [False, True])
def test_int8_uniform_is_numpys_draw(threaded: bool, pieces: bool,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Serial, and split over threads (every draw of two words or more, here); each slice
    drawn whole, or two words at a time."""
    if threaded:
        monkeypatch.setattr("spec.synth.PARALLEL_WORDS", 1)
        monkeypatch.setattr("os.cpu_count", lambda: 3)
    if pieces:
        monkeypatch.setattr("spec.synth.PIECE_WORDS", 2)
    assert _mismatch(int8_uniform) == []


@pytest.mark.parametrize("mutant", [_no_buffered_half, _unsigned, _repeated_slices])
def test_mutants_are_caught(mutant: Draw) -> None:
    assert _mismatch(mutant)


def test_other_generators_take_numpys_draw() -> None:
    a, b = np.random.Generator(np.random.MT19937(3)), np.random.Generator(np.random.MT19937(3))
    assert np.array_equal(int8_uniform(a, (5, 3)), b.integers(-128, 128, (5, 3), dtype=np.int8))


def _follows_caller() -> bool:
    """Whether changing the caller's ``x`` after ``random_problem`` changes the problem."""
    from spec import OpConfig, random_problem

    cfg = OpConfig(ep_size=1, experts_per_rank=2, top_k=1, hidden=16, intermediate=8,
                   tokens_per_rank=(2,))
    x = random_problem(cfg, seed=1).ranks[0].x.copy()
    problem = random_problem(cfg, seed=0, x=[x])
    kept = problem.ranks[0].x.copy()
    assert not any(a.flags.writeable for a in (problem.ranks[0].x, problem.ranks[0].w1[0]))
    if not x.flags.writeable:  # adopted: the caller's own array was sealed
        return True
    x[...] = 1
    return not np.array_equal(problem.ranks[0].x, kept)


def test_random_problem_holds_no_caller_array(monkeypatch: pytest.MonkeyPatch) -> None:
    """The problem keeps its own draws without a copy (``Problem.adopt``) but copies what the
    caller passed; the mutant that adopts the caller's array too is caught."""
    assert not _follows_caller()
    monkeypatch.setattr("spec.synth._own", lambda a: a)
    assert _follows_caller()


def test_adopt_validates_like_the_constructor() -> None:
    from spec import Problem, RankInputs, SpecError

    rank = RankInputs(x=np.zeros((1, 16), np.float16), expert_idx=np.array([[5]], np.int32),
                      probs=np.ones((1, 1), np.float32),
                      w1=[np.zeros((2, 16, 16), np.int8)], w2=[np.zeros((2, 8, 16), np.int8)],
                      scale1=[np.ones((2, 16), np.float32)], scale2=[np.ones((2, 16), np.float32)])
    messages = []
    for build in (Problem, Problem.adopt):
        with pytest.raises(SpecError) as caught:
            build([rank])
        messages.append(str(caught.value))
    assert messages[0] == messages[1] and "expert_idx" in messages[0]


# Float weights: draws from a table of 2^16 values indexed by the raw words' 16-bit
# quarters (issue 26: about 3 ns a value against 27 for standard_normal). What the judge and
# the power benchmarks rely on, each shown failing on a mutant generator:
# the spread (std[j] per slice: activations O(1), scale1/scale2 sized for it), the normal
# shape, the full mantissa (roundings as normal weights give), independent slices (experts),
# and the same values however many threads draw them.

FloatDraw = Callable[[np.random.Generator, tuple[int, ...], Any, Any], Any]
STD = np.array([0.03, 0.06, 0.045])


SHAPE = (3, 256, 128)


def _faults(draw: FloatDraw, dtype: Any, table: bool, monkeypatch: pytest.MonkeyPatch,
            shape: tuple[int, ...] = SHAPE) -> list[str]:
    """The properties a draw of three slices of 2^15 values breaks, by name: from the table,
    or drawn directly (``DIRECT_DRAWS`` moved to take either path)."""
    monkeypatch.setattr("spec.synth.DIRECT_DRAWS", 1 if table else 1 << 62)
    w = np.asarray(draw(np.random.default_rng(5), shape, STD, dtype))
    found = []
    if w.dtype != np.dtype(dtype) or w.shape != shape:
        return ["dtype or shape"]
    z = w.astype(np.float64).reshape(3, -1) / STD[:, None]
    if np.abs(z.std(axis=1) - 1).max() > 0.02 or np.abs(z.mean(axis=1)).max() > 0.03:
        found.append("spread")
    inside, tail = (np.abs(z) < 1).mean(), (np.abs(z) > 2).mean()
    if abs(inside - 0.6827) > 0.01 or abs(tail - 0.0455) > 0.005 or np.abs(z).max() < 3.5:
        found.append("shape")
    bits = w.view(np.uint16 if w.itemsize == 2 else np.uint32)
    mantissa = bits & (0x7F if w.itemsize == 2 else 0xFF)  # bf16's 7 bits, float32's low 8
    one_binade = (np.abs(z) >= 1) & (np.abs(z) < 2) if w.itemsize == 2 else np.abs(z) > 0.1
    if np.unique(mantissa.reshape(3, -1)[one_binade]).size < (128 if w.itemsize == 2 else 250):
        found.append("mantissa")
    if abs(np.corrcoef(z[0], z[1])[0, 1]) > 0.05 or np.array_equal(z[0] > 0, z[2] > 0):
        found.append("independence")
    return found


def _uniform(rng: np.random.Generator, shape: tuple[int, ...], std: Any, dtype: Any) -> Any:
    """Mutant: uniform values of the same spread."""
    u = rng.uniform(-np.sqrt(3), np.sqrt(3), shape) * np.asarray(std)[:, None, None]
    return u.astype(np.float32).astype(dtype)


def _wide(rng: np.random.Generator, shape: tuple[int, ...], std: Any, dtype: Any) -> Any:
    """Mutant: a spread 10 % too wide."""
    return normal_weights(rng, shape, np.asarray(std) * 1.1, dtype)


def _coarse(rng: np.random.Generator, shape: tuple[int, ...], std: Any, dtype: Any) -> Any:
    """Mutant: the low mantissa bits constant (a table of few distinct values)."""
    w = normal_weights(rng, shape, std, dtype)
    bits = w.view(np.uint16 if w.itemsize == 2 else np.uint32)
    return (bits & ~type(bits[0, 0, 0])(0x3F if w.itemsize == 2 else 0xFFFF)).view(w.dtype)


def _shared(rng: np.random.Generator, shape: tuple[int, ...], std: Any, dtype: Any) -> Any:
    """Mutant: every slice the first one's draw, scaled."""
    first = normal_weights(rng, (1, *shape[1:]), np.ones(1), np.float32)
    return (first * np.asarray(std)[:, None, None]).astype(dtype)


@pytest.mark.parametrize("table", [True, False])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_normal_weights_keep_spread_shape_mantissa_and_independence(
        dtype: str, table: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _faults(normal_weights, np.dtype(DTYPES.get(dtype, dtype)), table, monkeypatch) == []


def test_normal_weights_are_the_same_on_any_number_of_threads(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("spec.synth.DIRECT_DRAWS", 1)
    one = normal_weights(np.random.default_rng(2), (2, 1024, 512), np.ones(2), np.float32)
    monkeypatch.setattr("spec.synth.PARALLEL_WORDS", 1)
    monkeypatch.setattr("os.cpu_count", lambda: 3)
    assert np.array_equal(
        normal_weights(np.random.default_rng(2), (2, 1024, 512), np.ones(2), np.float32), one)


@pytest.mark.parametrize(("mutant", "fault"), [(_uniform, "shape"), (_wide, "spread"),
                                               (_coarse, "mantissa"), (_shared, "independence")])
@pytest.mark.parametrize("table", [True, False])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_weight_mutants_are_caught(mutant: FloatDraw, fault: str, dtype: str, table: bool,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    assert fault in _faults(mutant, np.dtype(DTYPES.get(dtype, dtype)), table, monkeypatch)


def test_the_table_draw_is_the_raw_words_quarters(monkeypatch: pytest.MonkeyPatch) -> None:
    """``table[u]`` for the next raw words' 16-bit quarters, the generator left past them:
    the same on one thread or three, whole pieces or two words at a time (the piece loop is
    int8_uniform's, whose mutants above show these comparisons failing)."""
    table = np.arange(1 << 16, dtype=np.uint16)[::-1].copy()
    draws = []
    for threads, piece in ((1, 1 << 13), (3, 2)):
        monkeypatch.setattr("spec.synth.PARALLEL_WORDS", 1 if threads > 1 else 1 << 22)
        monkeypatch.setattr("spec.synth.TABLE_PIECE_WORDS", piece)
        monkeypatch.setattr("os.cpu_count", lambda threads=threads: threads)
        a, b = np.random.default_rng(9), np.random.default_rng(9)
        a.random(dtype=np.float32)  # a 32-bit half left buffered: kept, as random_raw keeps it
        b.random(dtype=np.float32)
        got = np.empty(35, np.uint16)
        _fill_from_table(a, table, got)
        words = b.bit_generator.random_raw(9)
        assert np.array_equal(got, table[words.view(np.uint16)[:35]])
        assert a.bit_generator.state == b.bit_generator.state
        draws.append(got)
    assert np.array_equal(*draws)
    with pytest.raises(ValueError, match="65536 entries"):
        _fill_from_table(np.random.default_rng(0), table[:5], np.empty(3, np.uint16))


STRIPPED = ["fp8_block", "mxfp4_w4a16", "int4_w4a16", "nvfp4_w4a16"]


def _strip_mismatches(variant: str) -> list[str]:
    """Where the scaled format's weights, quantised by strips of rows, differ from the same
    weights quantised whole (spec.synth._quantised with strips=False): 2 experts of 300 x 200
    (a partial strip and partial blocks), values over eight decades and a zero block."""
    import spec.synth as synth

    rng = np.random.default_rng(4)
    w = (rng.standard_normal((2, 300, 200)) * 10.0 ** rng.integers(-4, 4, (2, 300, 200)))
    w = w.astype(np.float32)
    w[-1, :130, 0] = 0
    quantise = {"fp8_block": lambda v, _: synth.quantise_blocks(v),
                "mxfp4_w4a16": lambda v, _: synth.quantise_mx(v),
                "int4_w4a16": synth.quantise_groups}.get(variant)
    dtype = DTYPES["bfloat16"]
    if quantise is None:  # NVFP4: the global scale of each expert's whole tensor
        got, want = synth._nv_by_strips(w, dtype), synth.quantise_nv(w)
    else:
        got = synth._by_strips(lambda strip, _: quantise(strip, dtype), w)
        want = quantise(w, dtype)
    return [f"output {n}" for n, (a, b) in enumerate(zip(got, want, strict=True))
            if a.shape != b.shape or a.tobytes() != b.tobytes()]


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("variant", STRIPPED)
def test_quantising_by_strips_is_quantising_whole(variant: str, parallel: bool,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Bit for bit, on one thread and (``parallel``: the threshold lowered) on one per core;
    strips of 24 rows, which NVFP4's 16-row, MXFP4's 32-row and the others' 128-row blocks
    cross, differ."""
    if parallel:
        monkeypatch.setattr("spec.synth.DIRECT_DRAWS", 1)
        monkeypatch.setattr("spec.synth.os.cpu_count", lambda: 3)
    assert _strip_mismatches(variant) == []
    monkeypatch.setattr("spec.synth.STRIP_ROWS", 24)
    assert _strip_mismatches(variant)


@pytest.mark.parametrize("parallel", [False, True])
def test_fp8_channel_by_strips_is_quantising_whole(parallel: bool,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """FP8 per channel: each column's scale from the whole reduction, whatever the strips
    (their column maxima combined): bit for bit :func:`spec.fp8.quantise_channels`, on one
    thread and on one per core. Scales taken per strip (each strip quantised alone) differ."""
    import spec.synth as synth

    if parallel:
        monkeypatch.setattr("spec.synth.DIRECT_DRAWS", 1)
        monkeypatch.setattr("spec.synth.os.cpu_count", lambda: 3)
    rng = np.random.default_rng(4)
    w = (rng.standard_normal((2, 300, 200)) * 10.0 ** rng.integers(-4, 4, (2, 300, 200)))
    w = w.astype(np.float32)
    want = quantise_channels(w)
    got = synth._channel_by_strips(w, None)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(got, want, strict=True))
    per_strip = synth._by_strips(lambda strip, _: quantise_channels(strip)[:1], w)
    assert per_strip[0].tobytes() != want[0].tobytes()


def test_tile_tags_differ_between_touching_tiles() -> None:
    """Each 128 x 128 tile's tag is 1/2, 1 or 2, and differs from the tag of the tile beside
    it and of the tile below it; partial tiles at the edges too."""
    from spec.synth import TILE, tile_tag

    tags = tile_tag(3 * TILE + 5, 4 * TILE + 7)
    assert set(np.unique(tags).tolist()) == {0.5, 1.0, 2.0}
    corners = tags[::TILE, ::TILE]
    assert (corners[1:] != corners[:-1]).all() and (corners[:, 1:] != corners[:, :-1]).all()
    assert (tags[:TILE, :TILE] == tags[0, 0]).all()  # constant on a tile


@pytest.mark.parametrize("variant", ["fp8_block", "mxfp4_w4a16"])
def test_tile_tags_scale_each_blocks_scale_and_keep_its_values(variant: str) -> None:
    """Tags are powers of two: on the same draws, each block's scale is multiplied by its
    tile's tag, exactly, and the quantised values are the same bits. So a kernel reading a
    neighbouring block's scale is off by 2x or 4x, and nothing else changes."""
    from spec import OpConfig, random_problem
    from spec.synth import tile_tag

    cfg = OpConfig(ep_size=1, experts_per_rank=2, top_k=1, hidden=320, intermediate=192,
                   tokens_per_rank=(2,),
                   weight_dtype="float8_e4m3fn" if variant == "fp8_block" else "uint8")
    assert cfg.kernel_variant.name == variant
    plain, tagged = (random_problem(cfg, seed=4, tiles=t).ranks[0] for t in (False, True))
    for g, (rows, cols) in (("1", (cfg.hidden, cfg.n)), ("2", (cfg.intermediate, cfg.hidden))):
        w, s = f"w{g}", f"scale{g}"
        assert np.array_equal(getattr(plain, w)[0].view(np.uint8),
                              getattr(tagged, w)[0].view(np.uint8))
        s0, s1 = getattr(plain, s)[0], getattr(tagged, s)[0]
        if variant == "fp8_block":  # float32 scales per 128 x 128 block
            moved = s1.astype(np.float64) / s0
            tag = tile_tag(rows, cols)[::128, ::128]
        else:  # e8m0 codes per 32 rows and one column: a power of two is a code's step
            moved = 2.0 ** (s1.astype(np.int64) - s0.astype(np.int64))
            tag = tile_tag(rows, cols)[::32, :]
        assert np.array_equal(moved, np.broadcast_to(tag, moved.shape)), (variant, g)


def test_tile_tags_are_refused_where_no_block_scale_is_drawn() -> None:
    from spec import OpConfig, random_problem

    cfg = OpConfig(ep_size=1, experts_per_rank=1, top_k=1, hidden=16, intermediate=8,
                   tokens_per_rank=(1,))
    with pytest.raises(ValueError, match="w8a8 weights have no block scales"):
        random_problem(cfg, tiles=True)
