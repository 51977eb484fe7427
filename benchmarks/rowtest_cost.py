"""What the row test's thresholds cost (``oracle.judge.rowtest.row_thresholds``) against the
same function at another git revision, in one process, alternating (best of ``--repeat``):
at K = 7168, I = 2048 (EP 2 x 4, top_k 8, 8 tokens per rank, bf16 x), for W8A8 and
fp8_channel weights (``benchmarks/ideal_power.py``'s problems, seed 0). The two revisions'
thresholds are also compared: the largest relative change of a tested row's threshold.

Run from the repository root::

    PYTHONPATH=$PWD python benchmarks/rowtest_cost.py --before ac7a3a5 [--repeat 4]

Not a timed test.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import oracle
from oracle.judge import rowtest
from spec import OpConfig

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1] / "tests")]
from fp8_power import rowtest_at  # noqa: E402
from ideal_power import problem_with  # noqa: E402

FORMATS: dict[str, dict[str, Any]] = {
    "w8a8": {},
    "fp8_channel": {"weight_dtype": "float8_e4m3fn", "scale_dims": 1},
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--before", metavar="REV", required=True)
    parser.add_argument("--repeat", type=int, default=4)
    args = parser.parse_args(argv)
    before = rowtest_at(args.before)
    for name, fields in FORMATS.items():
        cfg = OpConfig(ep_size=2, experts_per_rank=4, top_k=8, hidden=7168, intermediate=2048,
                       tokens_per_rank=(8, 8), **fields)
        problem = problem_with(cfg, 0)
        ideal = oracle.run(problem, numerics="ideal")
        best = {"before": float("inf"), "after": float("inf")}
        out: dict[str, Any] = {}
        for _ in range(args.repeat):
            for tag, module in (("before", before), ("after", rowtest)):
                start = time.perf_counter()
                out[tag] = module.row_thresholds(problem, ideal)
                best[tag] = min(best[tag], time.perf_counter() - start)
        old, new = (np.concatenate(out[t].threshold) for t in ("before", "after"))
        both = np.isfinite(old) & np.isfinite(new)
        change = float(np.abs(new[both] / old[both] - 1).max()) if both.any() else 0.0
        print(f"{name}: row_thresholds best of {args.repeat}: {args.before} "
              f"{best['before']:.3f} s, this tree {best['after']:.3f} s, ratio "
              f"{best['after'] / best['before']:.2f}; tested rows {int(both.sum())} of "
              f"{both.size}, thresholds moved by at most {change:.1%}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
