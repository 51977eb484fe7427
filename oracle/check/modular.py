"""The search for one stage of the modular split (:mod:`spec.modular`): :func:`check_stage`
draws stage calls (:func:`spec.modular_strategies.stage_calls`, their inputs from the
reference, :func:`oracle.model.modular.stage_inputs`), runs the implementation on a copy in a
thread under a timeout, judges it (:mod:`oracle.judge.modular`) and raises
:class:`StageConformanceError` with the shrunk call, saved as a version-3 counterexample file
(its stage record: :mod:`oracle.files.counterexample`) that ``dfc-oracle replay`` reruns. An
implementation that raises, hangs or returns garbage gets a report, never a traceback of this
code. It runs in this process, in a daemon thread (no child isolation, unlike
:func:`oracle.check.harness.check_implementation`: the child's wire protocol carries the
fused call's ``(out, expert_token_nums)`` shapes, not a stage's buffers); an ``os._exit``, a
crash or a GIL-holding hang in the implementation stops the search.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from oracle.check.harness import (
    _NUMPY_DEFAULTS,
    DEFAULT_SAVE_DIR,
    _copy_inputs,
    _save_counterexample,
    describe_problem,
    run_in_thread,
)
from oracle.check.isolation import check_signature
from oracle.check.loading import load_impl
from oracle.files.atomic import SaveError
from oracle.judge.modular import compare_combine, compare_dispatch, compare_experts
from oracle.judge.verdict import Verdict
from oracle.model.modular import stage_inputs
from oracle.model.numerics import Numerics, resolve_numerics
from spec.modular import LAYOUTS, STAGES, Received, StageCall
from spec.modular_strategies import placed_stage_calls
from spec.modular_strategies import stage_calls as spec_stage_calls

__all__ = ["StageConformanceError", "check_stage", "evaluate_stage", "judge_stage", "stage_calls"]

StageImpl = Callable[[StageCall], Any]


class StageConformanceError(AssertionError):
    """A stage implementation disagrees with the reference: ``call`` is the shrunk
    :class:`spec.modular.StageCall`, ``verdict`` the judge's answer, ``report`` the text."""

    def __init__(self, report: str, *, call: StageCall, verdict: Verdict,
                 path: Path | None = None) -> None:
        super().__init__(report)
        self.report, self.call, self.verdict, self.path = report, call, verdict, path


def stage_calls(stage: str, *, layouts: Sequence[str] = LAYOUTS, placed: bool = False,
                **kwargs: Any) -> st.SearchStrategy[StageCall]:
    """:func:`spec.modular_strategies.stage_calls` (``placed``:
    :func:`~spec.modular_strategies.placed_stage_calls`, ``kwargs`` not taken) with the
    stage's inputs filled from the reference (a drawn seed for the combine's expert
    outputs)."""
    calls = (placed_stage_calls(stage, layouts=layouts, **kwargs) if placed else
             spec_stage_calls(stage, layouts=layouts, **kwargs))
    return st.tuples(calls, st.integers(0, 2**32 - 1)).map(lambda pair: stage_inputs(*pair))


def judge_stage(call: StageCall, outputs: object, *, numerics: str | Numerics = "ideal",
                ulps: float = 0.0) -> Verdict:
    """The stage's judge (:mod:`oracle.judge.modular`) on ``outputs``."""
    if call.stage == "dispatch":
        return compare_dispatch(call, outputs)
    judge = compare_experts if call.stage == "experts" else compare_combine
    return judge(call, outputs, numerics=numerics, ulps=ulps)


def _copy(call: StageCall) -> StageCall:
    """A writable deep copy of the call, so that the implementation cannot touch what it is
    judged on."""
    return dataclasses.replace(
        call, problem=_copy_inputs(call.problem),
        received=tuple(Received(x=b.x.copy(), source=b.source.copy(), counts=b.counts.copy())
                       for b in call.received), routed=tuple(m.copy() for m in call.routed))


def evaluate_stage(impl: StageImpl, call: StageCall, *, numerics: str | Numerics = "ideal",
                   ulps: float = 0.0, timeout: float = 60.0) -> Verdict:
    """Run ``impl`` on a copy of ``call`` in a daemon thread and judge it; never raises for
    what the implementation does."""
    copy = _copy(call)
    box = run_in_thread(lambda: impl(copy), timeout, "dfc-oracle-stage")
    if box is None:
        return Verdict(False, "timeout", f"the {call.stage} implementation did not return: "
                       f"no result after {timeout:g} s (hung, or far too slow)", float("inf"))
    if "error" in box:
        return Verdict(False, "call", f"the {call.stage} implementation raised: {box['error']}",
                       float("inf"))
    with np.errstate(**_NUMPY_DEFAULTS):
        return judge_stage(call, box.get("result"), numerics=numerics, ulps=ulps)


class _Mismatch(Exception):
    def __init__(self, call: StageCall, verdict: Verdict) -> None:
        super().__init__(verdict.message)
        self.call, self.verdict = call, verdict


def check_stage(
    stage: str,
    impl: StageImpl | str,
    *,
    layouts: Sequence[str] = LAYOUTS,
    numerics: str | Numerics = "ideal",
    ulps: float = 0.0,
    timeout: float = 60.0,
    calls: st.SearchStrategy[StageCall] | None = None,
    settings: hsettings | None = None,
    save_dir: str | Path | None = DEFAULT_SAVE_DIR,
    impl_name: str | None = None,
) -> None:
    """Search for a stage call on which ``impl`` (``impl(call) -> one entry per rank``,
    :mod:`spec.modular`, a callable or a ``"module:function"`` name, run in this process)
    disagrees with the reference; raise :class:`StageConformanceError` with the shrunk call.
    ``layouts``: the receive layouts the implementation takes; ``calls`` replaces the default
    strategy (:func:`stage_calls`); ``settings`` defaults to the active Hypothesis profile
    without a deadline. ``numerics``: ``"ideal"`` (default) or a :class:`Numerics` whose
    kernel profile the experts stage is emulated with (its rounding points, the one-rank
    fused judge) and the combine judged with (the profile's sum order and dtype); a dispatch
    is bit-exact either way. The shrunk call is saved under ``save_dir`` (None: not saved).

    >>> from oracle.model.modular import dispatch_reference
    >>> check_stage("dispatch", lambda c: [(b.x, b.source, b.counts)
    ...                                    for b in dispatch_reference(c)],
    ...             settings=hsettings(max_examples=5, database=None))
    """
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r} is not one of {STAGES}: name the stage the "
                         "implementation computes")
    unknown = sorted(set(layouts) - set(LAYOUTS))
    if unknown or not layouts:
        raise ValueError(f"layouts {list(layouts)!r}: allowed a non-empty subset of {LAYOUTS}")
    run = load_impl(impl) if isinstance(impl, str) else impl
    check_signature(run, impl if isinstance(impl, str) else repr(impl))
    strategy = calls if calls is not None else stage_calls(stage, layouts=layouts)
    base = settings if settings is not None else hsettings(hsettings(), deadline=None)
    search = hsettings(base, report_multiple_bugs=False,
                       suppress_health_check=[*base.suppress_health_check,
                                              HealthCheck.too_slow, HealthCheck.data_too_large])

    @search
    @given(strategy)
    def conforms(call: StageCall) -> None:
        verdict = evaluate_stage(run, call, numerics=numerics, ulps=ulps, timeout=timeout)
        if not verdict.ok:
            raise _Mismatch(call, verdict)

    try:
        conforms()
    except _Mismatch as found:
        call, verdict = found.call, found.verdict
    else:
        return
    if impl_name is None and isinstance(impl, str):
        impl_name = impl
    path, saved = None, ""
    if save_dir is not None:
        try:
            path = _save_counterexample(Path(os.path.abspath(save_dir)), call.problem, verdict,
                                        None, resolve_numerics(numerics), impl_name, ulps,
                                        "ignore", stage=call)
            saved = f"\nsaved: {path}" + (f"\nreplay: dfc-oracle replay {path} --impl "
                                          f"{impl_name}" if impl_name else "")
        except SaveError as exc:
            saved = f"\nnot saved: {exc}"
    report = (f"the {stage} stage fails on a {call.layout} call ({verdict.stage}): "
              f"{verdict.message}\n{call.summary()}\n{describe_problem(call.problem)}{saved}")
    raise StageConformanceError(report, call=call, verdict=verdict, path=path)
