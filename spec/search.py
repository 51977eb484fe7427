"""The deterministic shrinking search every finding runs, and the shape domain it searches
(re-exported by :mod:`spec.findings`; :mod:`spec.index_width` reads them without the table)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from hypothesis import HealthCheck, Phase, Verbosity, find, settings
from hypothesis import strategies as st
from hypothesis.errors import NoSuchExample

__all__ = ["MAX_EXPERTS_PER_RANK", "MAX_TOKENS_PER_RANK", "MAX_TOP_K", "search"]

#: Search domain. E up to 512 (CANN's MC2 documents allow 512 experts, §9); top-k up to 16 (the
#: largest documented MC2 limit, the A3 kernel has none); M up to 131072, the current default
#: ``max_output_size`` (§5) [inferred: the operator checks no M].
MAX_EXPERTS_PER_RANK = 512
MAX_TOP_K = 16
MAX_TOKENS_PER_RANK = 131072

T = TypeVar("T")


def search(strategy: st.SearchStrategy[T], fails: Callable[[T], bool], *,
           max_examples: int) -> T | None:
    """The minimal value of ``strategy`` for which ``fails`` holds, or None; deterministic."""
    try:
        return find(strategy, fails, settings=settings(  # the same under any loaded profile
            parent=settings.get_profile("default"), derandomize=True, database=None,
            deadline=None, max_examples=max_examples,
            phases=(Phase.generate, Phase.shrink), verbosity=Verbosity.quiet,
            suppress_health_check=list(HealthCheck),
        ))
    except NoSuchExample:
        return None
