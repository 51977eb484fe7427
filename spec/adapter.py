"""What the real operator does with a call before and around its kernels: which of the call's
attributes its torch adapter hands to which kernel, and which local experts the SwiGLU epilogue
covers. Models of vllm-ascend's code, read at 182b75ea (``csrc/mc2/dispatch_ffn_combine*``),
for the findings (:mod:`spec.findings`) and the hunt's kernel variants (``oracle.check.hunt``).

>>> dropped_attributes("bf16", ("x_active_mask", "swiglu_limit"))
('x_active_mask', 'swiglu_limit')
>>> swiglu_experts(2, "bf16"), swiglu_experts(1, "bf16")
(range(0, 0), range(0, 1))
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "ADAPTERS",
    "ATTRIBUTES",
    "KERNELS",
    "PR11916_PYTHON_DEFAULT_ALPHA",
    "dropped_attributes",
    "epilogue_granularity",
    "swiglu_experts",
]

#: The kernels the adapter picks by ``weight1[0].dtype``: int8, int32 (packed int4), else BF16
#: (reference notes §2; ``dispatch_ffn_combine_torch_adpt.h``).
KERNELS = ("w8a8", "w4a8", "bf16")
#: The call's optional attributes that change the result.
ATTRIBUTES = ("x_active_mask", "swiglu_limit", "swiglu_alpha")
#: The α the Python binding of open PR #11916 passes when the caller gives none [inferred:
#: variants.md]; the C++ adapter's own default is 0.0 [pr].
PR11916_PYTHON_DEFAULT_ALPHA = 1.0
#: Per adapter version, the attributes each kernel receives; the adapter never rejects one.
ADAPTERS: dict[str, dict[str, frozenset[str]]] = {
    # HEAD: aclnnDispatchFFNCombine and ...W4A8 take the mask and the clamp,
    # aclnnDispatchFFNCombineBF16 neither [code].
    "head": {
        "w8a8": frozenset({"x_active_mask", "swiglu_limit"}),
        "w4a8": frozenset({"x_active_mask", "swiglu_limit"}),
        "bf16": frozenset(),
    },
    # Open PR #11916 adds swiglu_alpha to the int8 call only (its review asks for a
    # TORCH_CHECK on the other two) [pr].
    "pr11916": {
        "w8a8": frozenset({"x_active_mask", "swiglu_limit", "swiglu_alpha"}),
        "w4a8": frozenset({"x_active_mask", "swiglu_limit"}),
        "bf16": frozenset(),
    },
}


def dropped_attributes(kernel: str, passed: Iterable[str], *, adapter: str = "head"
                       ) -> tuple[str, ...]:
    """The attributes of ``passed`` that ``adapter`` silently drops on its way to ``kernel``."""
    received = ADAPTERS[adapter][kernel]
    return tuple(a for a in passed if a not in received)


def epilogue_granularity(experts_per_rank: int, kernel: str) -> int:
    """The uint32 split of a rank's experts into the two SwiGLU batches: ``E − 2`` in the BF16
    kernel (``dispatch_ffn_combine_bf16.h``), ``E − 3`` or, for ``E <= 4``, ``E − 1`` in the
    W8A8 kernel (``dispatch_ffn_combine.h``) [code]; wraps below 0."""
    if kernel == "bf16":
        g = experts_per_rank - 2
    else:
        g = experts_per_rank - 1 if experts_per_rank <= 4 else experts_per_rank - 3
    return g % 2**32


def swiglu_experts(experts_per_rank: int, kernel: str) -> range:
    """The local experts whose rows SwiGLU runs on: the first batch takes experts ``< g``
    (``groupIdx + 1 <= epilogueGranularity``), the second the rest only when ``0 < g < E``
    (``*_kernel.hpp``) [code]. ``g = 0`` runs neither: GMM2 reads a SwiGLU output buffer that
    nothing wrote (variants.md)."""
    g = epilogue_granularity(experts_per_rank, kernel)
    if 0 < g < experts_per_rank:
        return range(experts_per_rank)
    return range(min(g, experts_per_rank))
