"""What the row test adds to the gate: the judge's time per example on the gate's own draws,
with and without the row test, measured side by side in one process (issue 11). The outputs
are those of a legitimate kernel that sums its float GEMMs in BLAS order (the row test is
skipped where they equal the model's bit for bit, as for a kernel in the model's own order).

Run from the repository root: ``python benchmarks/gate_cost.py [--draws N]``. Prints a table;
not a timed test.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
from hypothesis import HealthCheck, given, settings

import oracle
from oracle.judge import verdict as judge
from oracle.judge.rowtest import RowVerdict
from oracle.model.kernels import get_kernel
from spec import Problem
from spec.strategies import configs, problems

sys.path[:0] = [str(Path(__file__).parent)]
from profile_power import blas_order  # noqa: E402


def draws(kernel: str, n: int) -> list[Problem]:
    """``n`` problems of the gate's default strategy in ``kernel``'s domain (derandomised)."""
    out: list[Problem] = []

    @settings(max_examples=n, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(problems(configs=configs(domain=get_kernel(kernel).domain)))
    def collect(problem: Problem) -> None:
        out.append(problem)

    collect()
    return out[:n]


def judge_seconds(batch: list[tuple[Problem, Any]], kernel: str) -> float:
    start = time.perf_counter()
    for problem, outs in batch:
        assert judge.compare(problem, outs, numerics=kernel).ok
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--draws", type=int, default=200)
    args = parser.parse_args()
    skip = RowVerdict(True, 0.0, None, None, "rows conform")
    print("| kernel | draws | row test ran | judge without row test (s) | with (s) | ratio |")
    print("|---|---|---|---|---|---|")
    for kernel in ("ascend-a3", "vllm-triton"):
        legit = oracle.Numerics(kernel=blas_order(get_kernel(kernel)))
        batch = [(p, [(r.out, r.expert_token_nums) for r in oracle.run(p, numerics=legit).ranks])
                 for p in draws(kernel, args.draws)]
        ran = sum(any(not np.array_equal(o[w.defined].view(np.uint16),
                                         w.out[w.defined].view(np.uint16))
                      for (o, _), w in zip(outs, oracle.run(p, numerics=kernel).ranks))
                  for p, outs in batch)
        times: dict[str, list[float]] = {"without": [], "with": []}
        for _ in range(2):  # alternate, so that load on the machine hits both alike
            with mock.patch.object(judge, "_row_test", lambda *a: skip):
                times["without"].append(judge_seconds(batch, kernel))
            times["with"].append(judge_seconds(batch, kernel))
        a, b = (float(np.min(times[k])) for k in ("without", "with"))
        print(f"| {kernel} | {len(batch)} | {ran} | {a:.2f} | {b:.2f} | {b / a:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
