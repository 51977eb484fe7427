"""The HCCL buffer check of §7, its message, its environment parsing and the window layout."""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spec import HcclBufferTooSmall, OpConfig
from spec.buffers import (
    INT32_MAX,
    MIB,
    check_hccl_buffer,
    hccl_buffsize_from_env,
    hccl_required_bytes,
    hccl_required_mb,
    int32_offset_overflows,
    layout_fits,
    mc2_v1_a2_required_mb,
    mc2_v1_a3_required_mb,
    mc2_v2_a3_required_mb,
    operator_message_formula_mb,
    region_needs,
    window_layout,
)
from spec.errors import ConfigError
from spec.findings import DATA_REGIONS, configs, search, whole_mb_boundary
from spec.limits import MAX_HIDDEN_A3

N = 300


def _cfg(m: int, top_k: int = 1, k: int = 32) -> OpConfig:
    return OpConfig(ep_size=1, experts_per_rank=1, top_k=top_k, hidden=k, intermediate=k // 2,
                    tokens_per_rank=(m,))


def test_required_size_example_of_the_notes() -> None:
    assert hccl_required_mb(_cfg(4096, top_k=8, k=7168)) == 682


@pytest.mark.parametrize(
    ("raw", "mb", "warns"),
    [(None, 200, False), ("512", 512, False), (" +64MB", 64, False), ("65535", 65535, False),
     ("65536", 200, True), ("-1", 200, True), ("", 200, True), ("abc", 200, True),
     ("9" * 30, 200, True), ("0", 0, False)],
)
def test_hccl_buffsize_from_env(raw: str | None, mb: int, warns: bool) -> None:
    got = hccl_buffsize_from_env({} if raw is None else {"HCCL_BUFFSIZE": raw})
    assert got.mb == mb and (got.warning is not None) == warns


@settings(max_examples=100)
@given(configs())
def test_check_message_states_the_setting_that_fixes_it(config: OpConfig) -> None:
    required = hccl_required_mb(config)
    with pytest.raises(HcclBufferTooSmall) as err:
        check_hccl_buffer(config, required - 1)
    fix = re.search(r"set HCCL_BUFFSIZE to at least (\d+)", str(err.value))
    assert fix is not None and int(fix.group(1)) == required
    check_hccl_buffer(config, int(fix.group(1)))  # the stated setting passes


def test_operator_message_formula_is_7mb_short() -> None:
    found = search(configs(), lambda c: operator_message_formula_mb(c) < hccl_required_mb(c),
                   max_examples=N)
    assert found is not None and found.max_tokens == 0 and found.hidden == 32
    assert hccl_required_mb(found) - operator_message_formula_mb(found) == 7


def _overflows(c: OpConfig, window: int) -> bool:
    return not layout_fits(c, window, regions=DATA_REGIONS)


def test_check_passes_but_layout_overflows_exact_window() -> None:
    found = search(configs(), lambda c: _overflows(c, hccl_required_bytes(c)), max_examples=N)
    assert found is not None
    slots = found.max_tokens * found.top_k
    assert slots >= 109227
    smaller = _cfg(found.max_tokens - 1, found.top_k, found.hidden)
    assert not _overflows(smaller, hccl_required_bytes(smaller))  # shrunk: M is minimal
    # The exact boundary, for every K: M·topK = 109226 fits, 109227 overflows region A.
    for k in range(32, MAX_HIDDEN_A3 + 1, 32):
        assert not _overflows(_cfg(109226, k=k), hccl_required_bytes(_cfg(109226, k=k)))
        assert _overflows(_cfg(109227, k=k), hccl_required_bytes(_cfg(109227, k=k)))


def test_whole_mb_boundary() -> None:
    slots, k = whole_mb_boundary()
    assert (slots, k) == (109266, 8864)
    c = _cfg(slots, k=k)
    check_hccl_buffer(c, hccl_required_mb(c))  # the check passes ...
    assert _overflows(c, hccl_required_mb(c) * MIB)  # ... and region A overflows
    assert whole_mb_boundary(max_hidden=1 << 20)[0] == 109227  # K = 2**20 leaves no slack


def test_window_regions_are_ordered_and_sound_at_realistic_sizes() -> None:
    c = OpConfig(ep_size=16, experts_per_rank=16, top_k=8, hidden=7168, intermediate=2048,
                 tokens_per_rank=(256,) * 16)
    regions = window_layout(c, hccl_required_mb(c) * MIB)
    assert all(a.start + a.capacity <= b.start for a, b in itertools.pairwise(regions))
    assert layout_fits(c, hccl_required_mb(c) * MIB)


def test_mc2_formulas_and_their_limits() -> None:
    assert mc2_v1_a3_required_mb(batch=512, hidden=7168, top_k=8, ep_size=32,
                                 experts_per_rank=8) == 3779
    assert mc2_v1_a2_required_mb(batch=256, hidden=7168, top_k=8, ep_size=16,
                                 experts_per_rank=16) == 900
    assert mc2_v2_a3_required_mb(batch=256, hidden=7168, top_k=8, ep_size=64,
                                 experts_per_rank=4) == 1912
    with pytest.raises(ConfigError, match="hidden"):
        mc2_v1_a3_required_mb(batch=8, hidden=4096, top_k=8, ep_size=32, experts_per_rank=8)
    with pytest.raises(ConfigError, match="ep_size"):
        mc2_v1_a2_required_mb(batch=8, hidden=4096, top_k=8, ep_size=8, experts_per_rank=8)



# --- Large offsets without arrays (edge_cases.md: byte offsets past 2^31, vllm PR #45907). ---

@st.composite
def _near_int32(draw: st.DrawFn) -> OpConfig:
    """A call whose region A, ``M·topK·(K + 32)`` bytes, lies within two rows of 2**31, with
    other ranks of fewer tokens (M is the largest)."""
    top_k = draw(st.sampled_from((1, 2, 8)))
    hidden = draw(st.sampled_from((32, 96, 2048, 4064, 7168)))
    m = 2**31 // (top_k * (hidden + 32)) + draw(st.integers(-2, 2))
    ep = draw(st.sampled_from((1, 2, 32)))
    return OpConfig(ep_size=ep, experts_per_rank=2, top_k=top_k, hidden=hidden, intermediate=16,
                    tokens_per_rank=(m,) + (m // 2,) * (ep - 1))


@given(_near_int32(), st.sampled_from((200, 2048, 4096, 65535)))
def test_window_sizes_stay_exact_past_int32(config: OpConfig, window_mb: int) -> None:
    """Every start, capacity and need is a Python int equal to the formula in exact arithmetic
    (no wrap, no float rounding), on both sides of 2**31."""
    m, k, h = config.max_tokens, config.top_k, config.hidden
    regions = window_layout(config, window_mb * MIB)
    for r in regions:
        assert all(type(v) is int for v in (r.start, r.capacity, r.need, r.over)), r
    needs = {r.name: r.need for r in regions}
    assert needs == region_needs(config)
    assert needs["A (dispatch send rows)"] == m * k * (h + 32)
    assert needs["D (combine rows)"] == m * k * h * 2
    assert type(hccl_required_bytes(config)) is int
    assert hccl_required_bytes(config) == m * k * h * 3 + 10 * MIB


@given(_near_int32())
def test_int32_offset_rule_flags_exactly_past_int32_max(config: OpConfig) -> None:
    extent = config.max_tokens * config.top_k * (config.hidden + 32)
    flagged = [v.message for v in int32_offset_overflows(config)]
    assert any("region A" in f for f in flagged) == (extent > INT32_MAX), (extent, flagged)
    assert all(v.rule == "int32-offset" for v in int32_offset_overflows(config))


@pytest.mark.parametrize(("m", "flagged"), [(2**25 - 1, False), (2**25, True)])
def test_int32_offset_boundary_is_2_to_the_31(m: int, flagged: bool) -> None:
    """K = 32, top_k = 1: region A spans 64·M bytes, 2**31 − 64 then exactly 2**31."""
    config = _cfg(m)
    assert region_needs(config)["A (dispatch send rows)"] == 64 * m
    assert bool(int32_offset_overflows(config)) == flagged


def test_int32_offset_message_names_the_region_and_the_fix() -> None:
    (a, d) = int32_offset_overflows(_cfg(2**25))
    assert str(a) == (
        "int32-offset: region A (dispatch send rows) spans 2147483648 bytes > 2147483647 "
        "(M·topK = 33554432·1, K = 32): int32 byte offsets into it wrap; compute offsets in "
        "int64 or split the call into fewer tokens per rank")
    assert "region D (combine rows)" in str(d)
