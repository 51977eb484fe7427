"""How long the gate takes, pass or fail, and what its family budget costs in power (issue 13).

Runs ``pytest --dfc-impl`` (the bundled suite, dfc-ci profile, child-process isolation) as a
subprocess on kernels of the mutant catalogue (``benchmarks/mutants``): the correct one, which
must pass, and mutants, which must fail.

- ``--before PATH``: also run the gate of another checkout (e.g. ``git worktree add /tmp/before
  <commit>``) on the same kernels, alternating with this one, so both columns share the
  machine's load.
- ``--kills``: every mutant of the catalogue through this checkout's gate at the default family
  budget and at ``--dfc-family-examples 100`` (the budget every test had before): which mutants
  the smaller budget lets through.

Run from the repository root: ``python benchmarks/gate_time.py [--before PATH] [--kills]``.
Prints Markdown tables; not a timed test.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]
from benchmarks.mutants import MUTANTS  # noqa: E402

#: The kernels timed by default: the correct one and three failing ones, one per stage kind.
TIMED = ("correct", "probs_ignored", "masked_slots_counted", "combine_bf16_accumulator")

SHIM = """from benchmarks.mutants import MUTANTS
from benchmarks.mutants.correct import DispatchFfnCombine
correct = DispatchFfnCombine()
globals().update(MUTANTS)
"""


def gate(checkout: Path, kernel: str, shim_dir: str, *extra: str) -> tuple[float, str, int]:
    """Seconds, outcome (``"pass"``/``"FAIL"``) and the number of full failure reports of one
    gate run of ``kernel`` from ``checkout``."""
    env = dict(os.environ, PYTHONPATH=f"{shim_dir}{os.pathsep}{checkout}")
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "--dfc-impl",
         f"gate_kernels:{kernel}", *extra],
        cwd=checkout, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    reports = len(re.findall(r"^what failed:", done.stdout, flags=re.M))
    outcome = {0: "pass", 1: "FAIL"}.get(done.returncode, f"exit {done.returncode}")
    return seconds, outcome, reports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--before", type=Path, help="another checkout to time side by side")
    parser.add_argument("--kernels", default=",".join(TIMED))
    parser.add_argument("--kills", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as shim_dir:
        Path(shim_dir, "gate_kernels.py").write_text(SHIM)
        checkouts = [("after", ROOT)] + ([("before", args.before)] if args.before else [])
        print("| kernel | " + " | ".join(f"{name} s | {name} outcome | {name} full reports"
                                        for name, _ in checkouts) + " |")
        print("|---|" + "---|---|---|" * len(checkouts))
        for kernel in args.kernels.split(","):
            cells = []
            for _, checkout in checkouts:
                seconds, outcome, reports = gate(checkout, kernel, shim_dir)
                cells.append(f"{seconds:.1f} | {outcome} | {reports}")
            print(f"| {kernel} | " + " | ".join(cells) + " |", flush=True)
        if not args.kills:
            return
        print("\n| mutant | default family budget | s | --dfc-family-examples 100 | s |")
        print("|---|---|---|---|---|")
        for name in sorted(MUTANTS):
            small = gate(ROOT, name, shim_dir)
            full = gate(ROOT, name, shim_dir, "--dfc-family-examples", "100")
            print(f"| {name} | {small[1]} | {small[0]:.1f} | {full[1]} | {full[0]:.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
