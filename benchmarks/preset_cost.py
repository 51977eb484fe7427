"""What one call of a model-shape preset (``--dfc-shapes``) costs the gate: per preset, the
seconds to draw a problem (its weights), to run a vectorised NumPy kernel (the mutant
catalogue's correct one) and to judge its outputs, on the gate's own draws (W8A8, the A3
domain, derandomised), in one process with one thread.

Run from the repository root: ``OMP_NUM_THREADS=1 python benchmarks/preset_cost.py
[--draws N] [MODEL ...]`` (default: qwen3-30b-a3b deepseek-v3). Prints a table; not a test.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings

from oracle.check.harness import preset_configs
from oracle.judge.verdict import compare
from oracle.model.kernels import ASCEND_A3
from spec import Problem
from spec.limits import MODEL_PRESETS
from spec.strategies import problems

sys.path[:0] = [str(Path(__file__).parent)]
from mutants import correct  # noqa: E402


def timed_draws(key: str, n: int) -> list[tuple[Problem, float]]:
    """``n`` problems of the preset, each with the seconds Hypothesis took to draw it."""
    out: list[tuple[Problem, float]] = []
    start = [time.perf_counter()]

    @settings(max_examples=n, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(problems(configs=preset_configs(key, ["w8a8"], domain=ASCEND_A3.domain)))
    def collect(problem: Problem) -> None:
        out.append((problem, time.perf_counter() - start[0]))
        start[0] = time.perf_counter()

    collect()
    return out[:n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("models", nargs="*", default=["qwen3-30b-a3b", "deepseek-v3"],
                        choices=list(MODEL_PRESETS))
    args = parser.parse_args()
    print("| preset | shape | draws | draw (s/call) | kernel (s/call) | judge (s/call) |")
    print("|---|---|---|---|---|---|")
    for key in args.models:
        batch = timed_draws(key, args.draws)
        kernel = judge = 0.0
        for problem, _ in batch:
            t0 = time.perf_counter()
            outs = correct(problem)
            t1 = time.perf_counter()
            assert compare(problem, outs).ok
            kernel, judge = kernel + t1 - t0, judge + time.perf_counter() - t1
        cfg = batch[0][0].config
        shape = f"EP={cfg.ep_size} E={cfg.experts_per_rank} top_k={cfg.top_k} K={cfg.hidden} " \
                f"I={cfg.intermediate}"
        n = len(batch)
        print(f"| {key} | {shape} | {n} | {sum(t for _, t in batch) / n:.2f} | "
              f"{kernel / n:.2f} | {judge / n:.2f} |")


if __name__ == "__main__":
    main()
