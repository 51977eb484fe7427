"""Memory layouts (issue 15): the operator's weights are ``IgnoreContiguous()``, so a kernel
may be handed Fortran-order or strided views. The oracle judges values; the strategies, the
problem, the child process and files keep the layout, so a kernel that reads a view as if it
were contiguous is caught (``benchmarks.mutants`` ``weights_read_as_contiguous``)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

import oracle
from oracle.check.harness import ConformanceError, check_implementation
from oracle.check.isolation import _decode_arrays, _encode
from spec import OpConfig, Problem, random_problem
from spec.memory import LAYOUTS, copy_array, layout_of, with_layout
from spec.strategies import problems

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from benchmarks.mutants import MUTANTS  # noqa: E402
from benchmarks.mutants.correct import DispatchFfnCombine  # noqa: E402

CFG = OpConfig(ep_size=2, experts_per_rank=2, top_k=2, hidden=32, intermediate=16,
               tokens_per_rank=(3, 2))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_with_layout_keeps_values_and_gives_the_layout(layout: str) -> None:
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    b = with_layout(a, layout)
    assert layout_of(b) == layout and np.array_equal(a, b) and b.flags.writeable
    c = copy_array(b)
    assert layout_of(c) == layout and np.array_equal(a, c) and not np.shares_memory(b, c)
    with pytest.raises(ValueError, match="not one of"):
        with_layout(a, "diagonal")


def test_problem_keeps_the_layout_and_owns_its_copy() -> None:
    problem = random_problem(CFG, seed=1, layout="strided")
    w = problem.ranks[0].w1[0]
    assert layout_of(w) == "strided" and layout_of(problem.ranks[0].x) == "strided"
    assert not w.flags.writeable
    caller = with_layout(np.asarray(w), "fortran")
    rebuilt = Problem([type(r)(**{**r.__dict__, "w1": [caller]}) if i == 0 else r
                       for i, r in enumerate(problem.ranks)])
    caller[0, 0, 0] = ~caller[0, 0, 0]  # the caller's later write does not reach the problem
    assert layout_of(rebuilt.ranks[0].w1[0]) == "fortran"
    assert rebuilt.ranks[0].w1[0][0, 0, 0] != caller[0, 0, 0]


@pytest.mark.parametrize("layout", ["fortran", "strided"])
def test_the_reference_reads_values_not_memory(layout: str) -> None:
    plain = oracle.run(random_problem(CFG, seed=2))
    laid = oracle.run(random_problem(CFG, seed=2, layout=layout))
    for a, b in zip(plain.ranks, laid.ranks, strict=True):
        assert np.array_equal(a.out.view(np.uint16), b.out.view(np.uint16))


def test_strategy_draws_the_layout_with_an_event() -> None:
    seen: set[str] = set()

    @settings(max_examples=15, database=None, derandomize=True)
    @given(problems(layouts=st.sampled_from(LAYOUTS)))
    def check(problem: Problem) -> None:
        seen.update(layout_of(w) for r in problem.ranks for w in r.w1 if w.size)

    check()
    assert seen == set(LAYOUTS)


def test_the_wire_to_the_child_keeps_the_layout() -> None:
    arrays = [(f"a.{name}", with_layout(np.arange(12.0).reshape(3, 4), name)) for name in LAYOUTS]
    chunks = _encode({}, arrays)
    import json

    n_head = int.from_bytes(bytes(chunks[0][:4]), "big")
    header = json.loads(bytes(chunks[1]).decode())
    assert n_head == len(bytes(chunks[1]))
    payload = b"".join(bytes(c) for c in chunks[2:])
    for (name, a), (got_name, b) in zip(arrays, _decode_arrays(header["arrays"], payload)):
        assert got_name == name and layout_of(b) == layout_of(a) and np.array_equal(a, b)
        assert not b.flags.writeable


def test_an_isolated_kernel_receives_the_layout(monkeypatch) -> None:
    """A kernel that needs contiguous weights passes on contiguous draws and fails, in its
    child process, once handed a Fortran-order view."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    kwargs = {"save_dir": None, "isolate": True, "settings": settings(max_examples=5,
              database=None, derandomize=True)}
    check_implementation("broken_impls:needs_contiguous_weights", **kwargs)
    with pytest.raises(ConformanceError, match="not contiguous"):
        check_implementation("broken_impls:needs_contiguous_weights",
                             problems=problems(layouts=st.just("fortran")), **kwargs)


@pytest.mark.parametrize("layout", ["fortran", "strided"])
def test_a_kernel_that_reads_views_as_contiguous_is_caught(layout: str) -> None:
    mutant = MUTANTS["weights_read_as_contiguous"]
    quick = settings(max_examples=10, database=None, derandomize=True)
    check_implementation(mutant, settings=quick, save_dir=None)  # contiguous draws hide it
    check_implementation(DispatchFfnCombine(), settings=quick, save_dir=None,
                         problems=problems(layouts=st.just(layout)))
    with pytest.raises(ConformanceError) as failure:  # the stage is the claim: unshrunk
        check_implementation(mutant, settings=settings(quick, phases=[Phase.explicit,
                                                                      Phase.generate]),
                             save_dir=None, problems=problems(layouts=st.just(layout)))
    assert failure.value.verdict.stage == "out"
