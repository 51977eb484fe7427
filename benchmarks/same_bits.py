"""Whether two source trees judge alike: every value the kernel profiles' model computes, bit
for bit, and every judge-internal value (the ideal model's ``y*`` and ``out*``, the row test's
thresholds and directions, the sound bound) within 1e-6 relative, with the same verdicts (stage,
and ratio within 1e-6 relative), for this tree and for ``--before PATH`` (run in a subprocess
with ``PYTHONPATH=PATH``), on the same 60 problems (issue 26: a speed-up must not move a
profile's output by one bit, nor a verdict; the judge's own float64 and float32 sums may be
re-blocked, which moves their last bits: ``benchmarks/PRODUCTION_SHAPES.md``). The row test's
thresholds, float32 evaluations, may move within ``γ_{K+N}``; the sound bound may tighten by
up to :data:`TIGHTENING` (and the ideal-mode ratios, error over the bound, move with it), never
widen beyond ``γ_{K+N}``; the verdicts' stages never move.

The problems cover both sides of float32's exact int8 range (K = 64, 1104, 2048), every
weight dtype (int8, int32 packed int4, bfloat16, float16), truncation, the clamp, masks, the
list form and the three memory layouts, a zero row and a tiny row; each is run under both
kernel profiles, both zero-row policies, with and without the envelope, in ideal mode, through
the row test's thresholds, the sound bound and ``compare`` (profile and ideal).

Run from the repository root::

    PYTHONPATH=$PWD python benchmarks/same_bits.py --before /tmp/before-tree

Prints ``same bits and verdicts on N problems`` with the largest moves, or each problem and
value that differs, and exits 1 then. Not a timed test.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
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


#: How far a float64 value of the ideal model (or a verdict's ratio) may move, relative. The
#: row test's thresholds and directions are evaluated on float32 BLAS, whose error they
#: carry (the row test widens by ``1 + γ_{K+N}``, ``oracle.judge.rowtest`` "Budget"): they
#: may move by ``γ_{K+N}`` relative.
RELATIVE = 1e-6
#: The sound bound (``ideal tolerance``) may grow by ``γ_{K+N}`` relative and shrink by this
#: much, and the ideal-mode verdicts' ratios (error over the bound) move accordingly: a worst
#: case built from the problem's own values tightens when those values are evaluated more
#: accurately. Since stop 3 of ``benchmarks/PRODUCTION_SHAPES.md`` its ``h*`` and ``y*`` are
#: the float64 ideal's (``oracle.judge.bounds`` "Evaluation"), no longer float32 products
#: carrying ``γ32_n`` of their own: up to 2.4 % tighter where a GEMM's output cancels.
TIGHTENING = 0.05


def fingerprints() -> list[dict[str, Any]]:
    """Per problem, in a fixed order: ``str`` values (digests of what must stay bit for bit,
    verdicts' stages) and float64 arrays (judge-internal values, verdicts' ratios)."""
    import oracle
    from oracle import Numerics
    from oracle.judge.bounds import ideal_tolerance
    from oracle.judge.rowtest import row_thresholds
    from spec import random_problem

    problems = []
    for n, (cfg, layout) in enumerate(_configs()):
        p = random_problem(cfg, seed=n, layout=layout)
        if n % 3 == 0:  # a zero row and a tiny row
            xs = [r.x.copy() for r in p.ranks]
            xs[0][0] = 0
            xs[0][1] = xs[0][1] * np.asarray(1e-30).astype(xs[0].dtype)
            p = random_problem(cfg, seed=n, layout=layout, x=xs)
        out: dict[str, Any] = {"name": f"{n} {cfg.summary()} {layout}",
                               "problem": _digest(p.ranks[0].w1[0], p.ranks[1].x),
                               "row widening": np.array([_gamma32(cfg.hidden
                                                                  + 2 * cfg.intermediate)]),
                               "underflow": np.array([(cfg.hidden + 2 * cfg.intermediate)
                                                      * 2.0**-149])}
        w4a8 = cfg.weight_dtype == "int32"
        for kernel in ("ascend-a3",) if w4a8 else ("ascend-a3", "vllm-triton"):
            for zero_rows in ("zero", "nan"):
                for envelope in (False, True):
                    r = oracle.run(p, numerics=Numerics(kernel=kernel, zero_rows=zero_rows),
                                   envelope=envelope)
                    out[f"{kernel} {zero_rows} envelope={envelope}"] = _digest(
                        *[a for rr in r.ranks for a in (rr.out, rr.out_lo, rr.out_hi)],
                        *r.trace.y, *r.trace.combined)
            if w4a8:  # no ideal mode for W4A8
                continue
            ideal = oracle.run(p, numerics=Numerics("ideal", kernel=kernel))
            out[f"{kernel} ideal y*"] = np.concatenate([y.reshape(-1) for y in ideal.trace.y])
            out[f"{kernel} ideal out*"] = np.concatenate(
                [c.reshape(-1) for c in ideal.trace.combined])
            rows = row_thresholds(p, ideal,
                                  Numerics(kernel=kernel).profile.ideal_assumptions(cfg.x_dtype))
            out[f"{kernel} row thresholds"] = np.concatenate(rows.threshold)
            out[f"{kernel} row directions"] = np.concatenate(
                [d.reshape(-1) for d in rows.direction])
            own = [(rr.out, rr.expert_token_nums) for rr in oracle.run(p, numerics=kernel).ranks]
            for mode in (kernel, "ideal"):
                v = oracle.compare(p, own, numerics=mode)
                out[f"{kernel} compare {mode} stage"] = v.stage
                out[f"{kernel} compare {mode} ratio"] = np.array([v.ratio])
        if not w4a8:
            out["ideal tolerance"] = np.concatenate(
                [t.reshape(-1) for t in ideal_tolerance(p, oracle.run(p, numerics="ideal"))])
        problems.append(out)
    return problems


def _gamma32(n: int) -> float:
    return n * 2.0**-24 / (1 - n * 2.0**-24)


def _moved(before: Any, after: Any) -> float | None:
    """How far an array moved, relative (``None`` if its shape, or where it is NaN or
    infinite, changed)."""
    if before.shape != after.shape:
        return None
    special = ~np.isfinite(before)
    if not np.array_equal(special, ~np.isfinite(after)) or not np.array_equal(
            before[special], after[special], equal_nan=True):
        return None
    b, a = before[~special], after[~special]
    scale = np.maximum(np.abs(b), np.abs(a))
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(a == b, 0.0, np.abs(a - b) / scale)
    return float(rel.max(initial=0.0))


def _bound_moved(before: Any, after: Any, grow: float, floor: float) -> float | None:
    """How far the bound shrank, relative (``None`` if it grew by more than ``grow`` relative
    plus ``floor``, or its shape or non-finite values changed). ``floor``: the bound's own
    allowance for products that underflow float32 (``n·η32``, :mod:`oracle.judge.bounds`),
    within which a float32 and a float64 evaluation of a bound below float32's normal range
    may differ: a tiny row's bound of 3.3e-40 moves 2.8e-5 relative, 1e-44 absolute, between
    the NumPy and the torch backends."""
    if _moved(before, after) is None:
        return None
    finite = np.isfinite(before) & (before > 0)
    b, a = before[finite], after[finite]
    if (a > b * (1 + grow) + floor).any():
        return None
    return float(((b - a) / b).max(initial=0.0))


def differences(before: list[dict[str, Any]],
                after: list[dict[str, Any]]) -> tuple[list[str], dict[str, float]]:
    """Every value that differs beyond what is allowed, and the largest move of each kind
    (row test, float64 values and ratios, the bound and the ideal-mode ratios) as a fraction
    of what is allowed."""
    differ, largest = [], {"row": 0.0, "float64": 0.0, "bound": 0.0}
    if len(before) != len(after):
        differ.append(f"{len(before)} problems before, {len(after)} after")
    for b, a in zip(before, after):
        for key in sorted((b.keys() | a.keys()) - {"underflow"}):
            if key not in a or key not in b:
                differ.append(f"{a.get('name', b['name'])}: {key} only on one side")
            elif isinstance(b[key], str) or isinstance(a[key], str):
                if b[key] != a[key]:
                    differ.append(f"{a['name']}: {key}: {b[key]} before, {a[key]} after")
            elif key == "ideal tolerance":
                moved = _bound_moved(b[key], a[key], float(a["row widening"][0]),
                                     float(a.get("underflow", [0.0])[0]))
                if moved is None or moved > TIGHTENING:
                    differ.append(f"{a['name']}: the bound shrank by {moved} relative (allowed "
                                  f"{TIGHTENING:g}; None: it grew by more than γ_(K+N), or "
                                  "its shape or non-finite values changed)")
                else:
                    largest["bound"] = max(largest["bound"], moved / TIGHTENING)
            else:
                moved = _moved(b[key], a[key])
                kind = "row" if " row " in key else "float64"
                allowed = float(a["row widening"][0]) if kind == "row" else RELATIVE
                if key.endswith("compare ideal ratio"):  # error over the bound
                    kind, allowed = "bound", TIGHTENING / (1 - TIGHTENING)
                if moved is None or moved > allowed:
                    differ.append(f"{a['name']}: {key} moved {moved} relative (allowed "
                                  f"{allowed:.3g}; None: shape or non-finite values changed)")
                elif kind != "bound":
                    largest[kind] = max(largest[kind], moved / allowed)
    return differ, largest


def _save(problems: list[dict[str, Any]], path: str) -> None:
    arrays = {f"{n}/{key}": np.asarray(value) for n, p in enumerate(problems)
              for key, value in p.items()}
    np.savez(path, **arrays)


def _load(path: str) -> list[dict[str, Any]]:
    problems: list[dict[str, Any]] = []
    with np.load(path, allow_pickle=False) as data:
        for name in data.files:
            n, key = name.split("/", 1)
            while len(problems) <= int(n):
                problems.append({})
            value = data[name]
            problems[int(n)][key] = str(value) if value.dtype.kind == "U" else value
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", metavar="PATH", help="the source tree to compare with")
    parser.add_argument("--save", metavar="NPZ", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.save or not args.before:
        problems = fingerprints()
        if args.save:
            _save(problems, args.save)
        else:
            print("\n".join(f"{p['name']}: {len(p) - 1} values" for p in problems))
        return 0
    # the tree first; the rest of PYTHONPATH stays (e.g. a --target folder of wheels)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [os.path.abspath(args.before), *filter(None, [os.environ.get("PYTHONPATH")])])}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "before.npz")
        subprocess.run([sys.executable, os.path.abspath(__file__), "--save", path], env=env,
                       cwd=args.before, check=True)
        before = _load(path)
    differ, largest = differences(before, fingerprints())
    print("\n".join(differ) if differ else
          f"same bits and verdicts on {len(before)} problems; largest moves, as fractions of "
          f"what is allowed: row test {largest['row']:.3g} (of γ_(K+N)), float64 values "
          f"and ratios {largest['float64']:.3g} (of {RELATIVE:g}), the bound's tightening "
          f"{largest['bound']:.3g} (of {TIGHTENING:g})")
    return 1 if differ else 0


if __name__ == "__main__":
    raise SystemExit(main())
