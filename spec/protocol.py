"""A stateful model of the count exchange: why the 512-byte rule exists, as an interleaving.

One receiver's count matrix (every rank's is the same by symmetry) as int32 words; each sender
writes its tagged row ``[s·S, s·S + L)`` (:func:`spec.layout.written_words`), split at absolute
512-byte block boundaries into pieces that land atomically but in any order (reference notes §8,
protocol since PR #5665). The receiver polls the version's polled words of each row
(:func:`spec.layout.polled_words`); once all are ready it reads the row's payload and removes the
tag. After the end-of-call barrier it resets the matrix.

Every word also records who wrote it in which call, so the invariants are exact:

* a row the receiver declared complete holds only words its sender wrote in this call;
* no piece of one sender lands outside its own row (in another row or past the matrix).

Variants: the layout ``version`` (PR #5665, #6156, #8560), the ``tagging`` — ``"nonzero"`` (the
code: count + 0x800000, ready when non-zero) or ``"generation"`` (the unmerged proposal: a tag
byte ``1 + call % 255`` in bits 24..31, ready when it equals this call's tag) — and the
``reset`` — ``"full"`` (``EP·S`` words, the code) or ``"unpadded"`` (``EP·EP·E`` words: a mutant
that covers fewer words than were written). PR #3532's counter protocol is not modelled.

:class:`PeerSchedule` models the other half of the exchange: which (peer, local expert) blocks
each vector core of a destination rank serves, where it pushes the count row, and the offset it
reads each block's rows from (variants.md, "The per-core peer offset"), as a pure function of
the shapes and the count matrix.

>>> ex = CountExchange(2, 33, version="pr5665")
>>> ex.start_call(seed=0); ex.deliver(0); ex.deliver(0)
Traceback (most recent call last):
...
spec.protocol.ProtocolViolation: EP=2 E=33 pr5665/nonzero/full-reset: row 1 declared complete \
but word(s) 128..131 were not written by sender 1 in call 0 (never written)
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from hypothesis import HealthCheck, Phase, Verbosity, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    precondition,
    rule,
    run_state_machine_as_test,
)

from spec.errors import ConfigError
from spec.layout import (
    BLOCK_WORDS,
    count_row_stride,
    payload_words,
    polled_words,
    write_pieces,
    written_words,
)

__all__ = [
    "NONZERO_TAG",
    "OFFSETS",
    "PROTOCOL_VERSIONS",
    "PUSHES",
    "RESETS",
    "TAGGINGS",
    "CountExchange",
    "PeerSchedule",
    "ProtocolViolation",
    "exchange_machine",
    "first_failing_config",
    "search_exchange",
]

#: The tag added to every entry so that a zero count is non-zero (PR #5665 [code]).
NONZERO_TAG = 0x800000
#: Layouts with the block-head polling protocol (§8).
PROTOCOL_VERSIONS = ("pr5665", "pr6156", "pr8560")
TAGGINGS = ("nonzero", "generation")
RESETS = ("full", "unpadded")


class ProtocolViolation(AssertionError):
    """An invariant broke; ``config`` is ``(EP, E)`` (:class:`PeerSchedule`: ``(n_aiv, EP, E)``)
    and ``story`` the events that led there."""

    def __init__(self, message: str, *, config: tuple[int, ...], story: list[str]) -> None:
        super().__init__(message)
        self.config = config
        self.story = list(story)


def _ranges(words: np.ndarray) -> str:
    """``[3, 4, 5, 9]`` -> ``"3..5, 9"``."""
    breaks = np.flatnonzero(np.diff(words) != 1) + 1
    parts = [(int(g[0]), int(g[-1])) for g in np.split(words, breaks)]
    return ", ".join(f"{a}..{b}" if a != b else f"{a}" for a, b in parts)


def _choose(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError(field=name, given=repr(value), allowed=" or ".join(allowed),
                          fix=f"pick a modelled {name}")
    return value


@dataclass
class CountExchange:
    """The count matrix of one receiver across successive calls (see the module docstring)."""

    ep_size: int
    experts_per_rank: int
    version: str = "pr8560"
    tagging: str = "nonzero"
    reset: str = "full"
    story: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _choose("version", self.version, PROTOCOL_VERSIONS)
        _choose("tagging", self.tagging, TAGGINGS)
        _choose("reset", self.reset, RESETS)
        ep, e = self.ep_size, self.experts_per_rank
        self.stride = count_row_stride(ep, e, version=self.version)
        self.payload = payload_words(ep, e, version=self.version)
        self.length = written_words(ep, e, version=self.version)
        self.sender, self.start, self.stop = write_pieces(ep, e, version=self.version)
        size = (ep - 1) * self.stride + self.length  # spilled words stay visible
        self.value = np.zeros(size, dtype=np.int64)
        self.writer = np.full((size, 2), -1, dtype=np.int64)  # (sender, call) per word
        self.call = -1
        self.in_call = False
        self.pending: list[int] = []
        self.done = np.ones(ep, dtype=bool)
        self.rows = np.zeros((ep, self.length), dtype=np.int64)
        self.polled = [polled_words(ep, e, r, version=self.version) for r in range(ep)]

    @property
    def label(self) -> str:
        """``EP=.. E=.. version/tagging/reset``."""
        return (f"EP={self.ep_size} E={self.experts_per_rank} "
                f"{self.version}/{self.tagging}/{self.reset}-reset")

    def _fail(self, message: str) -> ProtocolViolation:
        self.story.append(f"VIOLATION: {message}")
        return ProtocolViolation(f"{self.label}: {message}",
                                 config=(self.ep_size, self.experts_per_rank), story=self.story)

    def _encode(self, counts: np.ndarray) -> np.ndarray:
        if self.tagging == "nonzero":
            return counts + NONZERO_TAG
        return counts | ((1 + self.call % 255) << 24)

    def _ready(self, words: np.ndarray) -> np.ndarray:
        if self.tagging == "nonzero":
            return np.asarray(words != 0)
        return np.asarray((words >> 24) == 1 + self.call % 255)

    @property
    def idle(self) -> bool:
        """No call in progress: a new one may start."""
        return not self.in_call

    @property
    def complete(self) -> bool:
        """Every row read and every piece landed: the end-of-call barrier can pass."""
        return self.in_call and bool(self.done.all()) and not self.pending

    def start_call(self, seed: int) -> None:
        """Every sender builds its tagged row (counts from ``seed``); all pieces become pending."""
        self.call += 1
        self.in_call = True
        counts = np.zeros((self.ep_size, self.length), dtype=np.int64)
        counts[:, : self.payload] = np.random.default_rng(seed).integers(
            0, 100, (self.ep_size, self.payload))
        self.rows = self._encode(counts)
        self.pending = list(range(len(self.sender)))
        self.done[:] = False
        self.story.append(f"call {self.call} starts: {len(self.pending)} pieces in flight")
        self.poll()

    def deliver(self, choice: int) -> None:
        """Land the pending piece number ``choice % len(pending)`` (in sender, address order)."""
        i = self.pending.pop(choice % len(self.pending))
        s, a, b = int(self.sender[i]), int(self.start[i]), int(self.stop[i])
        base = s * self.stride
        self.value[a:b] = self.rows[s, a - base: b - base]
        self.writer[a:b] = (s, self.call)
        self.story.append(f"sender {s}'s words {a}..{b - 1} land")
        if b > base + self.stride:
            target = "past the matrix" if b > self.ep_size * self.stride else f"in row {s + 1}"
            raise self._fail(f"sender {s}'s words {max(a, base + self.stride)}..{b - 1} landed "
                             f"{target} (row {s} is words {base}..{base + self.stride - 1})")
        self.poll(range(a // self.stride, (b - 1) // self.stride + 1))

    def deliver_rest(self) -> None:
        """Land every pending piece in order."""
        while self.pending:
            self.deliver(0)

    def poll(self, rows: Iterable[int] | None = None) -> None:
        """Declare complete every unread row whose polled words are ready, and read it.

        The model polls after every landing and at the start of a call: memory changes only
        when a piece lands, so this receiver sees every state any polling schedule could see,
        and reads each row at the earliest (most dangerous) moment. ``rows`` limits the poll to
        the rows a landing touched (no other row can have changed).
        """
        for r in np.flatnonzero(~self.done) if rows is None else rows:
            if self.done[r]:
                continue
            polled = self.polled[r]
            if not self._ready(self.value[polled]).all():
                continue
            self.done[r] = True
            words = np.arange(r * self.stride, r * self.stride + self.payload)
            wrong = words[(self.writer[words] != (r, self.call)).any(axis=1)]
            self.story.append(f"receiver: row {r} ready (polled word(s) {_ranges(polled)}), "
                              f"reads words {_ranges(words)}")
            if wrong.size:
                who = {tuple(w) for w in self.writer[wrong].tolist()}
                owners = ", ".join("never written" if s < 0 else f"sender {s} in call {c}"
                                   for s, c in sorted(who))
                raise self._fail(f"row {r} declared complete but word(s) {_ranges(wrong)} were "
                                 f"not written by sender {r} in call {self.call} ({owners})")

    def end_call(self) -> None:
        """The end-of-call reset: zero the first ``EP·S`` (or, mutated, ``EP·EP·E``) words."""
        width = self.stride if self.reset == "full" else self.ep_size * self.experts_per_rank
        size = self.ep_size * width
        self.value[:size] = 0
        self.writer[:size] = -1
        self.in_call = False
        self.story.append(f"call {self.call} ends: reset zeroes words 0..{size - 1}")


def exchange_machine(
    *, version: str, tagging: str = "nonzero", reset: str = "full",
    max_ep: int = 16, max_experts: int = 64,
) -> type[RuleBasedStateMachine]:
    """A Hypothesis state machine over :class:`CountExchange` for one variant.

    It draws ``EP`` and ``E``, then interleaves: start a call, land any pending piece, land the
    rest, end the call (reset); the receiver polls after each event (:meth:`CountExchange.poll`).
    Invariants are checked inside the model.
    """

    class CountExchangeMachine(RuleBasedStateMachine):
        model: CountExchange

        @initialize(ep_size=st.integers(1, max_ep), experts_per_rank=st.integers(1, max_experts),
                    near_block=st.booleans())
        def configure(self, ep_size: int, experts_per_rank: int, near_block: bool) -> None:
            if near_block:  # edge_cases.md: EP·E around multiples of 128 (one 512-byte block)
                blocks = -(-ep_size * experts_per_rank // BLOCK_WORDS)
                experts_per_rank = max(1, blocks * BLOCK_WORDS // ep_size)
            self.model = CountExchange(ep_size, experts_per_rank, version=version,
                                       tagging=tagging, reset=reset)

        @precondition(lambda self: self.model.idle)
        @rule(seed=st.integers(0, 2**16))
        def start_call(self, seed: int) -> None:
            self.model.start_call(seed)

        @precondition(lambda self: bool(self.model.pending))
        @rule(choice=st.integers(0, 3) | st.integers(0, 2**16))
        def deliver(self, choice: int) -> None:
            self.model.deliver(choice)

        @precondition(lambda self: bool(self.model.pending))
        @rule()
        def deliver_rest(self) -> None:
            self.model.deliver_rest()

        @precondition(lambda self: self.model.complete)
        @rule()
        def end_call(self) -> None:
            self.model.end_call()

    CountExchangeMachine.__name__ = f"CountExchange_{version}_{tagging}_{reset}"
    return CountExchangeMachine


def search_exchange(
    *, version: str, tagging: str = "nonzero", reset: str = "full",
    max_examples: int = 200, steps: int = 30,
) -> ProtocolViolation | None:
    """Run the state machine deterministically; the minimal violation found, or None.

    >>> search_exchange(version="pr8560", max_examples=5) is None
    True
    """
    machine = exchange_machine(version=version, tagging=tagging, reset=reset)
    try:
        run_state_machine_as_test(machine, settings=settings(  # type: ignore[no-untyped-call,unused-ignore]
            derandomize=True, database=None, deadline=None, max_examples=max_examples,
            stateful_step_count=steps, verbosity=Verbosity.quiet, print_blob=False,
            report_multiple_bugs=False, phases=(Phase.generate, Phase.shrink),
            suppress_health_check=list(HealthCheck),
        ))
    except ProtocolViolation as violation:
        return violation
    return None


def first_failing_config(
    *, version: str, tagging: str = "nonzero", reset: str = "full",
    max_ep: int = 16, max_experts: int = 128, calls: int = 2,
) -> ProtocolViolation | None:
    """The first ``(EP, E)`` (fewest ranks first, then fewest experts) that breaks an invariant
    when every piece lands in address order for ``calls`` successive calls; None if none does.

    In-order landing is the adversarial schedule for the flaws of §8: a misaligned row's unpolled
    piece is its last, a spilled sentinel lands whatever the order, and a stale polled word is
    seen at the start of the next call. It is the explicit counterpart of
    :func:`exchange_machine` and gives the exact minimal configuration.

    >>> first_failing_config(version="pr6156").config
    (1, 128)
    """
    for ep_size, experts_per_rank in itertools.product(range(1, max_ep + 1),
                                                       range(1, max_experts + 1)):
        model = CountExchange(ep_size, experts_per_rank, version=version, tagging=tagging,
                              reset=reset)
        try:
            for call in range(calls):
                model.start_call(seed=call)
                model.deliver_rest()
                model.end_call()
        except ProtocolViolation as violation:
            return violation
    return None


#: Where a vector core pushes this rank's count row for a peer it serves: ``"core"``, to rank
#: ``coreIdx`` (HEAD [inferred from code]), or ``"peer"`` (PR #13426, W8A8).
PUSHES = ("core", "peer")
#: Where a core reads a peer's rows for a local expert: ``"shared"``, one running ``prevSum``
#: per core initialised from peer ``coreIdx``'s offset (all three kernels at HEAD [code]), or
#: ``"per-peer"``, the peer's own prefix sum ``P(p, g)`` (PR #10340, W4A8 only, open).
OFFSETS = ("shared", "per-peer")


@dataclass(frozen=True)
class PeerSchedule:
    """The vector cores of every destination rank: blocks served, count pushes, read offsets.

    Core ``c`` of ``n_aiv`` serves every (peer ``p``, local expert ``g``) with
    ``p ≡ c (mod n_aiv)``, ``g``-major then ``p`` ascending (variants.md [code]). For each peer
    it pushes this rank's count row (to ``p``, or with ``push="core"`` to rank ``c``); for each
    block it reads ``cnt[p][d·E+g]`` rows from peer ``p``'s expert-sorted send slots starting at
    ``rowSrc`` and returns the results to the block's own slots. The right ``rowSrc`` is
    ``P(p, g) = Σ_{i < d·E+g} cnt[p][i]``; ``offset="shared"`` computes ``rowSrc = prevSum;
    prevSum += rows`` over all the core's blocks, right only while it serves one peer. Truncation
    (``max_output_size``) is not modelled.

    >>> PeerSchedule(2, 1, n_aiv=1).served(0)
    [(0, 0), (1, 0)]
    >>> PeerSchedule(3, 1, n_aiv=2).count_receivers()
    [0, 1]
    """

    ep_size: int
    experts_per_rank: int
    n_aiv: int
    push: str = "core"
    offset: str = "shared"

    def __post_init__(self) -> None:
        for name, value in (("ep_size", self.ep_size), ("experts_per_rank",
                            self.experts_per_rank), ("n_aiv", self.n_aiv)):
            if value < 1:
                raise ConfigError(field=name, given=repr(value), allowed=">= 1",
                                  fix=f"use a positive {name}")
        _choose("push", self.push, PUSHES)
        _choose("offset", self.offset, OFFSETS)

    @property
    def label(self) -> str:
        """``n_aiv=.. EP=.. E=.. push/offset``."""
        return (f"n_aiv={self.n_aiv} EP={self.ep_size} E={self.experts_per_rank} "
                f"{self.push}-push/{self.offset}-offset")

    def peers(self, core: int) -> range:
        """The peers core ``core`` serves, ascending (two or more iff ``EP > n_aiv``)."""
        return range(core, self.ep_size, self.n_aiv)

    def served(self, core: int) -> list[tuple[int, int]]:
        """The (peer, local expert) blocks of core ``core`` in service order."""
        return [(p, g) for g in range(self.experts_per_rank) for p in self.peers(core)]

    def count_receivers(self) -> list[int]:
        """The ranks every sender pushes its count row to (the same on every sender)."""
        return sorted({c if self.push == "core" else p
                       for c in range(self.n_aiv) for p in self.peers(c)})

    def peer_offsets(self, counts: np.ndarray, dest: int) -> np.ndarray:
        """``P[p, g]``: where peer ``p``'s slots for destination ``dest``'s expert ``g`` start."""
        e = self.experts_per_rank
        rows = counts[:, dest * e: (dest + 1) * e]
        before = counts[:, : dest * e].sum(axis=1, keepdims=True)
        return np.asarray(before + np.cumsum(rows, axis=1) - rows)

    def read_offsets(self, counts: np.ndarray, dest: int) -> np.ndarray:
        """``rowSrc[p, g]``: where destination ``dest``'s cores read block (p, g)."""
        right = self.peer_offsets(counts, dest)
        if self.offset == "per-peer":
            return right
        rows = counts[:, dest * self.experts_per_rank: (dest + 1) * self.experts_per_rank]
        read = np.zeros_like(right)
        for core in range(min(self.n_aiv, self.ep_size)):
            peers = self.peers(core)
            served = rows[peers].T  # (g, p): the service order, g-major
            read[peers] = (right[core, 0] + np.cumsum(served) - served.ravel()).reshape(
                served.shape).T
        return read

    def _check_counts(self, counts: np.ndarray) -> None:
        shape = (self.ep_size, self.ep_size * self.experts_per_rank)
        if counts.shape != shape or (counts < 0).any():
            raise ConfigError(field="counts", given=f"shape {counts.shape}",
                              allowed=f"non-negative, shape {shape} (cnt[source][global expert])",
                              fix="pass the call's count matrix")

    def violation(self, counts: np.ndarray) -> ProtocolViolation | None:
        """The first broken invariant, or None: every rank receives every sender's count row
        (else it polls forever on the first call), and every block with rows is read at its
        own offset ``P(p, g)``."""
        self._check_counts(counts)
        receivers = self.count_receivers()
        starved = sorted(set(range(self.ep_size)) - set(receivers))
        if starved:
            r = starved[0]
            c = r % self.n_aiv
            return self._fail(
                f"rank {r} never receives a count row: it polls forever on the first call "
                "(hang)", [f"every sender: core {c} serves peers {list(self.peers(c))} and "
                           f"pushes its count row to rank {c} for each",
                           f"count rows reach ranks {receivers} only"])
        e = self.experts_per_rank
        for dest in range(self.ep_size):
            right, read = self.peer_offsets(counts, dest), self.read_offsets(counts, dest)
            rows = counts[:, dest * e: (dest + 1) * e]
            bad = (rows > 0) & (read != right)
            for core in range(min(self.n_aiv, self.ep_size)):
                if not bad[self.peers(core)].any():
                    continue
                story = [f"destination rank {dest}, core {core}: peers "
                         f"{list(self.peers(core))}, prevSum := P({core}, 0) = "
                         f"{right[core, 0]}"]
                for p, g in self.served(core):
                    n, a, b = int(rows[p, g]), int(read[p, g]), int(right[p, g])
                    story.append(f"expert {dest * e + g}, peer {p}: {n} row(s) read at slot {a}"
                                 f" (P({p}, {g}) = {b})")
                    if n and a != b:
                        return self._fail(
                            f"destination rank {dest} reads peer {p}'s rows for expert "
                            f"{dest * e + g} at slots {a}..{a + n - 1} instead of "
                            f"{b}..{b + n - 1}", story)
        return None

    def _fail(self, message: str, story: list[str]) -> ProtocolViolation:
        return ProtocolViolation(f"{self.label}: {message}",
                                 config=(self.n_aiv, self.ep_size, self.experts_per_rank),
                                 story=[*story, f"VIOLATION: {message}"])
