"""A user's own kernel profile at every door (issue 21): ``kernel=``/``--kernel``/
``--dfc-kernel`` take a registered name, ``MODULE:NAME`` of a
:class:`oracle.model.kernels.KernelProfile` or a profile file written by ``dfc-oracle kernels
--dump``. At each door the kernel of :mod:`own_profiles` (A3 with silu rounded before the
multiply) passes under its own profile and fails under the default one."""

from __future__ import annotations

import json
import os
from pathlib import Path

import own_profiles
import pytest
from hypothesis import Phase, settings

from oracle import ConformanceError, check_implementation
from oracle.check.loading import load_kernel
from oracle.cli import main
from oracle.config.options import OptionError
from oracle.files.counterexample import judged_with, load
from oracle.model.kernels import ASCEND_A3, PROFILES, profile_from_dict
from spec import OpConfig, random_problem

TESTS = Path(__file__).parent
OWN = "own_profiles:SILU_ROUNDED"
FAST = settings(max_examples=30, derandomize=True, database=None, deadline=None)
PASS = settings(FAST, max_examples=8)


@pytest.fixture
def in_tests_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(TESTS)  # own_profiles is importable from here, as a user's module would be


@pytest.fixture(scope="module")
def found_by_default(tmp_path_factory: pytest.TempPathFactory) -> ConformanceError:
    """The own kernel searched under the default profile (it fails, saved): one search shared
    by the tests that read its message or its file."""
    with pytest.raises(ConformanceError) as found:
        check_implementation(own_profiles.dispatch_ffn_combine, settings=FAST,
                             save_dir=tmp_path_factory.mktemp("found"))
    return found.value


@pytest.fixture
def own_file(tmp_path: Path, in_tests_dir: None, capsys: pytest.CaptureFixture[str]) -> Path:
    """The own profile as a profile file, written by ``dfc-oracle kernels --dump``."""
    assert main(["kernels", "--dump", OWN]) == 0
    path = tmp_path / "mine.json"
    path.write_text(capsys.readouterr().out, encoding="utf-8")
    return path


def test_the_dump_is_the_record_and_reads_back(own_file: Path, capsys) -> None:
    assert profile_from_dict(json.loads(own_file.read_text())) == own_profiles.SILU_ROUNDED
    assert load_kernel(str(own_file)) == own_profiles.SILU_ROUNDED
    assert main(["kernels", "--dump", "vllm-triton"]) == 0
    assert profile_from_dict(json.loads(capsys.readouterr().out)) == PROFILES["vllm-triton"]
    assert "a3-silu-rounded" not in PROFILES  # nothing registered it


@pytest.mark.parametrize(("given", "message"), [
    ("cutlass", f"kernel='cutlass' must be one of {', '.join(PROFILES)} (registered), "
                "MODULE:NAME"),
    ("own_profiles:NOT_A_PROFILE", "is a dict, not an oracle.model.kernels.KernelProfile"),
    ("own_profiles:NOPE", "has no attribute 'NOPE'"),
    ("nowhere:MINE", "cannot import module 'nowhere'"),
    ("missing.json", "cannot read the profile file"),
])
def test_what_is_no_profile_says_what_to_pass(in_tests_dir, given: str, message: str,
                                              capsys) -> None:
    with pytest.raises(OptionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_kernel(given)
    assert main(["check", "own_profiles:dispatch_ffn_combine", "--kernel", given]) == 2
    assert message in capsys.readouterr().err


def test_a_file_that_is_no_profile_is_a_usage_error(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"name": "x", "pipelines": {}}')
    assert main(["kernels", "--dump", str(bad)]) == 2
    assert "is not a profile file (kernel profile: summary must be a string)" in \
        capsys.readouterr().err


def test_check_implementation_takes_a_name_a_file_or_a_record(
        own_file: Path, found_by_default: ConformanceError) -> None:
    impl = own_profiles.dispatch_ffn_combine
    for kernel in (OWN, str(own_file), own_profiles.SILU_ROUNDED):
        check_implementation(impl, kernel=kernel, settings=PASS, save_dir=None)
    assert "ascend-a3 profile" in str(found_by_default)
    with pytest.raises(ConformanceError, match="a3-silu-rounded profile"):  # any failing call
        check_implementation(own_profiles.probs_ignored, kernel=OWN,
                             settings=settings(FAST, phases=[Phase.explicit, Phase.generate]),
                             save_dir=None)


def test_check_and_replay_on_the_command_line(own_file: Path, tmp_path: Path, capsys) -> None:
    # In process after the first call: the profile is the parent's business (the judge), and
    # each child start costs about a second of CPU.
    args = ["--max-examples", "30", "--save-dir", str(tmp_path), "--in-process"]
    impl = "own_profiles:dispatch_ffn_combine"
    passing = ["--max-examples", "8", "--save-dir", str(tmp_path)]
    assert main(["check", impl, "--kernel", OWN, *passing]) == 0
    assert "kernel a3-silu-rounded (kernel domain)" in capsys.readouterr().err
    assert main(["check", impl, "--kernel", str(own_file), "--in-process", *passing]) == 0
    assert main(["check", impl, *args]) == 1
    default_file = next(tmp_path.glob("own_profiles.dispatch_ffn_combine-out-*.npz"))
    # The file found under the default profile replays under the own one.
    replay = ["--in-process", "--impl"]
    assert main(["replay", str(default_file), *replay, impl]) == 1
    assert main(["replay", str(default_file), *replay, impl, "--kernel", str(own_file)]) == 0
    # A file found under the own profile records the whole record: replay imports nothing.
    assert main(["check", "own_profiles:probs_ignored", "--kernel", OWN, *args]) == 1
    own_found = next(tmp_path.glob("own_profiles.probs_ignored-out-*.npz"))
    numerics, _ = judged_with(load(own_found).meta)
    assert numerics.kernel == own_profiles.SILU_ROUNDED  # the record itself, not a name
    assert main(["replay", str(own_found), *replay, impl]) == 0
    assert main(["replay", str(own_found), *replay, "own_profiles:probs_ignored"]) == 1


def test_explain_diagnoses_under_the_profile_asked_for(
        own_file: Path, found_by_default: ConformanceError, capsys) -> None:
    file = str(found_by_default.path)
    assert main(["explain", file, "--no-stages"]) == 0
    default = capsys.readouterr().out
    assert "against ascend-a3" in default and "diagnosis: none needed" not in default
    assert main(["explain", file, "--kernel", OWN]) == 0
    own = capsys.readouterr().out
    assert "explained with: numerics faithful to a3-silu-rounded (--kernel)" in own
    assert "diagnosis: none needed, the outputs conform" in own
    assert main(["explain", file, "--kernel", "cutlass"]) == 2



def test_the_stage_hook_names_the_first_intermediate_that_differs(
        found_by_default: ConformanceError, in_tests_dir, capsys) -> None:
    """Found under the default profile, the kernel's own intermediates (the stage hook) agree
    with A3's up to h and first differ at a, where it rounds silu: that is what explain says."""
    file = str(found_by_default.path)
    assert main(["explain", file, "--intermediates", "own_profiles:intermediates"]) == 0
    said = capsys.readouterr().out
    assert "your a (step 4) first differs at slot 0, column " in said, said
    assert "outside the ascend-a3 envelope (agreeing before it: q, sigma1, h)" in said
    assert main(["explain", file, "--intermediates", "own_profiles:intermediates",
                 "--kernel", OWN]) == 0
    assert "stages: none, no failing out row (the outputs conform)" in capsys.readouterr().out
    assert main(["explain", file, "--intermediates", "own_profiles:intermediates_raising"]) == 0
    assert "your intermediates: own_profiles:intermediates_raising raised: RuntimeError: no " \
        "hook here" in capsys.readouterr().out


def test_verify_judges_a_capture_with_the_own_profile(own_file: Path, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch", reason="a capture holds torch tensors (extra 'torch')")
    from oracle.check import capture

    cfg = OpConfig(ep_size=2, experts_per_rank=2, top_k=2, hidden=64, intermediate=32,
                   tokens_per_rank=(6, 5), x_dtype="bfloat16")
    problem = random_problem(cfg, seed=3)
    for r, (out, counts) in enumerate(own_profiles.dispatch_ffn_combine(problem)):
        capture.dump(tmp_path / "run", r, problem.ranks[r],
                     (torch.from_numpy(out.astype("float32")).to(torch.bfloat16),
                      torch.from_numpy(counts)), world_size=2)
    directory = str(tmp_path / "run")
    assert main(["verify", directory]) == 1
    assert main(["verify", directory, "--kernel", str(own_file)]) == 0
    assert main(["verify", directory, "--kernel", OWN]) == 0
    assert main(["verify", directory, "--kernel", "cutlass"]) == 2


pytest_plugins = ["pytester"]


def test_the_pytest_gate_takes_the_own_profile(pytester, monkeypatch) -> None:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join((str(TESTS), str(TESTS.parent))))
    own_file = pytester.path / "mine.json"
    own_file.write_text(json.dumps(own_profiles.SILU_ROUNDED.to_dict()))
    gate = ["--dfc-impl", "own_profiles:dispatch_ffn_combine", "-p", "no:cacheprovider",
            "-q", "-k", "test_variant and w8a8", "--dfc-family-examples", "10"]
    # The profile file passes, and the header (not -q) says where the profile came from; the
    # MODULE:NAME form reaches the gate's option in the last run below.
    own = pytester.runpytest_subprocess(*[g for g in gate if g != "-q"],
                                        "--dfc-kernel", str(own_file))
    own.stdout.fnmatch_lines([f"dfc-oracle: impl=* kernel=a3-silu-rounded (from {own_file})"
                              " domain=kernel *"])
    own.assert_outcomes(passed=1)
    default = pytester.runpytest_subprocess(*gate)
    default.assert_outcomes(failed=1)
    default.stdout.fnmatch_lines(["*ascend-a3 profile pins this value*"])
    bad = pytester.runpytest_subprocess(*gate, "--dfc-kernel", "own_profiles:NOT_A_PROFILE")
    assert bad.ret != 0
    bad.stderr.fnmatch_lines(["*--dfc-kernel: kernel='own_profiles:NOT_A_PROFILE' is a dict*"])


def test_check_distributed_takes_the_own_profile(own_file: Path) -> None:
    """The per-rank reference (A3's numerics) passes under a profile file holding A3's record
    and fails under the own profile, whose silu rounding it does not have."""
    pytest.importorskip("torch", reason="oracle.check.distributed needs the extra 'torch'")
    from oracle.check import distributed as D

    a3_file = own_file.with_name("a3.json")
    a3_file.write_text(json.dumps(ASCEND_A3.to_dict()))
    options = {"world_size": 1, "variants": ["w8a8"], "settings": FAST, "max_examples": 10}
    D.check_distributed(D.reference_rank, kernel=str(a3_file), **options)
    with pytest.raises(ConformanceError, match="a3-silu-rounded profile"):
        D.check_distributed(D.reference_rank, kernel=OWN, **options)
