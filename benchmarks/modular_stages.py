"""The modular split's evidence (issue 22): the stage mutant table (killed?, stage calls
tried until the kill including shrinking, the shrunk call, seconds) and the false alarms of the
correct stage implementations (``benchmarks/mutants/modular.py``) over ``--examples`` calls
per stage of :func:`oracle.check.modular.stage_calls` (both layouts), judged in ideal numerics.
Also the smallest EP at which MoRI's dispatched-ids combine is killed without a masked token.

    PYTHONPATH=$PWD python benchmarks/modular_stages.py --examples 300 > benchmarks/MODULAR.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.mutants.modular import CORRECT, STAGE_MUTANTS  # noqa: E402
from oracle.check.modular import evaluate_stage, stage_calls  # noqa: E402
from spec.findings import search  # noqa: E402
from spec.modular import StageCall  # noqa: E402
from spec.strategies import configs  # noqa: E402


def false_alarms(stage: str, examples: int, seed_value: int) -> tuple[int, list[str], float]:
    """``(calls judged, failing calls, seconds)`` of the correct ``stage``."""
    seen: list[str] = []
    count = [0]
    start = time.perf_counter()

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @seed(seed_value)
    @given(stage_calls(stage))
    def judge(call: StageCall) -> None:
        count[0] += 1
        verdict = evaluate_stage(CORRECT[stage], call)
        if not verdict.ok:
            seen.append(f"{call.summary()}: {verdict.message}")

    judge()
    return count[0], seen, time.perf_counter() - start


def kill(name: str, calls: st.SearchStrategy[StageCall] | None = None,
         max_examples: int = 500) -> tuple[StageCall | None, int, float]:
    stage, layouts, mutant = STAGE_MUTANTS[name]
    tried = [0]

    def fails(call: StageCall) -> bool:
        tried[0] += 1
        return not evaluate_stage(mutant, call).ok

    start = time.perf_counter()
    call = search(calls if calls is not None else stage_calls(stage, layouts=layouts), fails,
                  max_examples=max_examples)
    return call, tried[0], time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--examples", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print("# The modular split: stage mutants and false alarms (issue 22)\n")
    print(f"`PYTHONPATH=$PWD python benchmarks/modular_stages.py --examples {args.examples}`\n")
    print("| mutant | stage | killed | calls judged (incl. shrinking) | seconds | shrunk call |")
    print("|---|---|---|---|---|---|")
    for name, (stage, _, _) in STAGE_MUTANTS.items():
        call, tried, seconds = kill(name)
        shrunk = call.summary() if call is not None else "-"
        print(f"| {name} | {stage} | {'yes' if call else 'NO'} | {tried} | {seconds:.1f} | "
              f"{shrunk} |")
    unmasked = stage_calls("combine", configs=configs(masked=st.just(False),
                                                      truncation=st.just(False)))
    call, tried, seconds = kill("combine_dispatched_ids", unmasked)
    ep = call.problem.config.ep_size if call is not None else None
    print(f"\nMoRI's dispatched ids without masked tokens: killed at EP = {ep} "
          f"({tried} calls, {seconds:.1f} s): {call.summary() if call else '-'}\n")
    for stage in CORRECT:
        n, seen, seconds = false_alarms(stage, args.examples, args.seed)
        print(f"Correct {stage}: {len(seen)} false alarms in {n} calls ({seconds:.0f} s).")
        for line in seen[:5]:
            print(f"  - {line}")


if __name__ == "__main__":
    main()
