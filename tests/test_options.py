"""Options outside what is allowed are usage errors before the search, in one sentence: never a
gate that passes everything, marks everything hung, or ends in a traceback after a full search."""

from __future__ import annotations

import os
import time
from pathlib import Path

import broken_impls
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from oracle.check.harness import check_implementation
from oracle.check.loading import ImplLoadError
from oracle.cli import main
from oracle.config.options import OptionError, check_options
from spec import OpConfig, random_problem
from spec.strategies import problems, routings, token_rows

TESTS = Path(__file__).parent
PROBLEM = random_problem(OpConfig(ep_size=1, experts_per_rank=1, top_k=1, hidden=16,
                                  intermediate=8, tokens_per_rank=(1,)), seed=0)


def never_called(problem):
    raise AssertionError("the search started despite an invalid option")


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("ulps", -1.0, "must be a finite number from 0 to"),
        ("ulps", float("nan"), "must be a finite number from 0 to"),
        ("ulps", "1", "must be a number"),
        ("timeout", 0, "must be a finite number of seconds > 0 and"),
        ("timeout", -1.0, "must be a finite number of seconds > 0 and"),
        ("timeout", float("nan"), "must be a finite number of seconds > 0 and"),
        ("timeout", float("inf"), "must be a finite number of seconds > 0 and"),
        ("inputs", "lenient", "must be one of sentinel, strict, report, ignore"),
        ("numerics", "exact", "must be one of faithful, ideal"),
        ("variants", ("w8a8", "w4a16"), "must be one or more of w8a8, bf16, fp16, w4a8"),
        ("variants", "w8a8", "must be one or more of w8a8, bf16, fp16, w4a8"),  # a str, not names
        ("variants", (), "must be one or more of w8a8, bf16, fp16, w4a8"),
    ],
)
def test_invalid_options_are_rejected_before_the_search(option, value, message) -> None:
    with pytest.raises(OptionError, match=message) as info:
        check_implementation(never_called, save_dir=None, **{option: value})
    assert info.value.option == option


def test_w4a8_is_refused_in_ideal_mode_and_accepted_in_faithful() -> None:
    with pytest.raises(OptionError, match="w4a8 is judged against a kernel profile only"):
        check_implementation(never_called, save_dir=None, variants=["w4a8"], numerics="ideal")
    check_options(variants=["w4a8"], numerics="faithful")


def test_a_save_dir_that_is_not_a_directory_is_rejected(tmp_path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(OptionError, match="is not a directory"):
        check_implementation(never_called, save_dir=tmp_path / "file" / "sub")


def test_the_signature_is_checked_once_up_front() -> None:
    with pytest.raises(ImplLoadError, match="must take one argument"):
        check_implementation(lambda: None, save_dir=None)


def test_unknown_family_names_are_rejected_not_routed_as_another_family() -> None:
    for strategy, keyword in ((problems(routing=routings(families=st.just("zipff"))),
                               "families"),
                              (problems(values=token_rows(families=st.just("zero_rows"))),
                               "families"),
                              (problems(layouts=st.just("transposed")), "layouts")):
        with pytest.raises(InvalidArgument, match=f"{keyword} must be names from"):
            check_implementation(broken_impls.correct, problems=strategy, save_dir=None,
                                 settings=settings(max_examples=5, database=None))


def test_without_settings_hypothesis_deadline_does_not_apply() -> None:
    def slow(problem):
        time.sleep(0.3)
        return broken_impls.correct(problem)

    current = settings._current_profile  # type: ignore[attr-defined]
    settings.load_profile("default")  # Hypothesis' own: a 200 ms deadline
    try:
        check_implementation(slow, problems=st.just(PROBLEM), save_dir=None)
    finally:
        settings.load_profile(current)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["check", "broken_impls:correct", "--max-examples", "0"], "--max-examples: "),
        (["check", "broken_impls:correct", "--timeout", "nan"], "--timeout: "),
        (["check", "broken_impls:correct", "--timeout", "0"], "--timeout: "),
        (["check", "broken_impls:correct", "--ulps", "-1"], "--ulps: "),
        (["hunt", "--max-examples", "0"], "--max-examples: "),
        (["replay", "x.npz", "--impl", "broken_impls:correct", "--timeout", "-1"], "--timeout: "),
    ],
)
def test_cli_usage_errors_exit_2_before_the_search(monkeypatch, capsys, argv, message) -> None:
    monkeypatch.chdir(TESTS)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


pytest_plugins = ["pytester"]


def test_gate_options_are_usage_errors(pytester, monkeypatch) -> None:
    # This checkout's oracle, not whichever copy is installed, and broken_impls.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join((str(TESTS), str(TESTS.parent))))
    # One run per path (each is a pytest start, ~3 s of CPU): a value check_options refuses
    # (--dfc-timeout takes the same path as --dfc-ulps: the OptionError named after its
    # option; the timeout's bounds are check_options', tested below), the gate's
    # comma-separated list, the gate's own family-budget check.
    for flag, value, message in (("--dfc-ulps", "nan", "must be a finite number"),
                                 ("--dfc-variants", "w8a8,w4a16", "must be one or more of"),
                                 ("--dfc-family-examples", "0", "give at least 1 example")):
        result = pytester.runpytest_subprocess("--dfc-impl", "broken_impls:correct", flag, value)
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines([f"*{flag}: *{message}*"])


# --- Round 2 (issue 23): every door checks every option, and every number is bounded. ---

@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("timeout", 1e10, r"> 0 and <= 86400"),
        ("ulps", float("inf"), "from 0 to 65536"),
        ("ulps", 10**400, "from 0 to 65536"),  # an int beyond any float
        ("kernel", ["ascend-a3"], "must be one of"),  # unhashable: no TypeError
        ("variants", [["w8a8"]], "must be one or more of"),
        ("save_dir", 5, "must be a directory path"),
    ],
)
def test_unbounded_values_are_rejected_at_every_door(option, value, message) -> None:
    from oracle.check.harness import evaluate

    with pytest.raises(OptionError, match=message):
        check_implementation(never_called, **{"save_dir": None, option: value})
    with pytest.raises(OptionError, match="from 1 to 1000000"):
        check_options(max_examples=10**30)
    if option in ("timeout", "ulps"):
        with pytest.raises(OptionError, match=message):
            evaluate(never_called, PROBLEM, **{option: value})


def test_a_timeout_beyond_the_bound_overflowed_and_the_bound_itself_runs() -> None:
    """Both outcomes: past the validator (the mutant: ``_call`` directly), 1e10 s overflows the
    thread join a correct implementation waits in; the largest allowed timeout runs."""
    from oracle.check.harness import _call, evaluate
    from oracle.config.options import MAX_TIMEOUT

    with pytest.raises(OverflowError):
        _call(broken_impls.correct, PROBLEM, 1e10)
    verdict, _ = evaluate(broken_impls.correct, PROBLEM, timeout=MAX_TIMEOUT)
    assert verdict.ok


def test_replay_refuses_an_infinite_slack_from_the_command_line_or_the_file(
    tmp_path, monkeypatch, capsys
) -> None:
    """Both outcomes: ``ulps=inf`` makes the judge pass a wrong output (the mutant: the judge
    without the validator); replay refuses it as an option (exit 2) and as a file's record."""
    import json

    from oracle.files.counterexample import load, save
    from oracle.judge.verdict import compare

    (out, nums), = broken_impls.correct(PROBLEM)
    out = out.copy()
    out[0, 0] += out.dtype.type(0.1)  # one value off, by far more than the envelope
    wrong = [(out, nums)]
    assert not compare(PROBLEM, wrong).ok and compare(PROBLEM, wrong, ulps=float("inf")).ok
    monkeypatch.chdir(TESTS)
    path = save(tmp_path / "ce.npz", PROBLEM, outputs=wrong,
                meta={"stage": "out", "ulps": 0.0, "inputs": "sentinel"})
    for value in ("inf", "nan", "-1"):
        assert main(["replay", str(path), "--impl", "broken_impls:probs_ignored",
                     "--ulps", value]) == 2
        assert "--ulps: ulps=" in capsys.readouterr().err
    for record, field in ((float("inf"), "meta.ulps"), ("lenient", "meta.inputs")):
        key = "ulps" if field == "meta.ulps" else "inputs"
        bad = save(tmp_path / f"{key}.npz", PROBLEM, outputs=wrong,
                   meta={"stage": "out", "ulps": 0.0, "inputs": "sentinel", key: record})
        assert json.dumps(load(bad).meta[key]) in ("Infinity", '"lenient"')
        assert main(["replay", str(bad), "--impl", "broken_impls:probs_ignored"]) == 2
        err = capsys.readouterr().err
        assert f"manifest.json {field}: got" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("scales", "bogus", "must be one of int64, float32"),
        ("world_size", 0, "from 1 to 32"),
        ("timeout", 1e10, "<= 86400"),
        ("max_examples", 0, "from 1 to 1000000"),
        ("backend", "", "must be a torch.distributed backend name"),
    ],
)
def test_check_distributed_checks_its_options_before_any_process(option, value, message) -> None:
    from oracle.check.distributed import check_distributed

    kwargs = {"world_size": 2, option: value}
    with pytest.raises(OptionError, match=message) as info:
        check_distributed(never_called, **kwargs)
    assert info.value.option == option
