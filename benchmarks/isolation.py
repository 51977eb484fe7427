"""What running the implementation in a child process costs: per-call overhead and gate time,
in process (the old default) and isolated (the new one), side by side in one run.

    python benchmarks/isolation.py [--calls 300] [--max-examples 100]

The implementation is ``broken_impls:correct`` (the reference model itself), so both columns do
the same work and their difference is the isolation's cost: copying the problem into the child
as raw bytes, the outputs back, and the parent's checks. Not a timed test: numbers depend on
the machine. On a loaded machine, NumPy's BLAS threads of the parent and the child compete (the
parent's spin while the child computes): ``OPENBLAS_NUM_THREADS=1`` shows the isolation's own
cost.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path

from hypothesis import settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import broken_impls

import oracle.config.settings  # noqa: F401 - registers the profiles
from oracle.check.harness import _call, check_implementation
from oracle.check.isolation import ChildProcess
from spec import OpConfig, random_problem

SHAPES = {
    "small (EP=2 E=2 K=16 M=3+1)": OpConfig(ep_size=2, experts_per_rank=2, top_k=2, hidden=16,
                                            intermediate=8, tokens_per_rank=(3, 1)),
    "medium (EP=8 E=4 K=256 M=16/rank)": OpConfig(ep_size=8, experts_per_rank=4, top_k=4,
                                                  hidden=256, intermediate=128,
                                                  tokens_per_rank=(16,) * 8),
}


def per_call(calls: int) -> list[tuple[str, list[float], list[float]]]:
    """Median and minimum of one call (copying the problem in, running the implementation,
    watching its inputs, bringing its outputs back; no judge): in process, and in a child
    whose inputs are views of a file both processes map (the parent reads the writes back).
    Interleaved, in turn, so that both see the same load; run the script of an older checkout
    for a before/after."""
    rows = []
    with ChildProcess("broken_impls:correct") as child:
        for label, config in SHAPES.items():
            problem = random_problem(config, seed=0)
            runs = (partial(_call, broken_impls.correct, problem, 60.0),
                    partial(child.call, problem, 60.0))
            samples: list[list[float]] = [[] for _ in runs]
            for run in runs:
                run()  # warm-up
            for i in range(calls):
                for j in range(len(runs)):  # each goes first in turn: no one gains by its place
                    k = (i + j) % len(runs)
                    start = time.perf_counter()
                    runs[k]()
                    samples[k].append((time.perf_counter() - start) * 1e3)
            rows.append((label, [statistics.median(t) for t in samples],
                         [min(t) for t in samples]))
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
    print("| one call, no judge: median (min), ms | in process | child process | overhead |")
    print("|---|---:|---:|---:|")
    for label, medians, minima in per_call(args.calls):
        cells = [f"{m:.2f} ({n:.2f})" for m, n in zip(medians, minima)]
        cells += [f"{m - medians[0]:+.2f} ({n - minima[0]:+.2f})"
                  for m, n in zip(medians[1:], minima[1:])]
        print(f"| {label} | " + " | ".join(cells) + " |")
    inproc, child = gate(args.max_examples)
    print(f"\n| gate: check_implementation, dfc-ci, {args.max_examples} examples | in process | "
          "child process | overhead |")
    print("|---|---:|---:|---:|")
    print(f"| broken_impls:correct | {inproc:.1f} s | {child:.1f} s | {child - inproc:+.1f} s "
          "(includes the child's start) |")


if __name__ == "__main__":
    main()
