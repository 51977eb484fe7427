"""The gate's search as the format tests run it: in this process (no child), nothing saved, on
the strategy and Hypothesis budget each call site names. The tests assert on what it found.
Also the implementation a profile describes, the legitimate kernel those searches must pass."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st

from oracle import Numerics
from oracle.check.harness import ConformanceError, check_implementation
from oracle.check.hunt import outputs_of
from oracle.model.kernels import KernelProfile
from spec import Problem

Array = np.ndarray[Any, Any]


def model_impl(profile: KernelProfile) -> Callable[[Problem], list[tuple[Array, Array]]]:
    """The implementation ``profile`` describes: its model's outputs and counts, per rank."""
    return outputs_of(Numerics(kernel=profile))


def failure(impl: Any, kernel: KernelProfile, drawn: st.SearchStrategy[Problem] | None,
            budget: settings, numerics: str | Numerics = "faithful") -> ConformanceError | None:
    """The search's failure (its shrunk problem and report), or None where ``impl`` passed.
    ``drawn`` None: the kernel's own domain (the gate's default strategy)."""
    try:
        check_implementation(impl, kernel=kernel, numerics=numerics, problems=drawn,
                             settings=budget, save_dir=None, isolate=False)
    except ConformanceError as exc:
        return exc
    return None


def shrunk(impl: Any, kernel: KernelProfile, drawn: st.SearchStrategy[Problem] | None,
           budget: settings, numerics: str | Numerics = "faithful") -> Problem | None:
    """The shrunk counterexample of :func:`failure`, or None where ``impl`` passed."""
    found = failure(impl, kernel, drawn, budget, numerics)
    return None if found is None else found.problem
