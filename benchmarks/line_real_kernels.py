"""The row test's three statistics on real GPU kernels at many rows (issues 25 and 26): torch's
FP8 grouped GEMM (``torch._scaled_grouped_mm``, fp8_channel, Hopper FP8 tensor-core
accumulation) and its BF16 one (``torch._grouped_mm``), through the drivers of
``tests/controls/gpu/``, judged under the ideal assumptions and under each kernel's profile.

"Rows in line" adds the rows' projections with their signs, so a coherent legitimate error
(a truncating FP8 accumulator's shrink, ``rowtest._truncation_shrink``) grows against its
limit like the square root of the rows; the gate's examples are small, so this script is
where a production batch meets it. Printed per call: the worst row's ``|s|/T``, the rows
together's ``sqrt(Q/q)``, the rows in line's ``|S|/limit``, the common relative error ``S/Σa``
and the line's limits below and above.

Run on a GPU machine from the repository root (the judge's GEMMs on the device)::

    DFC_GEMM=torch PYTHONPATH=$PWD python benchmarks/line_real_kernels.py \\
        [--shape 7168x2048x256 ...] [--seeds 2] [--device cuda]

(``KxIxT``: hidden, intermediate, tokens per rank; EP 2 x 4 experts, top-8). ``--device cpu``
runs the same drivers on torch's CPU kernels (no Hopper accumulation): a check of the script.
Not a timed test.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).parents[1]), str(Path(__file__).parents[1] / "tests")]

import oracle  # noqa: E402
from oracle.adapters.torch_io import implementation  # noqa: E402
from oracle.judge.rowtest import row_thresholds  # noqa: E402
from oracle.model.kernels import IdealAssumptions, get_kernel  # noqa: E402
from spec import OpConfig, random_problem  # noqa: E402

#: (gate name, the driver's module name in tests/controls/gpu, its profile, OpConfig fields)
KERNELS = (("fp8_channel", "scaled_grouped_mm", "torch-scaled-grouped-mm",
            {"weight_dtype": "float8_e4m3fn", "scale_dims": 1}),
           ("bf16", "grouped_mm", "torch-grouped-mm", {"weight_dtype": "bfloat16"}))


def report(problem: Any, impl: Any, profile: str) -> list[str]:
    """One line per judge (ideal, the profile's) for ``impl``'s output on ``problem``."""
    outs = [o for o, _ in impl(problem)]
    ideal = oracle.run(problem, numerics="ideal")
    lines = []
    for name, assumptions in (("ideal", IdealAssumptions()), (
            "profile", get_kernel(profile).ideal_assumptions(problem.config.x_dtype))):
        th = row_thresholds(problem, ideal, assumptions)
        v = th.judge(outs)
        rows = int(sum((a > 0).sum() for a in th.weight))
        lines.append(f"  {name}: {'ok' if v.ok else 'REJECTED'}, row {v.projection:.3g}, "
                     f"together {v.together:.3g}, in line {v.line:.3g}, common error "
                     f"{v.common:+.3g}, line limits -{th.line_limits[0]:.3g}/"
                     f"+{th.line_limits[1]:.3g}, rows {rows}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", nargs="+", default=["7168x2048x256", "7168x2048x64"])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    import importlib

    for shape in args.shape:
        k, i, t = (int(v) for v in shape.split("x"))
        for gate, module, profile, fields in KERNELS:
            moe = importlib.import_module(f"controls.gpu.{module}").moe
            for seed in range(args.seeds):
                cfg = OpConfig(ep_size=2, experts_per_rank=4, top_k=8, hidden=k,
                               intermediate=i, tokens_per_rank=(t, t), **fields)
                start = time.perf_counter()
                lines = report(random_problem(cfg, seed=seed),
                               implementation(moe, device=args.device), profile)
                print(f"{gate} K={k} I={i} rows={2 * t} seed={seed} "
                      f"({time.perf_counter() - start:.1f} s)", *lines, sep="\n", flush=True)


if __name__ == "__main__":
    main()
