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

from collections.abc import Sequence

from hypothesis import strategies as st

from spec.config import OpConfig
from spec.modular import LAYOUTS, STAGES, StageCall
from spec.strategies import configs as plain_configs
from spec.strategies import problems

__all__ = ["stage_calls"]


@st.composite
def stage_calls(draw: st.DrawFn, stage: str, *, layouts: Sequence[str] = LAYOUTS,
                configs: st.SearchStrategy[OpConfig] | None = None) -> StageCall:
    """A valid :class:`StageCall` of ``stage`` (its ``received`` left empty) in one of
    ``layouts``. ``configs``: the configuration strategy (default: the small configurations
    of :func:`spec.strategies.configs` without truncation)."""
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r} is not one of {STAGES}")
    bad = sorted(set(layouts) - set(LAYOUTS))
    if bad or not layouts:
        raise ValueError(f"layouts {list(layouts)!r}: allowed a non-empty subset of {LAYOUTS}")
    cfgs = configs if configs is not None else plain_configs(truncation=st.just(False))
    problem = draw(problems(configs=cfgs))
    layout = draw(st.sampled_from(tuple(layouts)))
    call = StageCall(stage=stage, problem=problem, layout=layout)
    if layout == "batched":
        spare = draw(st.integers(0, 2))
        call = StageCall(stage=stage, problem=problem, layout=layout,
                         max_tokens_per_rank=call.fitting_tokens() + spare)
    return call
