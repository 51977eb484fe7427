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
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from hypothesis import strategies as st

from spec.adapter import (
    KERNELS,
    PR11916_PYTHON_DEFAULT_ALPHA,
    dropped_attributes,
    swiglu_experts,
)
from spec.buffers import (
    MIB,
    hccl_required_bytes,
    hccl_required_mb,
    layout_fits,
    operator_message_formula_mb,
)
from spec.config import MAX_EP_SIZE, OpConfig, oai_alpha
from spec.index_width import INT32_OFFSETS, first_overflow
from spec.layout import (
    COUNT_REGION_BYTES,
    count_row_stride,
    matrix_overflow,
    misaligned_rows,
    sentinel_outside_row,
)
from spec.limits import (
    A2_W8A8,
    A3_W8A8,
    MAX_HIDDEN_A3,
    VECTOR_CORES,
    Profile,
    Shape,
    check_supported,
)
from spec.placed_strategies import placed_calls
from spec.placement import NO_EXPERT, PlacedCall
from spec.protocol import PeerSchedule, ProtocolViolation, first_failing_config
from spec.search import MAX_EXPERTS_PER_RANK, MAX_TOKENS_PER_RANK, MAX_TOP_K, search

__all__ = [
    "DATA_REGIONS",
    "MAX_EXPERTS_PER_RANK",
    "MAX_PEER_EP",
    "MAX_PEER_EXPERTS",
    "MAX_TOKENS_PER_RANK",
    "MAX_TOP_K",
    "Finding",
    "PeerCall",
    "combine_calls",
    "combined_rows",
    "configs",
    "hunt_rules",
    "layout_params",
    "misrouted_tokens",
    "peer_calls",
    "rank_choice_contributions",
    "render_findings_markdown",
    "search",
    "whole_mb_boundary",
]

#: The regions whose need grows with ``M·topK·K``, the terms of the buffer check (§7); the
#: fixed 1 MiB regions have their own rule (count matrix, sync flags).
DATA_REGIONS = ("A ", "scale", "D ")
#: EP for the per-core peer searches: up to 64, MegaMoe's limit and the largest of the operator
#: family (variants.md); the A3 kernel's own guard is 32 (PR #5787).
MAX_PEER_EP = 64
#: E for the peer searches: E does not enter whether a core serves two peers (variants.md);
#: 1..16 keeps the count matrix (EP × EP·E) small.
MAX_PEER_EXPERTS = 16

T = TypeVar("T")


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


@dataclass(frozen=True)
class PeerCall:
    """A call's routing for the per-core peer model: ``routing[r][t]`` is token ``t``'s
    ``top_k`` global expert ids on rank ``r`` (every token active; duplicates allowed, §4)."""

    n_aiv: int
    ep_size: int
    experts_per_rank: int
    top_k: int
    routing: tuple[tuple[tuple[int, ...], ...], ...]

    def counts(self) -> np.ndarray:
        """``cnt[source][global expert]``."""
        experts = self.ep_size * self.experts_per_rank
        return np.array([np.bincount([g for token in rank for g in token], minlength=experts)
                         for rank in self.routing], dtype=np.int64).reshape(self.ep_size, experts)

    def schedule(self, *, push: str, offset: str) -> PeerSchedule:
        """The model of this call's vector cores."""
        return PeerSchedule(self.ep_size, self.experts_per_rank, self.n_aiv, push=push,
                            offset=offset)

    def slot_tokens(self, rank: int) -> list[int]:
        """The token of each of ``rank``'s send slots, sorted by expert then flat index (§5)."""
        slots = sorted((g, t * self.top_k + k) for t, token in enumerate(self.routing[rank])
                       for k, g in enumerate(token))
        return [i // self.top_k for _, i in slots]

    def __str__(self) -> str:
        ranks = "; ".join(
            f"rank {r}: " + (", ".join(f"t{t} -> {'/'.join(map(str, token))}"
                                       for t, token in enumerate(rank)) or "no tokens")
            for r, rank in enumerate(self.routing))
        return (f"n_aiv={self.n_aiv}, EP={self.ep_size}, E={self.experts_per_rank}, "
                f"top_k={self.top_k} ({ranks})")


@st.composite
def _peer_call(draw: st.DrawFn, n_aiv: st.SearchStrategy[int], max_ep: int) -> PeerCall:
    n, ep = draw(n_aiv), draw(st.integers(1, max_ep))
    e, top_k = draw(st.integers(1, MAX_PEER_EXPERTS)), draw(st.integers(1, MAX_TOP_K))
    # Tokens as (source, expert ids) taken modulo EP and EP·E: a smaller EP or E keeps every
    # token, so the shrinker can lower them without first moving the tokens that fail.
    ids = st.integers(0, max_ep * MAX_PEER_EXPERTS - 1)
    tokens = draw(st.lists(st.tuples(st.integers(0, max_ep - 1), st.tuples(*[ids] * top_k)),
                           max_size=16))
    routing = tuple(tuple(tuple(g % (ep * e) for g in token) for s, token in tokens
                          if s % ep == r) for r in range(ep))
    return PeerCall(n, ep, e, top_k, routing)


def peer_calls(*, n_aiv: st.SearchStrategy[int], max_ep: int = MAX_PEER_EP
               ) -> st.SearchStrategy[PeerCall]:
    """Calls for the per-core peer model: the core count from ``n_aiv``, EP in 1..max_ep, E in
    1..16, top-k in 1..16, then up to 16 tokens on any ranks; shrinks towards one core, one
    rank, no tokens."""
    return _peer_call(n_aiv, max_ep)


def misrouted_tokens(call: PeerCall, *, offset: str) -> list[str]:
    """Every token slot that receives the FFN of another row, one phrase each (empty: none).

    A block read at the wrong offset returns expert ``d·E+g``'s FFN of the row at the slot it
    read (another token, or a stale row past the peer's slots) to the block's own slot; reading
    another slot of the same token is harmless (its row is the same).
    """
    sched, counts = call.schedule(push="peer", offset=offset), call.counts()
    e = call.experts_per_rank
    found = []
    for dest in range(call.ep_size):
        right, read = sched.peer_offsets(counts, dest), sched.read_offsets(counts, dest)
        rows = counts[:, dest * e: (dest + 1) * e]
        for p, g in np.argwhere((rows > 0) & (read != right)):
            tokens = call.slot_tokens(p)
            for j in range(rows[p, g]):
                own, got = tokens[right[p, g] + j], int(read[p, g] + j)
                if got >= len(tokens) or tokens[got] != own:
                    row = f"token {tokens[got]}" if got < len(tokens) else f"stale slot {got}"
                    found.append(f"rank {p} token {own} gets expert {dest * e + g}'s FFN of "
                                 f"{row} (destination rank {dest} reads slot {got}, not "
                                 f"{right[p, g] + j})")
    return found


def _hangs(call: PeerCall, push: str) -> bool:
    receivers = call.schedule(push=push, offset="per-peer").count_receivers()
    return len(receivers) < call.ep_size


#: The dies of variants.md and the kernel profile whose guards apply there.
_PLATFORMS: tuple[tuple[str, Profile], ...] = (("Atlas A3 die", A3_W8A8),
                                               ("Ascend 910B3", A2_W8A8))


def _smaller_calls(c: PeerCall, core_step: int) -> Iterator[PeerCall]:
    """One-step simplifications of ``c``: fewer cores, ranks, experts, ids per token or tokens,
    and ids lowered to 0 (ids taken modulo the new EP·E, as :func:`peer_calls` draws them)."""
    def with_(ep: int, e: int, top_k: int, routing: Any, n_aiv: int = c.n_aiv) -> PeerCall:
        return PeerCall(n_aiv, ep, e, top_k, tuple(
            tuple(tuple(g % (ep * e) for g in token[:top_k]) for token in rank)
            for rank in routing[:ep]))

    if c.n_aiv > core_step:
        yield with_(c.ep_size, c.experts_per_rank, c.top_k, c.routing, c.n_aiv - core_step)
    for ep, e, top_k in ((c.ep_size - 1, c.experts_per_rank, c.top_k),
                         (c.ep_size, c.experts_per_rank - 1, c.top_k),
                         (c.ep_size, c.experts_per_rank, c.top_k - 1)):
        if min(ep, e, top_k) >= 1:
            yield with_(ep, e, top_k, c.routing)
    for r, rank in enumerate(c.routing):
        for t, token in enumerate(rank):
            fewer = (*c.routing[:r], (*rank[:t], *rank[t + 1:]), *c.routing[r + 1:])
            yield with_(c.ep_size, c.experts_per_rank, c.top_k, fewer)
            for k, g in enumerate(token):
                if g:
                    lower = (*token[:k], 0, *token[k + 1:])
                    yield with_(c.ep_size, c.experts_per_rank, c.top_k,
                                (*c.routing[:r], (*rank[:t], lower, *rank[t + 1:]),
                                 *c.routing[r + 1:]))


def _descend(call: PeerCall, fails: Callable[[PeerCall], bool], *, core_step: int) -> PeerCall:
    """The search's minimum, simplified greedily while it still fails: the reported call then
    does not depend on where Hypothesis' shrinker stopped (once, in a full CI run, it stopped
    at top_k = 5 with every id 0, where one id and one token per rank still fail)."""
    while (smaller := next((s for s in _smaller_calls(call, core_step) if fails(s)), None)):
        call = smaller
    return call


def _peer_minima(fails: Callable[[PeerCall], bool], n: int) -> tuple[PeerCall, PeerCall, str]:
    """The minimal failing call with ``n_aiv`` free and with ``n_aiv = 2·blockDim``, and a
    sentence on the real dies: the first EP at which a core serves two peers (computed, not
    searched: the shrinker stalls above it), against the guards of their profiles."""
    free = _descend(_must(search(peer_calls(n_aiv=st.integers(1, max(VECTOR_CORES.values()))),
                                 fails, max_examples=n)), fails, core_step=1)
    even = _descend(_must(search(peer_calls(n_aiv=st.integers(1, max(VECTOR_CORES.values()) // 2)
                                            .map(lambda b: 2 * b)), fails, max_examples=n)),
                    fails, core_step=2)
    real = []
    for name, profile in _PLATFORMS:  # the first EP at which a core serves two peers
        cores = VECTOR_CORES[name]
        ep = next(ep for ep in itertools.count(1)
                  if len(PeerSchedule(ep, 1, n_aiv=cores).peers(0)) > 1)
        guard = [v.limit for v in check_supported(Shape(ep_size=ep, experts_per_rank=1, top_k=1,
                                                        hidden=32), profile)
                 if v.limit.field == "ep_size"]
        real.append(f"{name} ({cores} cores): from EP={ep}"
                    + (f", outside {profile.name}'s guard '{guard[0].name}' ({guard[0].source})"
                       if guard else f", inside {profile.name}'s guards"))
    return free, even, "; ".join(real)


def _peer_rows(n: int) -> list[Finding]:
    push_free, push_even, push_real = _peer_minima(lambda c: _hangs(c, "core"), n)
    hang = _must(push_free.schedule(push="core", offset="per-peer").violation(push_free.counts()))
    off_free, off_even, off_real = _peer_minima(
        lambda c: bool(misrouted_tokens(c, offset="shared")), n)
    shown = _must(off_free.schedule(push="peer", offset="shared").violation(off_free.counts()))
    return [
        Finding(
            "peer-count-push", "count row pushed to rank coreIdx, not the peer (all three "
            "kernels at HEAD)", "every rank receives every sender's count row",
            f"n_aiv={push_free.n_aiv}, EP={push_free.ep_size}, E={push_free.experts_per_rank}: "
            f"{str(hang).split(': ', 1)[1]}; with n_aiv = 2·blockDim: n_aiv={push_even.n_aiv}, "
            f"EP={push_even.ep_size}; {push_real}",
            "variants.md [inferred from code]; PR #13426 (open) pushes to the peer (W8A8)",
            tuple(hang.story)),
        Finding(
            "peer-row-offset", "rowSrc = prevSum; prevSum += rows, one running sum per vector "
            "core (count push fixed as in PR #13426)",
            "every token receives the FFN of its own row",
            f"{off_free}: {misrouted_tokens(off_free, offset='shared')[0]}; with n_aiv = "
            f"2·blockDim: n_aiv={off_even.n_aiv}, EP={off_even.ep_size}; {off_real}",
            "variants.md [inferred]; issue #10335, PR #10340 (open) fixes W4A8 only; the W8A8 "
            "and BF16 kernels at HEAD have the same two lines", tuple(shown.story)),
    ]


def combined_rows(received: list[int], capacity: int, *, rows_per_token: int = 1) -> list[int]:
    """The rows the combine's GEMM2 takes per local expert, as the kernel's combine loop walks
    them: each expert's ``received`` rows capped by what is left of ``capacity``, the running
    sum advanced by ``rows_per_token`` per row taken. One row per token is §5's truncation (the
    receive buffer keeps the first ``capacity`` rows); W4A8 at HEAD packs each token as two
    int4 rows and advances the sum by both (``CombineV2`` in
    ``dispatch_ffn_combine_w4_a8_kernel.hpp`` at 182b75ea; open PR #14869).

    >>> combined_rows([1, 1], 2), combined_rows([1, 1], 2, rows_per_token=2)
    ([1, 1], [1, 0])
    """
    taken, used = [], 0
    for rows in received:
        m = 0 if used >= capacity else min(rows, capacity - used)
        taken.append(m)
        used += rows_per_token * m
    return taken


def combine_calls() -> st.SearchStrategy[tuple[list[int], int]]:
    """``(rows received per local expert, max_output_size)``: E in 1..16, up to 64 rows per
    expert, a capacity up to 1024; shrinks towards one expert, no rows, capacity 0."""
    return st.tuples(st.lists(st.integers(0, 64), min_size=1, max_size=MAX_PEER_EXPERTS),
                     st.integers(0, 1024))


def _w4a8_combine_row(n: int) -> Finding:
    def drops(call: tuple[list[int], int]) -> bool:
        received, cap = call
        return combined_rows(received, cap, rows_per_token=2) != combined_rows(received, cap)

    received, cap = _must(search(combine_calls(), drops, max_examples=n))
    return Finding(
        "w4a8-combine-capacity", "W4A8 combine: the running sum of taken rows counts two packed "
        "rows per token and is compared with max_output_size, a token count",
        "the combine takes every row the receive buffer kept (§5)",
        f"E={len(received)}, max_output_size={cap}, rows per expert {received}: the combine "
        f"takes {combined_rows(received, cap, rows_per_token=2)}, the buffer kept "
        f"{combined_rows(received, cap)} (the dropped rows' tokens never get that expert's "
        "FFN)",
        "variants.md [code]: CombineV2 in dispatch_ffn_combine_w4_a8_kernel.hpp at 182b75ea; "
        "PR #14869 (open)")
def _adapter_row(key: str, attribute: str, adapter: str, consequence: str,
                 source: str, n: int) -> Finding:
    kernels = st.sampled_from(KERNELS)  # shrinks towards w8a8, then w4a8
    first = _must(search(kernels, lambda k: bool(dropped_attributes(k, [attribute],
                                                                    adapter=adapter)),
                         max_examples=n))
    every = [k for k in KERNELS if dropped_attributes(k, [attribute], adapter=adapter)]
    return Finding(
        key, f"the torch adapter's dispatch by weight dtype ({adapter})",
        "every attribute a call passes reaches its kernel, or the call is rejected",
        f"{first} weights with {attribute}: dropped without an error (dropped by "
        f"{', '.join(every)}); {consequence}", source)


def _masked_count_change(n: int) -> str:
    """The minimal call whose ``expert_token_nums`` a dropped mask changes (§5: masked slots
    are not counted): a search over (EP, E, top_k, M) with every token masked."""
    def changes(c: tuple[int, int, int, int]) -> bool:
        return c[2] * c[3] > 0  # top_k·M masked slots are counted once the mask is gone

    ep, e, top_k, m = _must(search(st.tuples(st.integers(1, MAX_EP_SIZE),
                                             st.integers(1, MAX_EXPERTS_PER_RANK),
                                             st.integers(1, MAX_TOP_K), st.integers(0, 4)),
                                   changes, max_examples=n))
    return (f"EP={ep}, E={e}, top_k={top_k}, M={m}, x_active_mask=[False]: the masked "
            f"token is dispatched, counted (expert_token_nums [{m * top_k}], the contract "
            "[0]) and its out row written")


def _bf16_rows(n: int) -> list[Finding]:
    e_bf16 = _must(search(st.integers(1, MAX_EXPERTS_PER_RANK),
                          lambda e: len(swiglu_experts(e, "bf16")) < e, max_examples=n))
    e_w8a8 = _must(search(st.integers(1, MAX_EXPERTS_PER_RANK),
                          lambda e: len(swiglu_experts(e, "w8a8")) < e, max_examples=n))
    upstream = "BF16 kernel of PR #5866 (merged); no upstream issue or fix found"
    return [
        _adapter_row("bf16-adapter-drops-mask", "x_active_mask", "head",
                     _masked_count_change(n),
                     f"variants.md; dispatch_ffn_combine_torch_adpt.h [code]; {upstream}", n),
        _adapter_row("bf16-adapter-drops-clamp", "swiglu_limit", "head",
                     "SwiGLU runs unclamped; spec.OpConfig rejects the call instead",
                     f"variants.md; dispatch_ffn_combine_torch_adpt.h [code]; {upstream}", n),
        _adapter_row("oai-adapter-drops-alpha", "swiglu_alpha", "pr11916",
                     "standard SwiGLU runs where SwigluOAI was asked for; spec.OpConfig "
                     "rejects alpha > 0 there",
                     "PR #11916 (open): its review asks for a TORCH_CHECK", n),
        Finding(
            "bf16-epilogue-e2", "epilogueGranularity = E − 2 (uint32), BF16 kernel",
            "SwiGLU runs on the rows of every local expert",
            f"E={e_bf16}: granularity 0, neither SwiGLU batch runs and GMM2 reads a SwiGLU "
            f"buffer nothing wrote; E=1 wraps to 2^32 − 1 and works (the W8A8 kernel's "
            f"E − 1 / E − 3 rule fails at E={e_w8a8}, which its E >= 2 limit excludes)",
            f"variants.md; dispatch_ffn_combine_bf16.h, *_kernel.hpp [code]; {upstream}"),
    ]


def _oai_rows() -> list[Finding]:
    # The property, for the caller who passes nothing: the default must select standard SwiGLU.
    _must(oai_alpha(PR11916_PYTHON_DEFAULT_ALPHA))
    return [Finding(
        "oai-default-alpha", f"the Python binding's default swiglu_alpha = "
        f"{PR11916_PYTHON_DEFAULT_ALPHA} (PR #11916)",
        "a call that does not pass swiglu_alpha runs standard SwiGLU",
        f"any W8A8 call without swiglu_alpha: the kernel's α > 0 switch reads "
        f"{PR11916_PYTHON_DEFAULT_ALPHA} as SwigluOAI, (up + 1)·gate·σ(gate) instead of "
        "silu(gate)·up (the hunt's variant 'oai-default-alpha' gives the smallest call "
        "whose outputs change)",
        "variants.md [inferred]; PR #11916 (open); the C++ adapter defaults to 0.0")]


def rank_choice_contributions(call: PlacedCall) -> np.ndarray:
    """How many ranks compute each routed slot when every rank sees every token and picks its
    replica by ``(row + ep_rank + id) % count`` (vLLM's EPLB variant), int per (token, slot)."""
    pl = call.placement
    logical = np.concatenate([np.where(r, ids.astype(np.int64), NO_EXPERT)
                              for r, ids in zip(call.routed, call.logical)])
    g = np.arange(logical.shape[0])
    counts = np.bincount(pl.row, minlength=pl.num_logical)
    lid = np.maximum(logical, 0)
    first = np.cumsum(counts) - counts
    slots = np.argsort(pl.row, kind="stable")
    total = np.zeros(logical.shape, np.int64)
    for r in range(pl.ep_size):
        phys = slots[first[lid] + (g[:, None] + r + lid) % counts[lid]]
        total += phys // pl.slots_per_rank == r
    return np.where(logical == NO_EXPERT, 1, total)


def _unrouted(c: PlacedCall) -> bool:
    return any(bool((~r).any()) for r in c.routed)


def _routing_rows(n: int) -> list[Finding]:
    """GPU stacks' routing rules (placement.md), each a property over placed calls."""
    def found(fails: Callable[[PlacedCall], bool]) -> PlacedCall:
        return _must(search(placed_calls(), fails, max_examples=n))

    shared = found(lambda c: c.shared is not None and c.config.ep_size > 1
                   and c.config.total_slots > 0)
    rsf2 = found(lambda c: c.weights.routed_scaling_factor != 1 and c.config.total_slots > 0)
    skip = found(lambda c: c.weights.routed_scaling_factor != 1 and not c.weights.renormalize
                 and c.config.total_slots > 0)
    clamp = found(_unrouted)
    rank = found(lambda c: bool((rank_choice_contributions(c) != 1).any()))
    contributions = rank_choice_contributions(rank)
    rows = [
        Finding("rank-replica-choice-all-gather", "replica (row + ep_rank + id) % count with "
                "every rank seeing every token (sglang PR #32962)",
                "every (token, slot) is computed by exactly one replica",
                f"{rank.summary()}, every rank seeing every token: slot contributions "
                f"{contributions.reshape(-1).tolist()} (must all be 1)",
                "placement.md rule 3 [pr]; fixed upstream"),
        Finding("clamp-invalid-logical-id", "invalid logical ids clamped to 0 before the "
                "lookup (vllm-ascend map_and_record)",
                "a -1 slot computes nothing and counts no load",
                f"{clamp.summary()}: the -1 slot runs logical expert 0 and adds its output",
                "placement.md [code]; open"),
        Finding("padding-counted-as-load", "expert load counted over every slot (vllm PR "
                "#38128)", "padding and -1 slots do not count as load",
                f"{clamp.summary()}: a -1 slot adds one row to expert 0's load",
                "placement.md rule 6 [pr]; fixed by PR #38128"),
        Finding("rsf-applied-twice", "routed_scaling_factor in the router and on the output "
                "(vllm PR #45037; sglang PR #35152)", "rsf multiplies the routed part once "
                "(out linear in the routing weights)",
                f"{rsf2.summary()}: the routed part is scaled by rsf² = "
                f"{rsf2.weights.routed_scaling_factor ** 2}", "placement.md [pr]; fixed"),
        Finding("rsf-skipped-without-renormalize", "rsf applied on the renormalising path only "
                "(sglang-jax PR #1282; sglang PR #31449)", "rsf applies whether or not the "
                "weights are renormalised", f"{skip.summary()}: the routed part lacks rsf",
                "placement.md [pr]; fixed"),
        Finding("shared-expert-per-rank", "replicated shared-expert output added before the "
                "all-reduce (TensorRT-LLM PR #15922)",
                "out(routed + shared) − out(routed) = shared(x) at every EP",
                f"{shared.summary()}: shared(x) added EP = {shared.config.ep_size} times",
                "placement.md [pr]; fixed"),
    ]
    for off, key in zip(INT32_OFFSETS[:2], ("int32-permuted-offset", "int32-expert-stride")):
        c = _must(first_overflow(off, max_examples=n))
        rows.append(Finding(
            key, f"int32 offset {off.name}", "every offset of the declared domain fits int32",
            f"{_short(c)}, I={c.intermediate}: largest offset {off.largest(c)} >= 2^31",
            f"placement.md [pr]: {off.source}"))
    return rows


def _must(value: T | None) -> T:
    if value is None:
        raise AssertionError("a search that must find a counterexample found none")
    return value


def _short(c: OpConfig) -> str:
    return (f"EP={c.ep_size}, E={c.experts_per_rank}, top_k={c.top_k}, K={c.hidden}, "
            f"M={c.max_tokens}")


@functools.lru_cache(maxsize=4)
def _hunt(max_examples: int) -> tuple[Finding, ...]:
    return (*_layout_rows(max_examples), *_buffer_rows(max_examples), *_protocol_rows(),
            *_peer_rows(max_examples), *_bf16_rows(max_examples), *_oai_rows(),
            _w4a8_combine_row(max_examples), *_routing_rows(max_examples))


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
        "Flaws the properties of `spec.layout`, `spec.buffers`, `spec.protocol` and "
        "`spec.adapter` find by themselves in the operator's historical and current rules "
        "(reference notes §7–§9, and variants.md's per-core peer offset, modelled by "
        "`spec.protocol.PeerSchedule` with the vector-core count `n_aiv` a parameter, the BF16 "
        "kernel's adapter and epilogue, SwigluOAI's default α, and the W4A8 combine's capacity "
        "walk, `spec.findings.combined_rows`), and GPU stacks' routing contract "
        "(`spec.placement`: replica choice, invalid ids, load, the routed scaling factor, "
        "shared experts; `spec.index_width`: int32 offsets over the declared shape domain). "
        "Each counterexample is the minimal one the "
        "search returns; `dfc-oracle hunt` also runs the kernel variants "
        "`oai-default-alpha` and `bf16-epilogue-e2` (`oracle.check.hunt`) and prints the "
        "smallest call whose outputs they change.",
        "",
        "| rule | property | minimal counterexample | reproduce | source |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {_cell(f.rule)} | {_cell(f.prop)} | {_cell(f.counterexample)} | `{f.command}` "
        f"| {_cell(f.source)} |"
        for f in rows
    ]
    lines += ["", "## Stories (interleavings and core schedules)", ""]
    for f in rows:
        if f.story:
            lines += [f"### {f.key}", "", "```", *f.story, "```", ""]
    lines += [
        "The per-call tag byte passes the short-reset mutant (a stale word carries the previous "
        "call's tag) but races on the PR #5665 layout exactly as the non-zero tag does: it "
        "replaces the reset, not the 512-byte alignment.",
        "",
        "Both per-core peer flaws need EP > n_aiv: no call inside today's guards hits them on a "
        "full A3 die (48 vector cores) or 910B3 (40); a launch on fewer cores (a core limit "
        "[inferred]) does. MegaMoe's EP <= 64 is another kernel, not read for this.",
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
