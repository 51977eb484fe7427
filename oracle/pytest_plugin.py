"""pytest plugin (entry point ``pytest11``): ``pytest --dfc-impl package.module:function``
runs the bundled conformance suite (:mod:`oracle.check.conformance`) against that implementation.

The header prints the implementation, numerics, profile and seed, so a CI log says what was
checked. ``--dfc-profile`` loads one of the Hypothesis profiles of :mod:`oracle.config.settings`.
The implementation runs in one child process for the whole session (:mod:`oracle.check.isolation`),
so an ``os._exit``, a crash or a hang is a failing test with a report, never a silently green
or dead gate; ``--dfc-in-process`` runs it in pytest's process instead, for debugging.
``--dfc-stage STAGE`` gates one stage of the modular split instead (``test_stage[...]``, one
test per layout; :mod:`oracle.check.modular`): the implementation then runs in pytest's
process and the fused call's tests are skipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from oracle.config.options import DEFAULT_INPUTS, DEFAULT_VARIANTS, INPUT_POLICIES, WEIGHT_VARIANTS
from oracle.config.settings import DEFAULT_PROFILE, SETTINGS_PROFILES
from oracle.model.kernels import DEFAULT_KERNEL
from oracle.model.kernels import PROFILES as KERNELS
from spec.limits import MODEL_PRESETS
from spec.modular import LAYOUTS, STAGES

_SUITE = Path(__file__).parent / "check" / "conformance.py"
_IMPL = pytest.StashKey[Any]()  # the gate's ChildProcess, or the callable (--dfc-in-process)
_KERNEL = pytest.StashKey[Any]()  # --dfc-kernel resolved once: a registered name or a profile


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("dfc-oracle", "dfc-oracle conformance gate")
    group.addoption("--dfc-impl", metavar="MODULE:FUNC", default=None,
                    help="run the dfc-oracle conformance suite against this implementation")
    group.addoption("--dfc-numerics", choices=("faithful", "ideal"), default="faithful",
                    help="faithful: emulate the kernel profile; ideal: the float64 mathematics "
                    "with a derived tolerance (default: faithful)")
    group.addoption("--dfc-kernel", default=DEFAULT_KERNEL, metavar="KERNEL",
                    help="kernel numerics profile: emulation, tolerance and generated shapes; "
                    f"one of {', '.join(KERNELS)}, MODULE:NAME of a KernelProfile, or a "
                    "profile file from 'dfc-oracle kernels --dump NAME' (default: "
                    f"{DEFAULT_KERNEL})")
    group.addoption("--dfc-domain", choices=("kernel", "contract"), default="kernel",
                    help="kernel: the kernel profile's shapes; contract: every shape the "
                    "contract allows (default: kernel)")
    group.addoption("--dfc-profile", choices=SETTINGS_PROFILES, default=None,
                    help=f"Hypothesis profile (default with --dfc-impl: {DEFAULT_PROFILE})")
    group.addoption("--dfc-variants", default=",".join(DEFAULT_VARIANTS),
                    help="weight variants the implementation supports, comma-separated, from "
                    f"{','.join(WEIGHT_VARIANTS)}; the others are skipped by name (default: "
                    f"{','.join(DEFAULT_VARIANTS)})")
    group.addoption("--dfc-inputs", choices=INPUT_POLICIES, default=DEFAULT_INPUTS,
                    help="an implementation that writes into its inputs: sentinel allows only "
                    "the operator's write-back of EP·E into masked tokens' expert ids, strict "
                    f"no write, report warns, ignore (default: {DEFAULT_INPUTS})")
    group.addoption("--dfc-ulps", type=float, default=0.0,
                    help="ulps of the out dtype allowed beyond the kernel profile's envelope "
                    "(default: 0, the envelope only; a value no freedom reaches is bitwise)")
    group.addoption("--dfc-timeout", type=float, default=60.0,
                    help="seconds one call of the implementation may take before it is "
                    "reported as hung (default: 60)")
    group.addoption("--dfc-family-examples", type=int, default=None,
                    help="examples for each test of one input family (default: a fifth of the "
                    "profile's max_examples, at least 10; the default search keeps them all)")
    group.addoption("--dfc-shapes", default="", metavar="MODEL[,MODEL...]",
                    help="also test each model's real K, I and top_k as a fixed-shape family "
                    "(test_model_shape[MODEL]; spec.limits.MODEL_PRESETS: "
                    f"{','.join(MODEL_PRESETS)}; default: none)")
    group.addoption("--dfc-placement", action="store_true", default=False,
                    help="also test placed calls (test_placed[FAMILY]): FUNC(call) gets a "
                    "spec.placement.PlacedCall (replicas, shared experts, rsf, weights on the "
                    "input, int64 and -1 ids; docs/routing.md), judged in ideal numerics; "
                    "skipped for a kernel whose domain excludes placement, as the Ascend "
                    "profile's does (default: off)")
    group.addoption("--dfc-stage", choices=STAGES, default=None,
                    help="gate one stage of the modular split instead of the fused call "
                    "(test_stage[STAGE-LAYOUT]): FUNC(call) gets a spec.modular.StageCall; run "
                    "in pytest's process; judged in ideal numerics unless --dfc-kernel is "
                    "given; with --dfc-placement also calls made from placed calls (default: "
                    "off)")
    group.addoption("--dfc-layout", choices=LAYOUTS, default=None,
                    help="with --dfc-stage: the receive-buffer layout the stage takes "
                    "(default: both)")
    group.addoption("--dfc-threads", type=int, default=1, metavar="N",
                    help="OpenMP, BLAS and torch threads of the implementation's child "
                    "process; 0 leaves them as the environment sets them (default: 1, a gate "
                    "time that does not depend on the machine's load)")
    group.addoption("--dfc-in-process", action="store_true", default=False,
                    help="run the implementation in pytest's own process (debugging: an "
                    "os._exit, crash or GIL-holding hang then takes the gate down; default: a "
                    "child process)")


def pytest_configure(config: pytest.Config) -> None:
    profile = config.getoption("--dfc-profile")
    impl = config.getoption("--dfc-impl")
    if profile is None and impl:
        profile = DEFAULT_PROFILE
    if profile:
        settings.load_profile(profile)
    if impl:
        from oracle.check.isolation import ChildProcess, check_signature  # lazy: start-up
        from oracle.check.loading import ImplLoadError, load_impl, load_kernel  # lazy: start-up
        from oracle.config.options import OptionError, check_options  # lazy: start-up

        try:
            config.stash[_KERNEL] = load_kernel(config.getoption("--dfc-kernel"))
            check_options(numerics=config.getoption("--dfc-numerics"),
                          ulps=config.getoption("--dfc-ulps"),
                          timeout=config.getoption("--dfc-timeout"),
                          inputs=config.getoption("--dfc-inputs"),
                          kernel=config.stash[_KERNEL],
                          domain=config.getoption("--dfc-domain"),
                          variants=config.getoption("--dfc-variants").split(","),
                          threads=config.getoption("--dfc-threads") or None,
                          shapes=shapes(config.getoption("--dfc-shapes")))
        except OptionError as exc:
            raise pytest.UsageError(f"--dfc-{exc.option}: {exc}") from None
        family = config.getoption("--dfc-family-examples")
        if family is not None and family < 1:
            raise pytest.UsageError(f"--dfc-family-examples: {family} is not allowed; give at "
                                    "least 1 example per family test")
        try:  # once, before collection: a bad name is one usage error, not an error per test
            if config.getoption("--dfc-in-process") or config.getoption("--dfc-stage"):
                loaded = load_impl(impl)
                check_signature(loaded, impl)
                config.stash[_IMPL] = loaded
            else:
                child = ChildProcess(impl, threads=config.getoption("--dfc-threads") or None)
                child.start()
                config.stash[_IMPL] = child
        except ImplLoadError as exc:
            raise pytest.UsageError(f"--dfc-impl: {exc}") from None
        config.args.append(str(_SUITE))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With ``--dfc-stage``, every test of the suite but ``test_stage`` is skipped by name:
    the implementation is a stage, not the fused call."""
    stage = config.getoption("--dfc-stage")
    if not stage or not config.getoption("--dfc-impl"):
        return
    skip = pytest.mark.skip(reason=f"--dfc-stage {stage} gates that stage alone; the fused "
                            "call's tests need a fused implementation")
    for item in items:
        if item.path == _SUITE and getattr(item, "originalname", "") != "test_stage":
            item.add_marker(skip)


def pytest_unconfigure(config: pytest.Config) -> None:
    runner = config.stash.get(_IMPL, None)
    if runner is not None and not callable(runner):  # the gate's ChildProcess
        runner.close()


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int,
                            config: pytest.Config) -> None:
    """After a gate run: how many passing calls had rows the row test could not judge
    (:func:`oracle.check.harness.untested_summary`), so that a weak pass is seen."""
    if not config.getoption("--dfc-impl"):
        return
    from oracle.check.harness import untested_summary  # lazy: start-up

    if untested_summary():
        terminalreporter.write_line(f"dfc-oracle: {untested_summary()}")


def pytest_report_header(config: pytest.Config) -> list[str]:
    impl = config.getoption("--dfc-impl")
    if not impl:
        return []
    current = settings()
    seed = "derandomised" if current.derandomize else "random (see Hypothesis' seed report)"
    return [
        f"dfc-oracle: impl={impl} kernel={_kernel_name(config)} "
        f"domain={config.getoption('--dfc-domain')} numerics={config.getoption('--dfc-numerics')} "
        f"profile={settings.get_current_profile_name()} "
        f"variants={config.getoption('--dfc-variants')} "
        f"shapes={config.getoption('--dfc-shapes') or 'none'} "
        f"placement={'on' if config.getoption('--dfc-placement') else 'off'} "
        f"stage={config.getoption('--dfc-stage') or 'off(fused)'} "
        f"max_examples={current.max_examples} "
        f"family_examples={family_examples(config.getoption('--dfc-family-examples'))} "
        f"seed={seed} "
        f"isolation={_isolation(config)} "
        f"threads={_threads(config)}"
    ]


def _isolation(config: pytest.Config) -> str:
    in_process = config.getoption("--dfc-in-process") or config.getoption("--dfc-stage")
    return "in-process" if in_process else "child-process"


def _threads(config: pytest.Config) -> str:
    """The child's pinned thread count, as the header says it."""
    if config.getoption("--dfc-in-process") or config.getoption("--dfc-stage"):
        return "not-pinned(in-process)"
    return str(config.getoption("--dfc-threads") or "environment")


def _kernel_name(config: pytest.Config) -> str:
    """The profile's name, and where it came from when the user gave their own."""
    given = config.getoption("--dfc-kernel")
    kernel = config.stash.get(_KERNEL, given)
    name = getattr(kernel, "name", kernel)
    return name if name == given else f"{name} (from {given})"


@pytest.fixture(scope="session")
def dfc_options(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The gate's options and the implementation loaded by ``pytest_configure``."""
    name = request.config.getoption("--dfc-impl")
    if not name:
        pytest.skip("no --dfc-impl given: the conformance suite needs an implementation")
    stage = request.config.getoption("--dfc-stage")
    return {
        "impl": request.config.stash[_IMPL],
        "impl_name": name,
        "numerics": request.config.getoption("--dfc-numerics"),
        "variants": tuple(request.config.getoption("--dfc-variants").split(",")),
        "inputs": request.config.getoption("--dfc-inputs"),
        "ulps": request.config.getoption("--dfc-ulps"),
        "kernel": request.config.stash[_KERNEL],
        "domain": request.config.getoption("--dfc-domain"),
        "timeout": request.config.getoption("--dfc-timeout"),
        "family_examples": family_examples(request.config.getoption("--dfc-family-examples")),
        "preset_examples": preset_examples(request.config.getoption("--dfc-family-examples")),
        "placement": request.config.getoption("--dfc-placement"),
        "stage": stage,
        # The stage judges use the kernel profile only when --dfc-kernel was given.
        "kernel_named": any(a.startswith("--dfc-kernel")
                            for a in request.config.invocation_params.args),
    }


def shapes(option: str) -> tuple[str, ...]:
    """``--dfc-shapes`` as preset keys (empty: none)."""
    return tuple(option.split(",")) if option else ()


def preset_examples(option: int | None) -> int:
    """Examples per model-shape preset: a quarter of a family test's, at least 3. One call at
    DeepSeek-V3's K = 7168 costs seconds, not milliseconds (benchmarks/GATE_TIME.md)."""
    return max(3, family_examples(option) // 4)


def family_examples(option: int | None) -> int:
    """Examples per family test: ``--dfc-family-examples``, else a fifth of the profile's
    ``max_examples`` (at least 10). A family test draws its family in every example, so a
    defect of that family shows in the first few (``benchmarks/gate_time.py`` measures what the
    smaller budget loses on the mutant catalogue)."""
    return option if option is not None else max(10, settings().max_examples // 5)
