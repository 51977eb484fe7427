"""Try to fool the gate: hostile implementations, invalid options, damaged files, lying outputs.

    python benchmarks/attacks.py            # this checkout
    PYTHONPATH=/old/checkout python benchmarks/attacks.py   # another one, for a before/after

Prints one row per category: attacks tried, clean reports (a failing report, or a usage error
with exit 2), tracebacks (or a harness killed without a report), false passes, hangs (no end
within the wall limit). Each implementation attack is one ``dfc-oracle check`` in a fresh
process, so nothing an attack does can end this script.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"
WALL = 90.0

PROCESS = ["exits_zero", "segfaults", "aborts", "null_pointer", "prints_and_dies",
           "holds_the_gil", "sys_exit", "leaves_a_thread"]
OUTPUTS = ["masked_nan", "out_raises", "unprintable_error", "appends_to_weights",
           "damages_the_problem"]


def run(argv: list[str], *, expect_pass: bool = False) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [p for p in (os.environ.get("PYTHONPATH"), str(TESTS)) if p])}
    try:
        done = subprocess.run([sys.executable, "-m", "oracle", *argv], capture_output=True,
                              text=True, timeout=WALL, cwd=TESTS, env=env)
    except subprocess.TimeoutExpired:
        return "hang"
    if "Traceback" in done.stderr or done.returncode not in (0, 1, 2):
        return "traceback"
    if done.returncode == 0:
        return "clean" if expect_pass else "false pass"
    if done.returncode == 1 and "does not conform" not in done.stdout:
        return "traceback"  # exit 1 without a report: the 'found' code for a crash
    return "clean"


def check(impl: str, *extra: str) -> list[str]:
    return ["check", impl, "--max-examples", "10", "--timeout", "3", "--save-dir",
            tempfile.mkdtemp(), *extra]


def library(code: str) -> str:
    """A snippet run in a fresh interpreter: prints CLEAN, PASS or raises (a traceback)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [p for p in (os.environ.get("PYTHONPATH"), str(TESTS)) if p])}
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=WALL, cwd=TESTS, env=env)
    except subprocess.TimeoutExpired:
        return "hang"
    if "CLEAN" in done.stdout:
        return "clean"
    if "PASS" in done.stdout:
        return "false pass"
    return "traceback"


def corruptions(n: int) -> Counter[str]:
    code = f"""
import random, tempfile, pathlib, numpy as np
import oracle
from oracle.files import counterexample
from spec import OpConfig, SpecError, random_problem
p = random_problem(OpConfig(ep_size=2, experts_per_rank=2, top_k=2, hidden=16, intermediate=8,
                            tokens_per_rank=(2, 1)), seed=3)
outs = [(r.out, r.expert_token_nums) for r in oracle.run(p).ranks]
d = pathlib.Path(tempfile.mkdtemp())
raw = counterexample.save(d / "ce.npz", p, outputs=outs).read_bytes()
rng = random.Random(0)
for i in range({n}):
    b = bytearray(raw)
    for _ in range(rng.randint(1, 4)):
        b[rng.randrange(len(b))] = rng.randrange(256)
    (d / "x.npz").write_bytes(bytes(b))
    try:
        counterexample.load(d / "x.npz"); print("OK")
    except SpecError:
        print("CLEAN")
    except BaseException as e:
        print("TRACE", type(e).__name__)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=600)
    lines = done.stdout.split("\n")
    return Counter({"clean": sum(x in ("CLEAN", "OK") for x in lines),
                    "traceback": sum(x.startswith("TRACE") for x in lines)})


def special_files() -> list[str]:
    root = Path(tempfile.mkdtemp())
    out = []
    for name, make in (("link-to-dev-zero", lambda p: p.symlink_to("/dev/zero")),
                       ("fifo", os.mkfifo)):
        path = root / f"{name}.npz"
        make(path)
        out.append(run(["explain", str(path)]))
    many = root / "many.npz"
    with zipfile.ZipFile(many, "w") as z:
        for i in range(100_000):
            z.writestr(f"m{i}.npy", b"")
    out.append(run(["explain", str(many)]))
    return out


OPTION_SNIPPETS = {
    "ulps=-1": "ulps=-1.0", "ulps=nan": "ulps=float('nan')", "timeout=0": "timeout=0",
    "timeout=nan": "timeout=float('nan')", "inputs='lenient'": "inputs='lenient'",
}


def option_attacks() -> list[str]:
    results = []
    for kwargs in OPTION_SNIPPETS.values():
        results.append(library(f"""
import broken_impls
from hypothesis import settings
from oracle.check.harness import check_implementation, ConformanceError
try:
    check_implementation(broken_impls.probs_ignored, save_dir=None, {kwargs},
                         settings=settings(max_examples=10, database=None, deadline=None))
    print("PASS")
except (ValueError,) as e:
    print("CLEAN" if "must" in str(e) else "TRACE")
except ConformanceError as e:
    print("CLEAN" if e.verdict.stage != "timeout" else "PASS")
"""))
    for argv in (["--max-examples", "0"], ["--timeout", "0"], ["--timeout", "nan"]):
        results.append(run(check("broken_impls:probs_ignored", *argv)))
    return results


INPUT_SNIPPETS = {
    "masked -1 ids": "x = r.expert_idx.copy(); x[0, 0] = -1; "
                     "r = dataclasses.replace(r, expert_idx=np.ma.masked_equal(x, -1))",
    "np.matrix x": "r = dataclasses.replace(r, x=np.asmatrix(r.x))",
}


def input_attacks() -> list[str]:
    results = []
    for edit in INPUT_SNIPPETS.values():
        results.append(library(f"""
import dataclasses, numpy as np
from spec import OpConfig, Problem, SpecError, random_problem
p = random_problem(OpConfig(ep_size=1, experts_per_rank=2, top_k=2, hidden=16, intermediate=8,
                            tokens_per_rank=(2,)), seed=0)
r = p.ranks[0]
{edit}
try:
    Problem([r]); print("PASS")
except SpecError:
    print("CLEAN")
"""))
    for kind in ("float8_e4m3fn", "meta", "sparse"):
        make = {"float8_e4m3fn": "torch.zeros(s, dtype=torch.float8_e4m3fn)",
                "meta": "torch.zeros(s, device='meta')", "sparse": "torch.zeros(s).to_sparse()"}
        results.append(library(f"""
import torch
from oracle.check.harness import evaluate
from spec import OpConfig, random_problem
p = random_problem(OpConfig(ep_size=1, experts_per_rank=2, top_k=2, hidden=16, intermediate=8,
                            tokens_per_rank=(2,)), seed=0)
def impl(problem):
    s = (2, 16)
    return [({make[kind]}, torch.zeros(2, dtype=torch.int32))]
v, _ = evaluate(impl, p)
print("CLEAN" if not v.ok else "PASS")
"""))
    return results


def main() -> None:
    rows = {
        "process (exit, signal, GIL hang, threads)": [
            run(check(f"hostile_impls:{n}"), expect_pass=n == "leaves_a_thread") for n in PROCESS],
        "outputs and inputs writes (in the gate)": [run(check(f"hostile_impls:{n}"),
                                                        expect_pass=n == "damages_the_problem")
                                                    for n in OUTPUTS],
        "numpy.seterr at import": [run(check("hostile_import_seterr:dispatch_ffn_combine"),
                                       expect_pass=True)],
        "options": option_attacks(),
        "inputs and torch outputs": input_attacks(),
        "special files (link, FIFO, 100k members)": special_files(),
    }
    print("| category | attacks | clean | tracebacks / no report | false passes | hangs |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, results in rows.items():
        c = Counter(results)
        print(f"| {name} | {len(results)} | {c['clean']} | {c['traceback']} | "
              f"{c['false pass']} | {c['hang']} |")
    c = corruptions(1000)
    print(f"| 1000 byte corruptions of a counterexample | 1000 | {c['clean']} | "
          f"{c['traceback']} | 0 | 0 |")


if __name__ == "__main__":
    main()
