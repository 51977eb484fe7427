"""Known-defective and open-question variants of the reference model, for ``dfc-oracle hunt``.

Each variant is an implementation (``problem -> outputs``) that differs from the default
reference in one documented way; hunting it shows, with a minimal counterexample, what the
difference does to real outputs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from hypothesis import strategies as st

from oracle.model.kernels import KernelProfile
from oracle.model.numerics import Numerics
from oracle.model.reference import run
from oracle.model.routing import run_placed
from spec import Problem
from spec.adapter import PR11916_PYTHON_DEFAULT_ALPHA, swiglu_experts
from spec.limits import ShapeDomain
from spec.placed_strategies import placed_calls
from spec.placement import NO_EXPERT, PlacedCall
from spec.strategies import configs, problems, token_rows

__all__ = ["PLACED_VARIANTS", "VARIANTS", "Variant", "outputs_of"]


def outputs_of(numerics: Numerics) -> Callable[[Problem], list[tuple[Any, Any]]]:
    """The reference model under other numerics, as an implementation."""

    def impl(problem: Problem) -> list[tuple[Any, Any]]:
        return [(r.out, r.expert_token_nums) for r in run(problem, numerics=numerics).ranks]

    return impl


def _changed(**change: Any) -> Callable[[Problem, Numerics], list[tuple[Any, Any]]]:
    """The reference under ``numerics`` with ``change`` applied, as a variant's run."""
    return lambda problem, numerics: outputs_of(dataclasses.replace(numerics, **change))(problem)


def _default_alpha(problem: Problem, numerics: Numerics) -> list[tuple[Any, Any]]:
    """A standard W8A8 call through PR #11916's Python binding: ``swiglu_alpha`` becomes its
    default."""
    attributes = problem.config.call_attributes()
    if attributes["swiglu_alpha"] is None:
        attributes["swiglu_alpha"] = PR11916_PYTHON_DEFAULT_ALPHA
    return outputs_of(numerics)(Problem(problem.ranks, **attributes))


def _bf16_epilogue(problem: Problem, numerics: Numerics) -> list[tuple[Any, Any]]:
    """The BF16 kernel's SwiGLU epilogue (:func:`spec.adapter.swiglu_experts`): an expert it
    skips goes through GMM2 on a SwiGLU buffer nothing wrote, taken as zeros (a first call on
    a fresh buffer; later calls read the previous call's rows [inferred]), so its ``y`` is 0:
    the reference with that expert's ``w2`` zeroed."""
    e = problem.config.experts_per_rank
    skipped = [j for j in range(e) if j not in swiglu_experts(e, "bf16")]
    if problem.config.weight_dtype == "int8" or not skipped:
        return outputs_of(numerics)(problem)

    def stale(w2: Any) -> Any:
        w2 = np.array(w2)
        if w2.ndim == 3:
            w2[skipped] = 0
        return w2

    ranks = []
    for r in problem.ranks:
        w2 = [stale(w) for w in r.w2] if len(r.w2) == 1 else [
            np.zeros_like(w) if j in skipped else w for j, w in enumerate(r.w2)]
        ranks.append(dataclasses.replace(r, w2=w2))
    return outputs_of(numerics)(Problem(ranks, **problem.config.call_attributes()))


def _clamp_invalid(call: PlacedCall) -> list[tuple[Any, Any]]:
    """vllm-ascend's ``map_and_record``: a −1 logical id clamped to 0 before the lookup, so
    the slot runs logical expert 0 with its weight (the reference on the clamped ids)."""
    fields, arrays = call.record()
    clamped = {k: np.maximum(a, 0).astype(a.dtype) if k.endswith(".expert_idx") else a
               for k, a in arrays.items()}
    again = PlacedCall.from_record(call.problem.ranks, fields, clamped, **call.attributes)
    return [(r.out, r.expert_token_nums) for r in run_placed(again, numerics="ideal").ranks]


@dataclass(frozen=True)
class Variant:
    """One variant: ``run(problem, numerics)`` is the reference under ``numerics`` with the
    variant's difference; ``search(domain)`` its problems inside a kernel's shape domain (a
    :class:`~spec.placement.PlacedCall` for :data:`PLACED_VARIANTS`, judged in ideal numerics)."""

    name: str
    what: str
    source: str
    run: Callable[[Any, Numerics], Any]
    search: Callable[[ShapeDomain | None], st.SearchStrategy[Any]]

    def impl(self, kernel: KernelProfile | None = None) -> Callable[[Any], Any]:
        """The variant of ``kernel`` (default: the default profile), as an implementation."""
        numerics = Numerics(kernel=kernel)
        return lambda problem: self.run(problem, numerics)

    def problems(self, kernel: KernelProfile | None = None) -> st.SearchStrategy[Any]:
        return self.search(None if kernel is None else kernel.domain)


VARIANTS = (
    Variant(
        "zero-row NaN",
        "the kernel's reading of §6 steps 1 and 5: an all-zero token row quantises as 0/0 = NaN "
        "and poisons every slot of its token, where the mathematics gives 0",
        "reference notes §6 step 1 and 5 [inferred]",
        _changed(zero_rows="nan"),
        lambda d: problems(configs=configs(domain=d),
                           values=token_rows(families=st.just("zero_row"))),
    ),
    Variant(
        "19-bit dequant scales",
        "the CANN converter keeps scale bits & 0xFFFFE000; vLLM passes raw float32 bits: does "
        "the open question change outputs?",
        "reference notes §6 step 2 [inferred]",
        _changed(truncate_scales=True),
        lambda d: problems(configs=configs(domain=d),
                           values=token_rows(families=st.sampled_from(("normal", "ties")))),
    ),
    Variant(
        "oai-default-alpha",
        f"PR #11916's Python binding passes swiglu_alpha = {PR11916_PYTHON_DEFAULT_ALPHA} when "
        "the caller passes none: a standard W8A8 model runs SwigluOAI",
        "variants.md [inferred]; PR #11916 (open)",
        _default_alpha,
        lambda d: problems(configs=configs(weight_dtypes=st.just("int8"), swiglu_alphas=st.none(),
                                           domain=d)),
    ),
    Variant(
        "bf16-epilogue-e2",
        "the BF16 kernel's epilogue granularity E − 2: at E = 2 SwiGLU never runs and GMM2 "
        "reads a stale buffer; E = 1 works",
        "variants.md; dispatch_ffn_combine_bf16.h [code]",
        _bf16_epilogue,
        lambda d: problems(configs=configs(
            weight_dtypes=st.sampled_from(("bfloat16", "float16")),
            experts_per_rank=st.sampled_from((1, 2, 3, 4)), domain=d)),
    ),
)

#: Variants of placed calls (:mod:`oracle.check.placed_search`), hunted after :data:`VARIANTS`.
PLACED_VARIANTS = (
    Variant(
        "clamp-invalid-id",
        f"vllm-ascend's map_and_record clamps a logical id of {NO_EXPERT} (a slot routed "
        "nowhere) to 0 before the lookup: the slot runs expert 0 with its weight",
        "placement.md [code]; open",
        lambda call, _numerics: _clamp_invalid(call),
        lambda _domain: placed_calls(),
    ),
)
