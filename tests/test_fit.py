"""``dfc-oracle fit`` (issue 21): the record of rounding points a kernel uses, searched over
rounding-point knobs only. It returns each built-in on its own outputs, finds a one-knob
change, and says "nothing fits" for a structural bug (which no rounding point explains)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import broken_impls
import own_profiles
import pytest
from gate_search import model_impl

import oracle
from oracle.check.harness import fit_problems
from oracle.cli import main
from oracle.explain.fit import KNOBS, _descend, _Scorer, fit
from oracle.judge.verdict import compare
from oracle.model.kernels import ASCEND_A3, VLLM_TRITON, profile_from_dict

TESTS = Path(__file__).parent
PROBLEMS = fit_problems(["w8a8", "bf16", "fp16"], 10, domain=ASCEND_A3.domain)
W8A8 = fit_problems(["w8a8"], 10, domain=ASCEND_A3.domain)


@pytest.fixture
def in_tests_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(TESTS)


def _calls(impl, problems=PROBLEMS):
    return [(p, impl(p)) for p in problems]


@pytest.mark.parametrize("profile", [ASCEND_A3, VLLM_TRITON], ids=lambda p: p.name)
def test_a_built_in_is_returned_on_its_own_outputs(profile) -> None:
    found = fit(_calls(model_impl(profile)))
    assert found.fits and found.best == profile and found.changes == ()
    assert found.describe().startswith(f"fits: {profile.name} with no change")


def test_one_knob_changed_is_found_and_fits_where_the_built_in_fails() -> None:
    calls = _calls(own_profiles.vllm_silu_once, W8A8)
    assert not all(compare(p, o, numerics="vllm-triton").ok for p, o in calls)
    found = fit(calls)
    assert found.fits and found.base == "vllm-triton"
    assert found.changes == ("w8a8.swiglu.silu_store: x -> float32 (no store)",)
    assert found.best.pipeline("w8a8") == own_profiles.VLLM_SILU_ONCE.pipeline("w8a8")
    assert all(compare(p, o, numerics=oracle.Numerics(kernel=found.best)).ok for p, o in calls)


#: A W8A8 and a BF16 call that split the built-ins: A3 holds the W8A8 call bitwise and vLLM's
#: Triton the BF16 one, for a kernel that is A3 but for its float pipeline.
SPLIT = [PROBLEMS[0], PROBLEMS[9]]


def test_a_knob_of_one_variants_pipeline_is_changed_there_only() -> None:
    calls = _calls(own_profiles.a3_float_silu_rounded, SPLIT)
    score = _Scorer(calls)
    assert [p.config.kernel_variant.name for p in SPLIT] == ["w8a8", "float"]
    assert score.unfitted(ASCEND_A3) == score.unfitted(VLLM_TRITON) == 1
    assert score(VLLM_TRITON) < score(ASCEND_A3)  # the fewest values outside: the wrong base
    reached, _ = _descend(score, VLLM_TRITON, KNOBS)
    assert score(reached) > 0  # descending from it alone: nothing fits
    found = fit(calls)
    assert found.fits and found.base == "ascend-a3"
    assert found.changes == ("float.swiglu.silu_store: float32 (no store) -> x",)
    assert found.best.pipelines == own_profiles.A3_FLOAT_SILU_ROUNDED.pipelines
    assert '"silu_store": "x"' not in json.dumps(found.best.to_dict()["pipelines"]["w8a8"])
    # the same knob in every pipeline does not fit: the W8A8 call tells them apart
    everywhere = ASCEND_A3.map_steps("swiglu", lambda s: dataclasses.replace(s, silu_store="x"))
    assert not compare(*calls[0], numerics=oracle.Numerics(kernel=everywhere)).ok


def test_a_structural_bug_is_not_fitted() -> None:
    """Ignoring the routed weights is no rounding point: the nearest record still fails."""
    found = fit(_calls(broken_impls.probs_ignored))
    assert not found.fits and found.outside > 0
    assert found.describe().startswith("nothing fits: no record within 3 rounding-point")
    counts = fit(_calls(broken_impls.modulo_mapping))
    assert not counts.fits
    assert counts.describe().startswith("nothing fits: stage 'expert_token_nums'")


def test_knobs_are_rounding_points_only() -> None:
    steps = {k.name.split(".", 1)[-1] for k in KNOBS}
    assert all(name.split(".")[0] in ("quantise", "requantise", "gemm1", "gemm2", "swiglu",
                                      "weight", "sum") for name in steps), steps
    assert not any(field in k.name for k in KNOBS for field in ("exp_ulps", "div_ulps"))


def test_the_command_prints_a_profile_file_the_gate_takes(in_tests_dir, tmp_path: Path,
                                                          capsys) -> None:
    assert main(["fit", "own_profiles:dispatch_ffn_combine", "--calls", "8",
                 "--kernel", "ascend-a3"]) == 0
    out, err = capsys.readouterr()
    assert "fits: ascend-a3 with w8a8.swiglu.silu_store: float32 (no store) -> x" in err
    fitted = tmp_path / "fitted.json"
    fitted.write_text(out)
    assert profile_from_dict(json.loads(out)).name == "ascend-a3+fit"
    assert main(["check", "own_profiles:dispatch_ffn_combine", "--kernel", str(fitted),
                 "--max-examples", "8", "--in-process", "--save-dir", str(tmp_path)]) == 0
    capsys.readouterr()
    assert main(["fit", "own_profiles:probs_ignored", "--calls", "4", "--kernel",
                 "ascend-a3", "--in-process"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "nothing fits" in err
    assert main(["fit", "broken_impls:returns_none", "--calls", "2"]) == 1
    assert "nothing fits: the implementation did not return outputs" in capsys.readouterr().err
    assert main(["fit", "own_profiles:dispatch_ffn_combine", "--calls", "0"]) == 2
    assert main(["fit", "own_profiles:dispatch_ffn_combine", "--kernel", "cutlass"]) == 2
