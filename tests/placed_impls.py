"""Placement-aware implementations by import name (``placed_impls:rsf_twice``), for the tests
of the doors that take placed calls: the correct one and a mutant of
``benchmarks/mutants/placement.py``; for placed calls of every weight format, the oracle's own
faithful model (``reference``) and a mutant computing the row that shares the call's weights
(``wrong_variant``)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # benchmarks/ is a plain folder; a child process imports us too
    sys.path.insert(0, str(ROOT))

import dataclasses  # noqa: E402
from typing import Any  # noqa: E402

from benchmarks.mutants.placement import PLACED_MUTANTS, placed_correct  # noqa: E402
from oracle.model.kernels import PROFILES  # noqa: E402
from oracle.model.numerics import Numerics, resolve_numerics, with_kernel  # noqa: E402
from oracle.model.routing import run_placed  # noqa: E402
from spec.fields import VARIANTS  # noqa: E402
from spec.placement import PlacedCall  # noqa: E402

correct = placed_correct
rsf_twice = PLACED_MUTANTS["rsf_twice"]


def _faithful(call: PlacedCall) -> list[tuple[Any, Any]]:
    """The oracle's own faithful outputs of ``call`` under the first kernel profile with its
    variant: a conforming implementation of every format."""
    variant = call.config.kernel_variant.name
    profile = next(name for name, p in PROFILES.items() if variant in p.variants)
    return [(r.out, r.expert_token_nums)
            for r in run_placed(call, numerics=profile_numerics(profile)).ranks]


def profile_numerics(profile: str) -> Numerics:
    return with_kernel(resolve_numerics("faithful"), profile)


def reference(call: PlacedCall) -> list[tuple[Any, Any]]:
    """Correct for every format: the faithful model of the call as it was handed over."""
    return _faithful(call)


def sibling_call(call: PlacedCall) -> PlacedCall:
    """``call`` selected as the other row its weight arrays make (what a door that drops the
    call's :class:`spec.fields.Selector` reads): ``act_scheme`` toggled between ``None`` and
    the sibling's, the selecting inputs dropped; ``call`` itself where no other row shares
    its weights (or the sibling needs inputs the call lacks)."""
    cfg = call.config
    sel = cfg.selection
    others = [v for v in VARIANTS if v is not cfg.kernel_variant
              and v.weight_dtype == cfg.kernel_variant.weight_dtype
              and v.scale_dims == cfg.kernel_variant.scale_dims
              and set(v.selector.inputs) <= set(cfg.kernel_variant.selector.inputs)]
    if not others:
        return call
    drop = set(cfg.kernel_variant.selector.inputs) - set(others[0].selector.inputs)
    ranks = [dataclasses.replace(r, **dict.fromkeys(drop)) for r in call.problem.ranks]
    fields, arrays = call.record()
    shared = {k: a for k, a in arrays.items() if k.split(".")[1] not in drop}
    attrs = {**call.attributes, "act_scheme": others[0].selection(sel.x_dtype).act_scheme}
    return PlacedCall.from_record(ranks, fields, shared, **attrs)


def wrong_variant(call: PlacedCall) -> list[tuple[Any, Any]]:
    """Mutant: the faithful outputs of :func:`sibling_call`, the numerics of the row sharing
    the call's weights (MXFP8 activations on an MXFP4 W4A16 call and the reverse; NVFP4 W4A4
    computed as W4A16)."""
    return _faithful(sibling_call(call))
