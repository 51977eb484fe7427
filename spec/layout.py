"""The count matrix: row stride of every historical version, the polling model, and its rules.

Every rank learns ``cnt[s][g]`` through a matrix of ``EP`` rows of ``S`` int32 words at the
window offset ``W − 2 MiB`` (reference notes §7–§8). Sender ``s`` writes its row ``[s·S, s·S+S)``
with every entry tagged; the receiver polls some words of each row until they are non-zero, then
reads the row. The hardware lands each part of a write that falls inside one 512-byte block
(128 int32 words) atomically, but the parts of one write may land in any order.

Soundness needs every written word to travel with a word the receiver polls for that row. The
static predicates here state the rules; :mod:`spec.protocol` shows why a violation breaks the
operator. Each predicate returns structured :class:`LayoutViolation` records, empty when sound.

>>> count_row_stride(2, 1, version="pr5665"), count_row_stride(2, 1, version="pr8560")
(2, 128)
>>> [v.rule for v in misaligned_rows(2, 1, version="pr5665")]
['row-alignment']
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spec.errors import ConfigError

__all__ = [
    "BLOCK_BYTES",
    "BLOCK_WORDS",
    "COUNT_REGION_BYTES",
    "CURRENT_VERSION",
    "MAX_SYNC_RANKS",
    "VERSIONS",
    "LayoutVersion",
    "LayoutViolation",
    "count_row_stride",
    "layout_violations",
    "matrix_overflow",
    "misaligned_rows",
    "payload_words",
    "polled_words",
    "sentinel_outside_row",
    "sync_flag_overflow",
    "unpolled_payload",
    "write_pieces",
    "written_words",
]

#: The hardware writes each 512-byte block atomically (§8 [code]).
BLOCK_BYTES = 512
#: int32 words per 512-byte block.
BLOCK_WORDS = BLOCK_BYTES // 4
#: The count matrix region: ``[W − 2 MiB, W − 1 MiB)`` (§7 layout table [code]).
COUNT_REGION_BYTES = 1 << 20
#: Rank flags sit at int offset ``16·r`` before the barrier counter at int offset 2048, so at
#: most 2048 / 16 = 128 ranks fit (§8 [inferred]).
MAX_SYNC_RANKS = 2048 // 16


def _align_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


@dataclass(frozen=True)
class LayoutVersion:
    """One historical count-row layout (§8 table).

    ``extra`` is the number of words after the ``EP·E`` counts that the sender writes: the masked
    sentinel slot (PR #6156, #8560) or the trailing counter (PR #3532). ``polls_blocks`` is True
    for the block-head polling protocol of PR #5665 onwards; PR #3532 polls only its trailing
    counter [inferred: "one trailing counter compared with a per-call count"].
    """

    name: str
    pr: int
    stride_rule: str
    extra: int
    polls_blocks: bool

    def stride(self, ep_size: int, experts_per_rank: int) -> int:
        """``S``, the row stride in int32 words."""
        experts = ep_size * experts_per_rank
        if self.name == "pr3532":
            return experts + 8
        if self.name == "pr5665":
            return experts
        if self.name == "pr6156":
            return _align_up(experts, BLOCK_WORDS)
        return _align_up(experts + 1, BLOCK_WORDS)


#: Every version of §8. PR #5665 wrote no sentinel slot [inferred: §8 first lists the sentinel
#: with PR #6156]; PR #6156 and #8560 write the masked-slot count at index ``EP·E`` (§4, §8).
VERSIONS: dict[str, LayoutVersion] = {
    v.name: v
    for v in (
        LayoutVersion("pr3532", 3532, "EP·E + 8", extra=1, polls_blocks=False),
        LayoutVersion("pr5665", 5665, "EP·E", extra=0, polls_blocks=True),
        LayoutVersion("pr6156", 6156, "AlignUp(EP·E, 128)", extra=1, polls_blocks=True),
        LayoutVersion("pr8560", 8560, "AlignUp(EP·E + 1, 128)", extra=1, polls_blocks=True),
    )
}
#: The version on ``main`` (PR #8560).
CURRENT_VERSION = "pr8560"


def _version(version: str) -> LayoutVersion:
    try:
        return VERSIONS[version]
    except KeyError:
        raise ConfigError(
            field="version", given=repr(version), allowed=" or ".join(map(repr, VERSIONS)),
            fix="name one of the count-row layouts of §8 of the reference notes",
        ) from None


@dataclass(frozen=True)
class LayoutViolation:
    """A broken layout rule: which rule, on which row (None: the whole matrix), and why."""

    rule: str
    message: str
    row: int | None = None

    def __str__(self) -> str:
        return f"{self.rule}: {self.message}"


def count_row_stride(ep_size: int, experts_per_rank: int, *, version: str = CURRENT_VERSION) -> int:
    """``S``: int32 words per count row under ``version`` (§8 table).

    >>> [count_row_stride(1, 128, version=v) for v in VERSIONS]
    [136, 128, 128, 256]
    """
    return _version(version).stride(ep_size, experts_per_rank)


def payload_words(ep_size: int, experts_per_rank: int, *, version: str = CURRENT_VERSION) -> int:
    """Words of a row that carry data: ``EP·E`` counts plus the version's extra slot."""
    return ep_size * experts_per_rank + _version(version).extra


def written_words(ep_size: int, experts_per_rank: int, *, version: str = CURRENT_VERSION) -> int:
    """Words each sender writes from its row start: the padded row, or more when the payload
    does not fit the stride (PR #6156 at ``EP·E % 128 == 0``: the sentinel spills) [inferred]."""
    stride = count_row_stride(ep_size, experts_per_rank, version=version)
    return max(stride, payload_words(ep_size, experts_per_rank, version=version))


def polled_words(
    ep_size: int, experts_per_rank: int, row: int, *, version: str = CURRENT_VERSION
) -> np.ndarray:
    """Absolute word offsets (from the matrix base) the receiver polls for ``row``.

    Since PR #5665 it polls every 128th word of the row up to the stride (the poll bound is the
    padded length, §8); PR #3532 polls its trailing counter at ``EP·E`` [inferred].

    >>> polled_words(2, 63, 1, version="pr5665").tolist()
    [126]
    """
    spec = _version(version)
    stride = spec.stride(ep_size, experts_per_rank)
    if not spec.polls_blocks:
        return np.array([row * stride + ep_size * experts_per_rank], dtype=np.int64)
    return row * stride + np.arange(0, stride, BLOCK_WORDS, dtype=np.int64)


def write_pieces(
    ep_size: int, experts_per_rank: int, *, version: str = CURRENT_VERSION
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every sender's row write split at absolute 512-byte block boundaries.

    Returns ``(sender, start, stop)`` int64 arrays, one entry per piece, in sender then address
    order; each piece ``[start, stop)`` lies inside one hardware block and lands atomically.

    >>> [a.tolist() for a in write_pieces(2, 63, version="pr5665")]
    [[0, 1, 1], [0, 126, 128], [126, 128, 252]]
    """
    stride = count_row_stride(ep_size, experts_per_rank, version=version)
    length = written_words(ep_size, experts_per_rank, version=version)
    starts = np.arange(ep_size, dtype=np.int64) * stride
    ends = starts + length
    first = starts // BLOCK_WORDS
    counts = (ends - 1) // BLOCK_WORDS - first + 1
    sender = np.repeat(np.arange(ep_size, dtype=np.int64), counts)
    block = np.repeat(first, counts) + np.arange(counts.sum()) - np.repeat(
        np.cumsum(counts) - counts, counts
    )
    start = np.maximum(block * BLOCK_WORDS, starts[sender])
    stop = np.minimum((block + 1) * BLOCK_WORDS, ends[sender])
    return sender, start, stop


def misaligned_rows(
    ep_size: int, experts_per_rank: int, *, version: str = CURRENT_VERSION
) -> list[LayoutViolation]:
    """Rows that do not start on a 512-byte boundary (the base ``W − 2 MiB`` is aligned, §8)."""
    stride = count_row_stride(ep_size, experts_per_rank, version=version)
    rows = np.flatnonzero((np.arange(ep_size) * stride) % BLOCK_WORDS)
    return [
        LayoutViolation(
            "row-alignment",
            f"row {r} starts at byte {4 * r * stride}, not a multiple of {BLOCK_BYTES} "
            f"(S = {_version(version).stride_rule} = {stride} words); "
            "pad the stride to a multiple of 128 words (PR #6156)",
            row=int(r),
        )
        for r in rows
    ]


def unpolled_payload(
    ep_size: int, experts_per_rank: int, *, version: str = CURRENT_VERSION
) -> list[LayoutViolation]:
    """Payload words that can land after the receiver has declared their row complete.

    A payload word is safe when the piece that carries it also carries a word polled for its
    row: the poll then cannot succeed before the word has landed.
    """
    sender, start, stop = write_pieces(ep_size, experts_per_rank, version=version)
    stride = count_row_stride(ep_size, experts_per_rank, version=version)
    payload_end = sender * stride + payload_words(ep_size, experts_per_rank, version=version)
    carries_payload = start < payload_end
    spec = _version(version)
    if spec.polls_blocks:
        # First polled offset at or after the piece start, relative to the row start.
        first_poll = -(-(start - sender * stride) // BLOCK_WORDS) * BLOCK_WORDS
        covered = (first_poll < stop - sender * stride) & (first_poll < stride)
    else:
        counter = sender * stride + ep_size * experts_per_rank
        covered = (start <= counter) & (counter < stop)
    bad = np.flatnonzero(carries_payload & ~covered)
    return [
        LayoutViolation(
            "unpolled-payload",
            f"words {start[i]}..{min(stop[i], payload_end[i]) - 1} of row {sender[i]} land in "
            f"a piece with no polled word of that row; the receiver can read them before they "
            f"arrive (rows must start on {BLOCK_BYTES}-byte boundaries, PR #6156)",
            row=int(sender[i]),
        )
        for i in bad
    ]


def sentinel_outside_row(
    ep_size: int, experts_per_rank: int, *, version: str = CURRENT_VERSION
) -> list[LayoutViolation]:
    """The row has no slot for its last payload word (the masked sentinel ``EP·E``)."""
    stride = count_row_stride(ep_size, experts_per_rank, version=version)
    payload = payload_words(ep_size, experts_per_rank, version=version)
    if payload <= stride:
        return []
    return [
        LayoutViolation(
            "sentinel-slot",
            f"the sentinel slot {ep_size * experts_per_rank} is outside a row of S = {stride} "
            f"words: each sender's sentinel count lands on the next row's first (polled) word, "
            f"the last one past the matrix; use S = AlignUp(EP·E + 1, 128) (PR #8560)",
        )
    ]


def matrix_overflow(
    ep_size: int, experts_per_rank: int, *, version: str = CURRENT_VERSION
) -> list[LayoutViolation]:
    """The matrix (and any spilled word) does not fit its 1 MiB region (§8 [inferred])."""
    stride = count_row_stride(ep_size, experts_per_rank, version=version)
    used = 4 * ((ep_size - 1) * stride + written_words(ep_size, experts_per_rank, version=version))
    if used <= COUNT_REGION_BYTES:
        return []
    return [
        LayoutViolation(
            "count-region",
            f"{ep_size} rows of {stride} int32 words need {used} bytes > the "
            f"{COUNT_REGION_BYTES}-byte count region; reduce EP·E",
        )
    ]


def sync_flag_overflow(ep_size: int) -> list[LayoutViolation]:
    """More ranks than sync-flag slots: the flag of rank 128 hits the barrier counter."""
    if ep_size <= MAX_SYNC_RANKS:
        return []
    return [
        LayoutViolation(
            "sync-flags",
            f"EP = {ep_size} ranks need flag slots up to int offset {16 * ep_size}, past the "
            f"barrier counter at int offset 2048; at most {MAX_SYNC_RANKS} ranks fit",
        )
    ]


def layout_violations(
    ep_size: int, experts_per_rank: int, *, version: str = CURRENT_VERSION
) -> list[LayoutViolation]:
    """Every rule above at once; empty for a sound layout.

    >>> layout_violations(16, 16)
    []
    """
    return [
        *misaligned_rows(ep_size, experts_per_rank, version=version),
        *unpolled_payload(ep_size, experts_per_rank, version=version),
        *sentinel_outside_row(ep_size, experts_per_rank, version=version),
        *matrix_overflow(ep_size, experts_per_rank, version=version),
        *sync_flag_overflow(ep_size),
    ]
