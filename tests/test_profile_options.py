"""Kernel profiles as the user selects them: ``kernel=``/``--kernel``/``--dfc-kernel``, the
shape domain they generate, and counterexample files that replay as they were judged."""

from __future__ import annotations

from pathlib import Path

import broken_impls as broken
import pytest
from hypothesis import Phase, settings
from hypothesis import strategies as st

from oracle import ConformanceError, Numerics, check_implementation, evaluate
from oracle.cli import main
from oracle.files.counterexample import load, save
from oracle.model.kernels import ASCEND_A3, KernelProfile, profile_from_dict
from spec import Problem
from spec.limits import A3_W8A8, check_supported
from spec.strategies import configs, problems, token_rows

TESTS = Path(__file__).parent
FAST = settings(max_examples=30, derandomize=True, database=None, deadline=None)
PASS = settings(FAST, max_examples=12)
#: For the searches whose claim is a verdict, a saved file or its replay, not the minimal
#: call: the first failing call, without the shrinking that is most of a search's time.
UNSHRUNK = settings(FAST, phases=[Phase.explicit, Phase.generate])


@pytest.fixture
def in_tests_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(TESTS)


def _found(impl, tmp_path: Path, search: settings = FAST, **kwargs) -> ConformanceError:
    with pytest.raises(ConformanceError) as info:
        check_implementation(impl, settings=search, save_dir=tmp_path, impl_name="x:y", **kwargs)
    return info.value


@pytest.fixture(scope="module")
def a3_under_vllm(tmp_path_factory: pytest.TempPathFactory) -> ConformanceError:
    """The A3 reference judged by the vllm-triton profile: it fails (searched once, saved)."""
    return _found(broken.correct, tmp_path_factory.mktemp("a3_under_vllm"), UNSHRUNK,
                  kernel="vllm-triton")


def test_each_profile_accepts_its_own_kernel_and_rejects_the_other(
        a3_under_vllm: ConformanceError) -> None:
    check_implementation(broken.vllm_model, kernel="vllm-triton", settings=PASS, save_dir=None)
    check_implementation(broken.correct, kernel="ascend-a3", settings=PASS, save_dir=None)
    assert "vllm-triton profile" in str(a3_under_vllm)
    with pytest.raises(ConformanceError, match="ascend-a3 profile"):
        check_implementation(broken.vllm_model, settings=FAST, save_dir=None)


@pytest.fixture(scope="module")
def probs_ignored_found(tmp_path_factory: pytest.TempPathFactory) -> ConformanceError:
    """probs_ignored's minimal failure under the default profile and domain: searched and
    shrunk once for the tests below that read it (each costs seconds)."""
    return _found(broken.probs_ignored, tmp_path_factory.mktemp("probs_ignored"))


def test_counterexamples_run_on_the_kernel_they_are_for(
    tmp_path: Path, probs_ignored_found: ConformanceError
) -> None:
    """Under the default domain the minimal failure is an A3 shape; ``domain="contract"``
    shrinks below it (E = 1, K = 16), which the A3 kernel cannot run."""
    inside = probs_ignored_found.problem.config
    assert ASCEND_A3.domain.violations(inside) == [] and check_supported(inside, A3_W8A8) == []
    outside = _found(broken.probs_ignored, tmp_path, domain="contract").problem.config
    assert ASCEND_A3.domain.violations(outside), outside.summary()


def _saved_meta(path: Path) -> dict:
    return load(path).meta


def test_the_file_records_the_whole_profile_switches_and_ulps(tmp_path: Path) -> None:
    error = _found(broken.vllm_model, tmp_path, UNSHRUNK, ulps=0.5)
    meta = _saved_meta(error.path)
    assert meta["ulps"] == 0.5 and meta["numerics"]["kernel"]["name"] == "ascend-a3"
    assert profile_from_dict(meta["numerics"]["kernel"]) == ASCEND_A3
    assert Numerics.from_dict(meta["numerics"]) == Numerics(kernel="ascend-a3")
    assert Numerics.from_dict(Numerics("ideal").to_dict()) == Numerics("ideal")


def test_replay_uses_the_zero_row_switch_it_was_found_with(in_tests_dir, tmp_path: Path,
                                                           capsys) -> None:
    """Found with zero_rows="nan", a kernel that writes 0 for a zero row fails; replayed with
    the default policy it would conform (the old replay did that)."""
    zero_rows = problems(values=token_rows(families=st.just("zero_row")))
    error = _found(broken.correct, tmp_path, UNSHRUNK, numerics=Numerics(zero_rows="nan"),
                   problems=zero_rows)
    assert error.verdict.stage == "non_finite"
    assert evaluate(broken.correct, error.problem)[0].ok  # the default switch: conforms
    assert main(["replay", str(error.path), "--in-process", "--impl", "broken_impls:correct"]) == 1
    assert "zero rows -> nan" in capsys.readouterr().out


def test_replay_uses_the_bitwise_gate_it_was_found_with(in_tests_dir, tmp_path: Path) -> None:
    """reverse_combine differs by 1 ulp where the profile pins the value: found at ulps=0, it
    must replay as a failure; ``--ulps 1`` overrides and lets it pass."""
    strategy = problems(configs=configs(
        top_k=st.just(8), x_dtypes=st.just("float16"), weight_dtypes=st.just("int8"),
        hidden=st.just(256), tokens_per_rank=st.integers(32, 64), ep_sizes=st.just(1),
        experts_per_rank=st.just(8), masked=st.just(False), truncation=st.just(False),
    ))
    error = _found(broken.reverse_combine, tmp_path, UNSHRUNK, problems=strategy)
    assert _saved_meta(error.path)["ulps"] == 0
    replay = ["replay", str(error.path), "--in-process", "--impl"]  # the judge is the parent's
    assert main([*replay, "broken_impls:reverse_combine"]) == 1
    assert main([*replay, "broken_impls:reverse_combine", "--ulps", "1"]) == 0


def test_replay_of_a_profile_file_and_its_override(in_tests_dir,
                                                   a3_under_vllm: ConformanceError) -> None:
    replay = ["replay", str(a3_under_vllm.path), "--in-process", "--impl"]
    assert main([*replay, "broken_impls:correct"]) == 1
    assert main([*replay, "broken_impls:vllm_model"]) == 0
    assert main([*replay, "broken_impls:correct", "--kernel", "ascend-a3"]) == 0


def test_a_malformed_profile_record_is_a_usage_error(
    in_tests_dir, tmp_path: Path, capsys, probs_ignored_found: ConformanceError
) -> None:
    error = probs_ignored_found
    meta = load(error.path).meta
    meta["numerics"]["kernel"]["combine"] = {"weight": "combine", "sum": 3, "extra": 1}
    bad = save(tmp_path / "bad.npz", error.problem, meta=meta)
    assert load(bad).problem.config == error.problem.config
    assert main(["replay", str(bad), "--impl", "broken_impls:correct"]) == 2
    assert "numerics" in capsys.readouterr().err


def test_kernels_lists_every_profile(capsys) -> None:
    assert main(["kernels"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed] == [
        "ascend-a3", "vllm-triton", "vllm-triton-tq", "torch-grouped-mm", "vllm-triton-fp8",
        "torch-scaled-grouped-mm", "vllm-mxfp4-w4a16", "vllm-marlin-w4a16", "vllm-nvfp4-w4a16",
        "deepgemm-sm100-fp8", "triton-mxfp4-mxfp8", "vllm-nvfp4"]
    assert main(["kernels", "--verbose"]) == 0
    verbose = capsys.readouterr().out
    assert "freedoms:" in verbose and "domain: a3, K % 32 == 0" in verbose
    # Which vLLM path calls which quantiser (issue 24).
    assert "scaled_int8_quant" in verbose and "per_token_quant_int8" in verbose
    assert "reciprocal within 2 ulp" in verbose


def test_unknown_kernel_is_a_usage_error(in_tests_dir, capsys) -> None:
    assert main(["check", "broken_impls:correct", "--kernel", "cutlass"]) == 2
    assert "--kernel: kernel='cutlass' must be one of ascend-a3" in capsys.readouterr().err
    with pytest.raises(ValueError, match="kernel='cutlass' must be one of ascend-a3, vllm"):
        check_implementation(broken.correct, kernel="cutlass")


def test_the_ideal_judge_reads_the_named_profile(monkeypatch: pytest.MonkeyPatch) -> None:
    """``numerics="ideal"`` with a profile assumes that kernel's stored dtypes (fp16
    intermediates for fp16 x on Ascend: a tighter threshold than the coarsest-kernel default,
    which must allow bf16); without one, the coarsest legitimate kernel."""
    import oracle
    import oracle.judge.rowtest as rowtest
    import oracle.judge.verdict
    from oracle.judge.verdict import compare
    from spec import OpConfig, random_problem

    p = random_problem(OpConfig(ep_size=2, experts_per_rank=2, top_k=2, hidden=256,
                                intermediate=64, x_dtype="float16", tokens_per_rank=(3, 2)))
    ideal = oracle.run(p, numerics="ideal")
    a3 = ASCEND_A3.ideal_assumptions("float16")
    assert a3.stored_dtype == "float16" and a3.x_dtype_combine_topk == ()
    assert a3.ties == ("away", "even")
    coarse = rowtest.row_thresholds(p, ideal).threshold
    tight = rowtest.row_thresholds(p, ideal, a3).threshold
    assert all((t <= c).all() for t, c in zip(tight, coarse))
    assert any((t < c).any() for t, c in zip(tight, coarse))
    seen = []
    original = rowtest.row_test
    monkeypatch.setattr(oracle.judge.verdict, "row_test",
                        lambda *a, **kw: seen.append(a[3]) or original(*a, **kw))
    outs = [(r.out, r.expert_token_nums) for r in oracle.run(p).ranks]
    assert compare(p, outs, numerics=Numerics("ideal", kernel="ascend-a3")).ok
    assert compare(p, outs, numerics="ideal").ok
    assert seen == [a3, rowtest.IdealAssumptions()]


def test_the_search_draws_only_the_variants_a_profile_has() -> None:
    """torch-grouped-mm has only a float pipeline: its default search draws BF16/FP16 weights
    only, and asking it for W8A8 alone is refused by name (the full profile draws W8A8)."""
    from oracle.check.harness import variants_of
    from oracle.model.kernels import TORCH_GROUPED_MM

    assert variants_of(TORCH_GROUPED_MM) == ("bf16", "fp16")
    assert variants_of(ASCEND_A3) == ("w8a8", "bf16", "fp16")
    with pytest.raises(ValueError, match="has a pipeline for none of the variants w8a8"):
        variants_of(TORCH_GROUPED_MM, ["w8a8"])
    assert variants_drawn(TORCH_GROUPED_MM) <= {"bf16", "fp16"}
    assert "w8a8" in variants_drawn(ASCEND_A3)


def variants_drawn(profile: KernelProfile) -> set[str]:
    """The gate variants 30 derandomised draws of ``profile``'s default search make."""
    from hypothesis import given

    from oracle.check.harness import default_problems

    drawn: set[str] = set()

    @settings(max_examples=30, derandomize=True, database=None, deadline=None)
    @given(default_problems(profile))
    def draw(problem: Problem) -> None:
        drawn.add(problem.config.variant)

    draw()
    assert drawn
    return drawn
