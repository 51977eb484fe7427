"""The gate cannot be fooled: whatever the implementation does in its child process (exit,
crash, hang holding the GIL, lie about its outputs), the result is a report, never a pass, a
dead harness or a traceback from the oracle."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import Phase, settings
from hypothesis import strategies as st

from oracle.check.harness import ConformanceError, check_implementation, evaluate
from oracle.check.isolation import ChildProcess, _SharedFile, importable_name
from oracle.check.loading import ImplLoadError, load_impl
from oracle.cli import main
from spec import OpConfig, random_problem
from spec.memory import layout_of, with_layout
from spec.strategies import configs, problems

TESTS = Path(__file__).parent
FAST = settings(max_examples=10, derandomize=True, database=None, deadline=None)
#: The first failing call, not shrunk: for the tests whose claim is the verdict or the report.
UNSHRUNK = settings(FAST, phases=[Phase.explicit, Phase.generate])
SMALL = problems(configs=configs(ep_sizes=st.sampled_from((1, 2)),
                                 tokens_per_rank=st.integers(0, 3)))
PROBLEM = random_problem(OpConfig(ep_size=2, experts_per_rank=2, top_k=2, hidden=16,
                                  intermediate=8, tokens_per_rank=(3, 1)), seed=1)
BIG = random_problem(OpConfig(ep_size=2, experts_per_rank=4, top_k=2, hidden=256,
                              intermediate=128, tokens_per_rank=(5, 3)), seed=2)


def find(name: str, search: settings = FAST, **kwargs) -> ConformanceError:
    with pytest.raises(ConformanceError) as info:
        check_implementation(f"hostile_impls:{name}", problems=SMALL, settings=search,
                             save_dir=None, **kwargs)
    return info.value


ENDINGS = [
    ("exits_zero", "call", "exited with code 0 without returning a result"),
    ("segfaults", "call", "killed by SIGSEGV"),
    ("null_pointer", "call", "killed by SIGSEGV"),
    ("aborts", "call", "killed by SIGABRT"),
    ("sys_exit", "call", "raised: SystemExit: 0"),
    ("unprintable_error", "call", "_Unprintable: <its __str__ raised ValueError>"),
    ("masked_nan", "structure", "numpy.ma.MaskedArray, an ndarray subclass"),
    ("out_raises", "structure", "cannot be read: RuntimeError: out is not ready"),
    ("appends_to_weights", "inputs", "r0.w1 (entries added, removed or replaced)"),
]
#: One of each way a search meets them: the child ends without a result, is killed by a
#: signal, or answers what the judge refuses. The others shrink the same way (any call fails:
#: about 8 s of CPU each), so they run with ``-m slow``.
SHRUNK_IN_CI = ("exits_zero", "segfaults", "masked_nan")


@pytest.mark.parametrize(("name", "stage", "message"), ENDINGS)
def test_every_way_of_ending_is_a_report(name, stage, message) -> None:
    error = find(name, UNSHRUNK)
    assert error.verdict.stage == stage and message in error.verdict.message


@pytest.mark.parametrize(("name", "stage", "message"), [
    case if case[0] in SHRUNK_IN_CI else pytest.param(*case, marks=pytest.mark.slow)
    for case in ENDINGS])
def test_every_way_of_ending_shrinks_to_the_minimal_call(name, stage, message) -> None:
    error = find(name)
    assert error.verdict.stage == stage and message in error.verdict.message
    assert "minimal call: EP=1" in error.report and "M=[0]" in error.problem.config.summary()


def test_a_crash_report_carries_the_exit_code_and_the_last_lines_of_stderr() -> None:
    error = find("prints_and_dies", UNSHRUNK)  # the claim is the report
    assert "exited with code 17" in error.verdict.message
    assert "last lines of its stderr:\n    device lost: HBM ECC error on die 3" in error.report


def test_a_call_that_holds_the_gil_is_killed_at_the_timeout() -> None:
    start = time.perf_counter()
    error = find("holds_the_gil", timeout=0.5)
    assert error.verdict.stage == "timeout" and "killed (SIGKILL)" in error.verdict.message
    assert time.perf_counter() - start < 10


def test_the_child_is_reused_and_restarted_after_a_crash() -> None:
    with ChildProcess("broken_impls:correct") as child:
        pid = child.pid
        for _ in range(3):
            verdict, _ = evaluate(child, PROBLEM)
            assert verdict.ok
        assert (child.starts, child.pid) == (1, pid)
    with ChildProcess("hostile_impls:holds_the_gil") as child:
        assert evaluate(child, PROBLEM, timeout=0.3)[0].stage == "timeout"
        assert evaluate(child, PROBLEM, timeout=0.3)[0].stage == "timeout"
        assert child.starts == 2  # killed at the first timeout, started again for the second


def test_large_arrays_travel_through_the_shared_file_intact() -> None:
    """Every input reaches the child through the shared file: a correct implementation passes,
    a wrong one fails, a write into an input is seen."""
    with ChildProcess("broken_impls:correct") as child:
        assert evaluate(child, BIG)[0].ok
    with ChildProcess("broken_impls:probs_ignored") as child:
        assert evaluate(child, BIG)[0].stage == "out"
    with ChildProcess("hostile_impls:writes_into_weights") as child:
        verdict, _ = evaluate(child, BIG)
    assert verdict.stage == "inputs" and "r0.w1" in verdict.message


def test_the_child_reads_only_declared_arrays_inside_the_shared_file() -> None:
    """…in their layouts, as views: what the worker writes, the parent reads back; and the
    worker cannot shrink the file under the parent's mapping (a SIGBUS in the parent)."""
    writer = _SharedFile.create()
    fortran = np.asfortranarray(np.arange(6.0).reshape(2, 3))
    strided = with_layout(np.arange(8, dtype=np.int8).reshape(2, 4), "strided")
    specs = writer.put([("a", np.arange(10, dtype=np.int32)), ("b", fortran), ("c", strided)])
    reader = _SharedFile(os.dup(writer.fd), owner=False)
    try:
        (_, a), (_, b), (_, c) = reader.get(specs)
        assert a.tolist() == list(range(10)) and b.tolist() == fortran.tolist()
        assert b.flags.f_contiguous and not b.flags.c_contiguous  # its layout class kept
        assert c.tolist() == strided.tolist() and layout_of(c) == "strided"
        b[1, 2], c[1, 3] = -1.0, -1
        (_, a2), (_, b2), (_, c2) = writer.get(specs)
        assert b2[1, 2] == -1.0 and c2[1, 3] == -1 and a2.tolist() == list(range(10))
        if sys.platform.startswith("linux"):
            with pytest.raises(PermissionError):
                os.ftruncate(reader.fd, 0)
        for bad in ([["a", "int32", [10], "contiguous", 1 << 30]],
                    [["a", "int32", [10], "contiguous", -64]],
                    [["a", "object", [1], "contiguous", 0]],
                    [["a", "int32", [-1], "contiguous", 0]],
                    [["a", "int32", [10], "diagonal", 0]], [["a"]], "not a list"):
            with pytest.raises(ValueError):
                reader.get(bad)
    finally:
        reader.close()
        writer.close()


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("no_such_module:f", "cannot import module 'no_such_module'"),
        ("hostile_import_exit:f", "exited with code 0"),
        ("hostile_impls:takes_two", "must take one argument"),
    ],
)
def test_an_implementation_that_cannot_be_loaded_is_a_load_error(name, message) -> None:
    with pytest.raises(ImplLoadError, match=message):
        ChildProcess(name).start()


def test_seterr_at_import_does_not_reach_the_oracle() -> None:
    before = np.geterr()
    load_impl("hostile_import_seterr:dispatch_ffn_combine")
    assert np.geterr() == before
    check_implementation("hostile_import_seterr:dispatch_ffn_combine", problems=SMALL,
                         settings=FAST, save_dir=None)


def test_only_importable_callables_are_isolated() -> None:
    import broken_impls

    assert importable_name(broken_impls.correct) == "broken_impls:correct"
    assert importable_name(lambda p: p) is None
    with pytest.warns(UserWarning, match="runs in this process"):
        check_implementation(lambda p: broken_impls.correct(p), problems=SMALL, settings=FAST,
                             save_dir=None, isolate=True)


def test_check_exits_1_for_os_exit_and_is_not_held_by_leftover_threads(
    tmp_path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(TESTS)
    assert main(["check", "hostile_impls:exits_zero", "--max-examples", "5",
                 "--save-dir", str(tmp_path)]) == 1
    assert "exited with code 0" in capsys.readouterr().out
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "oracle", "check", "hostile_impls:leaves_a_thread",
                           "--max-examples", "5", "--save-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=TESTS)
    assert done.returncode == 0 and "no counterexample in 5 calls" in done.stdout
    assert time.perf_counter() - start < 60


pytest_plugins = ["pytester"]


def test_the_gate_fails_an_implementation_that_exits(pytester, monkeypatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    result = pytester.runpytest_subprocess("--dfc-impl", "hostile_impls:exits_zero", "-q",
                                           "-k", "default_search", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*exited with code 0 without returning a result*"])


# --- Round 2 (issue 23): no process the implementation starts escapes the kill. ---


class _GroupKillOnly(ChildProcess):
    """The mutant: round 1's kill, the template's process group only."""

    def _kill(self) -> str:
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
        self._reap()
        return "its process was killed (SIGKILL)"


def _escaped_pid(pidfile: Path) -> int:
    for _ in range(500):
        if pidfile.exists():
            return int(pidfile.read_text())
        time.sleep(0.01)
    raise AssertionError("the hostile implementation never recorded its pid")


def _running(pid: int) -> bool:
    from oracle.check.isolation import _alive

    for _ in range(100):  # SIGKILL takes a moment
        if not _alive(pid):
            return False
        time.sleep(0.01)
    return True


@pytest.mark.parametrize("runner", [ChildProcess, _GroupKillOnly])
@pytest.mark.parametrize("name", ["setsid_and_hang", "leaves_a_daemon"])
def test_no_process_the_implementation_starts_outlives_the_kill(
    tmp_path, monkeypatch, runner, name
) -> None:
    """A hung worker in a session of its own is killed at the timeout, and a daemon left by a
    passing call at close; the report counts them. Round 1's process-group kill missed both."""
    pidfile = tmp_path / "pid"
    monkeypatch.setenv("DFC_TEST_PIDFILE", str(pidfile))
    with runner(f"hostile_impls:{name}") as child:
        verdict, _ = evaluate(child, PROBLEM, timeout=1.0)
        escaped = _escaped_pid(pidfile)
    try:
        if runner is _GroupKillOnly:
            assert _running(escaped)
            return
        assert not _running(escaped)
        if name == "setsid_and_hang":
            assert verdict.stage == "timeout"
            assert ("killed (SIGKILL), with 1 process(es) it started that had left its process "
                    "group") in verdict.message
        else:
            assert verdict.ok
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(escaped, signal.SIGKILL)


def test_the_input_write_verdict_is_decided_in_the_parent(monkeypatch) -> None:
    """An implementation that zeroes x and patches the oracle's watch in its own process: in
    process (the mutant: the verdict decided where the implementation runs) it passes
    ``inputs='strict'``; isolated, the parent reads the write from the shared file and fails it."""
    import oracle.check.isolation as isolation

    monkeypatch.setattr(isolation, "written", isolation.written)  # restored afterwards
    for name in ("changed", "list_writes"):
        monkeypatch.setattr(isolation.InputWatch, name, getattr(isolation.InputWatch, name))
    import hostile_impls

    fooled, _ = evaluate(hostile_impls.zeroes_x_and_hides_it, PROBLEM, inputs="strict")
    assert fooled.ok
    monkeypatch.undo()
    with ChildProcess("hostile_impls:zeroes_x_and_hides_it") as child:
        verdict, _ = evaluate(child, PROBLEM, inputs="strict")
    assert verdict.stage == "inputs" and "r0.x[" in verdict.message


@pytest.mark.parametrize("isolated", [True, False], ids=["child", "in-process"])
def test_the_adapters_refusal_is_reported_as_the_gates(isolated: bool) -> None:
    """The adapter's refusal (InputsRefused, raised before the implementation is entered) is
    told apart from the implementation raising, in the child (the parent may not import the
    implementation) and in process."""
    if isolated:
        with ChildProcess("broken_impls:refused") as child:
            verdict, _ = evaluate(child, PROBLEM, timeout=30)
    else:
        verdict, _ = evaluate(load_impl("broken_impls:refused"), PROBLEM)
    assert verdict.stage == "call"
    assert verdict.message == ("the gate's inputs were refused (the implementation was not "
                               "called): the torch adapter refused the gate's call (a stand-in)")
