"""Whether two source trees judge alike, bit for bit: a fingerprint of every value the model
and the judge compute, for this tree and for ``--before PATH`` (run in a subprocess with
``PYTHONPATH=PATH``), on the same 60 problems (issue 26: a speed-up must not move one bit).

The problems cover both sides of float32's exact int8 range (K = 64, 1104, 2048), every
weight dtype (int8, int32 packed int4, bfloat16, float16), truncation, the clamp, masks, the
list form and the three memory layouts, a zero row and a tiny row; each is run under both
kernel profiles, both zero-row policies, with and without the envelope, in ideal mode, through
the row test's thresholds, the sound bound and ``compare`` (profile and ideal).

Run from the repository root::

    PYTHONPATH=$PWD python benchmarks/same_bits.py --before /tmp/before-tree

Prints ``same bits on N problems`` or each problem whose fingerprints differ, and exits 1
then. Not a timed test.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np


def _digest(*arrays: Any) -> str:
    m = hashlib.sha256()
    for a in arrays:
        if a is None:
            m.update(b"none")
            continue
        a = np.ascontiguousarray(a)
        m.update(str(a.dtype).encode())
        m.update(a.tobytes())
    return m.hexdigest()[:12]


def _configs() -> Iterator[tuple[Any, str]]:
    from spec import OpConfig

    for k, i in ((64, 32), (1104, 96), (2048, 64)):
        for w in ("int8", "bfloat16", "float16", "int32"):
            x = "float16" if w == "float16" else "bfloat16"
            shape = {"hidden": k, "intermediate": i, "x_dtype": x, "weight_dtype": w}
            extras: list[dict[str, Any]] = [
                {}, {"max_output_size": 9, **({"swiglu_limit": 7.0} if w == "int8" else {})},
                {"masked": True} if w == "int8" else {}]
            for extra in extras:
                yield OpConfig(ep_size=2, experts_per_rank=3, top_k=3, tokens_per_rank=(5, 4),
                               **shape, **extra), "contiguous"
            small = {"ep_size": 2, "experts_per_rank": 2, "top_k": 2, "tokens_per_rank": (3, 2)}
            yield OpConfig(**small, **shape, weight_form="list"), "fortran"
            yield OpConfig(**small, **shape), "strided"


def fingerprints() -> list[str]:
    """One line per problem: its fingerprints, in a fixed order."""
    from oracle.bounds import ideal_tolerance
    from oracle.rowtest import row_thresholds

    import oracle
    from oracle import Numerics
    from spec import random_problem

    lines = []
    for n, (cfg, layout) in enumerate(_configs()):
        p = random_problem(cfg, seed=n, layout=layout)
        if n % 3 == 0:  # a zero row and a tiny row
            xs = [r.x.copy() for r in p.ranks]
            xs[0][0] = 0
            xs[0][1] = xs[0][1] * np.asarray(1e-30).astype(xs[0].dtype)
            p = random_problem(cfg, seed=n, layout=layout, x=xs)
        out = [_digest(p.ranks[0].w1[0], p.ranks[1].x)]
        w4a8 = cfg.weight_dtype == "int32"
        for kernel in ("ascend-a3",) if w4a8 else ("ascend-a3", "vllm-triton"):
            for zero_rows in ("zero", "nan"):
                for envelope in (False, True):
                    r = oracle.run(p, numerics=Numerics(kernel=kernel, zero_rows=zero_rows),
                                   envelope=envelope)
                    out.append(_digest(*[a for rr in r.ranks for a in (rr.out, rr.out_lo,
                                                                       rr.out_hi)],
                                       *r.trace.y, *r.trace.combined))
            if w4a8:  # no ideal mode for W4A8
                continue
            ideal = oracle.run(p, numerics=Numerics("ideal", kernel=kernel))
            out.append(_digest(*ideal.trace.y, *ideal.trace.combined))
            rows = row_thresholds(p, ideal,
                                  Numerics(kernel=kernel).profile.ideal_assumptions(cfg.x_dtype))
            out.append(_digest(*rows.threshold, *rows.direction))
            own = [(rr.out, rr.expert_token_nums) for rr in oracle.run(p, numerics=kernel).ranks]
            for mode in (kernel, "ideal"):
                v = oracle.compare(p, own, numerics=mode)
                out.append(f"{v.stage}:{v.ratio!r}")
        if not w4a8:
            out.append(_digest(*ideal_tolerance(p, oracle.run(p, numerics="ideal"))))
        lines.append(f"{n} {cfg.summary()} {layout}: {' '.join(out)}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", metavar="PATH", help="the source tree to compare with")
    parser.add_argument("--print", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.print or not args.before:
        print("\n".join(fingerprints()))
        return 0
    env = {**os.environ, "PYTHONPATH": os.path.abspath(args.before)}
    before = subprocess.run([sys.executable, os.path.abspath(__file__), "--print"], env=env,
                            cwd=args.before, check=True, capture_output=True,
                            text=True).stdout.splitlines()
    after = fingerprints()
    differ = [f"before: {b}\nafter:  {a}" for b, a in zip(before, after) if a != b]
    if len(before) != len(after):
        differ.append(f"{len(before)} problems before, {len(after)} after")
    print("\n".join(differ) if differ else f"same bits on {len(after)} problems")
    return 1 if differ else 0


if __name__ == "__main__":
    raise SystemExit(main())
