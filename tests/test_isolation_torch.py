"""Isolation with torch on both sides: the parent has imported torch and used its thread pool,
and the implementation's module (tests/torch_impls.py) multiplies tensors at import, in the
child, before any call; the implementation takes and returns tensors through
oracle.adapters.torch_io.

Before the child checked for threads started by loading the implementation, its template
forked a worker with torch's OpenMP pool running, and the worker's first product never returned:
the correct implementation below was reported as hung ('timeout' after 30 s)."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="the torch adapter needs the optional extra 'torch'")

from hypothesis import settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from oracle.check.harness import check_implementation, evaluate  # noqa: E402
from oracle.check.isolation import THREAD_VARIABLES, ChildProcess  # noqa: E402
from spec import OpConfig, random_problem  # noqa: E402
from spec.strategies import configs, problems  # noqa: E402

FAST = settings(max_examples=10, derandomize=True, database=None, deadline=None)
SMALL = problems(configs=configs(ep_sizes=st.sampled_from((1, 2)),
                                 tokens_per_rank=st.integers(0, 3)))
PROBLEM = random_problem(OpConfig(ep_size=2, experts_per_rank=2, top_k=2, hidden=16,
                                  intermediate=8, tokens_per_rank=(3, 1)), seed=1)


@pytest.fixture(autouse=True)
def _torch_busy_in_parent() -> None:
    """The parent's own thread pool is running before any child starts."""
    assert float((torch.ones(256, 256) @ torch.ones(256, 256))[0, 0]) == 256


def _pools_of_two(monkeypatch: pytest.MonkeyPatch) -> None:
    """The children started with ``threads=None`` take their pools from the environment:
    two threads each, so that torch's tensor operation at import starts its OpenMP pool
    whatever the caller's environment pins (``OMP_NUM_THREADS=1`` starts none, and a fork
    would then serve)."""
    for name in THREAD_VARIABLES:
        monkeypatch.setenv(name, "2")


def _forked_workers(child: ChildProcess) -> list[str]:
    assert child.pid is not None
    path = Path(f"/proc/{child.pid}/task/{child.pid}/children")
    if not path.exists():
        pytest.skip("no /proc/PID/task/PID/children on this system")
    return path.read_text().split()


def test_a_correct_torch_implementation_passes_isolated(
        monkeypatch: pytest.MonkeyPatch) -> None:
    _pools_of_two(monkeypatch)
    # Threads left as the environment sets them: torch's tensor operation at import starts its
    # OpenMP pool, so the process that loaded it serves the calls (no fork after threads).
    with ChildProcess("torch_impls:correct", threads=None) as child:
        check_implementation(child, problems=SMALL, settings=FAST, save_dir=None, timeout=30)
        assert child.starts == 1
        assert _forked_workers(child) == []  # served in the process that loaded it
    # Pinned to one thread (the default), the same import starts no thread: a fork serves.
    with ChildProcess("torch_impls:correct") as child:
        check_implementation(child, problems=SMALL, settings=FAST, save_dir=None, timeout=30)
        assert child.starts == 1
    with ChildProcess("broken_impls:correct") as child:  # loading started no thread
        assert evaluate(child, PROBLEM)[0].ok
        assert len(_forked_workers(child)) == 1  # a fork of the loaded template serves


def test_a_wrong_torch_implementation_fails_isolated() -> None:
    with ChildProcess("torch_impls:doubled") as child:
        verdict, _ = evaluate(child, PROBLEM, timeout=30)
    assert verdict.stage == "out"


def test_a_crash_inside_a_torch_implementation_is_reported_and_the_child_restarts(
        monkeypatch: pytest.MonkeyPatch) -> None:
    _pools_of_two(monkeypatch)
    # Threads as the environment sets them: torch's pool started at import, so there is no
    # template to fork from and each crash starts a new child.
    with ChildProcess("torch_impls:segfaults", threads=None) as child:
        for starts in (1, 2):
            verdict, _ = evaluate(child, PROBLEM, timeout=30)
            assert verdict.stage == "call" and "killed by SIGSEGV" in verdict.message
            assert child.starts == starts


@pytest.mark.slow
def test_the_adapters_refusal_crosses_from_the_child_as_the_gates() -> None:
    """An implementation declaring packed-ue8m0 scales, handed float32 ones in its child: the
    verdict says the gate's inputs were refused and the implementation not called (the parent
    never imports it, so the child classifies the exception). 9 s (torch in a child): slow;
    tests/test_isolation.py's twin raises the refusal in a child without torch."""
    fp8 = random_problem(OpConfig(ep_size=1, experts_per_rank=1, top_k=1, hidden=128,
                                  intermediate=128, tokens_per_rank=(1,),
                                  weight_dtype="float8_e4m3fn"), seed=1)
    with ChildProcess("torch_impls:packed_ue8m0") as child:
        verdict, _ = evaluate(child, fp8, timeout=30)
        assert verdict.stage == "call", verdict.message
        assert verdict.message.startswith("the gate's inputs were refused (the implementation "
                                          "was not called): the torch adapter refused"), verdict
