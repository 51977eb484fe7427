"""Placed calls at every door (issue 22): the placement record and the version-2
counterexample file, the search (:func:`oracle.check.placed_search.check_placed`), ``dfc-oracle
check --placement``, ``replay`` and ``hunt``'s placed variant, and the gate's ``test_placed``.
Each door is shown passing the correct placement-aware implementation and failing a mutant
(``benchmarks/mutants/placement.py``, by name in ``placed_impls``)."""

from __future__ import annotations

import dataclasses
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import placed_impls
import pytest
from hypothesis import Phase, find, settings

from oracle.check import conformance
from oracle.check.harness import ConformanceError
from oracle.check.hunt import PLACED_VARIANTS
from oracle.check.placed_search import PLACED_FAMILIES, check_placed, placed_families
from oracle.cli import main
from oracle.files.counterexample import PLACED_VERSION, VERSION, load, save
from oracle.model.kernels import DEFAULT_KERNEL
from spec import CounterexampleFileError, OpConfig, Problem, random_problem
from spec.errors import PlacementError
from spec.placed_strategies import placed_calls
from spec.placement import PlacedCall, Placement, RoutingWeights, SharedExperts

TESTS = Path(__file__).parent
FEW = settings(max_examples=8, derandomize=True, database=None, deadline=None)
#: A failing search without shrinking: that it fails is the point here (the shrunk minima are
#: tests/test_placement_mutants.py's).
UNSHRUNK = settings(FEW, phases=[Phase.generate])
#: One drawn example, not shrunk: what a family generates, cheaply.
ONE = settings(max_examples=5, derandomize=True, database=None, phases=[Phase.generate])


@pytest.fixture
def in_tests_dir(monkeypatch):
    monkeypatch.chdir(TESTS)  # placed_impls is importable from here, as a user's module would be


def _rich_call() -> PlacedCall:
    """A call with a replica, a shared expert, rsf and a -1 id: every part of the record."""
    def problem(experts: int, tokens: int) -> Problem:
        return random_problem(OpConfig(ep_size=1, experts_per_rank=experts, top_k=2, hidden=32,
                                       intermediate=16, tokens_per_rank=(tokens,)), seed=3)

    rank = dataclasses.replace(problem(3, 2).ranks[0],
                               expert_idx=np.array([[0, -1], [1, 0]], np.int64))
    shared = SharedExperts(lists={name: [a[None]] for name, a in
                                  problem(2, 0).ranks[0].expert_lists(0).items()})
    return PlacedCall([rank], placement=Placement(phy2log=np.array([0, 1, 0]), num_logical=2,
                                                  ep_size=1),
                      weights=RoutingWeights(routed_scaling_factor=2.5), shared=shared)


def test_record_round_trips_and_names_what_is_wrong() -> None:
    call = _rich_call()
    fields, arrays = call.record()
    again = PlacedCall.from_record(call.problem.ranks, fields, arrays)
    assert again.summary() == call.summary()
    assert all(np.array_equal(a, b) for a, b in zip(again.logical, call.logical))
    with pytest.raises(PlacementError, match=r"placement record\.routed_scaling_factor"):
        PlacedCall.from_record(call.problem.ranks, {**fields, "routed_scaling_factor": "2.5"},
                               arrays)
    with pytest.raises(PlacementError, match="exactly the fields"):
        PlacedCall.from_record(call.problem.ranks, {**fields, "extra": 1}, arrays)
    with pytest.raises(PlacementError, match=r"shared\.w1\.9"):
        PlacedCall.from_record(call.problem.ranks, fields, {**arrays, "shared.w1.9": arrays[
            "shared.w1.0"]})


def test_counterexample_file_keeps_the_placement(tmp_path) -> None:
    call = _rich_call()
    path = save(tmp_path / "placed.npz", call.problem, placed=call)
    loaded = load(path)
    assert loaded.placed is not None and loaded.placed.summary() == call.summary()
    plain = load(save(tmp_path / "plain.npz", call.problem))  # no placement: still version 1
    assert plain.placed is None
    with zipfile.ZipFile(tmp_path / "plain.npz") as z:
        assert f'"version": {VERSION}'.encode() in z.read("manifest.npy")
    with zipfile.ZipFile(path) as z:
        assert f'"version": {PLACED_VERSION}'.encode() in z.read("manifest.npy")


def _edit_manifest(path: Path, edit) -> None:
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    manifest = json.loads(np.load(io.BytesIO(members["manifest.npy"])).tobytes())
    edit(manifest)
    out = io.BytesIO()
    np.save(out, np.frombuffer(json.dumps(manifest).encode(), np.uint8))
    members["manifest.npy"] = out.getvalue()
    with zipfile.ZipFile(path, "w") as z:
        for n, b in members.items():
            z.writestr(n, b)


@pytest.mark.parametrize(("edit", "said"), [
    (lambda m: m["placement"].update(dispatch="broadcast"), "dispatch"),
    (lambda m: m.pop("placement"), "version 2 without a placement record"),
    (lambda m: m["placement"].update(num_logical=True), "num_logical"),
])
def test_damaged_placement_record_is_refused(tmp_path, edit, said) -> None:
    call = _rich_call()
    path = save(tmp_path / "placed.npz", call.problem, placed=call)
    _edit_manifest(path, edit)
    with pytest.raises(CounterexampleFileError, match=said):
        load(path)


def test_search_passes_the_correct_and_saves_the_mutant(tmp_path) -> None:
    check_placed(placed_impls.correct, settings=FEW, save_dir=None)
    with pytest.raises(ConformanceError) as caught:
        check_placed(placed_impls.rsf_twice, settings=UNSHRUNK, save_dir=tmp_path,
                     impl_name="placed_impls:rsf_twice")
    report = caught.value.report
    assert "placed call: " in report and "rsf=" in report and "numerics ideal" in report
    saved = load(caught.value.path)
    assert saved.placed is not None and saved.placed.weights.routed_scaling_factor != 1
    assert f"dfc-oracle replay {caught.value.path} --impl placed_impls:rsf_twice" in report


def test_cli_check_placement_and_replay(in_tests_dir, tmp_path, capsys) -> None:
    # The Ascend kernel takes no placed calls: a usage error that says what to pass.
    assert main(["check", "placed_impls:correct", "--placement", "--in-process"]) == 2
    assert "--domain contract" in capsys.readouterr().err
    args = ["--placement", "--kernel", "vllm-triton", "--in-process", "--max-examples", "6",
            "--save-dir", str(tmp_path)]
    assert main(["check", "placed_impls:correct", *args]) == 0
    assert "no counterexample in 6 placed calls" in capsys.readouterr().out
    assert main(["check", "placed_impls:rsf_twice", *args]) == 1
    saved = next(tmp_path.glob("placed_impls.rsf_twice-out-*.npz"))
    capsys.readouterr()
    # Replayed in a child process, as a user runs it: the mutant still fails, the correct one
    # conforms on the same file.
    assert main(["replay", str(saved), "--impl", "placed_impls:rsf_twice"]) == 1
    assert "placed call" not in capsys.readouterr().err
    assert main(["replay", str(saved), "--impl", "placed_impls:correct", "--in-process"]) == 0
    assert "now conforms (EP=" in capsys.readouterr().out


def test_hunt_variant_clamp_invalid_id_differs_only_with_unrouted_slots(tmp_path) -> None:
    variant = PLACED_VARIANTS[0]
    with pytest.raises(ConformanceError) as caught:
        check_placed(variant.impl(), calls=variant.problems(), settings=UNSHRUNK, save_dir=None)
    assert "-1 slots=" in caught.value.report
    call = find(placed_calls(), lambda c: "-1 slots" not in c.summary() and sum(
        c.config.tokens_per_rank) > 0, settings=ONE)
    from oracle.judge.placed import compare_placed  # the variant equals the reference here

    assert compare_placed(call, variant.impl()(call)).ok


def _options(impl: object, kernel: str = "vllm-triton") -> dict[str, object]:
    return {"impl": impl, "impl_name": "placed_impls", "numerics": "faithful",
            "variants": ("w8a8", "bf16", "fp16"), "inputs": "sentinel", "ulps": 0.0,
            "kernel": kernel, "domain": "kernel", "timeout": 60.0, "family_examples": 4,
            "preset_examples": 3, "placement": True}


def test_gate_test_placed_both_ways() -> None:
    conformance.test_placed(_options(placed_impls.correct), "any")
    with pytest.raises(pytest.fail.Exception, match="placed call: "):
        conformance.test_placed(_options(placed_impls.rsf_twice), "any")
    with pytest.raises(pytest.skip.Exception, match="takes no placed calls"):
        conformance.test_placed(_options(placed_impls.correct, DEFAULT_KERNEL), "any")


def test_families_reach_what_they_name() -> None:
    assert set(PLACED_FAMILIES) == {"any", "shared", "many_ranks"}
    many = find(placed_families("many_ranks", ("w8a8",)), lambda c: True, settings=ONE)
    assert many.config.ep_size >= 9
    assert find(placed_families("shared", ("bf16",)), lambda c: True,
                settings=ONE).shared is not None
    with pytest.raises(ValueError, match="placed family 'hot'"):
        placed_families("hot", ("w8a8",))


pytest_plugins = ["pytester"]


@pytest.mark.slow
def test_the_gate_runs_placed_calls(pytester, monkeypatch) -> None:
    """The real gate: ``--dfc-placement`` adds test_placed[family]; off, and for the Ascend
    kernel, it is skipped (the default gate unchanged)."""
    monkeypatch.chdir(TESTS)
    common = ["-q", "-p", "no:cacheprovider", "-k", "test_placed", "--dfc-family-examples", "5"]
    ok = pytester.runpytest_subprocess("--dfc-impl", "placed_impls:correct", "--dfc-placement",
                                       "--dfc-kernel", "vllm-triton", *common)
    ok.assert_outcomes(passed=len(PLACED_FAMILIES))
    bad = pytester.runpytest_subprocess("--dfc-impl", "placed_impls:rsf_twice",
                                        "--dfc-placement", "--dfc-kernel", "vllm-triton", *common)
    assert bad.ret == 1 and "placed call: " in bad.stdout.str()
    off = pytester.runpytest_subprocess("--dfc-impl", "placed_impls:correct", *common)
    off.assert_outcomes(skipped=1)
