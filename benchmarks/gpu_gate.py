"""CUDA through the gate (issue 26): how a CUDA implementation starts and runs in the gate's
isolated child process and in process. Needs a CUDA device; run from the repository root::

    PYTHONPATH=$PWD python benchmarks/gpu_gate.py [calls]

For the torch grouped-GEMM control imported lazily (CUDA first touched in the first call) and
eagerly (``tests/controls/gpu/eager.py``), and in process: seconds to start the child (an
interpreter and the imports), the first call (CUDA initialisation in the process that serves),
the mean of the following calls, the judge's share, whether the child forked a worker, and
every verdict (all must conform). Prints a Markdown table for ``benchmarks/GPU.md``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from oracle.check.harness import evaluate
from oracle.check.isolation import ChildProcess
from spec import OpConfig, random_problem

PROFILE = "torch-grouped-mm"
NAMES = {"lazy": "controls.gpu.grouped_mm:dispatch_ffn_combine",
         "eager": "controls.gpu.eager:dispatch_ffn_combine"}


def _problems(calls: int) -> list:  # type: ignore[type-arg]
    cfg = OpConfig(ep_size=4, experts_per_rank=4, top_k=4, hidden=1024, intermediate=512,
                   tokens_per_rank=(16, 8, 0, 32), weight_dtype="bfloat16")
    return [random_problem(cfg, seed=s) for s in range(calls)]


def _forked(pid: int | None) -> bool:
    """Whether the child's template process has a worker process of its own."""
    try:
        return any(Path(f"/proc/{pid}/task/{t}/children").read_text().strip()
                   for t in os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return False


def _run(runner, problems: list) -> tuple[list[float], list[float], list[bool]]:  # type: ignore[no-untyped-def,type-arg]
    calls, judged, oks = [], [], []
    for p in problems:
        t0 = time.perf_counter()
        verdict, _ = evaluate(runner, p, numerics=PROFILE, timeout=300)
        calls.append(time.perf_counter() - t0)
        t1 = time.perf_counter()
        evaluate(lambda q: [(r.out, r.expert_token_nums) for r in _golden(q)], p,
                 numerics=PROFILE)
        judged.append(time.perf_counter() - t1)
        oks.append(verdict.ok)
    return calls, judged, oks


def _golden(problem):  # type: ignore[no-untyped-def]
    from oracle import run
    return run(problem, numerics=PROFILE).ranks


def main(calls: int) -> None:
    import torch

    problems = _problems(calls)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, calls: {calls}; "
          "shape EP=4 E=4 top_k=4 K=1024 I=512 M=[16, 8, 0, 32] bf16")
    print("| where | start s | first call s | later calls s (mean) | of which judge+model s |"
          " forked worker | conform |")
    print("|---|---|---|---|---|---|---|")
    for how, name in NAMES.items():
        t0 = time.perf_counter()
        child = ChildProcess(name)
        child.start()
        started = time.perf_counter() - t0
        try:
            times, judged, oks = _run(child, problems)
            forked = _forked(child.pid)
        finally:
            child.close()
        print(f"| child, CUDA {how} | {started:.2f} | {times[0]:.2f} | "
              f"{np.mean(times[1:]):.3f} | {np.mean(judged[1:]):.3f} | {forked} | "
              f"{sum(oks)}/{len(oks)} |")
    from controls.gpu.grouped_mm import dispatch_ffn_combine

    times, judged, oks = _run(dispatch_ffn_combine, problems)
    print(f"| in process | 0 | {times[0]:.2f} | {np.mean(times[1:]):.3f} | "
          f"{np.mean(judged[1:]):.3f} | — | {sum(oks)}/{len(oks)} |")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20)
