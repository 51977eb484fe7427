"""The count-row layout rules of §8: each property fails on the version with the flaw and passes
on the fixed one, with the minimal counterexample Hypothesis shrinks to."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spec.findings import layout_params, search
from spec.layout import (
    MAX_SYNC_RANKS,
    VERSIONS,
    count_row_stride,
    layout_violations,
    matrix_overflow,
    misaligned_rows,
    polled_words,
    sentinel_outside_row,
    sync_flag_overflow,
    unpolled_payload,
    write_pieces,
    written_words,
)

N = 300


@pytest.mark.parametrize(
    ("ep", "e", "strides"),
    [(2, 1, (10, 2, 128, 128)), (16, 16, (264, 256, 256, 384)), (17, 16, (280, 272, 384, 384))],
)
def test_count_row_stride_every_version(ep: int, e: int, strides: tuple[int, ...]) -> None:
    assert tuple(count_row_stride(ep, e, version=v) for v in VERSIONS) == strides


def test_pr5665_rows_misaligned_minimal_ep2_e1() -> None:
    found = search(layout_params(), lambda c: bool(misaligned_rows(*c, version="pr5665")),
                   max_examples=N)
    assert found == (2, 1)
    for fixed in ("pr6156", "pr8560"):
        def misaligned(c: tuple[int, int], v: str = fixed) -> bool:
            return bool(misaligned_rows(*c, version=v))

        assert search(layout_params(), misaligned, max_examples=N) is None


def test_pr6156_sentinel_slot_fails_at_ep_e_128() -> None:
    found = search(layout_params(), lambda c: bool(sentinel_outside_row(*c, version="pr6156")),
                   max_examples=N)
    assert found is not None and found[0] * found[1] == 128
    assert search(layout_params(), lambda c: bool(sentinel_outside_row(*c)),
                  max_examples=N) is None


def test_unpolled_payload_static_minimum_is_the_protocol_race() -> None:
    # The static race rule is weaker than row alignment: EP=2, E=1 is misaligned but safe.
    assert misaligned_rows(2, 1, version="pr5665") and not unpolled_payload(2, 1, version="pr5665")
    racy = next((ep, e) for ep, e in itertools.product(range(1, 33), range(1, 513))
                if unpolled_payload(ep, e, version="pr5665"))
    assert racy == (2, 33)
    assert search(layout_params(), lambda c: bool(unpolled_payload(*c)), max_examples=N) is None


def test_count_matrix_region_largest_e_at_ep32() -> None:
    assert search(layout_params(ep_size=32), lambda c: bool(matrix_overflow(*c)),
                  max_examples=N) == (32, 256)
    assert not matrix_overflow(32, 255) and matrix_overflow(32, 256)
    # PR #5665's unpadded rows fit one more expert: the sentinel slot costs E = 256 at EP=32.
    assert not matrix_overflow(32, 256, version="pr5665")
    found = search(layout_params(), lambda c: bool(matrix_overflow(*c)), max_examples=N)
    assert found is not None and matrix_overflow(*found)


def test_sync_flags_hold_128_ranks() -> None:
    assert not sync_flag_overflow(MAX_SYNC_RANKS) and sync_flag_overflow(MAX_SYNC_RANKS + 1)


def test_pieces_tile_each_row_inside_one_block() -> None:
    for ep, e, v in [(2, 63, "pr5665"), (4, 32, "pr6156"), (12, 1, "pr8560")]:
        sender, start, stop = write_pieces(ep, e, version=v)
        assert np.all(start // 128 == (stop - 1) // 128)
        for s in range(ep):
            mine = sender == s
            base = s * count_row_stride(ep, e, version=v)
            assert start[mine][0] == base and np.all(start[mine][1:] == stop[mine][:-1])
            assert stop[mine][-1] == base + written_words(ep, e, version=v)


def test_polled_words_are_block_heads_under_current_layout() -> None:
    for r in range(5):
        assert np.all(polled_words(5, 40, r) % 128 == 0)
    assert polled_words(2, 63, 1, version="pr5665").tolist() == [126]


def test_violations_are_structured_and_actionable() -> None:
    found = layout_violations(4, 32, version="pr6156")
    assert [v.rule for v in found] == ["unpolled-payload"] * 4 + ["sentinel-slot"]
    assert "PR #8560" in str(found[-1])
    assert layout_violations(32, 8) == []



@given(st.sampled_from((31, 128)), st.integers(-2, 2), st.sampled_from(list(VERSIONS)))
@settings(max_examples=30)
def test_count_offsets_stay_exact_past_int32(ep: int, step: int, version: str) -> None:
    """EP·E where the matrix spans about 2**31 bytes: the polled offsets are int64 and equal
    the exact Python-int formula, and the region rule reports the exact byte count."""
    e = 2**31 // (4 * ep * ep) + step
    stride = count_row_stride(ep, e, version=version)
    row = ep - 1
    polled = polled_words(ep, e, row, version=version)
    first = row * stride + (0 if VERSIONS[version].polls_blocks else ep * e)
    assert polled.dtype == np.int64 and int(polled[0]) == first
    used = 4 * (row * stride + written_words(ep, e, version=version))
    assert used > 2**30 and type(used) is int
    (overflow,) = matrix_overflow(ep, e, version=version)
    assert f"need {used} bytes" in overflow.message
