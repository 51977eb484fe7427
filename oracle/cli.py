"""The ``dfc-oracle`` command (also ``python -m oracle``).

- ``check MODULE:FUNC`` — hunt for a counterexample in an implementation (exit 0: none found;
  1: found and saved; 2: usage or import error).
- ``replay FILE --impl MODULE:FUNC`` — rerun one saved counterexample and print the report.
- ``hunt`` — the main job, needing nothing from the user: search the built-in catalogue (the
  real operator's historical layout and buffer rules, and known-defective reference variants)
  and print what was found, each with its minimal counterexample.
- ``explain FILE`` — a readable description of a saved counterexample and, when it holds the
  implementation's outputs, the known defect they equal (``oracle.explain.diagnose``); ``--plot
  OUT.png`` also draws it (``oracle.explain.plot``, the optional extra ``plot``).
- ``verify DIRECTORY`` — check a captured multi-rank run (see ``oracle.check.capture``).
- ``fit MODULE:FUNC`` — which rounding points the implementation uses: the kernel profile
  record, reached from the built-ins by rounding-point changes only, under which every output
  of its calls lies in the envelope (``oracle.explain.fit``), printed as a profile file (exit
  0), or "nothing fits" with the nearest record (exit 1).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from oracle.check.harness import (
    DOMAINS,
    UNTESTED,
    ConformanceError,
    check_implementation,
    describe_problem,
    evaluate,
    preset_configs,
    routing_rows,
    untested_summary,
    variant_configs,
)
from oracle.check.isolation import ChildProcess, check_signature
from oracle.check.loading import KERNEL_FORMS, ImplLoadError, load_impl, load_kernel
from oracle.config.options import (
    DEFAULT_INPUTS,
    DEFAULT_VARIANTS,
    INPUT_POLICIES,
    NUMERICS_MODES,
    WEIGHT_VARIANTS,
    OptionError,
    check_options,
)
from oracle.config.settings import DEFAULT_PROFILE, SETTINGS_PROFILES
from oracle.files.counterexample import judged_with
from oracle.model.kernels import DEFAULT_KERNEL, KernelProfile, get_kernel
from oracle.model.kernels import PROFILES as KERNELS
from oracle.model.numerics import Numerics, resolve_numerics, with_kernel
from oracle.model.reference import route
from spec import SpecError
from spec.limits import MODEL_PRESETS
from spec.modular import LAYOUTS, STAGES
from spec.strategies import problems

if TYPE_CHECKING:
    from oracle.check.modular import StageConformanceError
    from oracle.explain.diagnose import Diagnosis
    from oracle.explain.stages import TokenStages

__all__ = ["main"]

EXIT_OK, EXIT_FOUND, EXIT_USAGE = 0, 1, 2


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _settings(args: argparse.Namespace) -> hsettings:
    hsettings.load_profile(args.profile)
    base = hsettings()
    changes: dict[str, Any] = {}
    if args.max_examples is not None:
        changes["max_examples"] = args.max_examples
    if getattr(args, "seed", None) is not None:
        changes["derandomize"] = False
    return hsettings(base, **changes)


class _Progress:
    """Counts calls of the implementation and reports them on stderr."""

    def __init__(self, impl: Any) -> None:
        self.impl, self.calls, self.start = impl, 0, time.perf_counter()

    def tick(self) -> None:
        self.calls += 1
        if self.calls % 25 == 0:
            _err(f"  ... {self.calls} calls, {time.perf_counter() - self.start:.1f} s")

    def __call__(self, problem: Any) -> Any:
        self.tick()
        return self.impl(problem)


def _usage(command: str, exc: OptionError) -> int:
    flag = "--" + exc.option.replace("_", "-")
    _err(f"dfc-oracle {command}: {flag}: {exc}")
    return EXIT_USAGE


def _runner(args: argparse.Namespace) -> ChildProcess | Any:
    """The implementation: a started child process, or (``--in-process``) the loaded callable.
    Raises ImplLoadError."""
    if args.in_process:
        impl = load_impl(args.impl)
        check_signature(impl, args.impl)
        return impl
    child = ChildProcess(args.impl, threads=args.threads or None)
    child.start()
    return child


def _kernel_name(kernel: str | KernelProfile | None) -> str:
    return kernel.name if isinstance(kernel, KernelProfile) else kernel or DEFAULT_KERNEL


def _check(args: argparse.Namespace) -> int:
    try:
        kernel = load_kernel(args.kernel)
        check_options(numerics=args.numerics, ulps=args.ulps, timeout=args.timeout,
                      inputs=args.inputs, save_dir=args.save_dir,
                      max_examples=args.max_examples, profile=args.profile,
                      kernel=kernel, domain=args.domain, variants=args.variants,
                      threads=args.threads or None, shapes=args.shapes)
    except OptionError as exc:
        return _usage("check", exc)
    if args.stage:
        return _check_stage(args, get_kernel(kernel or DEFAULT_KERNEL) if args.kernel_named
                            else None)
    try:
        runner = _runner(args)
    except ImplLoadError as exc:
        _err(f"dfc-oracle check: {exc}")
        return EXIT_USAGE
    progress = _Progress(runner)
    if isinstance(runner, ChildProcess):
        runner.on_call = progress.tick
    if args.placement:
        return _check_placed(args, runner, progress, get_kernel(kernel or DEFAULT_KERNEL))
    mode = "in process, threads not pinned" if args.in_process else (
        f"in a child process, {_threads_said(args.threads)}")
    variants = ",".join(args.variants or DEFAULT_VARIANTS)
    _err(f"dfc-oracle check {args.impl}: kernel {_kernel_name(kernel)} ({args.domain} domain), "
         f"numerics "
         f"{args.numerics}, variants {variants}, inputs {args.inputs}, profile {args.profile}, "
         f"{mode}")
    search = _settings(args)
    # The default search, then each model-shape preset's fixed shape with a twentieth of the
    # budget (5 of dfc-ci's 100: what the gate's test_model_shape runs).
    domain = get_kernel(kernel or DEFAULT_KERNEL).domain if args.domain == "kernel" else None
    searches = [(None, search)] + [
        (problems(configs=preset_configs(key, args.variants or DEFAULT_VARIANTS, domain=domain)),
         hsettings(search, max_examples=max(3, search.max_examples // 20)))
        for key in args.shapes]

    def run(impl: Any) -> None:
        for strategy, budget in searches:
            check_implementation(
                impl, numerics=args.numerics, problems=strategy, settings=budget,
                save_dir=args.save_dir, impl_name=args.impl, timeout=args.timeout,
                inputs=args.inputs, seed=args.seed, ulps=args.ulps, kernel=kernel,
                domain=args.domain, variants=args.variants,
            )

    return _search(run, runner, progress, "calls")


def _search(run: Callable[[Any], None], runner: Any, progress: _Progress, what: str,
            found: type[ConformanceError | StageConformanceError] = ConformanceError) -> int:
    """``run(impl)``, one search or several, reported as ``check`` reports: the report and
    :data:`EXIT_FOUND` on a counterexample (``found``: a stage search raises
    :class:`~oracle.check.modular.StageConformanceError`), else how many ``what`` were judged;
    the child process is closed either way."""
    UNTESTED.clear()
    try:
        run(runner if isinstance(runner, ChildProcess) else progress)
    except found as exc:
        print(exc.report)
        _err(f"counterexample found after {progress.calls} calls "
             f"({time.perf_counter() - progress.start:.1f} s)")
        return EXIT_FOUND
    finally:
        if isinstance(runner, ChildProcess):
            runner.close()
    print(f"no counterexample in {progress.calls} {what} "
          f"({time.perf_counter() - progress.start:.1f} s)")
    if untested_summary():
        print(f"note: {untested_summary()}")
    return EXIT_OK


def _check_placed(args: argparse.Namespace, runner: Any, progress: _Progress,
                  kernel: KernelProfile) -> int:
    """``check --placement``: the placed-call search (:func:`oracle.check.placed_search`),
    judged in ideal numerics, refused for a kernel whose domain takes no placement."""
    from oracle.check.placed_search import check_placed, placed_families  # lazy: start-up

    refused = None
    if args.domain == "kernel" and not kernel.domain.placement:
        refused = (f"--placement: the {kernel.name} kernel takes no placed calls (no replicas, "
                   "shared experts or rsf: its domain excludes them); pass --domain contract, "
                   "or a GPU profile such as --kernel vllm-triton")
    else:
        try:
            calls = placed_families("any", args.variants or DEFAULT_VARIANTS)
        except ValueError as exc:
            refused = f"--variants: {exc}"
    if refused is not None:
        if isinstance(runner, ChildProcess):
            runner.close()
        _err(f"dfc-oracle check: {refused}")
        return EXIT_USAGE
    _err(f"dfc-oracle check {args.impl}: placed calls (spec.placed_strategies), numerics "
         f"ideal, inputs {args.inputs}, profile {args.profile}")
    return _search(lambda impl: check_placed(
        impl, calls=calls, settings=_settings(args), save_dir=args.save_dir,
        impl_name=args.impl, timeout=args.timeout, inputs=args.inputs, ulps=args.ulps,
        seed=args.seed), runner, progress, "placed calls")


def _check_stage(args: argparse.Namespace, kernel: KernelProfile | None) -> int:
    """``check --stage``: one stage of the modular split (:mod:`oracle.check.modular`), in
    this process, in ideal numerics unless ``--kernel`` names a profile (then the experts
    stage is emulated with it and the combine judged with its sum; a dispatch is bit-exact
    either way); ``--placement`` draws the calls from placed calls (−1 slots included)."""
    from oracle.check.modular import (  # lazy: start-up
        StageConformanceError,
        check_stage,
        stage_calls,
    )

    layouts = (args.layout,) if args.layout else LAYOUTS
    try:
        impl = load_impl(args.impl)
        check_signature(impl, args.impl)
    except ImplLoadError as exc:
        _err(f"dfc-oracle check: {exc}")
        return EXIT_USAGE
    numerics: str | Numerics = "ideal" if kernel is None else with_kernel(
        resolve_numerics(args.numerics), kernel)
    calls = stage_calls(args.stage, layouts=layouts, placed=args.placement) if (
        args.placement or kernel is None) else stage_calls(
        args.stage, layouts=layouts, configs=variant_configs(
            args.variants or DEFAULT_VARIANTS, domain=kernel.domain,
            truncation=st.just(False)))
    progress = _Progress(impl)
    _err(f"dfc-oracle check {args.impl}: the {args.stage} stage, layouts {','.join(layouts)}, "
         f"{'placed' if args.placement else 'plain'} calls, numerics "
         f"{'ideal' if kernel is None else f'{args.numerics} on kernel {kernel.name}'}, "
         f"profile {args.profile}, in process (a stage is not isolated in a child process)")
    return _search(lambda counted: check_stage(
        args.stage, counted, layouts=layouts, numerics=numerics, ulps=args.ulps,
        timeout=args.timeout, calls=calls, settings=_settings(args), save_dir=args.save_dir,
        impl_name=args.impl), impl, progress, f"{args.stage} calls", StageConformanceError)


def _threads_said(threads: int) -> str:
    """How the header names ``--threads`` (0: the environment's)."""
    if not threads:
        return "threads as the environment sets them"
    return f"{threads} thread{'s' if threads > 1 else ''} (OpenMP, BLAS and torch pinned)"


def _replay(args: argparse.Namespace) -> int:
    from oracle.check.harness import format_report  # lazy: start-up
    from oracle.files.counterexample import load  # lazy: start-up

    try:
        check_options(timeout=args.timeout, ulps=0.0 if args.ulps is None else args.ulps,
                      threads=args.threads or None)
    except OptionError as exc:
        return _usage("replay", exc)
    try:
        saved = load(args.file)
        numerics, ulps = judged_with(saved.meta)  # the record, checked as options are
        # Files written before the policy was recorded were judged with that time's "strict".
        inputs = args.inputs or str(saved.meta.get("inputs", "strict"))
        check_options(inputs=inputs)
        numerics = with_kernel(numerics, load_kernel(args.kernel))
        if args.numerics is not None:
            numerics = replace(numerics, mode=args.numerics)
        ulps = ulps if args.ulps is None else args.ulps
        if saved.stage is not None:
            return _replay_stage(args, saved.stage, numerics, ulps)
        impl = _runner(args)
    except (ImplLoadError, SpecError) as exc:
        _err(f"dfc-oracle replay: {exc}")
        return EXIT_USAGE
    try:
        verdict, _ = evaluate(impl, saved.placed or saved.problem, numerics=numerics,
                              timeout=args.timeout, ulps=ulps, inputs=inputs)
    finally:
        if isinstance(impl, ChildProcess):
            impl.close()
    if verdict.ok:
        said = saved.placed.summary() if saved.placed else describe_problem(saved.problem)
        print(f"{args.file}: the implementation now conforms ({said})")
        return EXIT_OK
    print(format_report(saved.problem, verdict, numerics=numerics, path=Path(args.file),
                        replay=None, ulps=ulps))
    return EXIT_FOUND


def _kernels(args: argparse.Namespace) -> int:
    """One line per kernel profile; ``--verbose`` every knob, freedom and the shape domain;
    ``--dump KERNEL`` one profile as a JSON profile file (what ``--kernel FILE`` reads)."""
    import json  # lazy: start-up

    if args.dump is not None:
        try:
            dumped = get_kernel(load_kernel(args.dump) or DEFAULT_KERNEL)
        except OptionError as exc:
            _err(f"dfc-oracle kernels: --dump: {exc}")
            return EXIT_USAGE
        print(json.dumps(dumped.to_dict(), indent=2))
        return EXIT_OK
    if args.coverage:
        return _coverage()
    width = max(map(len, KERNELS)) + 2
    for name, profile in KERNELS.items():
        if args.verbose:
            print(profile.describe() + "\n")
        else:
            default = " (default)" if name == DEFAULT_KERNEL else ""
            print(f"{name:<{width}}{profile.summary}{default}")
    return EXIT_OK


def _coverage() -> int:
    """``kernels --coverage``: per profile, the code-path thresholds and int32 offsets its
    generators never cross (:func:`spec.index_width.domain_coverage`) and whether it generates
    placed calls; profiles of one domain share its lines."""
    from spec.index_width import domain_coverage  # lazy: start-up

    lines: dict[str, list[str]] = {}
    for name, profile in KERNELS.items():
        domain = profile.domain
        if domain.name not in lines:
            placed = ("generated with --placement" if domain.placement else "not crossed: "
                      "the domain takes none (--domain contract generates them)")
            lines[domain.name] = [*domain_coverage(domain), f"placed calls: {placed}"]
        print(f"{name} ({domain.name} domain):")
        print("\n".join(f"  {line}" for line in lines[domain.name]))
    return EXIT_OK


def _explain(args: argparse.Namespace) -> int:
    from oracle.files.counterexample import load  # lazy: start-up

    try:
        if args.plot is not None:
            from oracle.explain.plot import require_matplotlib  # lazy: start-up

            require_matplotlib()
        saved = load(args.file)
        kernel = load_kernel(args.kernel)
    except (SpecError, ImportError, OptionError) as exc:
        _err(f"dfc-oracle explain: {exc}")
        return EXIT_USAGE
    numerics, ulps = _judged_or_default(saved.meta)
    numerics = with_kernel(numerics, kernel)
    print(explain(saved.problem, saved.meta))
    if kernel is not None:
        print(f"explained with: numerics {numerics.describe()} (--kernel)")
    found = _diagnose(saved.problem, saved.outputs, numerics, ulps)
    print(diagnosis(saved.meta, found))
    if args.stages:
        print(stage_table(saved.problem, saved.outputs, found, numerics, ulps,
                          args.intermediates))
    if args.plot is not None:
        from oracle.explain.plot import save_plot  # lazy: start-up

        title = f"{args.file.name}: stage '{saved.meta.get('stage', 'unknown')}'"
        path = save_plot(args.plot, saved.problem, saved.outputs, numerics=numerics, ulps=ulps,
                         title=title)
        print(f"picture saved: {path}")
    return EXIT_OK


def _diagnose(problem: Any, outputs: Any, numerics: Numerics, ulps: float) -> Diagnosis | None:
    """The saved outputs re-judged as the file was (or under ``--kernel``), against the
    catalogue of known defects (:mod:`oracle.explain.diagnose`); ``None`` when the file holds
    no outputs."""
    from oracle.explain.diagnose import diagnose  # lazy: start-up

    if outputs is None:
        return None
    return diagnose(problem, outputs, numerics=numerics, ulps=ulps)


def _judged_or_default(meta: dict[str, Any]) -> tuple[Numerics, float]:
    try:
        return judged_with(meta)
    except SpecError:
        return Numerics(), 0.0


def diagnosis(meta: dict[str, Any], found: Diagnosis | None) -> str:
    """``found`` (:func:`_diagnose` of the saved outputs) in words; the harness saves outputs
    whenever they had the contract's structure, so a file without them failed before any
    value could be compared."""
    if found is None:
        return (f"diagnosis: none, the file holds no outputs of the implementation (stage "
                f"'{meta.get('stage', 'unknown')}')")
    return found.describe()


def stage_table(problem: Any, outputs: Any, found: Diagnosis | None, numerics: Numerics,
                ulps: float, hook: str | None = None) -> str:
    """The failing token of the re-judged outputs (``found``'s verdict) stage by stage
    (:mod:`oracle.explain.stages`), next to the implementation's out row; with ``hook``
    (``--intermediates MODULE:FUNC``), the first of the implementation's own intermediates
    that differs."""
    from oracle.explain.stages import token_stages  # lazy: start-up

    if found is None:
        return "stages: none, the file holds no outputs to locate a failing token"
    verdict = found.verdict
    if verdict.stage not in ("out", "non_finite") or verdict.rank is None or not verdict.where:
        why = "the outputs conform" if verdict.ok else f"stage '{verdict.stage}'"
        return f"stages: none, no failing out row ({why})"
    if numerics.mode == "ideal" and numerics.kernel is None:
        return ("stages: none, judged in ideal mode without a kernel profile: the mathematics "
                "has no rounding points to walk (--kernel NAME walks that profile's)")
    rank, token = verdict.rank, verdict.where[0]
    out, _ = outputs[rank]
    walk = token_stages(problem, rank, token, numerics)
    table = walk.describe(np.asarray(out[token]), ulps)
    if hook is None:
        return table
    return table + "\n" + _intermediates(hook, problem, rank, token, walk)


def _intermediates(hook: str, problem: Any, rank: int, token: int,
                   walk: TokenStages) -> str:
    """The stage hook: ``MODULE:FUNC(problem, rank, token)`` returns the implementation's
    intermediates of that token, one mapping per slot by stage name; run here, on a copy."""
    from oracle.check.harness import _copy_inputs  # lazy: start-up
    from oracle.check.isolation import describe_exception  # lazy: start-up

    try:
        theirs = load_impl(hook)(_copy_inputs(problem), rank, token)
        return "  " + walk.first_difference(list(theirs))
    except ImplLoadError as exc:
        return f"  your intermediates: --intermediates: {exc}"
    except Exception as exc:  # the hook is the user's code: its failure is a line, not ours
        return f"  your intermediates: {hook} raised: {describe_exception(exc)}"


def explain(problem: Any, meta: dict[str, Any]) -> str:
    """Configuration, the routing matrix (rank x global expert), and the undefined tokens."""
    cfg = problem.config
    routing = route(problem)
    lines = [f"configuration: {cfg.summary()}"]
    if meta.get("stage"):
        lines.append(f"saved for: stage '{meta['stage']}': {meta.get('message', '')}")
    try:
        numerics, ulps = judged_with(meta)
    except SpecError as exc:
        lines.append(f"judged with: unreadable ({exc})")
    else:
        slack = f" + {ulps:g} ulp" if ulps else ""
        lines.append(f"judged with: numerics {numerics.describe()}{slack}; the profile's knobs: "
                     "dfc-oracle kernels --verbose")
    lines.append("routed slots, source rank -> {global expert: slots} (expert g lives on rank "
                 f"g // {cfg.experts_per_rank}):")
    lines += routing_rows(routing.counts)
    for d, layout in enumerate(routing.receive):
        if layout.dropped:
            lines.append(f"rank {d} receives {layout.rows} rows, keeps {layout.kept} "
                         f"(max_output_size={cfg.max_output_size}): rows {layout.kept}.. dropped")
    kept = routing.slot_kept.reshape(-1, cfg.top_k)
    offset = 0
    for r, inputs in enumerate(problem.ranks):
        m = inputs.num_tokens
        active = inputs.is_active()
        for t in np.flatnonzero(~kept[offset : offset + m].all(axis=1)):
            lost = np.flatnonzero(~kept[offset + t]).tolist()
            why = "masked (active_mask False)" if not active[t] else (
                f"lost slot(s) {lost} to truncation")
            lines.append(f"rank {r} token {t}: out row undefined: {why}")
        offset += m
    return "\n".join(lines)


def _hunt(args: argparse.Namespace) -> int:
    """Search every historical rule and every variant; print one table row per finding (what,
    where from, minimal counterexample), then each finding's details and how to rerun it."""
    from oracle.check.hunt import PLACED_VARIANTS, VARIANTS  # lazy: start-up
    from oracle.check.placed_search import check_placed  # lazy: start-up
    from spec.findings import hunt_rules  # lazy: start-up

    try:
        kernel = load_kernel(args.kernel)
        check_options(save_dir=args.save_dir, max_examples=args.max_examples, kernel=kernel)
    except OptionError as exc:
        return _usage("hunt", exc)
    profile = None if kernel is None else get_kernel(kernel)
    if profile is not None:
        _err(f"hunting the variants of kernel profile '{profile.name}' (--kernel)")
    rows: list[tuple[str, str, str]] = []
    details: list[str] = []
    _err("hunting the operator's historical layout, buffer and protocol rules ...")
    for finding in hunt_rules():
        rows.append((finding.key, finding.source, finding.counterexample))
        details.append(f"{finding}\n  rerun: {finding.command}")
    for variant in VARIANTS + PLACED_VARIANTS:
        _err(f"hunting variant '{variant.name}' ...")
        try:
            if variant in PLACED_VARIANTS:
                check_placed(variant.impl(), calls=variant.problems(), settings=_settings(args),
                             save_dir=args.save_dir, impl_name=f"oracle.check.hunt:{variant.name}")
            else:
                check_implementation(variant.impl(profile), problems=variant.problems(profile),
                                     settings=_settings(args), save_dir=args.save_dir,
                                     impl_name=f"oracle.check.hunt:{variant.name}",
                                     kernel=profile)
        except ConformanceError as exc:
            rows.append((variant.name, variant.source, exc.problem.config.summary()))
            details.append(f"{variant.name}: {variant.what}\n  {exc.verdict.message}\n"
                           f"  saved: {exc.path}\n  rerun: dfc-oracle explain {exc.path}")
        else:
            details.append(f"{variant.name}: no difference found in the budget")
    print(f"dfc-oracle hunt: {len(rows)} findings\n")
    print(_table(("finding", "source", "minimal counterexample"), rows))
    print("\n" + "\n\n".join(details))
    return EXIT_OK


def _table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]], width: int = 72) -> str:
    """A plain-text table; cells longer than ``width`` are cut with an ellipsis."""
    cells = [header, *[tuple(c if len(c) <= width else c[: width - 1] + "…" for c in row)
                       for row in rows]]
    sizes = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(n) for c, n in zip(row, sizes)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * n for n in sizes))
    return "\n".join(lines)


def _fit(args: argparse.Namespace) -> int:
    """Run the implementation on drawn problems, then fit a record of rounding points to its
    outputs; the record goes to stdout as a profile file, the finding to stderr."""
    import json  # lazy: start-up

    from oracle.check.harness import call_implementation, fit_problems  # lazy: start-up
    from oracle.explain.fit import fit  # lazy: start-up

    try:
        bases = [get_kernel(load_kernel(k) or DEFAULT_KERNEL) for k in args.kernel or KERNELS]
        check_options(timeout=args.timeout, variants=args.variants,
                      threads=args.threads or None, shapes=args.shapes)
        if args.calls < 1:
            raise OptionError("calls", f"calls={args.calls} must be at least 1")
        runner = _runner(args)
    except OptionError as exc:
        return _usage("fit", exc)
    except ImplLoadError as exc:
        _err(f"dfc-oracle fit: {exc}")
        return EXIT_USAGE
    variants = args.variants or DEFAULT_VARIANTS
    start = time.perf_counter()
    calls = []
    try:
        for problem in fit_problems(variants, args.calls, domain=bases[0].domain,
                                    shapes=args.shapes):
            outcome = call_implementation(runner, problem, args.timeout)
            if outcome.status != "ok" or not isinstance(outcome.outputs, list):
                what = outcome.message or getattr(outcome.outputs, "message", "")
                _err(f"nothing fits: the implementation did not return outputs on "
                     f"{describe_problem(problem)}\n  {outcome.status}: {what}")
                return EXIT_FOUND
            calls.append((problem, outcome.outputs))
    finally:
        if isinstance(runner, ChildProcess):
            runner.close()
    ran = time.perf_counter() - start
    found = fit(calls, bases)
    _err(f"dfc-oracle fit {args.impl}: {len(calls)} calls ({ran:.1f} s), from "
         f"{', '.join(b.name for b in bases)} ({time.perf_counter() - start - ran:.1f} s)")
    _err(found.describe())
    if not found.fits:
        return EXIT_FOUND
    print(json.dumps(found.best.to_dict(), indent=2))
    return EXIT_OK


def _verify(args: argparse.Namespace) -> int:
    from oracle.check.capture import verify_main  # lazy: start-up

    try:
        kernel = load_kernel(args.kernel)
    except OptionError as exc:
        return _usage("verify", exc)
    numerics = with_kernel(resolve_numerics(args.numerics or "faithful"), kernel)
    return int(verify_main(args.directory, numerics))


class _Named(argparse.Action):
    """Stores the value and notes that it was given (``check --stage`` judges in ideal
    numerics unless ``--kernel`` is named: ``kernel_named``)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values)
        namespace.kernel_named = True


def _replay_stage(args: argparse.Namespace, call: Any, numerics: Numerics, ulps: float) -> int:
    """``replay`` of a stage file (version 3): the stage implementation rerun in this process
    on the saved call and judged as the search judged it. Raises ImplLoadError."""
    from oracle.check.modular import evaluate_stage  # lazy: start-up

    impl = load_impl(args.impl)
    check_signature(impl, args.impl)
    verdict = evaluate_stage(impl, call, numerics=numerics, ulps=ulps, timeout=args.timeout)
    if verdict.ok:
        print(f"{args.file}: the implementation now conforms ({call.summary()})")
        return EXIT_OK
    print(f"{args.file}: the {call.stage} stage fails ({verdict.stage}): {verdict.message}\n"
          f"{call.summary()}\n{describe_problem(call.problem)}")
    return EXIT_FOUND


def _variants(text: str) -> tuple[str, ...]:
    return tuple(text.split(","))


def _parser() -> argparse.ArgumentParser:
    """Every option has a one-line help that shows its default (a test walks them)."""
    kernel_help = KERNEL_FORMS.format(names=", ".join(KERNELS))
    parser = argparse.ArgumentParser(
        prog="dfc-oracle", description="Specification and test oracle for fused "
        "expert-parallel MoE dispatch -> FFN -> combine operators.")
    sub = parser.add_subparsers(dest="command", required=True)

    def search_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--profile", choices=SETTINGS_PROFILES, default=DEFAULT_PROFILE,
                       help="Hypothesis settings profile (default: %(default)s)")
        p.add_argument("--max-examples", type=int, default=None,
                       help="examples to try (default: the profile's)")
        p.add_argument("--save-dir", type=Path, default=Path("dfc-counterexamples"),
                       help="where counterexamples are saved (default: %(default)s)")

    def impl_options(p: argparse.ArgumentParser, judged: str | None) -> None:
        """Running the implementation; ``judged``: the default of ``--numerics`` (``""``: as
        the file was judged; ``None``: no such option, the command judges nothing)."""
        p.add_argument("--timeout", type=float, default=60.0,
                       help="seconds one call of the implementation may take before it is "
                       "reported as hung (default: %(default)s)")
        p.add_argument("--in-process", action="store_true",
                       help="run the implementation in this process (debugging; an os._exit, "
                       "crash or GIL-holding hang then stops the command; default: a child "
                       "process)")
        p.add_argument("--threads", type=int, default=1, metavar="N",
                       help="OpenMP, BLAS and torch threads of the implementation's child "
                       "process; 0 leaves them as the environment sets them (default: "
                       "%(default)s: a timing that does not depend on the machine's load)")
        if judged is None:
            return
        p.add_argument("--numerics", choices=NUMERICS_MODES, default=judged if judged else None,
                       help="faithful: emulate the kernel profile; ideal: the float64 "
                       "mathematics with a derived tolerance (default: "
                       f"{judged or 'as the file was judged'})")

    check = sub.add_parser("check", help="hunt for a counterexample in MODULE:FUNC")
    check.set_defaults(kernel_named=False)
    check.add_argument("impl", metavar="MODULE:FUNC",
                       help="the implementation: a function of the problem, by import name")
    impl_options(check, "faithful")
    check.add_argument("--kernel", default=DEFAULT_KERNEL, metavar="KERNEL", action=_Named,
                       help="kernel profile: emulation, tolerance and generated shapes; "
                       f"{kernel_help} (default: %(default)s)")
    check.add_argument("--domain", choices=DOMAINS, default="kernel",
                       help="generate the kernel profile's shapes, or the whole contract "
                       "(default: %(default)s)")
    check.add_argument("--variants", type=_variants, default=None, metavar="V[,V...]",
                       help="weight variants the implementation supports, comma-separated, "
                       f"from {', '.join(WEIGHT_VARIANTS)} (default: "
                       f"{','.join(DEFAULT_VARIANTS)})")
    check.add_argument("--shapes", type=_variants, default=(), metavar="MODEL[,MODEL...]",
                       help="after the search, each model's real K, I and top_k as a "
                       f"fixed-shape search ({', '.join(MODEL_PRESETS)}; default: none)")
    check.add_argument("--seed", type=int, default=None,
                       help="Hypothesis' random seed, for a reproducible random search "
                       "(default: the profile's, derandomised for dfc-ci)")
    check.add_argument("--inputs", choices=INPUT_POLICIES, default=DEFAULT_INPUTS,
                       help="an implementation that writes into its inputs: sentinel allows "
                       "only the operator's write-back of EP·E into masked tokens' expert ids, "
                       "strict no write, report warns, ignore (default: %(default)s)")
    check.add_argument("--placement", action="store_true",
                       help="search placed calls instead: FUNC(call) gets a "
                       "spec.placement.PlacedCall (replicas, shared experts, rsf, weights on "
                       "the input, int64 and -1 ids; docs/routing.md), judged in ideal numerics "
                       "(default: off, plain calls)")
    check.add_argument("--stage", choices=STAGES, default=None,
                       help="check one stage of the modular split instead: FUNC(call) gets a "
                       "spec.modular.StageCall and returns one entry per rank (docs/routing.md, "
                       "'Gating one stage'); run in this process; judged in ideal numerics "
                       "unless --kernel names a profile; with --placement its calls come from "
                       "placed calls (default: off, the fused call)")
    check.add_argument("--layout", choices=LAYOUTS, default=None,
                       help="with --stage: the receive-buffer layout the stage takes "
                       "(default: both)")
    check.add_argument("--ulps", type=float, default=0.0,
                       help="ulps of the out dtype allowed beyond the kernel profile's "
                       "envelope (default: %(default)s: the envelope only)")
    search_options(check)
    replay = sub.add_parser("replay", help="rerun a saved counterexample")
    replay.add_argument("file", type=Path, help="a counterexample file (.npz)")
    replay.add_argument("--impl", required=True, metavar="MODULE:FUNC",
                        help="the implementation to rerun it on (required)")
    impl_options(replay, "")
    replay.add_argument("--kernel", default=None, metavar="KERNEL",
                        help=f"kernel profile, {kernel_help} (default: as the file was judged)")
    replay.add_argument("--ulps", type=float, default=None,
                        help="ulps beyond the envelope (default: as the file was judged)")
    replay.add_argument("--inputs", choices=INPUT_POLICIES, default=None,
                        help="input-write policy (default: as the file was judged)")
    kernels_p = sub.add_parser("kernels", help="list the kernel numerics profiles")
    kernels_p.add_argument("--verbose", "-v", action="store_true",
                           help="every knob, freedom and the shape domain of each profile "
                           "(default: one line each)")
    kernels_p.add_argument("--coverage", action="store_true",
                           help="per profile, the code-path thresholds and int32 offsets its "
                           "generated shapes never cross, and whether it generates placed "
                           "calls (default: off)")
    kernels_p.add_argument("--dump", default=None, metavar="KERNEL",
                           help="print KERNEL as a JSON profile file, to edit and pass as "
                           "--kernel FILE.json (default: list the profiles)")
    hunt = sub.add_parser("hunt", help="search the built-in catalogue of rules and variants")
    hunt.add_argument("--kernel", default=None, metavar="KERNEL",
                      help="run and judge the variants on this kernel profile, "
                      f"{kernel_help} (default: {DEFAULT_KERNEL})")
    search_options(hunt)
    explain_p = sub.add_parser("explain", help="describe a saved counterexample and name the "
                               "known defect its outputs equal")
    explain_p.add_argument("file", type=Path, help="a counterexample file (.npz)")
    explain_p.add_argument("--kernel", default=None, metavar="KERNEL",
                           help=f"diagnose under this kernel profile, {kernel_help} "
                           "(default: as the file was judged)")
    explain_p.add_argument("--stages", action=argparse.BooleanOptionalAction, default=True,
                           help="print the failing token's reference intermediates at each "
                           "rounding point of the profile, next to your out row (default: on; "
                           "--no-stages leaves it out)")
    explain_p.add_argument("--intermediates", default=None, metavar="MODULE:FUNC",
                           help="the stage hook: FUNC(problem, rank, token) returns your "
                           "kernel's intermediates of that token, one dict per slot by stage "
                           "name (q, sigma1, h, a, q2, sigma2, y); the first that differs is "
                           "named (default: none)")
    explain_p.add_argument("--plot", type=Path, default=None, metavar="OUT.png",
                           help="also draw the routing matrix, the receive buffers with the "
                           "truncation line and the error/tolerance heat map into OUT.png "
                           "(needs pip install 'dfc-oracle[plot]'; default: no picture)")
    fit_p = sub.add_parser("fit", help="infer the rounding points of MODULE:FUNC: print the "
                           "kernel profile whose envelope holds every output as a profile file")
    fit_p.add_argument("impl", metavar="MODULE:FUNC",
                       help="the implementation: a function of the problem, by import name")
    impl_options(fit_p, None)
    fit_p.add_argument("--kernel", action="append", default=None, metavar="KERNEL",
                       help=f"a record to start from, repeatable: {kernel_help} (default: "
                       f"every registered profile, {', '.join(KERNELS)})")
    fit_p.add_argument("--variants", type=_variants, default=None, metavar="V[,V...]",
                       help="weight variants the implementation supports, from "
                       f"{', '.join(WEIGHT_VARIANTS)} (default: {','.join(DEFAULT_VARIANTS)})")
    fit_p.add_argument("--calls", type=int, default=24,
                       help="problems the implementation runs (default: %(default)s; the "
                       "same ones every time)")
    fit_p.add_argument("--shapes", type=_variants, default=(), metavar="MODEL[,MODEL...]",
                       help="also two calls at each model-shape preset's real K, I and top_k "
                       f"({', '.join(MODEL_PRESETS)}; default: none)")
    verify = sub.add_parser("verify", help="check a captured multi-rank run")
    verify.add_argument("directory", type=Path, help="the capture directory (oracle.check.capture)")
    verify.add_argument("--numerics", choices=NUMERICS_MODES, default=None,
                        help="faithful: the kernel profile; ideal: the float64 mathematics "
                        "(default: faithful)")
    verify.add_argument("--kernel", default=None, metavar="KERNEL",
                        help=f"kernel profile to judge with, {kernel_help} (default: "
                        f"{DEFAULT_KERNEL})")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler = {"check": _check, "replay": _replay, "hunt": _hunt, "explain": _explain,
               "verify": _verify, "kernels": _kernels, "fit": _fit}[args.command]
    return handler(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
