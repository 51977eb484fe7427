"""The conformance search for placement-aware implementations (issue 22): what
:func:`oracle.check.harness.check_implementation` does for plain calls, over
:class:`spec.placement.PlacedCall`\\ s (``docs/routing.md``).

The implementation is called as ``impl(call)`` with a :class:`~spec.placement.PlacedCall` (in a
child process by default, its placement record sent along) and returns one
``(out, expert_token_nums)`` pair per rank, the counts over the rank's ``P/EP`` physical slots;
:func:`oracle.judge.placed.compare_placed` judges it, in ideal numerics by default (GPU stacks
have no Ascend kernel profile). A failure is saved as a version-2 counterexample file that
``dfc-oracle replay`` reruns. :data:`PLACED_FAMILIES` are the gate's test families.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from hypothesis import HealthCheck, given
from hypothesis import seed as hseed
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from oracle.check.harness import (
    DEFAULT_INPUTS,
    DEFAULT_SAVE_DIR,
    ConformanceError,
    Implementation,
    _runner,
    _save_counterexample,
    evaluate,
    format_report,
)
from oracle.check.isolation import ChildProcess
from oracle.config.options import WEIGHT_VARIANTS, check_options
from oracle.files.atomic import SaveError
from oracle.judge.verdict import Verdict
from oracle.model.numerics import resolve_numerics
from spec.placed_strategies import PLACED_KINDS, placed_calls, placements
from spec.placement import PlacedCall

__all__ = ["PLACED_FAMILIES", "check_placed", "placed_families"]

#: The gate's families of placed calls (``test_placed[family]``): every draw has its family.
PLACED_FAMILIES = ("any", "shared", "many_ranks")


def placed_families(family: str, variants: Sequence[str]) -> st.SearchStrategy[PlacedCall]:
    """The placed calls of one family of :data:`PLACED_FAMILIES`, of the gate variants
    ``variants`` names (``bf16``/``fp16``: float weights; every other one by name,
    :data:`spec.placed_strategies.PLACED_KINDS`) but ``w4a8``, an Ascend format that the
    ideal judge of placed calls refuses. An unknown family or variant, or none left, is a
    ValueError naming what to pass."""
    kinds = tuple(dict.fromkeys("float" if v in ("bf16", "fp16") else v for v in variants
                                if v != "w4a8"))
    if not kinds or not set(kinds) <= set(PLACED_KINDS):
        raise ValueError(f"variants {','.join(variants)!r}: placed calls take "
                         f"{', '.join(v for v in WEIGHT_VARIANTS if v != 'w4a8')}")
    if family == "any":
        return placed_calls(variants=kinds)
    if family == "shared":
        return placed_calls(variants=kinds, shared=st.sampled_from((1, 2)))
    if family == "many_ranks":
        return placed_calls(variants=kinds, placements=placements(min_ep=9))
    raise ValueError(f"placed family {family!r}: one of {', '.join(PLACED_FAMILIES)}")


def check_placed(
    impl: Implementation | str | ChildProcess,
    *,
    calls: st.SearchStrategy[PlacedCall] | None = None,
    settings: hsettings | None = None,
    save_dir: str | Path | None = DEFAULT_SAVE_DIR,
    impl_name: str | None = None,
    numerics: str = "ideal",
    timeout: float = 60.0,
    inputs: str = DEFAULT_INPUTS,
    ulps: float = 0.0,
    seed: int | None = None,
    isolate: bool | None = None,
    threads: int | None = 1,
) -> None:
    """Search ``calls`` (default :func:`spec.placed_strategies.placed_calls`) for a placed call
    on which ``impl(call)`` disagrees with :func:`oracle.model.routing.run_placed`; raise
    :class:`oracle.check.harness.ConformanceError` with the minimal one, saved under
    ``save_dir`` with its placement record. ``impl``, ``isolate``, ``threads``, ``timeout``,
    ``inputs``, ``ulps``, ``seed`` and ``settings`` as for
    :func:`oracle.check.harness.check_implementation`."""
    check_options(numerics=numerics, ulps=ulps, timeout=timeout, inputs=inputs,
                  save_dir=save_dir, threads=threads)
    num = resolve_numerics(numerics)
    directory = None if save_dir is None else Path(os.path.abspath(save_dir))
    base = settings if settings is not None else hsettings(hsettings(), deadline=None)
    search = hsettings(base, report_multiple_bugs=False, suppress_health_check=[
        *base.suppress_health_check, HealthCheck.too_slow, HealthCheck.data_too_large])
    if impl_name is None and isinstance(impl, str):
        impl_name = impl
    runner, owned = _runner(impl, isolate, threads)
    found: list[tuple[PlacedCall, Verdict, object]] = []

    @search
    @given(calls if calls is not None else placed_calls())
    def conforms(call: PlacedCall) -> None:
        verdict, outputs = evaluate(runner, call, numerics=num, timeout=timeout,
                                    inputs=inputs, ulps=ulps)
        if not verdict.ok:
            found[:] = [(call, verdict, outputs)]
            # A hang is not shrunk: every smaller call would cost a whole timeout.
            if verdict.stage == "timeout":
                raise _Hung
            raise _Mismatch(verdict.message)

    if seed is not None:
        conforms = hseed(seed)(conforms)
    try:
        conforms()
    except (_Mismatch, _Hung):
        pass
    finally:
        if owned and isinstance(runner, ChildProcess):
            runner.close()
    if not found:
        return
    call, verdict, outputs = found[0]
    path, unsaved = None, None
    if directory is not None:
        try:
            path = _save_counterexample(directory, call.problem, verdict, outputs, num,
                                        impl_name, ulps, inputs, placed=call)
        except SaveError as exc:
            unsaved = str(exc)
    replay = f"dfc-oracle replay {path} --impl {impl_name}" if path and impl_name else None
    report = format_report(call.problem, verdict, numerics=num, path=path, replay=replay,
                           ulps=ulps, unsaved=unsaved, note=f"placed call: {call.summary()} "
                           "(the minimal call above has the chosen physical slots as ids)")
    raise ConformanceError(report, problem=call.problem, verdict=verdict, path=path)


class _Mismatch(Exception):
    """A placed call the implementation fails (the last one raised is the shrunk one)."""


class _Hung(BaseException):
    """Raised through Hypothesis (a BaseException is not shrunk) when a call times out."""
