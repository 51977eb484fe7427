"""The findings table: every flaw the properties find in the operator's historical and current
rules, produced by running the searches (deterministic: derandomised, no database).

Each rule of reference notes §7–§9 is stated as a property over all valid configurations
(EP 1–32, E 1–512, top-k 1–16, K a multiple of 32 up to 9000, M up to 131072); Hypothesis finds a
counterexample and shrinks it, or the protocol model (:mod:`spec.protocol`) finds an
interleaving. ``docs/findings.md`` is :func:`render_findings_markdown`'s output; a test keeps
them equal. Regenerate with ``python -m spec.findings > docs/findings.md``; reproduce one row
with ``python -m spec.findings --rule KEY``.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from hypothesis import HealthCheck, Phase, Verbosity, find, settings
from hypothesis import strategies as st
from hypothesis.errors import NoSuchExample

from spec.buffers import (
    MIB,
    hccl_required_bytes,
    hccl_required_mb,
    layout_fits,
    operator_message_formula_mb,
)
from spec.config import MAX_EP_SIZE, OpConfig
from spec.layout import (
    COUNT_REGION_BYTES,
    count_row_stride,
    matrix_overflow,
    misaligned_rows,
    sentinel_outside_row,
)
from spec.limits import MAX_HIDDEN_A3
from spec.protocol import ProtocolViolation, first_failing_config

__all__ = [
    "DATA_REGIONS",
    "MAX_EXPERTS_PER_RANK",
    "MAX_TOKENS_PER_RANK",
    "MAX_TOP_K",
    "Finding",
    "configs",
    "hunt_rules",
    "layout_params",
    "render_findings_markdown",
    "search",
    "whole_mb_boundary",
]

#: Search domain. E up to 512 (CANN's MC2 documents allow 512 experts, §9); top-k up to 16 (the
#: largest documented MC2 limit, the A3 kernel has none); M up to 131072, the current default
#: ``max_output_size`` (§5) [inferred: the operator checks no M].
MAX_EXPERTS_PER_RANK = 512
MAX_TOP_K = 16
MAX_TOKENS_PER_RANK = 131072
#: The regions whose need grows with ``M·topK·K``, the terms of the buffer check (§7); the
#: fixed 1 MiB regions have their own rule (count matrix, sync flags).
DATA_REGIONS = ("A ", "scale", "D ")

T = TypeVar("T")


def search(strategy: st.SearchStrategy[T], fails: Callable[[T], bool], *,
           max_examples: int) -> T | None:
    """The minimal value of ``strategy`` for which ``fails`` holds, or None; deterministic."""
    try:
        return find(strategy, fails, settings=settings(
            derandomize=True, database=None, deadline=None, max_examples=max_examples,
            phases=(Phase.generate, Phase.shrink), verbosity=Verbosity.quiet,
            suppress_health_check=list(HealthCheck),
        ))
    except NoSuchExample:
        return None


def layout_params(*, max_ep: int = MAX_EP_SIZE, ep_size: int | None = None
                  ) -> st.SearchStrategy[tuple[int, int]]:
    """``(EP, E)`` pairs: EP in 1..max_ep (or fixed), E in 1..512; shrinks towards (1, 1)."""
    eps = st.just(ep_size) if ep_size is not None else st.integers(1, max_ep)
    return st.tuples(eps, st.integers(1, MAX_EXPERTS_PER_RANK))


def _config(ep_size: int, experts_per_rank: int, top_k: int, k_units: int,
            tokens: int) -> OpConfig:
    hidden = 32 * k_units
    return OpConfig(ep_size=ep_size, experts_per_rank=experts_per_rank, top_k=top_k,
                    hidden=hidden, intermediate=hidden // 2, tokens_per_rank=(tokens,) * ep_size)


def configs() -> st.SearchStrategy[OpConfig]:
    """Configurations over the whole search domain, built directly (no arrays).

    Every draw has K a multiple of 32 and at most 9000, N = K, and every rank holding M tokens.
    """
    return st.builds(
        _config, st.integers(1, MAX_EP_SIZE), st.integers(1, MAX_EXPERTS_PER_RANK),
        st.integers(1, MAX_TOP_K), st.integers(1, MAX_HIDDEN_A3 // 32),
        st.integers(0, MAX_TOKENS_PER_RANK),
    )


def whole_mb_boundary(*, max_hidden: int = MAX_HIDDEN_A3) -> tuple[int, int]:
    """The smallest ``M·topK`` (and its K) for which the smallest whole-MB ``HCCL_BUFFSIZE``
    that passes the check still overflows region A, over K multiples of 32 up to ``max_hidden``.

    With ``P = M·topK`` and slack ``s = B·MiB − 3PK − 10 MiB`` (``0 <= s < MiB``), region A
    (``P·(K+32)`` bytes in ``floor(B·MiB / 3)``) overflows iff ``96·P > 10 MiB + s``: at
    ``s = 0`` that is ``P >= 109227``; a whole-MB window adds slack unless ``3PK`` is a multiple
    of 1 MiB, so the boundary moves up. Exhaustive over P from 109227 and every K.
    """
    k = 32 * np.arange(1, max_hidden // 32 + 1, dtype=np.int64)
    p = 109227
    while True:
        window = -(-(3 * p * k + 10 * MIB) // MIB) * MIB
        over = p * (k + 32) > window // 3
        if over.any():
            return p, int(k[np.argmax(over)])
        p += 1


@dataclass(frozen=True)
class Finding:
    """One row of the findings table."""

    key: str
    rule: str
    prop: str
    counterexample: str
    source: str
    story: tuple[str, ...] = ()

    @property
    def command(self) -> str:
        """The shell command that reruns the search behind this row."""
        return f"python -m spec.findings --rule {self.key}"

    def __str__(self) -> str:
        return f"{self.key}: {self.rule} -- {self.prop} -- fails at {self.counterexample}"


def _layout_rows(n: int) -> list[Finding]:
    rows = []
    ep, e = _must(search(layout_params(), lambda c: bool(misaligned_rows(*c, version="pr5665")),
                         max_examples=n))
    rows.append(Finding(
        "pr5665-row-alignment", "count row stride S = EP·E (PR #5665)",
        "every count row starts on a 512-byte boundary",
        f"EP={ep}, E={e}: {misaligned_rows(ep, e, version='pr5665')[0].message.split(';')[0]}",
        "§8; fixed by PR #6156"))
    ep, e = _must(search(layout_params(),
                         lambda c: bool(sentinel_outside_row(*c, version="pr6156")),
                         max_examples=n))
    rows.append(Finding(
        "pr6156-sentinel-slot", "count row stride S = AlignUp(EP·E, 128) (PR #6156)",
        "the masked-slot sentinel EP·E has a slot inside its row",
        f"EP={ep}, E={e} (EP·E = {ep * e}): S = {count_row_stride(ep, e, version='pr6156')} "
        "words, the sentinel lands on the next row's first word",
        "§8; fixed by PR #8560"))
    _, e = _must(search(layout_params(ep_size=32), lambda c: bool(matrix_overflow(*c)),
                        max_examples=n))
    used = 4 * 32 * count_row_stride(32, e)
    rows.append(Finding(
        "count-region-ep32", "count matrix in a 1 MiB region (current layout, PR #8560)",
        "EP·S·4 <= 1 MiB for every supported EP and E",
        f"EP=32, E={e}: {used} bytes > {COUNT_REGION_BYTES} (largest fitting E at EP=32 is "
        f"{e - 1}; nothing checks it)", "§8 [inferred]; no check in the operator"))
    return rows


def _buffer_rows(n: int) -> list[Finding]:
    def overflows(c: OpConfig) -> bool:
        return not layout_fits(c, hccl_required_bytes(c), regions=DATA_REGIONS)

    c = _must(search(configs(), overflows, max_examples=n))
    over = layout_fits(c, hccl_required_bytes(c), regions=DATA_REGIONS).overflows[0]
    p, k = whole_mb_boundary()
    msg = _must(search(configs(), lambda c: operator_message_formula_mb(c) < hccl_required_mb(c),
                       max_examples=n))
    return [
        Finding(
            "buffer-check-vs-layout", "HCCL check M·topK·K·3 + 10 MiB (PR #6130)",
            "a window the check accepts (exactly the required bytes) holds regions A, scale, D",
            f"{_short(c)}: M·topK = {c.max_tokens * c.top_k}; {over.name} over by {over.over} "
            "bytes (region A rows are K + 32 bytes, the check counts K)", "§7 [inferred]"),
        Finding(
            "buffer-check-whole-mb", "HCCL check with whole-MB HCCL_BUFFSIZE (PR #6130)",
            "the smallest whole-MB HCCL_BUFFSIZE the check accepts holds region A",
            f"M·topK = {p}, K = {k} (smallest over K <= {MAX_HIDDEN_A3}, exhaustive; "
            f"109227 when 3·M·topK·K is a multiple of 1 MiB)", "§7 [inferred]"),
        Finding(
            "buffer-message-3mb", "HCCL check error text '(m·k·topK·1)·3 + 3MB' (PR #6130)",
            "the formula in the error text gives the size the check requires",
            f"{_short(msg)}: the text's formula gives {operator_message_formula_mb(msg)} MB, "
            f"the check needs {hccl_required_mb(msg)} MB (always 7 MB short)",
            "§7 [code]: the constant became 10 MiB, the text kept 3MB"),
    ]


def _protocol_row(key: str, rule: str, violation: ProtocolViolation | None,
                  source: str) -> Finding:
    v = _must(violation)
    ep, e = v.config
    return Finding(key, rule, "a row declared complete holds only this call's counts of its "
                   "sender; no write lands outside its row",
                   f"EP={ep}, E={e}: {str(v).split(': ', 1)[1]}", source, tuple(v.story))


def _protocol_rows() -> list[Finding]:
    return [
        _protocol_row("protocol-pr5665-race", "block-head polling on S = EP·E (PR #5665)",
                      first_failing_config(version="pr5665"), "§8; fixed by PR #6156"),
        _protocol_row("protocol-pr6156-sentinel", "S = AlignUp(EP·E, 128) (PR #6156)",
                      first_failing_config(version="pr6156"), "§8; fixed by PR #8560"),
        _protocol_row("protocol-short-reset", "end-of-call reset of EP·EP·E words (mutant of "
                      "the EP·S reset, PR #8560)",
                      first_failing_config(version="pr8560", reset="unpadded"),
                      "§8: the reset must cover every written word"),
        _protocol_row("protocol-tag-byte-pr5665", "per-call tag byte (unmerged proposal) on "
                      "S = EP·E", first_failing_config(version="pr5665", tagging="generation"),
                      "§8; the tag replaces the reset, not the alignment"),
    ]


def _must(value: T | None) -> T:
    if value is None:
        raise AssertionError("a search that must find a counterexample found none")
    return value


def _short(c: OpConfig) -> str:
    return (f"EP={c.ep_size}, E={c.experts_per_rank}, top_k={c.top_k}, K={c.hidden}, "
            f"M={c.max_tokens}")


@functools.lru_cache(maxsize=4)
def _hunt(max_examples: int) -> tuple[Finding, ...]:
    return (*_layout_rows(max_examples), *_buffer_rows(max_examples), *_protocol_rows())


def hunt_rules(*, max_examples: int | None = None) -> list[Finding]:
    """Run every search; the findings in table order (cached per ``max_examples``).

    ``max_examples`` bounds each Hypothesis search (default 500); the protocol findings come
    from the explicit minimal search of :func:`spec.protocol.first_failing_config`.
    """
    return list(_hunt(500 if max_examples is None else max_examples))


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_findings_markdown(findings: list[Finding] | None = None) -> str:
    """``docs/findings.md``: the table, then the protocol stories."""
    rows = hunt_rules() if findings is None else findings
    lines = [
        "<!-- Generated by `python -m spec.findings > docs/findings.md`; "
        "tests/test_findings.py fails when this file is stale. -->",
        "# Findings",
        "",
        "Flaws the properties of `spec.layout`, `spec.buffers` and `spec.protocol` find by "
        "themselves in the operator's historical and current rules (reference notes §7–§9). "
        "Each counterexample is the minimal one the search returns.",
        "",
        "| rule | property | minimal counterexample | reproduce | source |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {_cell(f.rule)} | {_cell(f.prop)} | {_cell(f.counterexample)} | `{f.command}` "
        f"| {_cell(f.source)} |"
        for f in rows
    ]
    lines += ["", "## Interleavings", ""]
    for f in rows:
        if f.story:
            lines += [f"### {f.key}", "", "```", *f.story, "```", ""]
    lines += [
        "The per-call tag byte passes the short-reset mutant (a stale word carries the previous "
        "call's tag) but races on the PR #5665 layout exactly as the non-zero tag does: it "
        "replaces the reset, not the 512-byte alignment.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m spec.findings [--rule KEY]``: print the table, or one row and its story."""
    parser = argparse.ArgumentParser(prog="python -m spec.findings", description=__doc__)
    parser.add_argument("--rule", help="print one finding (by key) and its story")
    args = parser.parse_args(argv)
    if args.rule is None:
        print(render_findings_markdown(), end="")
        return 0
    chosen = [f for f in hunt_rules() if f.key == args.rule]
    if not chosen:
        parser.error(f"no finding {args.rule!r}; keys: {[f.key for f in hunt_rules()]}")
    print(chosen[0])
    print("\n".join(chosen[0].story))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
