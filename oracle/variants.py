"""Known-defective and open-question variants of the reference model, for ``dfc-oracle hunt``.

Each variant is an implementation (``problem -> outputs``) that differs from the default
reference in one documented way; hunting it shows, with a minimal counterexample, what the
difference does to real outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

from oracle.numerics import Numerics
from oracle.reference import run
from spec import Problem
from spec.strategies import problems, token_rows

__all__ = ["VARIANTS", "Variant", "outputs_of"]


def outputs_of(numerics: Numerics) -> Callable[[Problem], list[tuple[Any, Any]]]:
    """The reference model under other numerics, as an implementation."""

    def impl(problem: Problem) -> list[tuple[Any, Any]]:
        return [(r.out, r.expert_token_nums) for r in run(problem, numerics=numerics).ranks]

    return impl


@dataclass(frozen=True)
class Variant:
    name: str
    what: str
    source: str
    impl: Callable[[Problem], Any]
    problems: st.SearchStrategy[Problem]


VARIANTS = (
    Variant(
        "zero-row NaN",
        "the kernel's reading of §6 steps 1 and 5: an all-zero token row quantises as 0/0 = NaN "
        "and poisons every slot of its token, where the mathematics gives 0",
        "reference notes §6 step 1 and 5 [inferred]",
        outputs_of(Numerics(zero_rows="nan")),
        problems(values=token_rows(families=st.just("zero_row"))),
    ),
    Variant(
        "19-bit dequant scales",
        "the CANN converter keeps scale bits & 0xFFFFE000; vLLM passes raw float32 bits: does "
        "the open question change outputs?",
        "reference notes §6 step 2 [inferred]",
        outputs_of(Numerics(truncate_scales=True)),
        problems(values=token_rows(families=st.sampled_from(("normal", "ties")))),
    ),
)
