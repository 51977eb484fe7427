"""Numerics of the reference model: the choice record (mode, kernel profile, switches), resolved
once at the door and carried by everything below it.

Two modes (``docs/contract/dispatch_ffn_combine.md`` §6):

- ``"faithful"`` emulates the W8A8 kernel step by step, pinned to NumPy float32 operations so
  that independent models agree bit for bit. The hardware's ``exp`` and division are not
  bit-identical to NumPy's; that is a documented choice, not a claim about the hardware.
- ``"ideal"`` is the mathematics the kernel approximates: float64, dequantised weights, no
  activation quantisation.

The uncertain points of §6 are the named switches of :class:`Numerics`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from oracle.model.arithmetic import truncate_scale_bits
from oracle.model.kernels import (
    DEFAULT_KERNEL,
    PROFILES,
    KernelProfile,
    get_kernel,
    profile_from_dict,
)

__all__ = [
    "MODES",
    "ZERO_ROW_POLICIES",
    "Numerics",
    "resolve_numerics",
    "with_kernel",
]

MODES = ("faithful", "ideal")
#: Degenerate rows: an all-zero row (σ = 0) at step 1 or 5, or a row so small at step 5 that
#: ``127/amax2`` overflows float32. ``"zero"``: such a row takes its mathematical value (0 for
#: a zero row; the scale in float64 for a tiny one), which a correct kernel must produce;
#: ``"nan"``: the kernel's literal reading of §6 steps 1 and 5, 0/0 and inf·0 = NaN [inferred].
ZERO_ROW_POLICIES = ("zero", "nan")

Array = np.ndarray[Any, Any]


@dataclass(frozen=True)
class Numerics:
    """How the reference model computes.

    ``mode="faithful"`` runs the pipeline of the kernel profile ``kernel`` (a name in
    :data:`oracle.model.kernels.PROFILES`, or a :class:`oracle.model.kernels.KernelProfile`;
    ``None``, the default: ``"ascend-a3"``); ``"ideal"`` the float64 mathematics, judged assuming
    the given profile's stored dtypes and quantisers, or (``None``) the coarsest legitimate kernel.
    ``truncate_scales`` (an ascend-a3 switch): use the dequant scales truncated to 19 bits
    (``bits & 0xFFFFE000``), as the official CANN weight converter stores them [inferred];
    default off because vLLM passes the raw float32 bits. ``zero_rows``: see
    :data:`ZERO_ROW_POLICIES`.

    >>> Numerics("ideal").mode
    'ideal'
    """

    mode: str = "faithful"
    truncate_scales: bool = False
    zero_rows: str = "zero"
    kernel: str | KernelProfile | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"numerics mode {self.mode!r} is not one of {MODES}")
        self.profile  # noqa: B018 -- an unknown kernel name fails here, with the known ones
        if self.zero_rows not in ZERO_ROW_POLICIES:
            raise ValueError(f"zero_rows {self.zero_rows!r} is not one of {ZERO_ROW_POLICIES}")

    @property
    def profile(self) -> KernelProfile:
        """The kernel profile (the default one when none is given)."""

        return get_kernel(DEFAULT_KERNEL if self.kernel is None else self.kernel)

    def read_scales(self, s1: Array, s2: Array) -> tuple[Array, Array]:
        """The dequant scales as the kernel reads them: truncated to 19 bits with
        ``truncate_scales``, else as given."""
        if self.truncate_scales:
            return truncate_scale_bits(s1), truncate_scale_bits(s2)
        return s1, s2

    def describe(self) -> str:
        extras = []
        if self.truncate_scales:
            extras.append("19-bit scales")
        if self.zero_rows != "zero":
            extras.append(f"zero rows -> {self.zero_rows}")
        if self.mode == "faithful":
            name = f"faithful to {self.profile.name}"
        else:
            name = "ideal" + (f", assuming {self.profile.name}" if self.kernel is not None else "")
        return name + (f" ({', '.join(extras)})" if extras else "")

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable, with the whole profile (a counterexample's manifest)."""
        # Faithful runs a profile even when none was named: record it whole. Ideal without a
        # profile assumes the coarsest kernel, and says so with None.
        unnamed_ideal = self.kernel is None and self.mode == "ideal"
        kernel = None if unnamed_ideal else self.profile.to_dict()
        return {"mode": self.mode, "truncate_scales": self.truncate_scales,
                "zero_rows": self.zero_rows, "kernel": kernel}

    @classmethod
    def from_dict(cls, data: object) -> Numerics:
        """Inverse of :meth:`to_dict`; older files without a kernel get the default.
        ``ValueError``/``TypeError`` on anything malformed."""

        if not isinstance(data, dict):
            raise ValueError("numerics must be a JSON object")
        kernel_data = data.get("kernel")
        if kernel_data is None or isinstance(kernel_data, str):
            kernel: str | KernelProfile | None = kernel_data
        else:
            kernel = profile_from_dict(kernel_data)
            known = PROFILES.get(kernel.name)
            kernel = kernel.name if known == kernel else kernel
        flags = {k: data[k] for k in ("mode", "truncate_scales", "zero_rows") if k in data}
        if not all(isinstance(v, bool if k == "truncate_scales" else str)
                   for k, v in flags.items()):
            raise ValueError(f"numerics: malformed switches {flags}")
        return cls(**flags, kernel=kernel)


def with_kernel(numerics: Numerics, kernel: str | KernelProfile | None) -> Numerics:
    """``numerics`` with its kernel profile replaced (``None``: unchanged)."""
    return numerics if kernel is None else replace(numerics, kernel=kernel)


def resolve_numerics(numerics: str | Numerics) -> Numerics:
    """Accept a mode name (``"faithful"``: the default profile; ``"ideal"``), a kernel profile
    name (``"vllm-triton"``) or a :class:`Numerics`."""
    if isinstance(numerics, Numerics):
        return numerics
    if numerics in MODES:
        return Numerics(numerics)
    return Numerics("faithful", kernel=numerics)
