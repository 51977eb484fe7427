"""The dfc-oracle command and the pytest gate, as a user runs them."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import broken_impls
import numpy as np
import pytest
from hypothesis import given

import oracle
from oracle import pytest_plugin
from oracle.check import harness
from oracle.check.harness import variant_configs
from oracle.cli import _parser, _Progress, _search, main
from spec import DTYPES, OpConfig, random_problem
from spec.fields import GATE_VARIANTS
from spec.strategies import ROUTING_FAMILIES

TESTS = Path(__file__).parent


@pytest.fixture
def in_tests_dir(monkeypatch):
    monkeypatch.chdir(TESTS)  # broken_impls is importable from here, as a user's module would be


def test_check_exit_codes_and_replay(in_tests_dir, tmp_path, capsys) -> None:
    assert main(["check", "broken_impls:correct", "--max-examples", "15",
                 "--save-dir", str(tmp_path)]) == 0
    assert "no counterexample in 15 calls" in capsys.readouterr().out
    assert main(["check", "broken_impls:probs_ignored", "--max-examples", "30",
                 "--save-dir", str(tmp_path)]) == 1
    report = capsys.readouterr().out
    # E = 2: the default kernel profile (ascend-a3) generates only shapes A3 runs (E >= 2).
    # top_k = 2: softmax weights at top_k = 1 are all 1, where ignoring them changes nothing.
    assert "stage 'out'" in report and "minimal call: EP=1 E=2 top_k=2 K=32" in report
    saved = next(tmp_path.glob("broken_impls.probs_ignored-out-*.npz"))
    assert f"dfc-oracle replay {saved} --impl broken_impls:probs_ignored" in report
    # The replay prints the same finding; a fixed implementation conforms on the same file
    # (in process: a child start is about a second of CPU, and the search above had one).
    assert main(["replay", str(saved), "--in-process", "--impl",
                 "broken_impls:probs_ignored"]) == 1
    replayed = capsys.readouterr().out
    assert report.split("what failed: ")[1].splitlines()[0] in replayed
    assert main(["replay", str(saved), "--in-process", "--impl", "broken_impls:correct"]) == 0
    assert main(["explain", str(saved)]) == 0
    explained = capsys.readouterr().out
    assert "configuration: EP=1 E=2 top_k=2" in explained and "routed slots" in explained


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["check", "no_such_module:f"], "cannot import module 'no_such_module'"),
        (["check", "broken_impls:nope"], "has no attribute 'nope'"),
        (["check", "broken_impls"], "expected MODULE:FUNCTION"),
        (["explain", "/nonexistent.npz"], "no such file"),
    ],
)
def test_usage_errors_exit_2_with_a_message(in_tests_dir, capsys, argv, message) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_python_dash_m_is_the_same_command() -> None:
    done = subprocess.run([sys.executable, "-m", "oracle", "check", "x"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "expected MODULE:FUNCTION" in done.stderr


def test_hunt_reports_the_historical_flaws_and_variants(tmp_path, capsys) -> None:
    """The table has the historical rules and the kernel variants, whose rows give the
    smallest call they change (docs/findings.md names these two)."""
    assert main(["hunt", "--max-examples", "30", "--save-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "zero-row NaN" in out and "pr5665" in out and "pr6156" in out
    for variant, minimal in (
        ("oai-default-alpha", "EP=1 E=1 top_k=1 K=16 I=8 M=[1] x=bfloat16 w=int8"),
        ("bf16-epilogue-e2", "EP=1 E=2 top_k=1 K=16 I=8 M=[1] x=bfloat16 w=bfloat16"),
    ):
        assert any(line.startswith(variant) and minimal in line for line in out.splitlines())


pytest_plugins = ["pytester"]


def test_pytest_gate_passes_a_correct_kernel_and_fails_a_broken_one(pytester, monkeypatch) -> None:
    # This checkout's oracle, not whichever copy is installed, and broken_impls.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join((str(TESTS), str(TESTS.parent))))
    pytester.makepyfile(test_own="def test_mine():\n    assert True\n")
    # Family tests at a budget of 10 examples: the default (20) is in the header below, and
    # test_family_tests_search_with_the_family_budget shows the family tests search with it.
    # Each gate run starts pytest and a child process (~3 s of CPU): one run answers several
    # questions. Opt-in tests are skipped by name when not asked for: W4A8 (without
    # --dfc-variants w4a8) and the model-shape test (without --dfc-shapes: its empty
    # parameter set; test_model_shapes.py runs it with presets).
    good = pytester.runpytest_subprocess("--dfc-impl", "broken_impls:correct", "-p",
                                         "no:cacheprovider", "--dfc-profile", "dfc-ci", "-q",
                                         "--dfc-family-examples", "10", "-k",
                                         "default_search or routing or (variant and w4a8) "
                                         "or model_shape")
    routings = len(ROUTING_FAMILIES)
    # the default search and each routing family; w4a8's variant test and the model shape
    good.assert_outcomes(passed=1 + routings, skipped=2)
    # Not -q: the header is printed, with the defaults of the dfc-ci profile.
    bad = pytester.runpytest_subprocess("--dfc-impl", "broken_impls:probs_ignored",
                                        "-k", "default_search or routing")
    bad.stdout.fnmatch_lines(["dfc-oracle: impl=broken_impls:probs_ignored kernel=ascend-a3 "
                              "domain=kernel numerics=faithful profile=dfc-ci*"
                              "max_examples=100 family_examples=20 *"])
    bad.assert_outcomes(failed=1 + routings)
    bad.stdout.fnmatch_lines(["*minimal call: EP=1 E=2 top_k=2 K=32*"])
    # The defect is searched for and shrunk once; the later tests reuse that minimum.
    # The FAILURES section only: under CI=true pytest repeats whole messages in the summary.
    lines = bad.stdout.str().split("short test summary info")[0].splitlines()
    assert sum(line.startswith("what failed:") for line in lines) == 1  # one full report
    assert sum(line.startswith("same failure as test_default_search: stage 'out'")
               for line in lines) == routings
    missing = pytester.runpytest_subprocess("--dfc-impl", "nowhere:f", "-q", "-k", "default")
    assert missing.ret != 0
    missing.stderr.fnmatch_lines(["*--dfc-impl: cannot import module 'nowhere'*"])


def test_the_gate_judges_w4a8_when_asked(pytester, monkeypatch) -> None:
    """W4A8 is opt-in (skipped by name by default: the gate test above): with --dfc-variants
    w4a8 the reference passes its variant test, every variant not asked for (the default
    w8a8, bf16 and fp16, the opt-in GPU formats) is skipped, and a probs-dropping kernel fails
    it."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join((str(TESTS), str(TESTS.parent))))
    asked = pytester.runpytest_subprocess("--dfc-impl", "broken_impls:correct", "-q",
                                          "--dfc-variants", "w4a8", "-k", "variant", "-rs")
    others = [v.name for v in GATE_VARIANTS if v.name != "w4a8"]
    asked.assert_outcomes(passed=1, skipped=len(others))
    asked.stdout.fnmatch_lines([f"SKIPPED *: variant {v} not in --dfc-variants"
                                for v in others])
    bad = pytester.runpytest_subprocess("--dfc-impl", "broken_impls:probs_ignored", "-q",
                                        "--dfc-variants", "w4a8", "-k", "variant and w4a8")
    bad.assert_outcomes(failed=1)


def test_family_tests_search_with_the_family_budget(monkeypatch) -> None:
    """The default search keeps the profile's budget; a family test runs
    ``--dfc-family-examples`` (plugin default: a fifth of max_examples, at least 10)."""
    import oracle.check.conformance as conformance
    from oracle.pytest_plugin import family_examples

    budgets = []
    monkeypatch.setattr(conformance, "check_implementation",
                        lambda impl, **kw: budgets.append(kw["settings"]))
    monkeypatch.setattr(conformance, "_KNOWN", [])
    options = {"impl": None, "impl_name": "x", "numerics": "faithful", "inputs": "sentinel",
               "ulps": 0.0, "timeout": 1.0, "kernel": "ascend-a3", "domain": "kernel",
               "variants": ("w8a8",), "family_examples": 7}
    conformance.test_default_search(options)
    conformance.test_routing(options, "uniform")
    assert budgets[0] is None and budgets[1].max_examples == 7
    for profile, family in ((100, 20), (12, 10)):
        monkeypatch.setattr(pytest_plugin, "settings",
                            lambda p=profile: SimpleNamespace(max_examples=p))
        assert family_examples(None) == family and family_examples(3) == 3


def test_check_and_replay_judge_input_writes_with_the_same_policy(in_tests_dir, tmp_path,
                                                                  capsys) -> None:
    # The default policy (sentinel) passes the operator's write-back of masked ids ...
    assert main(["check", "broken_impls:writes_masked_ids", "--max-examples", "20",
                 "--save-dir", str(tmp_path)]) == 0
    # ... which strict fails; the file records the policy, so replay judges it the same way.
    assert main(["check", "broken_impls:writes_masked_ids", "--max-examples", "60",
                 "--inputs", "strict", "--save-dir", str(tmp_path)]) == 1
    assert "stage 'inputs'" in capsys.readouterr().out
    saved = str(next(tmp_path.glob("broken_impls.writes_masked_ids-inputs-*.npz")))
    assert main(["replay", saved, "--impl", "broken_impls:writes_masked_ids"]) == 1
    assert "is masked: the sentinel" in capsys.readouterr().out
    assert main(["replay", saved, "--impl", "broken_impls:writes_masked_ids",
                 "--inputs", "sentinel"]) == 0


def only_bf16(problem):
    """An implementation of the BF16-weight variant only."""
    if problem.config.variant != "bf16":
        raise NotImplementedError(f"{problem.config.variant} is not supported")
    return broken_impls.correct(problem)


def _options(parser: argparse.ArgumentParser) -> dict[str, list[argparse.Action]]:
    """Every subcommand's actions (the help action left out)."""
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {name: [a for a in p._actions if not isinstance(a, argparse._HelpAction)]
            for name, p in sub.choices.items()}


def test_every_option_of_every_subcommand_has_a_help_that_shows_its_default() -> None:
    for command, actions in _options(_parser()).items():
        for action in actions:
            name = f"dfc-oracle {command} {'/'.join(action.option_strings) or action.dest}"
            assert action.help and action.help != argparse.SUPPRESS, f"{name} has no help"
            if action.option_strings and not action.required:
                assert "default" in action.help, f"{name}'s help does not show its default"


class _Group:
    def __init__(self) -> None:
        self.options: dict[str, dict[str, Any]] = {}

    def addoption(self, name: str, **kwargs: Any) -> None:
        self.options[name] = kwargs


def test_check_takes_every_option_of_the_pytest_gate() -> None:
    group = _Group()
    pytest_plugin.pytest_addoption(SimpleNamespace(getgroup=lambda *_: group))
    check = {s: a for a in _options(_parser())["check"] for s in a.option_strings}
    for flag, kwargs in group.options.items():
        if flag in ("--dfc-impl", "--dfc-family-examples"):
            continue  # check's positional MODULE:FUNC; check runs one search, no family tests
        assert "default" in kwargs["help"], f"{flag}'s help does not show its default"
        twin = check.get(flag.replace("--dfc-", "--"))
        assert twin is not None, f"dfc-oracle check has no {flag.replace('--dfc-', '--')}"
        if "choices" in kwargs:
            assert list(twin.choices or ()) == list(kwargs["choices"]), flag


def test_check_variants_skips_the_variants_an_implementation_does_not_support(
    in_tests_dir, tmp_path, capsys
) -> None:
    argv = ["check", "test_cli:only_bf16", "--max-examples", "15", "--save-dir", str(tmp_path)]
    assert main([*argv, "--variants", "bf16"]) == 0
    assert main(argv) == 1  # every variant is searched by default
    assert "NotImplementedError: w8a8 is not supported" in capsys.readouterr().out
    assert main([*argv, "--variants", "bf16,w4a16"]) == 2
    assert ("--variants: variants=('bf16', 'w4a16') must be one or more of w8a8, bf16, fp16, "
            "w4a8") in capsys.readouterr().err


@given(variant_configs(["w8a8", "bf16"]))
def test_a_subset_of_variants_draws_only_those(config) -> None:
    # configs() lets float weights take x's dtype: w8a8's float16 x with bf16's weights would
    # be fp16, a variant not asked for.
    assert config.variant in ("w8a8", "bf16")


@pytest.mark.slow
def test_hunt_takes_a_kernel_profile_by_import_path(in_tests_dir, tmp_path, capsys) -> None:
    """``hunt --kernel MODULE:NAME`` runs and judges the variants on that profile (the
    zero-row NaN variant of the user's own kernel is found and explained against it); a name
    that is not a profile is a usage error that says so. 145 s (the historical rules too): the
    cheap twin is the next test."""
    assert main(["hunt", "--kernel", "own_profiles:SILU_ROUNDED", "--max-examples", "10",
                 "--save-dir", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "kernel profile 'a3-silu-rounded'" in captured.err
    assert "zero-row NaN" in captured.out
    saved = [f for f in tmp_path.iterdir() if "zero-row" in f.name]
    assert saved and "a3-silu-rounded" in main_explain(saved[0], capsys)
    assert main(["hunt", "--kernel", "own_profiles:NOT_A_PROFILE"]) == 2
    assert "NOT_A_PROFILE" in capsys.readouterr().err


def main_explain(path: Path, capsys: Any) -> str:
    main(["explain", str(path)])
    return str(capsys.readouterr().out)


def test_hunt_variants_run_on_the_kernel_given(in_tests_dir, capsys) -> None:
    """The cheap twin: a variant's implementation under a profile is that profile's run with
    the variant's change (the zero-row NaN variant of SILU_ROUNDED equals SILU_ROUNDED on
    every other row and differs from the default profile's), and a non-profile is refused."""
    import own_profiles

    import oracle
    from oracle.check.hunt import VARIANTS
    from spec import OpConfig, random_problem

    problem = random_problem(OpConfig(ep_size=1, experts_per_rank=2, top_k=2, hidden=32,
                                      intermediate=16, tokens_per_rank=(3,)), seed=0)
    zero_nan = next(v for v in VARIANTS if v.name == "zero-row NaN")
    (out, _), = zero_nan.impl(own_profiles.SILU_ROUNDED)(problem)
    own = oracle.run(problem, numerics=oracle.Numerics(kernel=own_profiles.SILU_ROUNDED))
    default = oracle.run(problem)
    assert np.array_equal(out, own.ranks[0].out) and not np.array_equal(out, default.ranks[0].out)
    assert main(["hunt", "--kernel", "own_profiles:NOT_A_PROFILE"]) == 2
    assert "NOT_A_PROFILE" in capsys.readouterr().err


def test_a_search_whose_passes_left_rows_untested_says_so(capsys) -> None:
    """A gate that could not row-test some rows of its passing calls says so after the
    search (dfc-oracle check, the pytest gate's summary); one that judged every row does not.
    The zero row of x has a zero ideal row, which the row test cannot project on."""
    cfg = OpConfig(ep_size=1, experts_per_rank=2, top_k=2, hidden=32, intermediate=16,
                   tokens_per_rank=(3,))
    x = np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32)
    plain = random_problem(cfg, seed=0, x=[x.astype(DTYPES[cfg.x_dtype])])
    x[1] = 0
    zero_row = random_problem(cfg, seed=0, x=[x.astype(DTYPES[cfg.x_dtype])])
    lines = []
    reporter = SimpleNamespace(write_line=lines.append)
    config = SimpleNamespace(getoption=lambda name: "m:f")
    for problem, said in ((plain, False), (zero_row, True)):
        outs = [(r.out, r.expert_token_nums) for r in oracle.run(problem).ranks]

        def run(_: Any, problem=problem, outs=outs) -> None:
            harness.evaluate(lambda _: outs, problem, numerics="ideal")

        assert _search(run, None, _Progress(None), "calls") == 0
        out = capsys.readouterr().out
        assert ("note: 1 passing calls had rows the row test could not judge" in out) is said
        assert ("zero ideal row" in out) is said
        pytest_plugin.pytest_terminal_summary(reporter, 0, config)
        assert bool(lines) is said
