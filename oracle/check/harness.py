"""The conformance harness: search for, shrink, save and report a counterexample.

:func:`check_implementation` runs a Hypothesis search comparing an implementation with
:func:`oracle.run` and, on failure, raises :class:`ConformanceError` carrying the minimal failing
problem and a report a kernel engineer can act on in one read. The implementation runs on its
own copy of the inputs, under a timeout; whatever it does — raise, hang, crash, exit, return
garbage, write into its inputs — becomes a report, never a traceback from this code. Given by
name (``"module:function"``) it runs in a child process (:mod:`oracle.check.isolation`); a callable
runs in this process unless ``isolate=True``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import HealthCheck, Phase, event, given, target
from hypothesis import seed as hseed
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from oracle.check.isolation import (
    CallOutcome,
    ChildProcess,
    InputWatch,
    InputWrite,
    check_signature,
    failure_of,
    importable_name,
    plain_outputs,
)
from oracle.check.loading import load_impl, load_kernel
from oracle.check.reduction import reduce_counterexample
from oracle.config.options import DEFAULT_INPUTS, DEFAULT_VARIANTS, INPUT_POLICIES, check_options
from oracle.files.atomic import SaveError
from oracle.files.counterexample import arrays_of, save
from oracle.judge.placed import compare_placed
from oracle.judge.verdict import Verdict, compare, structured_outputs
from oracle.model.kernels import KernelProfile
from oracle.model.numerics import Numerics, resolve_numerics, with_kernel
from oracle.model.reference import route
from spec import OpConfig, Problem
from spec.fields import GATE_VARIANTS, X_DTYPES, GateVariant, Selection
from spec.limits import MODEL_PRESETS, ShapeDomain
from spec.memory import copy_array
from spec.modular import StageCall
from spec.placement import PlacedCall
from spec.strategies import (
    FP8_ROW_FAMILIES,
    POWER_ROW_FAMILIES,
    ROW_FAMILIES,
    configs,
    problems,
    token_rows,
)

__all__ = [
    "DEFAULT_INPUTS",
    "INPUT_POLICIES",
    "ConformanceError",
    "Implementation",
    "call_implementation",
    "check_implementation",
    "describe_problem",
    "evaluate",
    "fit_problems",
    "format_report",
    "gate_configs",
    "preset_configs",
    "run_in_thread",
    "variant_configs",
]

Implementation = Callable[[Any], Any]  # takes a spec.Problem, or a PlacedCall (placed search)
#: NumPy's default floating-point error handling, restored around the judge: an implementation
#: that calls ``np.seterr(all="raise")`` (at import, or in its call) must not crash the oracle.
_NUMPY_DEFAULTS: dict[str, Any] = {"divide": "warn", "over": "warn", "under": "ignore",
                                   "invalid": "warn"}
DEFAULT_SAVE_DIR = Path("dfc-counterexamples")


class ConformanceError(AssertionError):
    """An implementation disagrees with the reference model.

    ``problem`` is the minimal failing :class:`spec.Problem`, ``verdict`` the judge's answer,
    ``report`` the text of the message, ``path`` the saved counterexample (or None).
    """

    def __init__(self, report: str, *, problem: Problem, verdict: Verdict,
                 path: Path | None) -> None:
        super().__init__(report)
        self.report = report
        self.problem = problem
        self.verdict = verdict
        self.path = path


class _Hung(BaseException):
    """Raised through Hypothesis (a BaseException is not shrunk) when a call times out."""

    def __init__(self, problem: Problem, verdict: Verdict) -> None:
        super().__init__(verdict.message)
        self.problem, self.verdict = problem, verdict


class _Mismatch(Exception):
    def __init__(self, problem: Problem, verdict: Verdict, outputs: object) -> None:
        super().__init__(verdict.message)
        self.problem, self.verdict, self.outputs = problem, verdict, outputs


def _copy_inputs(problem: Problem) -> Problem:
    """A writable deep copy, so the implementation cannot touch the problem we judge it on;
    each array keeps its layout class (:mod:`spec.memory`)."""
    return Problem.from_validated([r.map_arrays(copy_array, lists=True) for r in problem.ranks],
                                  problem.config)


def _copy_call(given: Problem | PlacedCall) -> Problem | PlacedCall:
    """:func:`_copy_inputs`, of a placed call's problem too (its record is copied read-only)."""
    if isinstance(given, Problem):
        return _copy_inputs(given)
    return PlacedCall.from_record(_copy_inputs(given.problem).ranks, *given.record(),
                                  **given.attributes)


def run_in_thread(fn: Callable[[], object], timeout: float,
                  name: str) -> dict[str, object] | None:
    """``fn()`` in a daemon thread: ``{"result": ...}``, or ``{"error": ..., "status": ...}``
    (what it raised, described, and whether it raised or the adapter refused the call:
    :func:`oracle.check.isolation.failure_of`), or ``None`` where it has not returned after
    ``timeout`` seconds."""
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:
            box["status"], box["error"] = failure_of(exc)

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    thread.join(timeout)
    return None if thread.is_alive() else box


def _call(impl: Implementation, given: Problem | PlacedCall, timeout: float) -> CallOutcome:
    """Run ``impl`` in this process, on a copy of ``given`` (a problem or a placed call), in a
    daemon thread. It cannot survive ``os._exit`` or a segfault, nor stop a call that holds the
    GIL: see :class:`oracle.check.isolation.ChildProcess` for that."""
    problem = given.problem if isinstance(given, PlacedCall) else given
    handed = _copy_call(given)
    copy = handed.problem if isinstance(handed, PlacedCall) else handed
    watch = InputWatch(copy)
    box = run_in_thread(lambda: impl(handed), timeout, "dfc-oracle-impl")
    if box is None:
        return CallOutcome("hung", f"no result after {timeout:g} s (hung, or far too slow)")
    with np.errstate(**_NUMPY_DEFAULTS):
        changed = tuple(watch.changed(arrays_of(problem)))
        if "error" in box:
            return CallOutcome(str(box["status"]), str(box["error"]), changed=changed)
        return CallOutcome("ok", outputs=plain_outputs(problem, box.get("result")),
                           changed=changed)


Runner = Implementation | ChildProcess


def call_implementation(impl: Runner, problem: Problem | PlacedCall,
                        timeout: float) -> CallOutcome:
    """Run ``impl`` once on a copy of ``problem`` (or placed call), in its child process or in
    this one; never raises for what the implementation does."""
    if isinstance(impl, ChildProcess):
        return impl.call(problem, timeout)
    return _call(impl, problem, timeout)


def evaluate(
    impl: Runner,
    problem: Problem | PlacedCall,
    *,
    numerics: str | Numerics = "faithful",
    timeout: float = 60.0,
    inputs: str = DEFAULT_INPUTS,
    ulps: float = 0.0,
) -> tuple[Verdict, object]:
    """Call ``impl`` (a callable, run in this process, or a :class:`ChildProcess`) on a copy of
    ``problem`` and judge it: ``(verdict, outputs as plain per-rank pairs, or None)``. A
    :class:`spec.placement.PlacedCall` is handed over as such and judged by
    :func:`oracle.judge.placed.compare_placed`. Options outside what is allowed raise
    :class:`oracle.config.options.OptionError`."""
    check_options(numerics=numerics, ulps=ulps, timeout=timeout, inputs=inputs)
    outcome = call_implementation(impl, problem, timeout)
    if outcome.status == "raised":
        return _failed("call", f"the implementation raised: {outcome.message}"), None
    if outcome.status == "refused":  # the adapter's, before the implementation was entered
        return _failed("call", "the gate's inputs were refused (the implementation was not "
                       f"called): {outcome.message}"), None
    if outcome.status == "crashed":
        return _failed("call", f"the implementation crashed: {outcome.message}"), None
    if outcome.status == "hung":
        return _failed("timeout", f"the implementation did not return: {outcome.message}"), None
    if isinstance(outcome.outputs, Verdict):
        return outcome.outputs, None
    outputs = outcome.outputs
    with np.errstate(**_NUMPY_DEFAULTS):
        verdict = (compare_placed(problem, outputs, numerics=numerics, ulps=ulps)
                   if isinstance(problem, PlacedCall) else
                   compare(problem, outputs, numerics=numerics, ulps=ulps))
    if verdict.ok and outcome.changed and inputs != "ignore":
        verdict = _judge_writes(verdict, outcome.changed, inputs, problem.config.num_experts)
    if verdict.ok and verdict.untested_rows:
        UNTESTED[verdict.untested_reason] += 1
        # In a search, a statistic (--hypothesis-show-statistics): how often a pass rested on
        # the element-wise check alone. Here, not in the search's own function: derandomised
        # Hypothesis seeds itself from that function's source.
        with contextlib.suppress(InvalidArgument):  # not in a Hypothesis test
            event(f"judge: rows the row test left to the element-wise check "
                  f"({verdict.untested_reason})")
    return verdict, outputs


#: Per reason, the passing verdicts of :func:`evaluate` in this process that left rows to the
#: element-wise check alone (:attr:`oracle.judge.verdict.Verdict.untested_rows`): what
#: ``dfc-oracle check`` and the pytest gate report after a search, so that a gate that could
#: not judge a kernel's rows does not read as one that did. Cleared by whoever reports it.
UNTESTED: Counter[str] = Counter()


def untested_summary() -> str:
    """One line on :data:`UNTESTED` ("" when empty)."""
    if not UNTESTED:
        return ""
    reason, most = UNTESTED.most_common(1)[0]
    return (f"{sum(UNTESTED.values())} passing calls had rows the row test could not judge, "
            f"left to the element-wise check alone (most often, in {most}: {reason}); "
            f"a bug there may pass")


def _judge_writes(verdict: Verdict, writes: tuple[InputWrite, ...], inputs: str,
                  sentinel: int) -> Verdict:
    """``verdict`` (a pass) for a call that wrote ``writes`` into its inputs, or the ``inputs``
    failure its policy (:data:`oracle.config.options.INPUT_POLICIES`) makes of them."""
    if inputs == "sentinel":
        forbidden = [w for w in writes if not w.sentinel]
        if forbidden:
            return _failed("inputs", "the implementation wrote into its inputs beyond the "
                           f"operator's write-back of the sentinel EP·E = {sentinel} into masked "
                           "tokens' expert ids: " + "; ".join(map(str, forbidden)))
    elif inputs == "strict":
        return _failed("inputs", "the implementation wrote into its inputs: "
                       + "; ".join(map(str, writes)) + " (inputs='strict' allows no write; "
                       "'sentinel' allows the operator's write-back of masked tokens' ids)")
    else:
        warnings.warn("the implementation wrote into its inputs: " + "; ".join(map(str, writes)),
                      stacklevel=3)
    return verdict


def _failed(stage: str, message: str) -> Verdict:
    return Verdict(False, stage, message, float("inf"))


def describe_problem(problem: Problem) -> str:
    """The configuration in one line plus the routing matrix (source rank x destination rank)."""
    cfg = problem.config
    counts = route(problem).counts
    per_dest = counts.reshape(cfg.ep_size, cfg.ep_size, cfg.experts_per_rank).sum(axis=2)
    lines = [cfg.summary(), "routed slots, source rank -> {destination rank: slots}:"]
    lines += routing_rows(per_dest)
    return "\n".join(lines)


def routing_rows(matrix: np.ndarray) -> list[str]:
    """One line per source rank that routes anything, as ``{column: count}`` (sparse, so EP=32
    or hundreds of experts stay readable); silent ranks are named in one line."""
    lines = [f"  rank {s}: {dict((int(c), int(row[c])) for c in np.flatnonzero(row))}"
             for s, row in enumerate(matrix) if row.any()]
    silent = [s for s, row in enumerate(matrix) if not row.any()]
    if silent:
        lines.append(f"  ranks routing nothing: {silent}")
    return lines


def format_report(
    problem: Problem, verdict: Verdict, *, numerics: Numerics, path: Path | None,
    replay: str | None, ulps: float = 0.0, note: str | None = None,
    unsaved: str | None = None,
) -> str:
    """The one-read report: configuration, stage, worst element, routing, file (or why it
    could not be saved: ``unsaved``), replay; ``note`` says how the minimal call was reduced
    after shrinking."""
    slack = f", +{ulps:g} ulp" if ulps and numerics.mode == "faithful" else ""
    lines = [
        f"dispatch_ffn_combine does not conform (stage '{verdict.stage}', numerics "
        f"{numerics.describe()}{slack}).",
        f"minimal call: {describe_problem(problem)}",
        f"what failed: {verdict.message}",
    ]
    if note:
        lines.insert(2, note)
    if path is not None:
        lines.append(f"counterexample saved: {path}")
    if unsaved is not None:
        lines.append(f"counterexample NOT saved: {unsaved}")
    if replay:
        lines.append(f"replay: {replay}")
    return "\n".join(lines)


DOMAINS = ("kernel", "contract")
#: Each weight variant's token dtypes and weight dtype (float weights are in x's dtype).
_GATE = {g.name: g for g in GATE_VARIANTS}
_VARIANT_DTYPES = {g.name: (g.x_dtypes, g.weight_dtype) for g in GATE_VARIANTS}


def variant_configs(
    variants: Sequence[str], *, domain: ShapeDomain | None = None, **fields: Any
) -> st.SearchStrategy[OpConfig]:
    """:func:`spec.strategies.configs` (with ``fields``) drawing only the weight variants
    ``variants`` (names of :data:`oracle.config.options.WEIGHT_VARIANTS`).

    >>> {variant_configs(["bf16"]).example().variant for _ in range(5)}
    {'bf16'}
    """
    xs = [x for x in X_DTYPES if any(x in _VARIANT_DTYPES[v][0] for v in variants)]
    weights = [_VARIANT_DTYPES[v][1] for v in variants]
    # configs() draws x, then the weights, and float weights take x's dtype: when a drawn pair
    # can make a variant not asked for (w8a8 with bf16: x float16 and float weights is fp16),
    # each variant is drawn with its own dtypes.
    made = {w if w in ("int8", "int32") else x for x in xs for w in weights}
    if made <= {_VARIANT_DTYPES[v][1] for v in variants} and all(
            _GATE[v].selection == Selection(_GATE[v].weight_dtype, _GATE[v].x_dtypes[0])
            for v in variants):
        return configs(x_dtypes=st.sampled_from(xs), weight_dtypes=st.sampled_from(weights),
                       domain=domain, **fields)
    return st.one_of([gate_configs(_GATE[v], _GATE[v].x_dtypes, domain=domain, **fields)
                      for v in variants])


def gate_configs(gate: GateVariant, x_dtypes: Sequence[str],
                 **fields: Any) -> st.SearchStrategy[OpConfig]:
    """:func:`spec.strategies.configs` (with ``fields``) drawing only ``gate``'s row at
    ``x_dtypes``: its weight dtype and what selects the row among those sharing it
    (:attr:`spec.fields.GateVariant.selection`; ``activation_scales`` drawn only for a row its
    inputs select, so that the other searches draw as before)."""
    sel = gate.selection
    return configs(x_dtypes=st.sampled_from(x_dtypes), weight_dtypes=st.just(sel.weight_dtype),
                   scale_dims=st.just(sel.scale_dims), act_schemes=st.just(sel.act_scheme),
                   activation_scales=st.just(True) if sel.activation_scales else None,
                   **fields)


#: Tokens per rank of a model-shape preset: the weights, not the tokens, cost at real K and I.
PRESET_TOKENS = st.integers(1, 4)


def preset_configs(
    key: str, variants: Sequence[str], *, domain: ShapeDomain | None = None
) -> st.SearchStrategy[OpConfig]:
    """The fixed shape of the model-shape preset ``key`` (:data:`spec.limits.MODEL_PRESETS`:
    real K, I and top_k, two ranks with the fewest experts that give top_k distinct ones; see
    :meth:`spec.limits.ModelShape.gate_shape`) with 1–4 tokens per rank, every other field
    (variant among ``variants``, masks, truncation, clamp) drawn as usual and the shape mapped
    into ``domain``.

    >>> {c.hidden for c in [preset_configs("qwen3-30b-a3b", ["w8a8"]).example()]}
    {2048}
    """
    shape = MODEL_PRESETS[key].gate_shape(
        min_experts_per_rank=domain.min_experts_per_rank if domain is not None else 1)
    return variant_configs(
        variants, domain=domain, ep_sizes=st.just(shape.ep_size),
        experts_per_rank=st.just(shape.experts_per_rank), top_k=st.just(shape.top_k),
        hidden=st.just(shape.hidden), intermediate=st.just(shape.intermediate),
        tokens_per_rank=PRESET_TOKENS)


def fit_problems(
    variants: Sequence[str], n: int, *, domain: ShapeDomain | None = None,
    shapes: Sequence[str] = (),
) -> list[Problem]:
    """What ``dfc-oracle fit`` runs the kernel on: ``n`` problems of the default strategy of
    ``variants`` in ``domain`` without truncation or clamp (which vLLM's kernel lacks: every
    built-in runs them), then two of each model-shape preset in ``shapes``; derandomised, so
    the same kernel is fitted on the same calls."""
    fixed = {"truncation": st.just(False), "swiglu_limits": st.just(None)}
    strategies = [(problems(configs=variant_configs(variants, domain=domain, **fixed),
                            domain=domain), n)]
    strategies += [(problems(configs=preset_configs(key, variants, domain=domain), domain=domain),
                    2) for key in shapes]
    return [problem for strategy, count in strategies for problem in _sample(strategy, count)]


def _sample(strategy: st.SearchStrategy[Problem], count: int) -> list[Problem]:
    """The first ``count`` draws of ``strategy``, derandomised."""
    batch: list[Problem] = []

    @hsettings(max_examples=count, derandomize=True, database=None, deadline=None,
               suppress_health_check=list(HealthCheck), phases=[Phase.generate])
    @given(strategy)
    def collect(problem: Problem) -> None:
        batch.append(problem)

    collect()
    return batch[:count]


def default_problems(
    profile: KernelProfile, domain: str = "kernel", variants: Sequence[str] | None = None,
    mode: str = "faithful",
) -> st.SearchStrategy[Problem]:
    """The default search: :func:`spec.strategies.problems` inside ``profile``'s shape domain
    (``domain="kernel"``) or the whole contract (``"contract"``), of every default weight
    variant or only ``variants``; a profile without some default variant (the GPU formats'
    profiles) searches the gate variants it has. ``mode="ideal"`` also draws the token rows of
    :data:`spec.strategies.POWER_ROW_FAMILIES` (what the ideal judge needs to see a per-tensor
    activation scale); a profile with an FP8 variant also draws
    :data:`spec.strategies.FP8_ROW_FAMILIES` (what e4m3's range needs for the same)."""
    if domain not in DOMAINS:
        raise ValueError(f"domain={domain!r} must be one of {DOMAINS}")
    shapes = profile.domain if domain == "kernel" else None
    have = variants_of(profile, variants)
    fp8 = any(_GATE[v].variant.weight_dtype == "float8_e4m3fn" for v in have)
    extra = (POWER_ROW_FAMILIES if mode == "ideal" else ()) + (FP8_ROW_FAMILIES if fp8 else ())
    rows = token_rows(families=st.sampled_from(ROW_FAMILIES + extra)) if extra else None
    if variants is None and have == DEFAULT_VARIANTS:
        return problems(configs=configs(domain=shapes), values=rows, domain=shapes)
    return problems(configs=variant_configs(have, domain=shapes), values=rows, domain=shapes)


def variants_of(profile: KernelProfile, variants: Sequence[str] | None = None) -> tuple[str, ...]:
    """The gate variants of ``variants`` (default: the default ones, or the profile's own where
    it has none of them) that ``profile`` has a pipeline for; ``ValueError`` when it has none.

    >>> variants_of(get_kernel("vllm-triton"), ["w8a8", "w4a8", "bf16"])
    ('w8a8', 'bf16')
    """
    wanted = DEFAULT_VARIANTS if variants is None else tuple(variants)
    have = tuple(v for v in wanted if _GATE[v].variant.name in profile.variants)
    if not have and variants is None:  # a profile of opt-in variants only (FP8, MXFP4)
        have = tuple(g.name for g in GATE_VARIANTS if g.variant.name in profile.variants)
    if not have:
        raise ValueError(f"kernel profile {profile.name!r} has a pipeline for none of the "
                         f"variants {', '.join(wanted)} (it has {', '.join(profile.variants)})")
    return have


def check_implementation(
    impl: Implementation | str | ChildProcess,
    *,
    numerics: str | Numerics = "faithful",
    problems: st.SearchStrategy[Problem] | None = None,
    settings: hsettings | None = None,
    save_dir: str | Path | None = DEFAULT_SAVE_DIR,
    impl_name: str | None = None,
    timeout: float = 60.0,
    inputs: str = DEFAULT_INPUTS,
    ulps: float = 0.0,
    seed: int | None = None,
    isolate: bool | None = None,
    kernel: str | KernelProfile | None = None,
    domain: str = "kernel",
    variants: Sequence[str] | None = None,
    threads: int | None = 1,
) -> None:
    """Search for a problem on which ``impl`` disagrees with :func:`oracle.run`.

    ``impl(problem)`` returns one ``(out, expert_token_nums)`` (or an object with those
    attributes) per rank. ``problems`` defaults to :func:`spec.strategies.problems`;
    ``settings`` to the active Hypothesis profile. On failure, raises :class:`ConformanceError`
    with the minimal failing problem, saved under ``save_dir`` (None: not saved). ``seed``
    fixes Hypothesis' random seed for a reproducible non-derandomised search.

    ``kernel`` (a profile name of :mod:`oracle.model.kernels`, a profile, ``"MODULE:NAME"`` of
    one or a profile file: :func:`oracle.check.loading.load_kernel`) selects the emulation
    and tolerance (it replaces the kernel of ``numerics``; ``numerics="ideal"`` keeps the ideal
    judge) and, with ``domain="kernel"`` (default), the shapes the default strategy generates
    and the values of every call (a given ``problems`` strategy's too: UE8M0 scales where the
    kernel takes only those, :meth:`spec.limits.ShapeDomain.fit_problem`), so that every
    counterexample runs on that kernel; ``domain="contract"`` generates the whole
    contract; ``variants`` (names from ``w8a8``, ``bf16``, ``fp16``; default: all) restricts
    it to the weight variants the implementation supports. ``ulps`` allows that many ulps of
    the out dtype beyond the profile's envelope. ``inputs`` says which writes into its inputs
    an implementation may make (:data:`oracle.config.options.INPUT_POLICIES`; the default,
    ``"sentinel"``, allows only the operator's write-back of EP·E into masked tokens' ids).

    ``impl`` is a callable, a ``"module:function"`` name or a running :class:`ChildProcess`.
    ``isolate`` (default: True for a name, False for a callable) runs it in a child process
    that nothing it does can take down with the search (``os._exit``, a segfault, a call that
    holds the GIL past ``timeout``); a callable that cannot be imported by name (a lambda, a
    closure) then runs in this process, with a warning. A child this search starts pins its
    OpenMP, BLAS and torch threads to ``threads`` (None: as the environment says). Options
    outside what is allowed raise :class:`oracle.config.options.OptionError` before the search;
    an implementation that cannot be loaded, or does not take one argument,
    :class:`oracle.check.loading.ImplLoadError`.
    """
    kernel = load_kernel(kernel)
    check_options(numerics=numerics, ulps=ulps, timeout=timeout, inputs=inputs,
                  save_dir=save_dir, kernel=kernel, domain=domain, variants=variants,
                  threads=threads)
    num = with_kernel(resolve_numerics(numerics), kernel)
    # Absolute now: an implementation that calls os.chdir() must not move the file.
    directory = None if save_dir is None else Path(os.path.abspath(save_dir))
    if problems is None:
        problems = default_problems(num.profile, domain, variants, num.mode)
    elif domain == "kernel":  # a given strategy's values too: only calls the kernel can take
        problems = problems.map(num.profile.domain.fit_problem)
    # Without settings, our timeout bounds a call, not Hypothesis' 200 ms deadline.
    base = settings if settings is not None else hsettings(hsettings(), deadline=None)
    search_settings = hsettings(
        base, report_multiple_bugs=False,
        suppress_health_check=[*base.suppress_health_check, HealthCheck.too_slow,
                               HealthCheck.data_too_large],
    )

    if impl_name is None and isinstance(impl, str):
        impl_name = impl
    # Rebound under the same name: derandomised Hypothesis seeds itself from this function's
    # source, so the search below stays the one the tests and benchmarks were measured with.
    impl, owned = _runner(impl, isolate, threads)

    @search_settings
    @given(problems)
    def conforms(problem: Problem) -> None:
        verdict, outputs = evaluate(impl, problem, numerics=num, timeout=timeout,
                                    inputs=inputs, ulps=ulps)
        if verdict.ratio > 0:
            # Only a real error is worth climbing: a target of 0 on every example would hand
            # half the budget to Hypothesis' target phase and starve generation (measured:
            # 37 of 40 examples were mutations of one).
            target(min(verdict.ratio, 1e12), label="error / tolerance")
        if verdict.stage == "timeout":
            raise _Hung(problem, verdict)
        if not verdict.ok:
            raise _Mismatch(problem, verdict, outputs)

    if seed is not None:
        conforms = hseed(seed)(conforms)
    note = None
    try:
        conforms()
    except _Hung as hung:
        problem, verdict, outputs = hung.problem, hung.verdict, None
    except _Mismatch as mismatch:
        problem, verdict, outputs = mismatch.problem, mismatch.verdict, mismatch.outputs
        reduced = reduce_counterexample(
            problem, verdict,
            lambda p: evaluate(impl, p, numerics=num, timeout=timeout, inputs=inputs, ulps=ulps),
            num.profile.domain if domain == "kernel" else None)
        if reduced is not None:
            problem, verdict, outputs = reduced.problem, reduced.verdict, reduced.outputs
            note = reduced.describe()
    else:
        return
    finally:
        if owned and isinstance(impl, ChildProcess):
            impl.close()
    path, unsaved = None, None
    if directory is not None:
        try:
            path = _save_counterexample(directory, problem, verdict, outputs, num, impl_name,
                                        ulps, inputs)
        except SaveError as exc:  # the report is whole without the file
            unsaved = str(exc)
    replay = None
    if path is not None and impl_name:
        replay = f"dfc-oracle replay {path} --impl {impl_name}"  # judged as saved
    report = format_report(problem, verdict, numerics=num, path=path, replay=replay, ulps=ulps,
                           note=note, unsaved=unsaved)
    raise ConformanceError(report, problem=problem, verdict=verdict, path=path)


def _runner(impl: Implementation | str | ChildProcess, isolate: bool | None,
            threads: int | None) -> tuple[Runner, bool]:
    """What runs the implementation, and whether this search owns (starts and stops) it."""
    if isinstance(impl, ChildProcess):
        return impl, False
    if isinstance(impl, str):
        if isolate is False:
            fn = load_impl(impl)
            check_signature(fn, impl)
            return fn, False
        child = ChildProcess(impl, threads=threads)
        child.start()
        return child, True
    if not callable(impl):
        raise TypeError(f"impl must be a callable or a 'module:function' name, not {impl!r}")
    if isolate:
        name = importable_name(impl)
        if name is not None:
            child = ChildProcess(name, threads=threads)
            child.start()
            return child, True
        warnings.warn(f"isolate=True: {impl!r} cannot be imported by name in a child process "
                      "(a lambda, closure or function of __main__); it runs in this process, "
                      "where os._exit, a crash or a GIL-holding hang can stop the search",
                      stacklevel=3)
    check_signature(impl, repr(impl))
    return impl, False


def _save_counterexample(
    directory: Path, problem: Problem, verdict: Verdict, outputs: object,
    numerics: Numerics, impl_name: str | None, ulps: float, inputs: str,
    placed: PlacedCall | None = None, stage: StageCall | None = None,
) -> Path:
    """Save a failing call under ``directory`` (a placed or stage call with its record; a
    stage call's outputs are not kept, ``outputs`` is None for it)."""
    checked = structured_outputs(problem, outputs) if outputs is not None else None
    meta = {
        "stage": verdict.stage,
        "message": verdict.message,
        # The whole profile, switches and tolerance: replay and explain judge as the search did.
        "numerics": numerics.to_dict(),
        "ulps": ulps,
        "inputs": inputs,  # the input-write policy, so that replay judges writes the same way
        "impl": impl_name,
    }
    digest = hashlib.sha1(f"{problem.config}{verdict.message}".encode()).hexdigest()[:10]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", (impl_name or "impl").replace(":", "."))
    name = f"{stem}-{verdict.stage}-{digest}"
    kept = checked if isinstance(checked, list) else None
    return save(directory / f"{name}.npz", problem, outputs=kept, meta=meta, placed=placed,
                stage=stage)
