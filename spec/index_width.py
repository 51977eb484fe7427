"""Index width and code-path thresholds at real sizes, checked analytically over a declared
shape domain, without running a kernel (``docs/contract/placement.md``, "Index width and code
paths at real sizes").

An int32 kernel computes element offsets such as ``permuted_idx · hidden`` and
``expert · stride_w``; the largest offset a shape needs is a closed formula, so the smallest
shape that overflows is found by a shrinking search over the domain. A kernel also switches
code paths at thresholds (the Ascend W8A8 kernel's ``CombineV1`` at ``M·topK > 4096``); the
report says which thresholds the default generators never cross, and :func:`crossing_configs`
gives a family that crosses each one at an affordable size.

    python -m spec.index_width      # the coverage report, one block per domain
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

from spec.config import MAX_EP_SIZE, OpConfig
from spec.limits import MAX_HIDDEN_A3, ShapeDomain
from spec.search import MAX_EXPERTS_PER_RANK, MAX_TOKENS_PER_RANK, MAX_TOP_K, search
from spec.strategies import configs

__all__ = ["INT32_OFFSETS", "THRESHOLDS", "Offset", "Threshold", "coverage_report",
           "crossing_configs", "crossing_fields", "domain_coverage", "first_overflow", "shapes"]

#: The first offset an int32 index cannot hold.
INT32_LIMIT = 2**31


@dataclass(frozen=True)
class Offset:
    """One element offset a kernel computes: ``largest(config)`` is its largest value."""

    name: str
    largest: Callable[[OpConfig], int]
    source: str


#: Offsets of the dispatched-row and stacked-weight buffers. Rows: every token of every rank
#: may reach one rank (attention-DP all-gather, TensorRT-LLM PR #15887), ``EP·M·topK`` rows of
#: ``K``. Weights: one stacked tensor over the call's ``EP·E`` experts.
INT32_OFFSETS = (
    Offset("permuted_idx·hidden", lambda c: c.ep_size * c.max_tokens * c.top_k * c.hidden - 1,
           "flashinfer PR #2642 (256 experts, top-8, 65 536 tokens); TensorRT-LLM PR #15887"),
    Offset("expert·stride_w1", lambda c: c.num_experts * c.hidden * c.n - 1,
           "Liger-Kernel #1296 (512 experts × 4096 × 1024); vllm PR #53907"),
    Offset("expert·stride_w2", lambda c: c.num_experts * c.intermediate * c.hidden - 1,
           "Liger-Kernel #1296; vllm PR #53907"),
)


@dataclass(frozen=True)
class Threshold:
    """A code-path switch: ``crosses(config)`` is True on the other path; ``domains``: the
    names of the shape domains whose kernel has it (:class:`spec.limits.ShapeDomain`)."""

    name: str
    crosses: Callable[[OpConfig], bool]
    source: str
    crossing: OpConfig
    domains: tuple[str, ...] = ()


THRESHOLDS = (
    Threshold("CombineV1 (M·topK > 4096)", lambda c: c.max_tokens * c.top_k > 4096,
              "dispatch_ffn_combine_kernel.hpp near line 254 @182b75ea [code]",
              OpConfig(ep_size=1, experts_per_rank=2, top_k=1, hidden=32, intermediate=16,
                       tokens_per_rank=(4097,)), domains=("a3",)),
)


@st.composite
def shapes(draw: st.DrawFn, *, max_hidden: int = MAX_HIDDEN_A3) -> OpConfig:
    """Every shape of a declared domain: EP 1–32, E 1–512, top-k 1–16, K a multiple of 32 up
    to ``max_hidden``, N <= K, M up to 131 072 (spec.findings' search domain)."""
    k = 32 * draw(st.integers(1, max_hidden // 32))
    ep = draw(st.integers(1, MAX_EP_SIZE))
    return OpConfig(ep_size=ep,
                    experts_per_rank=draw(st.integers(1, MAX_EXPERTS_PER_RANK)),
                    top_k=draw(st.integers(1, MAX_TOP_K)), hidden=k,
                    intermediate=draw(st.integers(1, k // 2)),
                    tokens_per_rank=(draw(st.integers(0, MAX_TOKENS_PER_RANK)),) + (0,) * (ep - 1))


def first_overflow(offset: Offset, *, max_hidden: int = MAX_HIDDEN_A3, limit: int = INT32_LIMIT,
                   max_examples: int = 500) -> OpConfig | None:
    """The smallest shape of the domain whose ``offset`` reaches ``limit`` (int32's by
    default; ``2**63`` for an int64 kernel), or None."""
    return search(shapes(max_hidden=max_hidden),
                  lambda c: offset.largest(c) >= limit, max_examples=max_examples)


def crossing_fields(threshold: Threshold) -> dict[str, Any]:
    """The :func:`spec.strategies.configs` keywords of :func:`crossing_configs`."""
    c = threshold.crossing
    return {"ep_sizes": st.just(c.ep_size), "experts_per_rank": st.just(c.experts_per_rank),
            "top_k": st.just(c.top_k), "hidden": st.just(c.hidden),
            "intermediate": st.just(c.intermediate), "tokens_per_rank": st.just(c.max_tokens),
            "truncation": st.just(False)}


def crossing_configs(threshold: Threshold) -> st.SearchStrategy[OpConfig]:
    """A family that crosses ``threshold`` on every draw, at an affordable size."""
    return configs(**crossing_fields(threshold))


def coverage_report(*, max_examples: int = 300) -> list[str]:
    """One line per offset (does int32 hold it over the domain; the smallest shape that
    overflows) and per threshold (do the default generators cross it)."""
    lines = []
    for label, hidden in (("a3 (K <= 9000)", MAX_HIDDEN_A3), ("vllm (K <= 16384)", 16384)):
        for off in INT32_OFFSETS:
            c = first_overflow(off, max_hidden=hidden, max_examples=max_examples)
            lines.append(f"{label}: {off.name}: " + (
                "fits int32 everywhere" if c is None else
                f"int32 overflows from EP={c.ep_size}, E={c.experts_per_rank}, "
                f"top_k={c.top_k}, K={c.hidden}, I={c.intermediate}, M={c.max_tokens} "
                f"(largest offset {off.largest(c)}); {off.source}"))
    for t in THRESHOLDS:
        crossed = search(configs(), t.crosses, max_examples=max_examples)
        lines.append(f"default generators: {t.name}: " + (
            f"never crossed in {max_examples} draws; crossing_configs() crosses it at "
            f"M={t.crossing.max_tokens}, top_k={t.crossing.top_k}" if crossed is None
            else f"crossed at {crossed.summary()}") + f"; {t.source}")
    return lines


def _overflows(offset: Offset) -> Callable[[OpConfig], bool]:
    return lambda c: offset.largest(c) >= INT32_LIMIT


def domain_coverage(domain: ShapeDomain, *, max_examples: int = 200) -> list[str]:
    """What the generators of one kernel's ``domain`` reach: per threshold of its kernel,
    crossed or "not crossed" in ``max_examples`` draws of :func:`spec.strategies.configs`
    (and the family that crosses it); per int32 offset, the smallest shape of the domain's K
    range that overflows (:func:`first_overflow`), a line each."""
    lines = []
    for t in THRESHOLDS:
        if domain.name not in t.domains:
            continue
        crossed = search(configs(domain=domain), t.crosses, max_examples=max_examples)
        lines.append(f"{t.name}: " + (
            f"not crossed by the generators in {max_examples} draws; the gate's family "
            f"crosses it at M={t.crossing.max_tokens}, top_k={t.crossing.top_k}"
            if crossed is None else f"crossed at {crossed.summary()}") + f" ({t.source})")
    hidden = domain.max_hidden or 16384
    for off in INT32_OFFSETS:
        generated = search(configs(domain=domain), _overflows(off), max_examples=max_examples)
        c = first_overflow(off, max_hidden=hidden, max_examples=max_examples)
        lines.append(f"int32 {off.name} (K <= {hidden}): " + (
            "not crossed by the generators" if generated is None
            else f"crossed at {generated.summary()}") + "; " + (
            "fits everywhere" if c is None else
            f"overflows from EP={c.ep_size}, E={c.experts_per_rank}, top_k={c.top_k}, "
            f"K={c.hidden}, I={c.intermediate}, M={c.max_tokens} (checked analytically: too "
            "large to run)"))
    return lines


if __name__ == "__main__":
    print("\n".join(coverage_report()))
