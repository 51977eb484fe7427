"""The routing contract's evidence (issue 22): the mutant table (killed?, placed calls tried
until the kill, the shrunk counterexample) and the false alarms of the correct placement-aware
implementation over ``--examples`` calls of :func:`spec.placed_strategies.placed_calls` (EP up
to 32), each judged by :func:`oracle.judge.placed.compare_placed` in ideal numerics.

    PYTHONPATH=$PWD python benchmarks/placement_false_alarms.py --examples 2000 \
        > benchmarks/PLACEMENT.md
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, given, seed, settings

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.mutants.placement import PLACED_MUTANTS, placed_correct  # noqa: E402
from oracle.judge.placed import compare_placed  # noqa: E402
from spec.findings import search  # noqa: E402
from spec.placed_strategies import placed_calls  # noqa: E402
from spec.placement import PlacedCall  # noqa: E402


def false_alarms(examples: int, seed_value: int) -> tuple[int, list[str], Counter[str], float]:
    """``(calls judged, failing calls, what the calls reached, seconds)``."""
    seen: list[str] = []
    reached: Counter[str] = Counter()
    start = time.perf_counter()

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @seed(seed_value)
    @given(placed_calls())
    def judge(call: PlacedCall) -> None:
        reached["calls"] += 1
        pl, w = call.placement, call.weights
        reached.update(k for k, on in (
            ("replicas", pl.redundant > 0), ("EP > 8", call.config.ep_size > 8),
            ("shared", call.shared is not None), ("-1 ids", "-1 slots" in call.summary()),
            ("rsf != 1", w.routed_scaling_factor != 1), ("renormalize", w.renormalize),
            ("weights on input", w.on_input), ("top_k = 1", call.config.top_k == 1),
            ("all_gather", pl.dispatch == "all_gather"),
            ("an empty rank", 0 in call.config.tokens_per_rank)) if on)
        verdict = compare_placed(call, placed_correct(call))
        if not verdict.ok:
            seen.append(f"{call.summary()}: {verdict.message}")

    judge()
    return reached["calls"], seen, reached, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print("# Placement-aware calls: mutants and false alarms (issue 22)\n")
    print(f"`PYTHONPATH=$PWD python benchmarks/placement_false_alarms.py --examples "
          f"{args.examples}`\n")
    print("| mutant | killed | calls tried | shrunk counterexample |")
    print("|---|---|---|---|")
    for name, mutant in PLACED_MUTANTS.items():
        tried = [0]

        def fails(call: PlacedCall, mutant: object = mutant, tried: list[int] = tried) -> bool:
            tried[0] += 1
            return not compare_placed(call, mutant(call)).ok  # type: ignore[operator]

        found = search(placed_calls(), fails, max_examples=600)
        shown = found.summary() if found is not None else "-"
        print(f"| {name} | {'yes' if found else 'no'} | {tried[0]} (incl. shrinking) | "
              f"{shown} |")
    calls, alarms, reached, seconds = false_alarms(args.examples, args.seed)
    print(f"\nCorrect implementation: {len(alarms)} false alarms in {calls} calls "
          f"({seconds:.0f} s).\n")
    print("Reached: " + ", ".join(f"{k} {v}" for k, v in reached.most_common() if k != "calls"))
    for line in alarms[:10]:
        print(f"\n- {line}")


if __name__ == "__main__":
    main()
