"""Placed calls of every weight format keep their variant at every door (issue 25 on issue
22's placed calls): the call's ``act_scheme`` and the inputs a :class:`spec.fields.Selector`
names travel with the placement record through the counterexample file and the isolated
child; where another row shares the call's weights, a placed-call mutant computing that row
(``placed_impls.wrong_variant``) or a judge of that row is caught, while the oracle's own
faithful model (``placed_impls.reference``) passes under the variant's kernel profile."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import placed_impls
import pytest
from hypothesis import Phase, find, settings
from hypothesis import strategies as st

from oracle.check.harness import evaluate
from oracle.check.isolation import ChildProcess
from oracle.check.placed_search import placed_families
from oracle.files.counterexample import load, save
from oracle.judge.placed import compare_placed
from oracle.model.kernels import PROFILES
from oracle.model.numerics import Numerics
from spec.errors import PlacementError
from spec.placed_strategies import PLACED_KINDS, placed_calls, placements
from spec.placement import PlacedCall, SharedExperts

ONE = settings(max_examples=5, derandomize=True, database=None, phases=[Phase.generate],
               deadline=None)
#: The rows whose weight arrays another row shares and which it can be mistaken for (the
#: sibling needs no input the call lacks: an NVFP4 W4A16 call has no activation scales).
SIBLINGS = {"mxfp4_w4a16": "mxfp4_mxfp8", "mxfp4_mxfp8": "mxfp4_w4a16", "nvfp4": "nvfp4_w4a16"}


def _call(kind: str) -> PlacedCall:
    """A small placed call of ``kind`` with tokens, a replica and a shared expert."""
    return find(placed_calls(variants=(kind,), placements=placements(max_ep=2), shared=st.just(1)),
                lambda c: sum(c.config.tokens_per_rank) > 0 and c.placement.redundant > 0,
                settings=ONE)


@pytest.fixture(scope="module")
def child() -> Iterator[ChildProcess]:
    """The oracle's own model of every format in one child, reused across formats."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(placed_impls.ROOT / "tests")  # placed_impls is importable from there
        with ChildProcess("placed_impls:reference") as process:
            yield process


def _numerics(call: PlacedCall) -> Numerics:
    """Faithful numerics under the first kernel profile with the call's variant."""
    name = call.config.kernel_variant.name
    return placed_impls.profile_numerics(next(n for n, p in PROFILES.items()
                                              if name in p.variants))


def _same(a: Any, b: Any) -> bool:
    """Per-rank output pairs equal bit for bit."""
    return all(np.array_equal(x, y) for pa, pb in zip(a, b, strict=True)
               for x, y in zip(pa, pb, strict=True))


@pytest.mark.parametrize("kind", list(PLACED_KINDS))
def test_placed_call_keeps_its_variant(kind, tmp_path, child) -> None:
    """The file and the child rebuild the call's row: the file's call equals it, and the
    child's faithful outputs are bit for bit those of the call's row (those of the row sharing
    its weights differ: a child that lost the selector would be seen)."""
    call = _call(kind)
    assert call.config.kernel_variant is PLACED_KINDS[kind]
    loaded = load(save(tmp_path / "placed.npz", call.problem, placed=call)).placed
    assert loaded is not None and loaded.config == call.config
    assert loaded.summary() == call.summary()
    verdict, outputs = evaluate(child, call, numerics=_numerics(call))
    mine = placed_impls.reference(call)
    assert verdict.ok and _same(outputs, mine), verdict.message
    sibling = placed_impls.sibling_call(call).config.variant
    assert (sibling, _same(placed_impls.wrong_variant(call), mine)) == (
        (SIBLINGS[kind], False) if kind in SIBLINGS else (call.config.variant, True))


#: Per row with a sibling: whether the judge of the call passes the mutant computing the
#: sibling's numerics, and whether the sibling's judge (a door that dropped the selector)
#: passes the correct outputs. Neither is True: the wrong row is caught one way or the other
#: (MXFP4 W4A16's outputs lie inside MXFP8's activation envelope, not the reverse).
WRONG_ROW = {"mxfp4_w4a16": (False, True), "mxfp4_mxfp8": (True, False),
             "nvfp4": (False, False)}


@pytest.mark.parametrize("kind", list(SIBLINGS))
def test_the_wrong_row_is_caught(kind) -> None:
    call = _call(kind)
    sibling = placed_impls.sibling_call(call)
    num = _numerics(call)
    assert compare_placed(call, placed_impls.reference(call), numerics=num).ok
    assert (compare_placed(call, placed_impls.wrong_variant(call), numerics=num).ok,
            compare_placed(sibling, placed_impls.reference(call),
                           numerics=_numerics(sibling)).ok) == WRONG_ROW[kind]


def test_a_door_that_drops_the_call_attributes_judges_the_wrong_row() -> None:
    """Why every door passes ``**placed_attributes(config)``: the record alone rebuilds an
    MXFP4 x MXFP8 call as MXFP4 W4A16."""
    call = _call("mxfp4_mxfp8")
    assert call.config.act_scheme == "mxfp8"
    assert PlacedCall.from_record(call.problem.ranks, *call.record()).config.variant == (
        "mxfp4_w4a16")
    again = PlacedCall.from_record(call.problem.ranks, *call.record(), **call.attributes)
    assert again.config == call.config


def test_shared_experts_must_be_the_routed_row() -> None:
    """NVFP4 W4A4 shared experts without their activation scales are NVFP4 W4A16 weights:
    refused by name, not computed as another row."""
    call = _call("nvfp4")
    assert call.shared is not None
    lists = {k: v for k, v in call.shared.lists.items() if not k.startswith("a")}
    with pytest.raises(PlacementError, match=r"shared \(variant\).*'nvfp4_w4a16'.*'nvfp4'"):
        PlacedCall(call.problem.ranks, shared=SharedExperts(lists=lists), **call.attributes)


def test_families_draw_the_formats_asked_for() -> None:
    got = find(placed_families("any", ("mxfp4_mxfp8", "bf16")),
               lambda c: c.config.variant == "mxfp4_mxfp8", settings=ONE)
    assert got.config.act_scheme == "mxfp8"
    for unusable in (("w9a9",), ("w4a8",)):  # W4A8: the ideal judge refuses it
        with pytest.raises(ValueError, match="placed calls take w8a8, bf16, fp16, fp8_block"):
            placed_families("any", unusable)
