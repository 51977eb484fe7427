"""A pytest plugin: each test's wall and CPU seconds, CPU counting this process and the child
processes it waited for (the gate's subprocesses, the isolation children). On a shared machine
the wall time follows the load; the CPU time much less.

    PYTHONPATH=$PWD:$PWD/benchmarks CPU_PER_TEST=/tmp/cpu.tsv \\
        python -m pytest tests/test_cli.py -q -p cpu_per_test

writes one ``cpu<TAB>wall<TAB>test`` line per test, most CPU first.
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


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, None, None]:
    wall, cpu = time.perf_counter(), _cpu()
    yield
    _ROWS.append((item.nodeid, time.perf_counter() - wall, _cpu() - cpu))


def pytest_sessionfinish() -> None:
    with open(os.environ.get("CPU_PER_TEST", "cpu_per_test.tsv"), "w") as out:
        for node, wall, cpu in sorted(_ROWS, key=lambda row: -row[2]):
            out.write(f"{cpu:8.2f}\t{wall:8.2f}\t{node}\n")
