"""A kernel with its own rounding points, gated three ways side by side (issue 21): under its
own profile (``kernel=``, what ``--dfc-kernel mypkg.profiles:MINE`` runs), under ideal mode
(``--dfc-numerics ideal``, the fallback a user without that door took) and under the default
profile (which fails the correct kernel: a false alarm, the reason for the door).

The kernel is the mutant catalogue's vectorised NumPy implementation
(``benchmarks/mutants``) with silu stored in x's dtype before the product (the profile
``tests/own_profiles.py:SILU_ROUNDED``); each mutant is that kernel with the mutant's defect.
Every cell is one ``oracle.check_implementation`` search under the dfc-ci settings (100
examples, derandomised), in this process, one thread: pass/fail and seconds.

Run from the repository root: ``OMP_NUM_THREADS=1 python benchmarks/own_profile_gate.py
[--mutants a,b] [--modes own,ideal,default]``. Prints a Markdown table; not a test.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import settings

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from own_profiles import SILU_ROUNDED  # noqa: E402

from benchmarks.mutants import _CLASSES  # noqa: E402
from benchmarks.mutants.correct import F32, DispatchFfnCombine  # noqa: E402
from oracle import ConformanceError, check_implementation  # noqa: E402
from oracle.config.settings import DEFAULT_PROFILE  # noqa: E402

MODES = {"own": {"kernel": SILU_ROUNDED}, "ideal": {"numerics": "ideal"}, "default": {}}


class SiluRounded:
    """Mixed in before a catalogue class: silu rounded to x's dtype before the product."""

    stored: Any = np.float32

    def ffn_w8a8(self, *args: Any) -> Any:
        self.stored = args[-1]
        return super().ffn_w8a8(*args)  # type: ignore[misc]

    def ffn_float(self, *args: Any) -> Any:
        self.stored = args[-1]
        return super().ffn_float(*args)  # type: ignore[misc]

    def swiglu(self, gate: np.ndarray, up: np.ndarray, alpha: float | None = None) -> Any:
        assert alpha is None  # the A3 domain draws no SwigluOAI
        with np.errstate(over="ignore"):
            silu = (gate / (F32(1) + np.exp(-gate))).astype(self.stored).astype(F32)
        return silu * up


def kernel(cls: type) -> Any:
    return type(f"Own{cls.__name__}", (SiluRounded, cls), {})()


def gate(impl: Any, mode: str) -> tuple[str, float]:
    start = time.perf_counter()
    try:
        check_implementation(impl, settings=settings.get_profile(DEFAULT_PROFILE),
                             save_dir=None, **MODES[mode])  # type: ignore[arg-type]
    except ConformanceError:
        return "FAIL", time.perf_counter() - start
    return "pass", time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mutants", default=",".join(_CLASSES))
    parser.add_argument("--modes", default=",".join(MODES))
    args = parser.parse_args()
    modes = args.modes.split(",")
    print("| kernel | " + " | ".join(f"{m} (s)" for m in modes) + " |")
    print("|---|" + "---|" * len(modes))
    rows = [("correct", DispatchFfnCombine)] + [
        (name, _CLASSES[name][1]) for name in args.mutants.split(",") if name]
    for name, cls in rows:
        cells = [gate(kernel(cls), mode) for mode in modes]
        print(f"| {name} | " + " | ".join(f"{o} {t:.1f}" for o, t in cells) + " |",
              flush=True)


if __name__ == "__main__":
    main()
