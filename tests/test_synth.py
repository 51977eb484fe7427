"""``spec.synth.int8_uniform`` is ``rng.integers(-128, 128, dtype=np.int8)`` bit for bit and
leaves the generator where NumPy's own draw leaves it (issue 26: a faster draw of the same
weights); each clause is shown failing on a mutant that breaks it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from spec.synth import int8_uniform

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
