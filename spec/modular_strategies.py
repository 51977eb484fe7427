"""Hypothesis strategies for one stage of the modular split (:class:`spec.modular.StageCall`).

The call is :func:`spec.strategies.problems` without truncation (a stage call drops no row;
every routing family, mask and token-count family of the fused search), a layout, and for the
batched layout a declared ``max_tokens_per_rank`` at the fitting size or a little above
(shrinking to the fitting size, where an expert can be full). The stage's input buffers are
the reference's (``oracle.model.modular.stage_inputs`` fills them; ``spec`` has no model).

>>> from hypothesis import given, settings
>>> @settings(max_examples=3, database=None)
... @given(stage_calls("dispatch", layouts=("batched",)))
... def test_batched(call):
...     assert call.layout == "batched" and call.capacity % call.problem.config.ep_size == 0
>>> test_batched()
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from hypothesis import strategies as st

from spec.config import OpConfig
from spec.modular import LAYOUTS, STAGES, StageCall
from spec.placed_strategies import placed_calls
from spec.strategies import configs as plain_configs
from spec.strategies import problems

__all__ = ["placed_stage_calls", "stage_calls"]


@st.composite
def stage_calls(draw: st.DrawFn, stage: str, *, layouts: Sequence[str] = LAYOUTS,
                configs: st.SearchStrategy[OpConfig] | None = None) -> StageCall:
    """A valid :class:`StageCall` of ``stage`` (its ``received`` left empty) in one of
    ``layouts``. ``configs``: the configuration strategy (default: the small configurations
    of :func:`spec.strategies.configs` without truncation)."""
    _check(stage, layouts)
    cfgs = configs if configs is not None else plain_configs(truncation=st.just(False))
    problem = draw(problems(configs=cfgs))
    layout = draw(st.sampled_from(tuple(layouts)))
    return _sized(draw, StageCall(stage=stage, problem=problem, layout=layout))


def _sized(draw: st.DrawFn, call: StageCall) -> StageCall:
    """``call`` with a batched buffer declared at the fitting size or a little above."""
    if call.layout != "batched":
        return call
    spare = draw(st.integers(0, 2))
    return dataclasses.replace(call, max_tokens_per_rank=call.fitting_tokens() + spare)


@st.composite
def placed_stage_calls(draw: st.DrawFn, stage: str, *,
                       layouts: Sequence[str] = LAYOUTS) -> StageCall:
    """A :class:`StageCall` made from a drawn placed call
    (:func:`spec.placed_strategies.placed_calls` without shared experts or weights on the
    input: :meth:`StageCall.from_placed`): replicas, int64 ids, rsf, renormalize, and −1
    slots (``routed`` False) in about half the draws."""
    _check(stage, layouts)
    placed = draw(placed_calls(shared=st.just(0)).filter(lambda c: not c.weights.on_input))
    layout = draw(st.sampled_from(tuple(layouts)))
    return _sized(draw, StageCall.from_placed(stage, placed, layout=layout))


def _check(stage: str, layouts: Sequence[str]) -> None:
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r} is not one of {STAGES}")
    bad = sorted(set(layouts) - set(LAYOUTS))
    if bad or not layouts:
        raise ValueError(f"layouts {list(layouts)!r}: allowed a non-empty subset of {LAYOUTS}")
