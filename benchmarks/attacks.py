"""Try to fool the gate: hostile implementations, invalid options, damaged files, lying outputs.

    python benchmarks/attacks.py            # this checkout
    PYTHONPATH=/old/checkout python benchmarks/attacks.py   # another one, for a before/after

Prints one row per category: attacks tried, clean reports (a failing report, or a usage error
with exit 2), tracebacks (or a harness killed without a report), false passes, hangs (no end
within the wall limit, or a process that outlives the command), files lost (an earlier
counterexample truncated, a link's target overwritten, a file misplaced), and the totals. Each
implementation attack is one ``dfc-oracle check`` in a fresh process, so nothing an attack does
can end this script.
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


def library(code: str, *, lost: str = "", keep_output: bool = False) -> str:
    """A snippet run in a fresh interpreter: prints CLEAN, PASS, ``lost`` (a file lost) or
    raises (a traceback). ``keep_output``: return its stdout instead (for set-up snippets)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [p for p in (os.environ.get("PYTHONPATH"), str(TESTS)) if p])}
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=WALL, cwd=TESTS, env=env)
    except subprocess.TimeoutExpired:
        return "hang"
    if keep_output:
        return done.stdout
    if lost and lost in done.stdout:
        return "lost"
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


# --- Round 2 (issue 23) ---------------------------------------------------------------------


def saving() -> list[str]:
    """Each snippet prints CLEAN when no file was lost (an earlier file whole, a planted link's
    target untouched, the file where it was asked) and the report is complete, LOST otherwise."""
    setup = """
import errno, os, pathlib, subprocess, sys, tempfile, numpy as np
import broken_impls, oracle
from hypothesis import settings, strategies as st
from oracle.files.counterexample import load, save
from oracle.check.harness import check_implementation, ConformanceError
from spec import OpConfig, random_problem
P = random_problem(OpConfig(ep_size=2, experts_per_rank=2, top_k=2, hidden=16, intermediate=8,
                            tokens_per_rank=(2, 1)), seed=3)
ONE = dict(problems=st.just(P), settings=settings(max_examples=1, database=None, deadline=None),
           isolate=False)
d = pathlib.Path(tempfile.mkdtemp())
def found(**kw):
    try:
        check_implementation(broken_impls.probs_ignored, **ONE, **kw)
    except ConformanceError as e:
        return e
"""
    snippets = {
        "disk full mid-save": """
first = found(save_dir=d); before = first.path.read_bytes()
real = np.savez_compressed
def full(f, **a):
    f.write(b"x" * 1000); raise OSError(errno.ENOSPC, "No space left on device")
np.savez_compressed = full
again = found(save_dir=d)
print("CLEAN" if first.path.read_bytes() == before and "NOT saved" in again.report else "LOST")
""",
        "two processes, one name": """
code = ("import sys; from oracle.files.counterexample import save; "
        "from spec import OpConfig, random_problem; "
        "p = random_problem(OpConfig(ep_size=2, experts_per_rank=2, top_k=2, hidden=16, "
        "intermediate=8, tokens_per_rank=(2, 1)), seed=int(sys.argv[1])); "
        "[save(sys.argv[2], p) for _ in range(10)]")
bad = 0
for round in range(5):
    procs = [subprocess.Popen([sys.executable, "-c", code, str(s), str(d / "same.npz")])
             for s in (1, 2)]
    [p.wait() for p in procs]
    try:
        load(d / "same.npz")
    except Exception:
        bad += 1
print("CLEAN" if bad == 0 else "LOST")
""",
        "link planted at the name": """
first = found(save_dir=d); precious = d / "precious"; precious.write_bytes(b"keep")
first.path.unlink(); first.path.symlink_to(precious)
again = found(save_dir=d)
print("CLEAN" if precious.read_bytes() == b"keep" and "NOT saved" in again.report else "LOST")
""",
        "save directory cannot be created": """
(d / "file").write_bytes(b"")
try:
    found(save_dir=d / "file" / "sub"); print("LOST")
except ValueError as e:
    print("CLEAN" if "save_dir" in str(e) else "LOST")
""",
        "chdir inside the implementation": """
os.chdir(d); (d / "elsewhere").mkdir()
def moves(problem):
    os.chdir(d / "elsewhere"); return broken_impls.probs_ignored(problem)
try:
    check_implementation(moves, save_dir="kept", **ONE)
except ConformanceError as e:
    print("CLEAN" if e.path == d / "kept" / e.path.name and e.path.is_file() else "LOST")
""",
    }
    return [library(setup + body, lost="LOST") for body in snippets.values()]


def every_door() -> list[str]:
    """Options refused at every door, as usage errors (exit 2) or OptionError/SpecError."""
    results = [run(check("broken_impls:correct", "--timeout", "1e10"))]
    saved = library("""
import pathlib, tempfile, hostile_impls
from oracle.files.counterexample import save
from spec import OpConfig, random_problem
p = random_problem(OpConfig(ep_size=1, experts_per_rank=2, top_k=1, hidden=16, intermediate=8,
                            tokens_per_rank=(2,)), seed=0)
outs = hostile_impls.one_value_off(p)
d = pathlib.Path(tempfile.mkdtemp())
save(d / "ok.npz", p, outputs=outs, meta={"ulps": 0.0, "inputs": "sentinel"})
save(d / "inf.npz", p, outputs=outs, meta={"ulps": float("inf")})
print("CLEAN", d)
""", keep_output=True)
    folder = saved.split()[-1]
    for value in ("inf", "nan", "-1"):
        results.append(run(["replay", f"{folder}/ok.npz", "--impl",
                            "hostile_impls:one_value_off", "--ulps", value]))
    results.append(run(["replay", f"{folder}/inf.npz", "--impl", "hostile_impls:one_value_off"]))
    for kwargs in ("scales='bogus'", "world_size=0", "timeout=1e10", "max_examples=0"):
        results.append(library(f"""
from oracle.check.distributed import check_distributed, reference_rank
from oracle.config.options import OptionError
try:
    check_distributed(reference_rank, **{{"world_size": 2, **dict({kwargs})}})
    print("PASS")
except OptionError:
    print("CLEAN")
"""))
    for fields in ("max_output_size=2**63", "max_output_size=2**64", "swiglu_limit=10**400",
                   "tokens_per_rank=5", "tokens_per_rank=None", "masked='yes'"):
        results.append(library(f"""
from spec import OpConfig, SpecError
base = dict(ep_size=1, experts_per_rank=2, top_k=1, hidden=16, intermediate=8,
            tokens_per_rank=(2,))
try:
    OpConfig(**{{**base, **dict({fields})}}); print("PASS")
except SpecError:
    print("CLEAN")
"""))
    return results


def escaping_workers() -> list[str]:
    """A worker in a session of its own, hung; a daemon left by a passing call. Each must be
    gone when the command ends (a survivor counts as a hang)."""
    results = []
    for name, expect_pass in (("setsid_and_hang", False), ("leaves_a_daemon", True)):
        pidfile = Path(tempfile.mkdtemp()) / "pid"
        os.environ["DFC_TEST_PIDFILE"] = str(pidfile)
        outcome = run(check(f"hostile_impls:{name}"), expect_pass=expect_pass)
        if pidfile.exists() and _running(int(pidfile.read_text())):
            os.kill(int(pidfile.read_text()), 9)
            outcome = "hang"  # it outlived the command
        results.append(outcome)
    return results


def _running(pid: int) -> bool:
    """``pid`` exists and is no zombie (a killed process that nobody has reaped yet: in a
    container whose init does not reap, killed processes stay zombies)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except OSError:
        return False


def distributed_faults() -> list[str]:
    """Faults of spawned ranks named as they happened (needs torch; skipped without it)."""
    results = []
    for impl, words in (("rank_one_forks_and_dies", "rank 1 died: exit code 7"),
                        ("rank_one_returns_too_much", "rank 1 oversized")):
        results.append(library(f"""
import test_distributed as T
from oracle import distributed as D
from oracle.check.harness import ConformanceError
try:
    D.check_distributed(T.{impl}, world_size=2, problems=T.ONE, settings=T.CI,
                        max_examples=1, timeout=20)
    print("PASS")
except D.DistributedTimeout:
    print("TRACE")
except ConformanceError as e:
    print("CLEAN" if {words!r} in e.report else "TRACE")
"""))
    results.append(library("""
import torch, test_distributed as T
from oracle import distributed as D
try:
    D.check_distributed(D.reference_rank, world_size=2, backend="nccl", problems=T.ONE,
                        settings=T.CI, max_examples=1, timeout=20)
    print("CLEAN" if torch.cuda.is_available() else "PASS")
except RuntimeError as e:
    print("CLEAN" if "group did not start: rank 0 failed:" in str(e) else "TRACE")
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
        "saving (disk full, two writers, planted link, no directory, chdir)": saving(),
        "options at every door (replay, files, distributed, config)": every_door(),
        "escaping workers (setsid, daemon)": escaping_workers(),
        "input writes judged in the parent (patched watch)": [
            run(check("hostile_impls:zeroes_x_and_hides_it", "--inputs", "strict"))],
        "distributed faults (dies after forking, 64 MiB answer, nccl without GPU)":
            distributed_faults(),
    }
    print("| category | attacks | clean | tracebacks / no report | false passes | hangs | "
          "files lost |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    total: Counter[str] = Counter()
    for name, results in rows.items():
        c = Counter(results)
        total += c
        print(f"| {name} | {len(results)} | {c['clean']} | {c['traceback']} | "
              f"{c['false pass']} | {c['hang']} | {c['lost']} |")
    c = corruptions(1000)
    total += c
    print(f"| 1000 byte corruptions of a counterexample | 1000 | {c['clean']} | "
          f"{c['traceback']} | 0 | 0 | 0 |")
    print(f"| **total** | {sum(total.values())} | {total['clean']} | {total['traceback']} | "
          f"{total['false pass']} | {total['hang']} | {total['lost']} |")


if __name__ == "__main__":
    main()
