"""The bundled conformance suite that ``pytest --dfc-impl MODULE:FUNC`` runs.

One test per input family of :mod:`spec.strategies` (routing, special rows, token counts,
masks, truncation, weight forms, memory layouts and variants) and one for the whole default
search; each runs :func:`oracle.check_implementation` under the active profile and fails with
its report. A variant the implementation does not support (``--dfc-variants``) is a named
skip. A failure found by one test is tried first by every later one, which then fails in one
line ("same failure as ...") instead of searching and shrinking the same defect again. The
default search runs the profile's ``max_examples``; a family test, whose every draw has its
family, runs ``--dfc-family-examples`` (default a fifth of them): a passing gate costs about
what two full searches cost, not 25 (issue "gate in a minute"; ``benchmarks/gate_time.py``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st

from oracle.check.harness import (
    ConformanceError,
    check_implementation,
    evaluate,
    gate_configs,
    preset_configs,
    variant_configs,
    variants_of,
)
from oracle.check.modular import StageConformanceError, check_stage, stage_calls
from oracle.check.placed_search import PLACED_FAMILIES, check_placed, placed_families
from oracle.model.kernels import get_kernel
from oracle.model.numerics import resolve_numerics, with_kernel
from spec import Problem
from spec.fields import GATE_VARIANTS
from spec.index_width import THRESHOLDS, crossing_fields
from spec.limits import ShapeDomain
from spec.memory import LAYOUTS
from spec.modular import LAYOUTS as STAGE_LAYOUTS
from spec.strategies import (
    POWER_ROW_FAMILIES,
    ROUTING_FAMILIES,
    ROW_FAMILIES,
    problems,
    routings,
    token_rows,
)

_GATE = {g.name: g for g in GATE_VARIANTS}


def _domain(options: dict[str, Any]) -> ShapeDomain | None:
    """The shapes to generate: the kernel profile's, unless ``--dfc-domain contract``."""
    return get_kernel(options["kernel"]).domain if options["domain"] == "kernel" else None


def _variant_configs(options: dict[str, Any], **fields: Any) -> st.SearchStrategy[Any]:
    """The selected variants the kernel profile has a pipeline for."""
    try:
        have = variants_of(get_kernel(options["kernel"]), options["variants"])
    except ValueError as e:
        pytest.skip(str(e))
    return variant_configs(have, domain=_domain(options), **fields)


@dataclass(frozen=True)
class _Known:
    """A minimal failure an earlier test of this session found (and shrank)."""

    test: str
    problem: Problem
    stage: str
    summary: str


#: The failures found so far, in order; each later test tries them before its own search, so
#: one defect is searched for and shrunk once, not once per test (issue "gate in a minute").
_KNOWN: list[_Known] = []


def _current_test() -> str:
    node = os.environ.get("PYTEST_CURRENT_TEST", "an earlier test").split(" ")[0]
    return node.split("::")[-1]


def _known_failure(options: dict[str, Any]) -> str | None:
    """The one-line report of the first known failure this implementation still has."""
    numerics = with_kernel(resolve_numerics(options["numerics"]), options["kernel"])
    for known in _KNOWN:
        if known.stage == "timeout":  # re-running a hang costs a whole timeout per test
            return (f"not searched: the implementation hung in {known.test} "
                    f"({known.summary}); fix that first")
        verdict, _ = evaluate(options["impl"], known.problem, numerics=numerics,
                              timeout=options["timeout"], inputs=options["inputs"],
                              ulps=options["ulps"])
        if not verdict.ok:
            return (f"same failure as {known.test}: stage '{verdict.stage}' on its minimal "
                    f"call {known.summary}; see that test's report")
    return None


def _check(options: dict[str, Any], strategy: st.SearchStrategy[Problem], *,
           family: bool = True, examples: int | None = None) -> None:
    """Search ``strategy``: with the profile's budget for the default search, with
    ``--dfc-family-examples`` for a test of one family, or ``examples``."""
    again = _known_failure(options)
    if again is not None:
        pytest.fail(again, pytrace=False)
    budget = settings(settings(), deadline=None,
                      max_examples=examples or options["family_examples"]) if family else None
    try:
        check_implementation(
            options["impl"], numerics=options["numerics"], problems=strategy,
            impl_name=options["impl_name"], inputs=options["inputs"], ulps=options["ulps"],
            timeout=options["timeout"], kernel=options["kernel"], domain=options["domain"],
            settings=budget,
        )
    except ConformanceError as exc:
        _KNOWN.append(_Known(_current_test(), exc.problem, exc.verdict.stage,
                             exc.problem.config.summary()))
        report = exc.report
    else:
        return
    pytest.fail(report, pytrace=False)


def test_default_search(dfc_options: dict[str, Any]) -> None:
    """Every family at once, as drawn by the default strategies."""
    _check(dfc_options, problems(configs=_variant_configs(dfc_options)), family=False)


@pytest.mark.parametrize("family", ROUTING_FAMILIES)
def test_routing(dfc_options: dict[str, Any], family: str) -> None:
    _check(dfc_options, problems(configs=_variant_configs(dfc_options),
                                 routing=routings(families=st.just(family))))


@pytest.mark.parametrize("family", [f for f in ROW_FAMILIES + POWER_ROW_FAMILIES
                                    if f != "normal"])
def test_token_rows(dfc_options: dict[str, Any], family: str) -> None:
    _check(dfc_options, problems(configs=_variant_configs(dfc_options),
                                 values=token_rows(families=st.just(family))))


@pytest.mark.parametrize(
    ("name", "fields"),
    [
        ("empty_ranks", {"tokens_per_rank": st.sampled_from((0, 0, 1, 3))}),
        ("masked", {"masked": st.just(True)}),
        ("truncation", {"truncation": st.just(True)}),
        ("per_expert_lists", {"weight_forms": st.just("list")}),
        ("swiglu_clamp", {"swiglu_limits": st.sampled_from((0.5, 2.0))}),
        ("many_ranks", {"ep_sizes": st.sampled_from((16, 31, 32))}),
        # EP·E = 112, 128, 144 around the 512-byte count-row boundary (§8).
        ("experts_around_128", {"ep_sizes": st.just(16),
                                "experts_per_rank": st.sampled_from((8, 7, 9))}),
        # Past the A3 W8A8 kernel's CombineV1 switch at M·topK > 4096, with tiny K and I
        # (spec.index_width.THRESHOLDS; the other families never cross it).
        ("combine_v1", crossing_fields(THRESHOLDS[0])),
    ],
)
def test_family(dfc_options: dict[str, Any], name: str, fields: dict[str, Any]) -> None:
    flag = {"masked": "masked", "swiglu_clamp": "clamped"}.get(name)
    if flag and not any(getattr(_GATE[v].variant, flag) for v in dfc_options["variants"]):
        pytest.skip(f"{name}: no variant in --dfc-variants has it")
    domain = _domain(dfc_options)
    feature = {"masked": "masks", "truncation": "truncation", "swiglu_clamp": "clamp"}.get(name)
    if domain is not None and feature and not getattr(domain, feature):
        pytest.skip(f"the {get_kernel(dfc_options['kernel']).name} kernel has no {feature} "
                    "(--dfc-domain contract generates it anyway)")
    _check(dfc_options, problems(configs=_variant_configs(dfc_options, **fields)))


@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name != "contiguous"])
def test_memory_layout(dfc_options: dict[str, Any], layout: str) -> None:
    """x and the weights as Fortran-order or strided views (the operator's weights are
    ``IgnoreContiguous()``): the same values, so the same outputs."""
    _check(dfc_options, problems(configs=_variant_configs(dfc_options),
                                 layouts=st.just(layout)))


@pytest.mark.parametrize("variant", list(_GATE))
def test_variant(dfc_options: dict[str, Any], variant: str) -> None:
    """One weight variant alone; W4A8 (int4 weights packed in int32) only when asked for with
    ``--dfc-variants``, like every variant outside the default list."""
    if variant not in dfc_options["variants"]:
        pytest.skip(f"variant {variant} not in --dfc-variants")
    profile = get_kernel(dfc_options["kernel"])
    if _GATE[variant].variant.name not in profile.variants:
        pytest.skip(f"kernel profile {profile.name} has no {_GATE[variant].variant.name} "
                    "pipeline")
    gate = _GATE[variant]
    strategy = gate_configs(gate, gate.x_dtypes[:1], domain=_domain(dfc_options))
    _check(dfc_options, problems(configs=strategy))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``test_model_shape`` once per preset of ``--dfc-shapes`` (none given: one skip);
    ``test_placed`` once per placed family with ``--dfc-placement`` (else one skip)."""
    if "model_shape" in metafunc.fixturenames:
        given = metafunc.config.getoption("--dfc-shapes")
        metafunc.parametrize("model_shape", given.split(",") if given else [])
    if "placed_family" in metafunc.fixturenames:
        on = metafunc.config.getoption("--dfc-placement")
        metafunc.parametrize("placed_family", PLACED_FAMILIES if on else [])
    if "stage_family" in metafunc.fixturenames:
        stage = metafunc.config.getoption("--dfc-stage")
        layout = metafunc.config.getoption("--dfc-layout")
        placed = ("", "-placed") if metafunc.config.getoption("--dfc-placement") else ("",)
        metafunc.parametrize("stage_family", [
            f"{stage}-{lay}{p}" for lay in ((layout,) if layout else STAGE_LAYOUTS)
            for p in placed] if stage else [])


def test_stage(dfc_options: dict[str, Any], stage_family: str) -> None:
    """One stage of the modular split (``--dfc-stage``, :mod:`oracle.check.modular`) in one
    layout, on plain calls or (``-placed``, with ``--dfc-placement``) on calls made from placed
    calls; ideal numerics unless ``--dfc-kernel`` is given (then the experts are emulated with
    the profile and the combine judged with its sum, on the profile's shapes)."""
    stage, layout, *placed = stage_family.split("-")
    named = dfc_options["kernel_named"]
    profile = get_kernel(dfc_options["kernel"])
    numerics = with_kernel(resolve_numerics(dfc_options["numerics"]), profile) if named else (
        "ideal")
    calls = stage_calls(stage, layouts=(layout,), placed=bool(placed)) if (
        placed or not named) else stage_calls(stage, layouts=(layout,), configs=variant_configs(
            dfc_options["variants"], domain=_domain(dfc_options), truncation=st.just(False)))
    try:
        check_stage(stage, dfc_options["impl"], layouts=(layout,), numerics=numerics,
                    ulps=dfc_options["ulps"], timeout=dfc_options["timeout"], calls=calls,
                    settings=settings(settings(), deadline=None,
                                      max_examples=dfc_options["family_examples"]),
                    impl_name=dfc_options["impl_name"])
    except StageConformanceError as exc:
        pytest.fail(exc.report, pytrace=False)


def test_placed(dfc_options: dict[str, Any], placed_family: str) -> None:
    """Placed calls (``--dfc-placement``, :mod:`oracle.check.placed_search`): the
    implementation gets a :class:`spec.placement.PlacedCall`, judged in ideal numerics."""
    domain = _domain(dfc_options)
    if domain is not None and not domain.placement:
        pytest.skip(f"the {get_kernel(dfc_options['kernel']).name} kernel takes no placed calls "
                    "(--dfc-domain contract generates them anyway)")
    try:
        calls = placed_families(placed_family, dfc_options["variants"])
    except ValueError as e:
        pytest.skip(str(e))
    try:
        check_placed(dfc_options["impl"], calls=calls, impl_name=dfc_options["impl_name"],
                     settings=settings(settings(), deadline=None,
                                       max_examples=dfc_options["family_examples"]),
                     timeout=dfc_options["timeout"], inputs=dfc_options["inputs"],
                     ulps=dfc_options["ulps"])
    except ConformanceError as exc:
        pytest.fail(exc.report, pytrace=False)


def test_model_shape(dfc_options: dict[str, Any], model_shape: str) -> None:
    """A real model's K, I and top_k (``--dfc-shapes``;
    :func:`oracle.check.harness.preset_configs`), judged as every other family, with a quarter
    of a family test's examples: every call generates and runs weights of hundreds of
    megabytes."""
    strategy = preset_configs(model_shape, dfc_options["variants"], domain=_domain(dfc_options))
    _check(dfc_options, problems(configs=strategy), examples=dfc_options["preset_examples"])
