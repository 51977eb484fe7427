"""Hostile implementations for the isolation tests: each ends, hangs or lies in a way an
in-process harness cannot survive or would judge wrongly."""

from __future__ import annotations

import ctypes
import os
import re
import signal
import threading
import time
from typing import Any

import numpy as np
from broken_impls import correct

from spec import Problem


def exits_zero(problem: Problem) -> Any:
    os._exit(0)


def segfaults(problem: Problem) -> Any:
    os.kill(os.getpid(), signal.SIGSEGV)


def aborts(problem: Problem) -> Any:
    os.abort()


def null_pointer(problem: Problem) -> Any:
    return ctypes.string_at(0)


def holds_the_gil(problem: Problem) -> Any:
    # Catastrophic backtracking inside the re module: C code that never releases the GIL.
    return re.match(r"(a+)+$", "a" * 64 + "b")


def leaves_a_thread(problem: Problem) -> Any:
    threading.Thread(target=time.sleep, args=(3600,), daemon=False).start()
    return correct(problem)


def _tell_pid() -> None:
    """Record this process's pid where the test reads it (``DFC_TEST_PIDFILE``)."""
    path = os.environ["DFC_TEST_PIDFILE"]
    with open(path + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(path + ".tmp", path)


def setsid_and_hang(problem: Problem) -> Any:
    """Leaves the process group the oracle kills, then hangs (round 1's killpg missed it)."""
    os.setsid()
    _tell_pid()
    time.sleep(3600)


def leaves_a_daemon(problem: Problem) -> Any:
    """A correct result, and a daemon grandchild (double fork, own session) left running."""
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            _tell_pid()
            time.sleep(3600)
        os._exit(0)
    return correct(problem)


def one_value_off(problem: Problem) -> Any:
    """The reference, with one out value moved by 0.1: far outside the envelope, too little
    for the row test; only an infinite --ulps passes it."""
    result = correct(problem)
    out = result[0][0].copy()
    out[0, 0] += out.dtype.type(0.1)
    return [(out, result[0][1]), *result[1:]]


def sys_exit(problem: Problem) -> Any:
    raise SystemExit(0)


def masked_nan(problem: Problem) -> Any:
    return [(np.ma.masked_invalid(np.full_like(out, np.nan)), nums)
            for out, nums in correct(problem)]


class _Broken:
    @property
    def out(self) -> Any:
        raise RuntimeError("out is not ready")

    expert_token_nums = None


def out_raises(problem: Problem) -> Any:
    return [_Broken() for _ in problem.ranks]


class _Unprintable(Exception):
    def __str__(self) -> str:
        raise ValueError("no text")


def unprintable_error(problem: Problem) -> Any:
    raise _Unprintable()


def appends_to_weights(problem: Problem) -> Any:
    result = correct(problem)
    problem.ranks[0].w1.append(problem.ranks[0].w1[0])
    return result


def writes_into_weights(problem: Problem) -> Any:
    result = correct(problem)
    problem.ranks[0].w1[0][0, 0] ^= 1
    return result


def damages_the_problem(problem: Problem) -> Any:
    result = correct(problem)
    problem._ranks = None  # type: ignore[assignment]
    problem._config = None  # type: ignore[assignment]
    return result


def zeroes_x_and_hides_it(problem: Problem) -> Any:
    """Zeroes its tokens after computing, and patches the oracle's input watch in its own
    process to see no write."""
    import oracle.check.isolation as isolation

    isolation.written = lambda *args: []  # type: ignore[assignment]
    isolation.InputWatch.changed = lambda self, originals: []  # type: ignore[method-assign]
    isolation.InputWatch.list_writes = lambda self: []  # type: ignore[method-assign]
    result = correct(problem)
    for inputs in problem.ranks:
        inputs.x[...] = 0
    return result


def seterr_raise(problem: Problem) -> Any:
    np.seterr(all="raise")
    return correct(problem)


def prints_and_dies(problem: Problem) -> Any:
    print("device lost: HBM ECC error on die 3", flush=True)
    os._exit(17)


def takes_two(problem: Problem, stream: Any) -> Any:
    return correct(problem)
