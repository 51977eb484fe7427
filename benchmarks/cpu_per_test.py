"""A pytest plugin: each test's wall and CPU seconds, CPU counting this process and the child
processes it waited for (the gate's subprocesses, the isolation children). On a shared machine
the wall time follows the load; the CPU time much less.

    PYTHONPATH=$PWD:$PWD/benchmarks CPU_PER_TEST=/tmp/cpu.tsv \\
        python -m pytest tests/test_cli.py -q -p cpu_per_test

writes one ``cpu<TAB>wall<TAB>test`` line per test as it ends (a run cut short keeps what it
measured), then, at the end of the session, the same lines again sorted, most CPU first.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Generator

import pytest

_ROWS: list[tuple[str, float, float]] = []


def _cpu() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _path() -> str:
    return os.environ.get("CPU_PER_TEST", "cpu_per_test.tsv")


def _line(node: str, wall: float, cpu: float) -> str:
    return f"{cpu:8.2f}\t{wall:8.2f}\t{node}\n"


def pytest_sessionstart() -> None:
    open(_path(), "w").close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, None, None]:
    wall, cpu = time.perf_counter(), _cpu()
    yield
    _ROWS.append((item.nodeid, time.perf_counter() - wall, _cpu() - cpu))
    with open(_path(), "a") as out:
        out.write(_line(*_ROWS[-1]))


def pytest_sessionfinish() -> None:
    with open(_path(), "w") as out:
        out.writelines(_line(*row) for row in sorted(_ROWS, key=lambda row: -row[2]))
