"""The judge at production shapes (issue 26): what one gate example costs the oracle at a
DeepSeek-V3-like call, as multiples of a plain float64 GEMM of the same FLOPs.

Shapes: EP 8 x 4 experts, top-8, 64 tokens (8 per rank), I from ``spec.limits.REAL_MODELS``:
``dsv3`` (K = 7168, I = 2048) and ``mid`` (K = 1024, I = 512). Timed per shape, best of
``--repeat`` (the machine is shared: the minimum is the fair estimate):

- ``synthesis``: ``spec.random_problem`` (seeded bulk values);
- ``run`` / ``run ideal``: ``oracle.run`` faithful (ascend-a3) and ideal;
- ``compare own``: ``oracle.compare`` (faithful) on the model's own output;
- ``compare 1 changed``: the same output with one value moved one ulp of bf16 (the verdict
  needs the envelope and the row test);
- ``compare ideal``: ``oracle.compare(numerics="ideal")`` on the model's own output (sound
  bound and row test).

Each is printed as seconds and as ratios of two float64 floors measured in the same process:
the issue's floor, one ``(R, K) @ (K, 2I)`` and one ``(R, I) @ (I, K)`` GEMM for all ``R``
rows, and the per-expert floor, the same FLOPs as the MoE does them (each expert's rows through
its own weights, already in float64): at 16 rows per expert the weights are read once per
expert, which the one-GEMM floor never pays.

``--before PATH`` first runs this same script in a subprocess against another source tree
(``PYTHONPATH=PATH``, e.g. an older commit unpacked with ``git archive``) and prints both
tables side by side; the verdicts (stage of every compare) must agree. The subprocess always
takes the NumPy GEMMs (``DFC_GEMM`` unset).

``--gemm torch`` times this tree with ``DFC_GEMM=torch`` (:mod:`oracle.adapters.gemm`: the
model's and the judge's weight GEMMs in float64 on ``DFC_GEMM_DEVICE``, cuda where torch
sees one). On a GPU machine, the NumPy and torch backends side by side, one command::

    PYTHONPATH=$PWD python benchmarks/production_shapes.py --gemm torch --before $PWD

Run from the repository root::

    PYTHONPATH=$PWD python benchmarks/production_shapes.py [--shape dsv3 mid] [--repeat 2]
        [--before /tmp/before-tree] [--gemm numpy|torch] [--variant w8a8 bf16 ...]
        [--steps synthesis ...] [--ep 8]

``--variant`` names gate variants (``spec.fields.GATE_VARIANTS``: each at its first x
dtype); ``--steps synthesis`` times the synthesis alone and prints one row per shape and
variant, wall and CPU seconds (``time.process_time``: every thread's, the figure a loaded
machine moves least), no floors.

Not a timed test.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

SHAPES = {"dsv3": (7168, 2048), "mid": (1024, 512)}  # K: I (spec.limits.REAL_MODELS)
STEPS = ("synthesis", "run", "run ideal", "compare own", "compare 1 changed", "compare ideal")


def _best(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    """The fastest of ``repeat`` calls and the last call's value."""
    best, value = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - start)
    return best, value


def _floor(k: int, i: int, rows: int, repeat: int) -> float:
    """A plain float64 GEMM of the FFN's FLOPs: ``(R, K) @ (K, 2I)`` and ``(R, I) @ (I, K)``
    (as ``benchmarks/power.py``). Measured before and after the steps; the smaller counts."""
    rng = np.random.default_rng(0)
    a, w1 = rng.standard_normal((rows, k)), rng.standard_normal((k, 2 * i))
    h, w2 = rng.standard_normal((rows, i)), rng.standard_normal((i, k))
    return _best(lambda: (a @ w1, h @ w2), max(repeat, 5))[0]


def _expert_floor(k: int, i: int, rows: list[int], repeat: int) -> float:
    """The same FLOPs as the MoE does them: per expert, its own rows through a float64 GEMM
    of weights already in float64 (one expert's weights stand for all: the cost is the same
    and 32 experts in float64 would need 11 GB). Skinny GEMMs read the weights once per
    expert; the one-GEMM floor reads them once in all."""
    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((k, 2 * i)), rng.standard_normal((i, k))
    xs = [(rng.standard_normal((m, k)), rng.standard_normal((m, i))) for m in rows if m]
    return _best(lambda: [(a @ w1, h @ w2) for a, h in xs], max(repeat, 3))[0]


def _move_inside_envelope(out: Any, want: Any) -> None:
    """Move one defined value of ``out`` one step up inside the profile's envelope: the
    verdict then needs the envelope and the row test (a value outside fails at once)."""
    up = (out.view(np.uint16) + np.where(out < 0, -1, 1).astype(np.uint16)).view(out.dtype)
    inside = want.defined[:, None] & (up.astype(np.float32) <= want.out_hi) & (out != 0)
    t, c = np.argwhere(inside)[0]
    out[t, c] = up[t, c]


def _config(shape: str, variant: str, ep: int = 8) -> Any:
    """The call at ``shape`` in the gate variant named ``variant`` (its first x dtype), on
    ``ep`` ranks of 4 experts and 8 tokens."""
    from spec import OpConfig
    from spec.fields import GATE_VARIANTS

    k, i = SHAPES[shape]
    gate: Any = next(g for g in GATE_VARIANTS if g.name == variant)
    if hasattr(gate, "selection"):  # the row's spec.fields.Selection, OpConfig's field names
        named = dataclasses.asdict(gate.selection)
    else:  # a --before tree older than the Selection record
        named = {"weight_dtype": gate.weight_dtype, "x_dtype": gate.x_dtypes[0],
                 "scale_dims": gate.scale_dims, "act_scheme": gate.act_scheme,
                 "activation_scales": gate.variant.activation_scales}
    return OpConfig(ep_size=ep, experts_per_rank=4, top_k=8, hidden=k, intermediate=i,
                    tokens_per_rank=(8,) * ep, **named)


def measure(shape: str, variant: str, repeat: int, steps: tuple[str, ...] = STEPS,
            ep: int = 8) -> dict[str, Any]:
    """Seconds of ``steps`` at ``shape`` (synthesis always), the floors, and every compare's
    verdict."""
    import oracle
    from spec import random_problem

    k, i = SHAPES[shape]
    cfg = _config(shape, variant, ep)
    if steps == ("synthesis",):  # seconds only: no floors
        cpu = []

        def synthesis() -> None:
            start = time.process_time()
            random_problem(cfg, seed=0)
            cpu.append(time.process_time() - start)

        seconds = _best(synthesis, repeat)[0]
        return {"shape": shape, "variant": variant, "seconds": {"synthesis": seconds},
                "cpu": min(cpu)}
    floor = _floor(k, i, cfg.total_slots, repeat)
    seconds: dict[str, float] = {}
    verdicts: dict[str, str] = {}
    seconds["synthesis"], problem = _best(lambda: random_problem(cfg, seed=0), repeat)
    seconds["run"], result = _best(lambda: oracle.run(problem), repeat)
    seconds["run ideal"], _ = _best(lambda: oracle.run(problem, numerics="ideal"), repeat)
    own = [(r.out, r.expert_token_nums) for r in result.ranks]
    changed = [(o.copy(), n) for o, n in own]
    _move_inside_envelope(changed[0][0], oracle.run(problem, envelope=True).ranks[0])
    for name, outs, numerics in (("compare own", own, "faithful"),
                                 ("compare 1 changed", changed, "faithful"),
                                 ("compare ideal", own, "ideal")):
        seconds[name], verdict = _best(
            lambda outs=outs, numerics=numerics: oracle.compare(problem, outs,
                                                                numerics=numerics), repeat)
        verdicts[name] = f"{verdict.stage} {verdict.ratio:.6g}"
    return _summary(shape, variant, cfg, problem, floor, repeat, seconds, verdicts)


def _summary(shape: str, variant: str, cfg: Any, problem: Any, floor: float, repeat: int,
             seconds: dict[str, float], verdicts: dict[str, str]) -> dict[str, Any]:
    """:func:`measure`'s record: the steps' seconds and verdicts, and both floors."""
    k, i = SHAPES[shape]
    rows = cfg.total_slots
    ids = np.concatenate([r.expert_idx.reshape(-1) for r in problem.ranks])
    per_expert = np.bincount(ids, minlength=cfg.num_experts).tolist()
    return {"shape": shape, "variant": variant, "summary": cfg.summary(), "rows": rows,
            "gemm": os.environ.get("DFC_GEMM") or "numpy",
            "gflop": 2 * rows * (k * 2 * i + i * k) / 1e9,
            "floor": min(floor, _floor(k, i, rows, repeat)),
            "expert_floor": _expert_floor(k, i, per_expert, repeat),
            "seconds": seconds, "verdicts": verdicts}


def _before(path: str, argv: list[str]) -> list[dict[str, Any]]:
    """This script's measurements against the source tree at ``path``, in a subprocess."""
    env = {key: value for key, value in os.environ.items() if key != "DFC_GEMM"}
    # the tree first; the rest of PYTHONPATH stays (e.g. a --target folder of wheels)
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.abspath(path), *filter(None, [os.environ.get("PYTHONPATH")])])
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--json", *argv],
                          env=env, cwd=path, check=True, capture_output=True, text=True)
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def _cell(m: dict[str, Any], step: str) -> str:
    t = m["seconds"][step]
    return f"{t:.3g} s, {t / m['floor']:.2g}x, {t / m['expert_floor']:.2g}x"


def render(after: list[dict[str, Any]], before: list[dict[str, Any]] | None) -> str:
    if all("floor" not in m for m in after):  # synthesis only: one row per shape and variant
        lines = ["cells: wall seconds (CPU seconds of all threads), best of --repeat each",
                 "| shape | variant | " + ("before | after | before / after (wall, CPU) |"
                                          if before else "synthesis |"),
                 "|---|---|---|" + ("---|---|" if before else "")]
        for n, m in enumerate(after):
            t, c = m["seconds"]["synthesis"], m["cpu"]
            cells = [f"{t:.3g} s ({c:.3g} s)"]
            if before:
                b, bc = before[n]["seconds"]["synthesis"], before[n]["cpu"]
                cells = [f"{b:.3g} s ({bc:.3g} s)", cells[0], f"{b / t:.3g}x, {bc / c:.3g}x"]
            lines.append(f"| {m['shape']} | {m['variant']} | {' | '.join(cells)} |")
        return "\n".join(lines)
    lines = []
    for n, m in enumerate(after):
        b = before[n] if before else None
        gemms = (f"GEMMs: {b.get('gemm', 'numpy')} before, {m['gemm']} after" if b
                 else f"GEMMs: {m['gemm']}")
        lines.append(f"\n{m['shape']} ({m['summary']}): {m['rows']} rows, {m['gflop']:.3g} GFLOP, "
                     f"float64 GEMM floor {m['floor']:.3g} s, per-expert floor "
                     f"{m['expert_floor']:.3g} s"
                     + (f" (before's process: {b['floor']:.3g} s, {b['expert_floor']:.3g} s)"
                        if b else "")
                     + f"; {gemms}; cells: seconds, x floor, x per-expert floor")
        head = "| step | before | after | verdict |" if b else "| step | this tree | verdict |"
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for step in (s for s in STEPS if s in m["seconds"]):
            verdict = m["verdicts"].get(step, "")
            if b and verdict and b["verdicts"].get(step) != verdict:
                verdict += f" (before: {b['verdicts'].get(step)})"
            cells = ([_cell(b, step)] if b else []) + [_cell(m, step)]
            lines.append(f"| {step} | {' | '.join(cells)} | {verdict} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--variant", nargs="+", default=["w8a8"],
                        help="gate variants (spec.fields.GATE_VARIANTS names: w8a8 bf16 fp16 "
                             "fp8_block ...)")
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS),
                        help="the steps timed (synthesis always)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--before", metavar="PATH",
                        help="also time the source tree at PATH (same script, a subprocess)")
    parser.add_argument("--gemm", choices=("numpy", "torch"), default=None,
                        help="the GEMM backend of this tree (sets DFC_GEMM; default: as set)")
    parser.add_argument("--ep", type=int, default=8,
                        help="ranks of the call (8; --ep 1 --steps synthesis: one rank's draw)")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.gemm:
        os.environ["DFC_GEMM"] = args.gemm
    steps = tuple(s for s in STEPS if s in args.steps or s == "synthesis")
    argv = ["--shape", *args.shape, "--variant", *args.variant, "--repeat", str(args.repeat),
            "--steps", *steps, "--ep", str(args.ep)]
    before = _before(args.before, argv) if args.before else None
    after = []
    for shape, variant in ((s, v) for s in args.shape for v in args.variant):
        after.append(measure(shape, variant, args.repeat, steps, args.ep))
        if args.json:
            print(json.dumps(after[-1]), flush=True)
    if not args.json:
        print(render(after, before))


if __name__ == "__main__":
    main()
