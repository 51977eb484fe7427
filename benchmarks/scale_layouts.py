"""What a declared scale layout costs at production shapes (``spec/scale_layout.py``): the time
of ``to_physical`` and ``to_logical`` per layout on one rank's FP8 block scales of DeepSeek-V3
(K = 7168, I = 2048, 32 local experts: EP 8 of 256), measured side by side in one run.

``packed-ue8m0`` holds one scale per output row (DeepGEMM's SM100 recipe ``(1, 128)``), so its
input is 128 times taller than the block scales the float32 layouts take: W1's ``S`` is
``(32, 4096, 56)`` per row against ``(32, 32, 56)`` per block; W2's ``(32, 7168, 16)`` against
``(32, 56, 16)``; ``tma-aligned`` is timed on the per-row shape as well, the same scales moved
without the packing.

Usage: ``python benchmarks/scale_layouts.py [--repeats N]``; prints a Markdown table.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from spec.fp8 import BLOCK, blocks
from spec.mxfp4 import e8m0_values
from spec.scale_layout import LAYOUTS, PER_ROW, to_logical, to_physical

EXPERTS, HIDDEN, INTERMEDIATE = 32, 7168, 2048


def _best(fn: Callable[..., Any], args: tuple[Any, ...], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    # (name, output rows, reduction): W1 (K -> 2I), W2 (I -> K)
    weights = (("W1", 2 * INTERMEDIATE, HIDDEN), ("W2", HIDDEN, INTERMEDIATE))
    print("| weight | layout | S shape | to_physical ms | to_logical ms |")
    print("| --- | --- | --- | ---: | ---: |")
    for name, rows, reduction in weights:
        kb = blocks(reduction, BLOCK)
        # tma-aligned on the per-row shape too: the same scales moved without the packing
        for layout, per_row in [(lay, lay in PER_ROW) for lay in LAYOUTS] + [("tma-aligned", True)]:
            mn = rows if per_row else blocks(rows, BLOCK)
            codes = rng.integers(100, 140, (EXPERTS, mn, kb), dtype=np.uint8)
            s = e8m0_values(codes)  # powers of two: every layout takes them
            buf = to_physical(s, layout)
            assert np.array_equal(to_logical(buf, layout, mn, kb), s)
            put = _best(to_physical, (s, layout), args.repeats)
            get = _best(to_logical, (buf, layout, mn, kb), args.repeats)
            print(f"| {name} | {layout} | {s.shape} | {put * 1e3:.1f} | {get * 1e3:.1f} |")


if __name__ == "__main__":
    main()
