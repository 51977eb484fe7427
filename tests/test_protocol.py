"""The count-exchange model (issue 8): the current layout survives every interleaving over many
calls; each flawed variant fails with a minimal configuration and a short story."""

from __future__ import annotations

import pytest

from spec.errors import ConfigError
from spec.layout import unpolled_payload
from spec.protocol import CountExchange, first_failing_config, search_exchange


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
