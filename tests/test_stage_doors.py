"""The stage split at the doors: ``dfc-oracle check --stage`` (with ``--layout`` and
``--placement``), ``dfc-oracle replay`` of the version-3 file it saves, and the pytest gate's
``--dfc-stage``. Each door passes a correct stage of ``benchmarks/mutants/modular.py`` and fails
a mutant of it."""

from __future__ import annotations

from pathlib import Path

import pytest

from oracle.cli import main

ROOT = Path(__file__).resolve().parent.parent
MUTANTS = "benchmarks.mutants.modular"
pytest_plugins = ["pytester"]


@pytest.fixture
def at_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """``benchmarks`` importable by name, as from the repository root."""
    monkeypatch.syspath_prepend(str(ROOT))


def test_check_stage_passes_a_correct_dispatch(at_root: None, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", f"{MUTANTS}:dispatch_shuffled", "--stage", "dispatch",
                 "--max-examples", "5", "--save-dir", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "no counterexample in 5 dispatch calls" in captured.out
    assert "the dispatch stage, layouts contiguous,batched, plain calls, numerics ideal" in (
        captured.err)
    assert not list(tmp_path.iterdir())


@pytest.mark.slow  # the search shrinks: 40 s under load; the cheap twin replays a saved file
def test_check_stage_fails_a_mutant_and_replay_reruns_its_file(
        at_root: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", f"{MUTANTS}:dispatch_counts_padding_row", "--stage", "dispatch",
                 "--layout", "batched", "--max-examples", "20",
                 "--save-dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "the dispatch stage fails on a batched call (counts)" in out
    (saved,) = tmp_path.iterdir()
    assert f"replay: dfc-oracle replay {saved}" in out
    assert main(["replay", str(saved), "--impl", f"{MUTANTS}:dispatch_shuffled"]) == 0
    assert "the implementation now conforms (dispatch batched" in capsys.readouterr().out
    assert main(["replay", str(saved), "--impl", f"{MUTANTS}:dispatch_counts_padding_row"]) == 1
    assert "the dispatch stage fails (counts)" in capsys.readouterr().out


@pytest.mark.slow  # the search shrinks: 40 s under load (tests/test_modular.py: a cheap twin)
def test_check_stage_on_placed_calls_kills_the_clamp_to_expert_0(
        at_root: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["check", "--stage", "dispatch", "--placement", "--max-examples", "30",
            "--save-dir", str(tmp_path)]
    assert main(["check", f"{MUTANTS}:dispatch_sorted", *argv[1:]]) == 0
    assert main(["check", f"{MUTANTS}:dispatch_clamps_unrouted", *argv[1:]]) == 1
    assert "nor slots routed nowhere (id -1)" in capsys.readouterr().out


def test_replay_reruns_a_saved_stage_file_both_ways(
        at_root: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from test_modular import unrouted_call

    from benchmarks.mutants.modular import dispatch_clamps_unrouted
    from oracle.check.harness import _save_counterexample
    from oracle.check.modular import evaluate_stage
    from oracle.model.numerics import Numerics

    call = unrouted_call("dispatch", "batched")
    verdict = evaluate_stage(dispatch_clamps_unrouted, call)
    saved = _save_counterexample(tmp_path, call.problem, verdict, None, Numerics("ideal"),
                                 f"{MUTANTS}:dispatch_clamps_unrouted", 0.0, "ignore",
                                 stage=call)
    assert main(["replay", str(saved), "--impl", f"{MUTANTS}:dispatch_sorted"]) == 0
    assert "now conforms (dispatch batched capacity=1" in capsys.readouterr().out
    assert main(["replay", str(saved), "--impl", f"{MUTANTS}:dispatch_clamps_unrouted"]) == 1
    assert "the dispatch stage fails (counts)" in capsys.readouterr().out


def test_pytest_gate_gates_one_stage(pytester: pytest.Pytester,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    args = ("--dfc-stage", "combine", "--dfc-family-examples", "5", "-p", "no:cacheprovider",
            "-q", "-k", "test_stage or default_search")
    good = pytester.runpytest_subprocess("--dfc-impl", f"{MUTANTS}:combine_by_ids", *args)
    # one test per layout; the fused call's default search is skipped by name
    good.assert_outcomes(passed=2, skipped=1)


@pytest.mark.slow  # the gate's search shrinks the failing call: 75 s under load
def test_pytest_gate_fails_a_stage_mutant(pytester: pytest.Pytester,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    args = ("--dfc-stage", "combine", "--dfc-family-examples", "5", "-p", "no:cacheprovider",
            "-q", "-k", "test_stage or default_search")
    bad = pytester.runpytest_subprocess("--dfc-impl", f"{MUTANTS}:combine_ignores_weights",
                                        "--dfc-layout", "contiguous", *args)
    bad.assert_outcomes(failed=1, skipped=1)
    bad.stdout.fnmatch_lines(["*the combine stage fails on a contiguous call (out)*"])
