"""What running the implementation in a child process costs: per-call overhead and gate time,
in process (the old default) and isolated (the new one), side by side in one run.

    python benchmarks/isolation.py [--calls 300] [--max-examples 100]

The implementation is ``broken_impls:correct`` (the reference model itself), so both columns do
the same work and their difference is the isolation's cost: copying the problem into the child
as raw bytes, the outputs back, and the parent's checks. Not a timed test: numbers depend on
the machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from hypothesis import settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import broken_impls

import oracle.profiles  # noqa: F401 - registers the profiles
from oracle.harness import check_implementation, evaluate
from oracle.isolation import ChildProcess
from spec import OpConfig, random_problem

SHAPES = {
    "small (EP=2 E=2 K=16 M=3+1)": OpConfig(ep_size=2, experts_per_rank=2, top_k=2, hidden=16,
                                            intermediate=8, tokens_per_rank=(3, 1)),
    "medium (EP=8 E=4 K=256 M=16/rank)": OpConfig(ep_size=8, experts_per_rank=4, top_k=4,
                                                  hidden=256, intermediate=128,
                                                  tokens_per_rank=(16,) * 8),
}


def per_call(calls: int) -> list[tuple[str, float, float]]:
    rows = []
    with ChildProcess("broken_impls:correct") as child:
        for label, config in SHAPES.items():
            problem = random_problem(config, seed=0)
            timings = {}
            for mode, impl in (("in process", broken_impls.correct), ("child", child)):
                evaluate(impl, problem)  # warm-up
                samples = []
                for _ in range(calls):
                    start = time.perf_counter()
                    evaluate(impl, problem)
                    samples.append(time.perf_counter() - start)
                timings[mode] = statistics.median(samples) * 1e3
            rows.append((label, timings["in process"], timings["child"]))
    return rows


def gate(max_examples: int) -> tuple[float, float]:
    search = settings(settings.get_profile("dfc-ci"), max_examples=max_examples)
    times = []
    for isolate in (False, True):
        start = time.perf_counter()
        check_implementation("broken_impls:correct", settings=search, save_dir=None,
                             isolate=isolate)
        times.append(time.perf_counter() - start)
    return times[0], times[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--max-examples", type=int, default=100)
    args = parser.parse_args()
    print("| per call (median of evaluate: call + judge) | in process | child process | overhead |")
    print("|---|---:|---:|---:|")
    for label, inproc, child in per_call(args.calls):
        print(f"| {label} | {inproc:.2f} ms | {child:.2f} ms | {child - inproc:+.2f} ms |")
    inproc, child = gate(args.max_examples)
    print(f"\n| gate: check_implementation, dfc-ci, {args.max_examples} examples | in process | "
          "child process | overhead |")
    print("|---|---:|---:|---:|")
    print(f"| broken_impls:correct | {inproc:.1f} s | {child:.1f} s | {child - inproc:+.1f} s "
          "(includes the child's start) |")


if __name__ == "__main__":
    main()
