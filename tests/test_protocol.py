"""The count-exchange model (issue 8): the current layout survives every interleaving over many
calls; each flawed variant fails with a minimal configuration and a short story."""

from __future__ import annotations

import numpy as np
import pytest

from spec.errors import ConfigError
from spec.layout import unpolled_payload
from spec.protocol import CountExchange, PeerSchedule, first_failing_config, search_exchange


def _show(label: str, story: list[str]) -> None:
    print(f"\n--- {label} ---\n" + "\n".join(story))


@pytest.mark.parametrize("tagging", ["nonzero", "generation"])
def test_current_layout_passes_many_calls(tagging: str) -> None:
    assert search_exchange(version="pr8560", tagging=tagging, max_examples=100, steps=30) is None


def test_pr5665_races() -> None:
    found = search_exchange(version="pr5665")
    assert found is not None
    _show("pr5665 (Hypothesis)", found.story)
    assert unpolled_payload(*found.config, version="pr5665")  # the static rule agrees
    assert len(found.story) <= 8 and "were not written by sender" in found.story[-1]
    minimal = first_failing_config(version="pr5665")
    assert minimal is not None and minimal.config == (2, 33)
    _show("pr5665 (minimal)", minimal.story)
    assert "word(s) 128..131" in str(minimal)


def test_pr6156_sentinel_spills_when_ep_e_is_a_multiple_of_128() -> None:
    found = search_exchange(version="pr6156")
    assert found is not None and found.config[0] * found.config[1] == 128
    _show("pr6156 (Hypothesis)", found.story)
    minimal = first_failing_config(version="pr6156")
    assert minimal is not None and minimal.config == (1, 128)
    spill = CountExchange(2, 64, version="pr6156")
    spill.start_call(seed=0)
    with pytest.raises(AssertionError, match="landed in row 1"):
        spill.deliver(1)  # sender 0's sentinel piece, word 128 = row 1's first word


def test_short_reset_fails_in_a_later_call_unless_tagged_per_call() -> None:
    found = search_exchange(version="pr8560", reset="unpadded")
    assert found is not None and "in call 1 (sender" in str(found)
    _show("short reset (Hypothesis)", found.story)
    minimal = first_failing_config(version="pr8560", reset="unpadded")
    assert minimal is not None and minimal.config == (1, 128)
    assert search_exchange(version="pr8560", reset="unpadded", tagging="generation") is None
    assert first_failing_config(version="pr8560", reset="unpadded", tagging="generation",
                                max_ep=2, max_experts=130) is None


def test_tag_byte_does_not_fix_alignment() -> None:
    minimal = first_failing_config(version="pr5665", tagging="generation")
    assert minimal is not None and minimal.config == (2, 33)


def test_unknown_variant_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="tagging"):
        CountExchange(2, 2, tagging="crc")


def test_peer_schedule_serves_g_major_then_peers() -> None:
    assert PeerSchedule(5, 2, n_aiv=2).served(0) == [(0, 0), (2, 0), (4, 0), (0, 1), (2, 1),
                                                     (4, 1)]
    assert PeerSchedule(3, 1, n_aiv=4).served(3) == []


def test_peer_push_to_core_starves_ranks_beyond_the_cores() -> None:
    counts = np.zeros((3, 3), dtype=np.int64)
    hang = PeerSchedule(3, 1, n_aiv=2).violation(counts)
    assert hang is not None and hang.config == (2, 3, 1) and "rank 2 never receives" in str(hang)
    assert PeerSchedule(3, 1, n_aiv=2, push="peer").violation(counts) is None
    assert PeerSchedule(48, 1, n_aiv=48).violation(np.zeros((48, 48), np.int64)) is None


def test_shared_prev_sum_is_right_only_for_a_cores_first_peer() -> None:
    counts = np.array([[0, 0], [1, 1]])  # variants.md: rank 1 sends one row to each expert
    shared = PeerSchedule(2, 1, n_aiv=1, push="peer")
    assert shared.read_offsets(counts, 1).tolist() == [[0], [0]]
    assert shared.peer_offsets(counts, 1).tolist() == [[0], [1]]
    bad = shared.violation(counts)
    assert bad is not None
    assert "peer 1's rows for expert 1 at slots 0..0 instead of 1..1" in str(bad)
    _show("peer offset", bad.story)
    right = PeerSchedule(2, 1, n_aiv=1, push="peer", offset="per-peer")
    assert right.violation(counts) is None
    assert PeerSchedule(2, 1, n_aiv=2, push="peer").violation(counts) is None  # one peer a core


def test_peer_schedule_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match="n_aiv"):
        PeerSchedule(2, 1, n_aiv=0)
    with pytest.raises(ConfigError, match="push"):
        PeerSchedule(2, 1, n_aiv=1, push="rank")
    with pytest.raises(ConfigError, match="counts"):
        PeerSchedule(2, 1, n_aiv=1).violation(np.zeros((2, 3), np.int64))
