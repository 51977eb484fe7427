"""A failing token stage by stage (issue 13): the intermediates are the reference's own, bit for
bit; ``dfc-oracle explain`` prints them next to the implementation's out row; the "first stage
that explains it" names a combine defect where there is one and no stage where there is none."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import broken_impls
import numpy as np
import pytest
from hypothesis import strategies as st

import oracle
from oracle.cli import main
from oracle.explain.stages import _line, token_stages
from spec import OpConfig, Problem, random_problem

Array = np.ndarray[Any, Any]


def _problem(weight_dtype: str = "int8", **fields: Any) -> Problem:
    """EP 2, top_k 3, truncated at 8 rows: some slots dropped, every kind of stage present."""
    cfg = OpConfig(**{**dict(ep_size=2, experts_per_rank=2, top_k=3, hidden=32, intermediate=16,
                             tokens_per_rank=(4, 3), max_output_size=8,
                             weight_dtype=weight_dtype), **fields})
    return random_problem(cfg, seed=5)


def _bits(a: Array) -> Array:
    return np.asarray(a, np.float32).view(np.uint32)


@pytest.mark.parametrize(("weight_dtype", "kernel"), [
    ("int8", "ascend-a3"), ("int8", "vllm-triton"), ("bfloat16", "ascend-a3"),
    ("bfloat16", "vllm-triton"), ("int32", "ascend-a3"),  # W4A8: ascend-a3 only
])
def test_the_stages_are_the_reference_trace_bit_for_bit(weight_dtype: str, kernel: str) -> None:
    problem = _problem(weight_dtype, **({"max_output_size": None} if kernel == "vllm-triton"
                                        else {}))
    numerics = oracle.Numerics(kernel=kernel)
    trace = oracle.run(problem, numerics=numerics).trace
    quantised = weight_dtype in ("int8", "int32")
    names = ["q", "sigma1", "h", "a", "q2", "sigma2", "y"] if quantised else ["h", "a", "y"]
    computed = dropped = 0
    for r, inputs in enumerate(problem.ranks):
        for t in range(inputs.num_tokens):
            stages = token_stages(problem, r, t, numerics)
            for s in stages.slots:
                if s.why_not:
                    dropped += 1
                    assert np.isnan(trace.y[r][t, s.slot]).all()
                    continue
                computed += 1
                values = {st.name: st.value.mid for st in s.stages}
                assert list(values) == names
                assert np.array_equal(_bits(values["y"]), _bits(trace.y[r][t, s.slot]))
                if quantised:
                    assert _bits(values["sigma1"]) == _bits(trace.token_scale[r][t])
            if stages.combined is None:
                continue
            assert np.array_equal(_bits(stages.combined.mid), _bits(trace.combined[r][t]))
    assert computed and (dropped or kernel == "vllm-triton")


def test_the_table_prints_the_stage_values() -> None:
    problem = _problem()
    trace = oracle.run(problem).trace
    table = token_stages(problem, 0, 0).describe()
    assert _line("    1    sigma1", trace.token_scale[0][0]) in table
    for k in range(3):
        assert _line("    6-7  y", trace.y[0][0, k]) in table
    assert _line("  8    combined", trace.combined[0][0]) in table


def _saved(tmp_path: Path, impl: Any, problem: Problem) -> Path:
    with pytest.raises(oracle.ConformanceError) as failure:
        oracle.check_implementation(impl, problems=st.just(problem), save_dir=tmp_path,
                                    isolate=False)
    assert failure.value.path is not None
    return Path(failure.value.path)


def _scaled(problem: Problem) -> list[tuple[Array, Array]]:
    """Every out value 1.25 times too large: no change of the combine alone gives that."""
    return [((r.out.astype(np.float32) * 1.25).astype(r.out.dtype), r.expert_token_nums)
            for r in oracle.run(problem).ranks]


@pytest.mark.parametrize(
    ("impl", "explained"),
    [
        (broken_impls.probs_ignored, "the combine of the reference y with the routing weights "
         "ignored"),
        (broken_impls.dropped_slot, "the combine of the reference y with slot 2 left out"),
        (_scaled, "not the combine alone"),
    ],
)
@pytest.mark.parametrize("weight_dtype", ["int8", "bfloat16"])
def test_explain_prints_the_failing_token_stage_by_stage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], impl: Any, explained: str,
    weight_dtype: str,
) -> None:
    path = _saved(tmp_path, impl, _problem(weight_dtype, max_output_size=None))
    assert main(["explain", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "stages of rank " in printed and "6-7  y" in printed, printed
    assert ("1    sigma1" in printed) == (weight_dtype == "int8")
    assert "out (yours)" in printed and "error (ulp)" in printed
    combine = "" if explained.startswith("not") else "step 8 (combine): your out row equals, "
    assert f"first stage that explains it: {combine}" in printed and explained in printed, printed
    assert main(["explain", str(path), "--no-stages"]) == 0
    assert "stages of rank" not in capsys.readouterr().out


def test_explain_without_outputs_says_there_is_no_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from oracle.files.counterexample import save

    path = save(tmp_path / "bare.npz", _problem(), meta={"stage": "timeout"})
    assert main(["explain", str(path)]) == 0
    assert "stages: none, the file holds no outputs" in capsys.readouterr().out


def test_a_conforming_row_is_not_explained_and_an_undefined_one_gets_none() -> None:
    problem = _problem()
    first, last = oracle.run(problem).ranks  # rank 1's tokens all lose a slot to truncation
    stages = token_stages(problem, 0, 3)
    assert stages.explanation(first.out[3]).startswith("none: the row is within")
    assert not np.abs(stages.error_ulps(first.out[3])).any()
    lost = token_stages(problem, 1, 0)
    assert not last.defined[0] and lost.explanation(last.out[0]) == "none, the row is undefined"
    assert "dropped by max_output_size" in lost.describe()
