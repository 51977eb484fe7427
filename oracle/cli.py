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
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from hypothesis import settings as hsettings

from oracle.check.harness import (
    DOMAINS,
    ConformanceError,
    check_implementation,
    describe_problem,
    evaluate,
    routing_rows,
)
from oracle.check.isolation import ChildProcess, check_signature
from oracle.check.loading import ImplLoadError, load_impl
from oracle.check.options import (
    DEFAULT_INPUTS,
    DEFAULT_VARIANTS,
    INPUT_POLICIES,
    NUMERICS_MODES,
    WEIGHT_VARIANTS,
    OptionError,
    check_options,
)
from oracle.check.settings import DEFAULT_PROFILE, PROFILES
from oracle.files.counterexample import judged_with
from oracle.model.kernels import DEFAULT_KERNEL
from oracle.model.kernels import PROFILES as KERNELS
from oracle.model.numerics import Numerics, resolve_numerics, with_kernel
from oracle.model.reference import route
from spec import SpecError

if TYPE_CHECKING:
    from oracle.explain.diagnose import Diagnosis

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
    child = ChildProcess(args.impl)
    child.start()
    return child


def _check(args: argparse.Namespace) -> int:
    try:
        check_options(numerics=args.numerics, ulps=args.ulps, timeout=args.timeout,
                      inputs=args.inputs, save_dir=args.save_dir,
                      max_examples=args.max_examples, profile=args.profile,
                      kernel=args.kernel, domain=args.domain, variants=args.variants)
    except OptionError as exc:
        return _usage("check", exc)
    try:
        runner = _runner(args)
    except ImplLoadError as exc:
        _err(f"dfc-oracle check: {exc}")
        return EXIT_USAGE
    progress = _Progress(runner)
    if isinstance(runner, ChildProcess):
        runner.on_call = progress.tick
    mode = "in process" if args.in_process else "in a child process"
    variants = ",".join(args.variants or DEFAULT_VARIANTS)
    _err(f"dfc-oracle check {args.impl}: kernel {args.kernel} ({args.domain} domain), numerics "
         f"{args.numerics}, variants {variants}, inputs {args.inputs}, profile {args.profile}, "
         f"{mode}")
    try:
        check_implementation(
            runner if isinstance(runner, ChildProcess) else progress, numerics=args.numerics,
            settings=_settings(args), save_dir=args.save_dir, impl_name=args.impl,
            timeout=args.timeout, inputs=args.inputs, seed=args.seed, ulps=args.ulps,
            kernel=args.kernel, domain=args.domain, variants=args.variants,
        )
    except ConformanceError as exc:
        print(exc.report)
        _err(f"counterexample found after {progress.calls} calls "
             f"({time.perf_counter() - progress.start:.1f} s)")
        return EXIT_FOUND
    finally:
        if isinstance(runner, ChildProcess):
            runner.close()
    print(f"no counterexample in {progress.calls} calls "
          f"({time.perf_counter() - progress.start:.1f} s)")
    return EXIT_OK


def _replay(args: argparse.Namespace) -> int:
    from oracle.check.harness import format_report  # lazy: start-up
    from oracle.files.counterexample import load  # lazy: start-up

    try:
        check_options(timeout=args.timeout)
    except OptionError as exc:
        return _usage("replay", exc)
    try:
        saved = load(args.file)
        numerics, ulps = judged_with(saved.meta)
        # Files written before the policy was recorded were judged with that time's "strict".
        inputs = args.inputs or str(saved.meta.get("inputs", "strict"))
        check_options(inputs=inputs)
        impl = _runner(args)
    except (ImplLoadError, SpecError, OptionError) as exc:
        _err(f"dfc-oracle replay: {exc}")
        return EXIT_USAGE
    if args.numerics is not None:
        numerics = replace(numerics, mode=args.numerics)
    numerics = with_kernel(numerics, args.kernel)
    ulps = ulps if args.ulps is None else args.ulps
    try:
        verdict, _ = evaluate(impl, saved.problem, numerics=numerics, timeout=args.timeout,
                              ulps=ulps, inputs=inputs)
    finally:
        if isinstance(impl, ChildProcess):
            impl.close()
    if verdict.ok:
        print(f"{args.file}: the implementation now conforms ({describe_problem(saved.problem)})")
        return EXIT_OK
    print(format_report(saved.problem, verdict, numerics=numerics, path=Path(args.file),
                        replay=None, ulps=ulps))
    return EXIT_FOUND


def _kernels(args: argparse.Namespace) -> int:
    """One line per kernel profile; ``--verbose`` every knob, freedom and the shape domain."""
    from oracle.model.kernels import DEFAULT_KERNEL  # lazy: start-up
    from oracle.model.kernels import PROFILES as KERNELS  # lazy: start-up

    width = max(map(len, KERNELS)) + 2
    for name, profile in KERNELS.items():
        if args.verbose:
            print(profile.describe() + "\n")
        else:
            default = " (default)" if name == DEFAULT_KERNEL else ""
            print(f"{name:<{width}}{profile.summary}{default}")
    return EXIT_OK


def _explain(args: argparse.Namespace) -> int:
    from oracle.files.counterexample import load  # lazy: start-up

    try:
        if args.plot is not None:
            from oracle.explain.plot import require_matplotlib  # lazy: start-up

            require_matplotlib()
        saved = load(args.file)
    except (SpecError, ImportError) as exc:
        _err(f"dfc-oracle explain: {exc}")
        return EXIT_USAGE
    print(explain(saved.problem, saved.meta))
    found = _diagnose(saved.problem, saved.outputs, saved.meta)
    print(diagnosis(saved.meta, found))
    if args.stages:
        print(stage_table(saved.problem, saved.outputs, saved.meta, found))
    if args.plot is not None:
        from oracle.explain.plot import save_plot  # lazy: start-up

        numerics, ulps = _judged_or_default(saved.meta)
        title = f"{args.file.name}: stage '{saved.meta.get('stage', 'unknown')}'"
        path = save_plot(args.plot, saved.problem, saved.outputs, numerics=numerics, ulps=ulps,
                         title=title)
        print(f"picture saved: {path}")
    return EXIT_OK


def _diagnose(problem: Any, outputs: Any, meta: dict[str, Any]) -> Diagnosis | None:
    """The saved outputs re-judged as the file was, against the catalogue of known defects
    (:mod:`oracle.explain.diagnose`); ``None`` when the file holds no outputs."""
    from oracle.explain.diagnose import diagnose  # lazy: start-up

    if outputs is None:
        return None
    numerics, ulps = _judged_or_default(meta)
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


def stage_table(problem: Any, outputs: Any, meta: dict[str, Any],
                found: Diagnosis | None) -> str:
    """The failing token of the re-judged outputs (``found``'s verdict) stage by stage
    (:mod:`oracle.explain.stages`), next to the implementation's out row."""
    from oracle.explain.stages import token_stages  # lazy: start-up

    if found is None:
        return "stages: none, the file holds no outputs to locate a failing token"
    verdict = found.verdict
    if verdict.stage not in ("out", "non_finite") or verdict.rank is None or not verdict.where:
        why = "the outputs conform" if verdict.ok else f"stage '{verdict.stage}'"
        return f"stages: none, no failing out row ({why})"
    numerics, ulps = _judged_or_default(meta)
    rank, token = verdict.rank, verdict.where[0]
    out, _ = outputs[rank]
    return token_stages(problem, rank, token, numerics).describe(np.asarray(out[token]), ulps)


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
    from oracle.check.hunt import VARIANTS  # lazy: start-up
    from spec.findings import hunt_rules  # lazy: start-up

    try:
        check_options(save_dir=args.save_dir, max_examples=args.max_examples)
    except OptionError as exc:
        return _usage("hunt", exc)
    rows: list[tuple[str, str, str]] = []
    details: list[str] = []
    _err("hunting the operator's historical layout, buffer and protocol rules ...")
    for finding in hunt_rules():
        rows.append((finding.key, finding.source, finding.counterexample))
        details.append(f"{finding}\n  rerun: {finding.command}")
    for variant in VARIANTS:
        _err(f"hunting variant '{variant.name}' ...")
        try:
            check_implementation(variant.impl, problems=variant.problems,
                                 settings=_settings(args), save_dir=args.save_dir,
                                 impl_name=f"oracle.check.hunt:{variant.name}")
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


def _verify(args: argparse.Namespace) -> int:
    from oracle.check.capture import verify_main  # lazy: start-up

    numerics = with_kernel(resolve_numerics(args.numerics or "faithful"), args.kernel)
    return int(verify_main(args.directory, numerics))


def _variants(text: str) -> tuple[str, ...]:
    return tuple(text.split(","))


def _parser() -> argparse.ArgumentParser:
    """Every option has a one-line help that shows its default (a test walks them)."""
    parser = argparse.ArgumentParser(
        prog="dfc-oracle", description="Specification and test oracle for fused "
        "expert-parallel MoE dispatch -> FFN -> combine operators.")
    sub = parser.add_subparsers(dest="command", required=True)

    def search_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--profile", choices=PROFILES, default=DEFAULT_PROFILE,
                       help="Hypothesis settings profile (default: %(default)s)")
        p.add_argument("--max-examples", type=int, default=None,
                       help="examples to try (default: the profile's)")
        p.add_argument("--save-dir", type=Path, default=Path("dfc-counterexamples"),
                       help="where counterexamples are saved (default: %(default)s)")

    def impl_options(p: argparse.ArgumentParser, judged: str) -> None:
        p.add_argument("--timeout", type=float, default=60.0,
                       help="seconds one call of the implementation may take before it is "
                       "reported as hung (default: %(default)s)")
        p.add_argument("--in-process", action="store_true",
                       help="run the implementation in this process (debugging; an os._exit, "
                       "crash or GIL-holding hang then stops the command; default: a child "
                       "process)")
        p.add_argument("--numerics", choices=NUMERICS_MODES, default=judged if judged else None,
                       help="faithful: emulate the kernel profile; ideal: the float64 "
                       "mathematics with a derived tolerance (default: "
                       f"{judged or 'as the file was judged'})")

    check = sub.add_parser("check", help="hunt for a counterexample in MODULE:FUNC")
    check.add_argument("impl", metavar="MODULE:FUNC",
                       help="the implementation: a function of the problem, by import name")
    impl_options(check, "faithful")
    check.add_argument("--kernel", choices=list(KERNELS), default=DEFAULT_KERNEL,
                       help="kernel profile: emulation, tolerance and generated shapes "
                       "(dfc-oracle kernels lists them; default: %(default)s)")
    check.add_argument("--domain", choices=DOMAINS, default="kernel",
                       help="generate the kernel profile's shapes, or the whole contract "
                       "(default: %(default)s)")
    check.add_argument("--variants", type=_variants, default=None, metavar="V[,V...]",
                       help="weight variants the implementation supports, comma-separated, "
                       f"from {', '.join(WEIGHT_VARIANTS)} (default: "
                       f"{','.join(DEFAULT_VARIANTS)})")
    check.add_argument("--seed", type=int, default=None,
                       help="Hypothesis' random seed, for a reproducible random search "
                       "(default: the profile's, derandomised for dfc-ci)")
    check.add_argument("--inputs", choices=INPUT_POLICIES, default=DEFAULT_INPUTS,
                       help="an implementation that writes into its inputs: sentinel allows "
                       "only the operator's write-back of EP·E into masked tokens' expert ids, "
                       "strict no write, report warns, ignore (default: %(default)s)")
    check.add_argument("--ulps", type=float, default=0.0,
                       help="ulps of the out dtype allowed beyond the kernel profile's "
                       "envelope (default: %(default)s: the envelope only)")
    search_options(check)
    replay = sub.add_parser("replay", help="rerun a saved counterexample")
    replay.add_argument("file", type=Path, help="a counterexample file (.npz)")
    replay.add_argument("--impl", required=True, metavar="MODULE:FUNC",
                        help="the implementation to rerun it on (required)")
    impl_options(replay, "")
    replay.add_argument("--kernel", choices=list(KERNELS), default=None,
                        help="kernel profile (default: as the file was judged)")
    replay.add_argument("--ulps", type=float, default=None,
                        help="ulps beyond the envelope (default: as the file was judged)")
    replay.add_argument("--inputs", choices=INPUT_POLICIES, default=None,
                        help="input-write policy (default: as the file was judged)")
    kernels_p = sub.add_parser("kernels", help="list the kernel numerics profiles")
    kernels_p.add_argument("--verbose", "-v", action="store_true",
                           help="every knob, freedom and the shape domain of each profile "
                           "(default: one line each)")
    hunt = sub.add_parser("hunt", help="search the built-in catalogue of rules and variants")
    search_options(hunt)
    explain_p = sub.add_parser("explain", help="describe a saved counterexample and name the "
                               "known defect its outputs equal")
    explain_p.add_argument("file", type=Path, help="a counterexample file (.npz)")
    explain_p.add_argument("--stages", action=argparse.BooleanOptionalAction, default=True,
                           help="print the failing token's reference intermediates at each "
                           "rounding point of the profile, next to your out row (default: on; "
                           "--no-stages leaves it out)")
    explain_p.add_argument("--plot", type=Path, default=None, metavar="OUT.png",
                           help="also draw the routing matrix, the receive buffers with the "
                           "truncation line and the error/tolerance heat map into OUT.png "
                           "(needs pip install 'dfc-oracle[plot]'; default: no picture)")
    verify = sub.add_parser("verify", help="check a captured multi-rank run")
    verify.add_argument("directory", type=Path, help="the capture directory (oracle.check.capture)")
    verify.add_argument("--numerics", choices=NUMERICS_MODES, default=None,
                        help="faithful: the kernel profile; ideal: the float64 mathematics "
                        "(default: faithful)")
    verify.add_argument("--kernel", choices=list(KERNELS), default=None,
                        help=f"kernel profile to judge with (default: {DEFAULT_KERNEL})")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler = {"check": _check, "replay": _replay, "hunt": _hunt, "explain": _explain,
               "verify": _verify, "kernels": _kernels}[args.command]
    return handler(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
