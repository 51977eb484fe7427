"""The implementation's child process pins its OpenMP, BLAS and torch thread pools (one thread
by default, ``threads``/``--threads``/``--dfc-threads`` to change it, 0 or None to leave the
environment's), and every header says which (issue 21: a torch kernel's gate took 66 s to
437 s on two shared cores with torch's full pool)."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from oracle import pytest_plugin
from oracle.check.harness import evaluate
from oracle.check.isolation import THREAD_VARIABLES, ChildProcess
from oracle.cli import main
from oracle.config.options import OptionError, check_options
from spec import OpConfig, random_problem

TESTS = Path(__file__).parent
PROBE = "thread_probe:dispatch_ffn_combine"
QUICK = "broken_impls:returns_none"  # imports no torch: the child starts in a second
PROBLEM = random_problem(OpConfig(ep_size=1, experts_per_rank=2, top_k=1, hidden=32,
                                  intermediate=8, tokens_per_rank=(1,)), seed=0)


@pytest.fixture
def in_tests_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(TESTS)


def _pools(threads: int | None) -> str:
    with ChildProcess(PROBE, threads=threads) as child:
        verdict, _ = evaluate(child, PROBLEM)
    assert verdict.stage == "call", verdict.message
    return verdict.message.split("pools: ")[1].split(" at ")[0]


def test_the_child_pins_every_pool(in_tests_dir, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch", reason="torch's pool needs the extra 'torch'")
    for name in THREAD_VARIABLES:
        monkeypatch.setenv(name, "2")
    assert _pools(1) == " ".join(f"{v}=1" for v in THREAD_VARIABLES) + " torch=1"
    # None: the environment's settings reach the kernel unchanged (here 2 each).
    assert _pools(None) == " ".join(f"{v}=2" for v in THREAD_VARIABLES) + " torch=2"


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_a_thread_count_below_one_is_an_option_error(bad: object) -> None:
    with pytest.raises(OptionError, match=f"threads={bad!r} must be an integer >= 1"):
        check_options(threads=bad)
    check_options(threads=None)


def test_the_headers_say_how_threads_are_set(in_tests_dir, tmp_path: Path, capsys) -> None:
    args = ["check", "broken_impls:correct", "--max-examples", "1", "--save-dir", str(tmp_path)]
    for given, said in (([], "in a child process, 1 thread (OpenMP, BLAS and torch pinned)"),
                        (["--threads", "4"], "4 threads (OpenMP, BLAS and torch pinned)"),
                        (["--threads", "0"], "threads as the environment sets them"),
                        (["--in-process"], "in process, threads not pinned")):
        assert main([*args, *given]) == 0
        assert said in capsys.readouterr().err
    assert main([*args, "--threads", "-2"]) == 2
    assert "--threads: threads=-2 must be an integer >= 1" in capsys.readouterr().err


pytest_plugins = ["pytester"]


def test_the_gate_header_names_the_threads(pytester, monkeypatch) -> None:
    """The gate prints the header (one run: each costs a pytest and a child process start,
    about 3 s of CPU); what it says of each thread option is ``_threads`` of the options."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join((str(TESTS), str(TESTS.parent))))
    header = pytester.runpytest_subprocess("--dfc-impl", QUICK, "--co")
    header.stdout.fnmatch_lines([f"dfc-oracle: impl={QUICK} * threads=1"])
    for given, said in (({"--dfc-threads": 1}, "1"), ({"--dfc-threads": 0}, "environment"),
                        ({"--dfc-threads": 1, "--dfc-in-process": True},
                         "not-pinned(in-process)"),
                        ({"--dfc-threads": 1, "--dfc-stage": "dispatch"},
                         "not-pinned(in-process)")):
        options = {"--dfc-in-process": False, "--dfc-stage": None, **given}
        assert pytest_plugin._threads(SimpleNamespace(getoption=options.get)) == said
    bad = pytester.runpytest_subprocess("--dfc-impl", QUICK, "--co", "--dfc-threads", "-1")
    bad.stderr.fnmatch_lines(["*--dfc-threads: threads=-1 must be an integer >= 1*"])
