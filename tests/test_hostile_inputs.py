"""In process too, an implementation that lies about its outputs, damages what it was given or
changes NumPy's error state gets a clean report; a Problem does not follow its caller's arrays."""

from __future__ import annotations

import dataclasses

import hostile_impls as hostile
import numpy as np
import pytest

from oracle.check.harness import evaluate
from spec import OpConfig, Problem, random_problem

PROBLEM = random_problem(OpConfig(ep_size=2, experts_per_rank=2, top_k=2, hidden=16,
                                  intermediate=8, tokens_per_rank=(3, 1)), seed=1)


@pytest.mark.parametrize(
    ("impl", "stage", "message"),
    [
        (hostile.masked_nan, "structure", "numpy.ma.MaskedArray"),
        (hostile.out_raises, "structure", "RuntimeError: out is not ready"),
        (hostile.unprintable_error, "call", "<its __str__ raised ValueError>"),
        (hostile.appends_to_weights, "inputs", "r0.w1 (entries added, removed or replaced)"),
        (hostile.sys_exit, "call", "SystemExit"),
    ],
)
def test_in_process_hostile_results_are_reports(impl, stage, message) -> None:
    verdict, _ = evaluate(impl, PROBLEM)
    assert verdict.stage == stage and message in verdict.message


def test_damaging_the_problem_or_numpy_state_does_not_reach_the_oracle() -> None:
    assert evaluate(hostile.damages_the_problem, PROBLEM)[0].ok
    before = np.geterr()
    evaluate(hostile.seterr_raise, PROBLEM)  # its own call may fail; ours must not
    assert np.geterr() == before


@pytest.mark.parametrize("kind", ["float8", "meta", "sparse", "conj"])
def test_torch_outputs_the_judge_cannot_read_are_structure_failures(kind) -> None:
    torch = pytest.importorskip("torch")

    make = {"float8": lambda shape: torch.zeros(shape, dtype=torch.float8_e4m3fn),
            "meta": lambda shape: torch.zeros(shape, device="meta"),
            "sparse": lambda shape: torch.zeros(shape).to_sparse(),
            "conj": lambda shape: torch.zeros(shape, dtype=torch.complex64).conj()}[kind]

    def impl(problem):
        return [(make((inputs.num_tokens, problem.config.hidden)),
                 torch.zeros(problem.config.experts_per_rank, dtype=torch.int32))
                for inputs in problem.ranks]

    verdict, _ = evaluate(impl, PROBLEM)
    assert not verdict.ok and verdict.stage == "structure"


def test_a_problem_is_independent_of_its_callers_arrays() -> None:
    ranks = [dataclasses.replace(r, x=np.array(r.x)) for r in PROBLEM.ranks]
    mine = Problem(ranks)
    ranks[0].x[:] = 0
    assert not np.array_equal(mine.ranks[0].x, ranks[0].x) and not mine.ranks[0].x.flags.writeable
