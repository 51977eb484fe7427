"""What the FP8 row test's per-tile weight sums cost (issue 26): ``_accumulation`` needs the
column sums of ``w²`` over each tile of 128 rows. Round 3 squared a float32 copy of ``w``
outside the weight pass (an e4m3 -> float32 conversion of the whole matrix, then ``reduceat``);
now :func:`oracle.judge.rowtest._weight_pass` gets them as more rows of the product it already
makes. Both forms side by side, at DeepSeek-V3's W1 (K = 7168, 2I = 4096) and W2 (I = 2048,
K = 7168), 128 slots, on random e4m3 weights; best of ``--repeat``.

Writes ``benchmarks/WEIGHT_PASS.md``. Run from the repository root:
``PYTHONPATH=$PWD python benchmarks/weight_pass.py [--repeat 3]``. Not a timed test.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from oracle.judge.rowtest import _weight_pass
from spec.fp8 import BLOCK

Array = np.ndarray[Any, Any]
SLOTS = 128


def separate(w: Array, squared: Array, transposed: Array) -> Array:
    """Round 3: the pass, then a float32 copy of ``w`` squared and summed per tile."""
    _weight_pass(w, squared, transposed, False)
    w_sq = np.square(w.astype(np.float32))
    return np.add.reduceat(w_sq, np.arange(0, w.shape[0], BLOCK), axis=0, dtype=np.float64)


def folded(w: Array, squared: Array, transposed: Array) -> Array:
    return _weight_pass(w, squared, transposed, True)[2]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    lines = ["# FP8 row test: per-tile weight sums inside the weight pass", "",
             f"`PYTHONPATH=$PWD python benchmarks/weight_pass.py --repeat {args.repeat}` on "
             f"{platform.machine()}, Python {platform.python_version()}, NumPy {np.__version__}, "
             "2 cores shared with other jobs; best of the repeats, seconds; written by the "
             "script.", "",
             "| weights (rows x columns) | separate square (round 3) | in the pass | "
             "max relative difference |", "|---|---|---|---|"]
    for name, (rows, cols) in {"W1 (K x 2I)": (7168, 4096), "W2 (I x K)": (2048, 7168)}.items():
        w = rng.standard_normal((rows, cols)).astype(ml_dtypes.float8_e4m3fn)
        squared = rng.random((SLOTS, rows))
        transposed = rng.random((SLOTS, cols)).astype(np.float32)
        best = {}
        for f in (separate, folded) * args.repeat:
            start = time.perf_counter()
            out = f(w, squared, transposed)
            best[f.__name__] = min(best.get(f.__name__, np.inf), time.perf_counter() - start)
            best[f"{f.__name__} out"] = out
        diff = float(np.max(np.abs(best["folded out"] - best["separate out"])
                            / np.maximum(best["separate out"], 1e-300)))
        lines.append(f"| {name} {rows} x {cols} | {best['separate']:.2f} | "
                     f"{best['folded']:.2f} | {diff:.1e} |")
        print(lines[-1], flush=True)
    Path(__file__).with_name("WEIGHT_PASS.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
