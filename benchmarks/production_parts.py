"""The parts of issue 26's third stop, each timed against the tree before it in one process,
alternating (best of ``--repeat``): the exact int8 GEMM of one expert's W1 and W2 at the
DeepSeek-V3 shape (16 rows), the row test's tie shift (16 bf16 rows of the dsv3 problem and
their ties through W1) and the int8 draw of one rank's W1. The before tree's modules are
loaded from ``--before PATH`` under other names (``spec/synth.py`` and
``oracle/model/arithmetic.py`` whole, ``_tie_shift`` from ``oracle/judge/rowtest.py``
alone); every pair's results are checked equal (the tie shift's within float32 rounding).

Run from the repository root::

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/production_parts.py \\
        --before /tmp/perf2-before

Not a timed test.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np


def _module(path: str, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _function(path: str, name: str, following: str) -> Callable[..., Any]:
    """The source of ``def name`` up to ``def following``, executed alone (NumPy only)."""
    with open(path, encoding="utf-8") as f:
        src = f.read()
    space: dict[str, Any] = {"np": np, "Array": Any}
    exec(src[src.index(f"def {name}("):src.index(f"def {following}(")], space)
    return space[name]  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", metavar="PATH", required=True)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    from oracle.judge import rowtest
    from oracle.model import arithmetic
    from spec import OpConfig, random_problem
    from spec.synth import int8_uniform

    old_arith = _module(os.path.join(args.before, "oracle/model/arithmetic.py"), "before_arith")
    old_synth = _module(os.path.join(args.before, "spec/synth.py"), "before_synth")
    old_tie = _function(os.path.join(args.before, "oracle/judge/rowtest.py"), "_tie_shift",
                        "_activation_ties")
    rng = np.random.default_rng(0)
    w1 = rng.integers(-128, 128, size=(7168, 4096), dtype=np.int8)
    w2 = rng.integers(-128, 128, size=(2048, 7168), dtype=np.int8)
    q1 = rng.integers(-127, 128, size=(16, 7168)).astype(np.float32)
    q2 = rng.integers(-127, 128, size=(16, 2048)).astype(np.float32)
    cfg = OpConfig(ep_size=8, experts_per_rank=4, top_k=8, hidden=7168, intermediate=64,
                   tokens_per_rank=(8,) * 8)
    x = np.concatenate([r.x for r in random_problem(cfg, seed=0).ranks]).astype(np.float32)[:16]
    ties = rowtest._activation_ties(x, np.abs(x).max(axis=1))
    c = np.where(ties, np.float32(0.7), np.float32(0))
    cases: dict[str, tuple[Callable[[], Any], Callable[[], Any]]] = {
        "exact int8 GEMM, W1 7168 x 4096, 16 rows": (
            lambda: old_arith.exact_int_matmuls(w1, (q1, False, 127)),
            lambda: arithmetic.exact_int_matmuls(w1, (q1, False, 127))),
        "exact int8 GEMM, W2 2048 x 7168, 16 rows": (
            lambda: old_arith.exact_int_matmuls(w2, (q2, False, 127)),
            lambda: arithmetic.exact_int_matmuls(w2, (q2, False, 127))),
        f"tie shift through W1, 16 rows ({int(ties.sum())} ties)": (
            lambda: old_tie(c, w1, None), lambda: rowtest._tie_shift(c, w1, None)),
        "int8 draw of one rank's W1 (117 M values)": (
            lambda: old_synth.int8_uniform(np.random.default_rng(1), (4, 7168, 4096)),
            lambda: int8_uniform(np.random.default_rng(1), (4, 7168, 4096))),
    }
    print("| part | before | after | speed-up |\n|---|---|---|---|")
    for name, (before, after) in cases.items():
        a, b = np.asarray(before()), np.asarray(after())
        if name.startswith("tie"):
            np.testing.assert_allclose(b, a, rtol=7168 * 2.0**-23)
        else:
            assert np.array_equal(a, b), name
        best = [np.inf, np.inf]
        for _ in range(args.repeat):
            for j, fn in enumerate((before, after)):
                start = time.perf_counter()
                fn()
                best[j] = min(best[j], time.perf_counter() - start)
        print(f"| {name} | {best[0] * 1e3:.0f} ms | {best[1] * 1e3:.0f} ms | "
              f"{best[0] / best[1]:.2g}x |", flush=True)


if __name__ == "__main__":
    main()
