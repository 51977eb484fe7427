"""Placement-aware implementations by import name (``placed_impls:rsf_twice``), for the tests
of the doors that take placed calls: the correct one and a mutant of
``benchmarks/mutants/placement.py``."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # benchmarks/ is a plain folder; a child process imports us too
    sys.path.insert(0, str(ROOT))

from benchmarks.mutants.placement import PLACED_MUTANTS, placed_correct  # noqa: E402

correct = placed_correct
rsf_twice = PLACED_MUTANTS["rsf_twice"]
