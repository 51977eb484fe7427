"""HCCL window sizes: the operator's own check, its environment parsing, the window layout, and
the buffer formulas of CANN's MC2 dispatch operators.

Reference notes §7 (host tiling of ``dispatch_ffn_combine``, check added by PR #6130) and §9
(CANN documents). All sizes are bytes unless a name ends in ``_mb`` (1 MB = 1 MiB here, as in
the operator: ``MB_SIZE = 1024 * 1024``).

>>> from spec import OpConfig
>>> cfg = OpConfig(ep_size=16, experts_per_rank=16, top_k=8, hidden=7168, intermediate=2048,
...                tokens_per_rank=(4096,) * 16)
>>> hccl_required_mb(cfg)
682
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from spec.config import OpConfig
from spec.errors import HcclBufferTooSmall
from spec.layout import BLOCK_BYTES, COUNT_REGION_BYTES, LayoutViolation, count_row_stride
from spec.limits import MC2_V1_A2, MC2_V1_A3, MC2_V2_A3, Profile, Shape, check_supported

__all__ = [
    "CHECK_OVERHEAD_BYTES",
    "DEFAULT_HCCL_BUFFSIZE_MB",
    "INT32_MAX",
    "MAX_HCCL_BUFFSIZE_MB",
    "MESSAGE_OVERHEAD_MB",
    "MIB",
    "HcclBuffsize",
    "LayoutFit",
    "Region",
    "check_hccl_buffer",
    "hccl_buffsize_from_env",
    "hccl_required_bytes",
    "hccl_required_mb",
    "int32_offset_overflows",
    "layout_fits",
    "mc2_v1_a2_required_mb",
    "mc2_v1_a3_required_mb",
    "mc2_v2_a3_required_mb",
    "operator_message_formula_mb",
    "region_needs",
    "window_layout",
]

MIB = 1 << 20
#: ``HCCL_BUFFSIZE`` when unset or unusable (§7 [code]).
DEFAULT_HCCL_BUFFSIZE_MB = 200
#: Larger values fall back to the default: the operator stores the value in a uint16 (§7 [code]).
MAX_HCCL_BUFFSIZE_MB = 65535
#: The constant the check adds (§7 [code]).
CHECK_OVERHEAD_BYTES = 10 * MIB
#: The constant the operator's error text states instead (§7 [pr history: 3 became 10 in the
#: code, not in the text]).
MESSAGE_OVERHEAD_MB = 3
#: The scale block and the count-matrix and sync-flag regions are 1 MiB each (§7 [code]).
_FIXED_REGION_BYTES = 1 << 20
#: The largest byte offset an int32 holds: ``row · stride`` computed in int32 wraps past it at
#: large M·topK·K (edge_cases.md, 2026: vllm PR #45907, Liger-Kernel PR #1248; DeepEP #454).
INT32_MAX = 2**31 - 1


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _data_term(config: OpConfig) -> int:
    # M·topK·K·sizeof(int8)·3: one int8 send row plus a 2-byte combine row per slot (§7).
    return config.max_tokens * config.top_k * config.hidden * 3


def hccl_required_bytes(config: OpConfig) -> int:
    """The operator's check: ``M·topK·K·3 + 10 MiB``, ``M`` the largest tokens-per-rank (§7).

    EP, E and ``max_output_size`` do not enter it.
    """
    return _data_term(config) + CHECK_OVERHEAD_BYTES


def hccl_required_mb(config: OpConfig) -> int:
    """The smallest ``HCCL_BUFFSIZE`` (MB) that passes the check: the required bytes rounded up.
    """
    return _ceil_div(hccl_required_bytes(config), MIB)


def operator_message_formula_mb(config: OpConfig) -> int:
    """What the formula printed in the operator's error text gives:
    ``(m·k·topK·1)·3 + 3MB``, rounded up to MB. It is 7 MB short of :func:`hccl_required_mb`
    for every configuration (the number the text prints next to it is the check's own, §7).
    """
    return _ceil_div(_data_term(config), MIB) + MESSAGE_OVERHEAD_MB


@dataclass(frozen=True)
class HcclBuffsize:
    """The window size the operator uses, and the warning it logged to get there (or None)."""

    mb: int
    warning: str | None = None


def hccl_buffsize_from_env(environ: Mapping[str, str]) -> HcclBuffsize:
    """The operator's reading of ``HCCL_BUFFSIZE`` (MB). Never raises.

    Mirrors ``std::stoul``: leading blanks and a sign are accepted, parsing stops at the first
    non-digit, a minus sign negates modulo 2**64; no digits or a value past 2**64 - 1 is an error
    (default 200 with an error log); a value above 65535 falls back to the default with a warning
    (§7 [code]).

    >>> hccl_buffsize_from_env({"HCCL_BUFFSIZE": " 512MB"})
    HcclBuffsize(mb=512, warning=None)
    >>> hccl_buffsize_from_env({"HCCL_BUFFSIZE": "70000"}).mb
    200
    """
    raw = environ.get("HCCL_BUFFSIZE")
    if raw is None:
        return HcclBuffsize(DEFAULT_HCCL_BUFFSIZE_MB)
    text = raw.lstrip(" \t\n\v\f\r")
    sign = -1 if text[:1] == "-" else 1
    text = text[1:] if text[:1] in "+-" and text else text
    digits = text[: len(text) - len(text.lstrip("0123456789"))]
    fallback = f"using the default {DEFAULT_HCCL_BUFFSIZE_MB} MB"
    if not digits or int(digits) >= 1 << 64:
        return HcclBuffsize(DEFAULT_HCCL_BUFFSIZE_MB,
                            f"HCCL_BUFFSIZE={raw!r} is not an unsigned integer; {fallback}")
    value = (sign * int(digits)) % (1 << 64)
    if value > MAX_HCCL_BUFFSIZE_MB:
        return HcclBuffsize(DEFAULT_HCCL_BUFFSIZE_MB,
                            f"HCCL_BUFFSIZE={raw!r} is above {MAX_HCCL_BUFFSIZE_MB}; {fallback}")
    return HcclBuffsize(value)


def check_hccl_buffer(config: OpConfig, hccl_buffsize_mb: int) -> None:
    """Raise :class:`spec.HcclBufferTooSmall` where the operator's check fails (§7).

    The message states the required MB (rounded up), the given MB, the dominant term and the
    setting that fixes it; setting exactly that value passes this check.

    >>> from spec import OpConfig
    >>> cfg = OpConfig(ep_size=1, experts_per_rank=2, top_k=8, hidden=7168, intermediate=64,
    ...                tokens_per_rank=(4096,))
    >>> check_hccl_buffer(cfg, 200)
    Traceback (most recent call last):
    ...
    spec.errors.HcclBufferTooSmall: HCCL_BUFFSIZE: got 200 MB; allowed: >= 682 MB = \
M·topK·K·3 (4096·8·7168·3 = 704643072 bytes, the dominant term) + 10 MiB, rounded up. \
Fix: set HCCL_BUFFSIZE to at least 682
    """
    required = hccl_required_mb(config)
    if hccl_buffsize_mb * MIB >= hccl_required_bytes(config):
        return
    data = _data_term(config)
    dominant = "the dominant term" if data >= CHECK_OVERHEAD_BYTES else "below the 10 MiB"
    raise HcclBufferTooSmall(
        field="HCCL_BUFFSIZE", given=f"{hccl_buffsize_mb} MB",
        allowed=f">= {required} MB = M·topK·K·3 ({config.max_tokens}·{config.top_k}·"
        f"{config.hidden}·3 = {data} bytes, {dominant}) + 10 MiB, rounded up",
        fix=f"set HCCL_BUFFSIZE to at least {required}",
    )


@dataclass(frozen=True)
class Region:
    """One region of the window: where it starts, how many bytes it may use, how many it needs.
    """

    name: str
    start: int
    capacity: int
    need: int

    @property
    def over(self) -> int:
        """Bytes by which the need exceeds the capacity (0 when it fits)."""
        return max(0, self.need - self.capacity)

    def __str__(self) -> str:
        return (f"{self.name}: start {self.start}, capacity {self.capacity}, need {self.need}"
                + (f", OVER by {self.over}" if self.over else ""))


def region_needs(config: OpConfig) -> dict[str, int]:
    """Bytes each region of the window needs for one call, exact Python ints (never wrapped).

    [inferred]: region A holds ``M·topK`` send rows of stride ``K + 32`` bytes (int8 row,
    float32 scale, padding; ``K + 512`` for W4A8 [code], the variant's ``send_row_pad``); the
    scale block one float32 per row; region D ``M·topK`` combine
    rows of 2-byte out dtype; the count matrix ``EP·S`` int32 (current layout,
    :mod:`spec.layout`); the sync flags 16 ints per rank.

    >>> from spec import OpConfig
    >>> cfg = OpConfig(ep_size=1, experts_per_rank=1, top_k=1, hidden=32, intermediate=16,
    ...                tokens_per_rank=(2**25,))
    >>> region_needs(cfg)["A (dispatch send rows)"] == 2**31
    True
    """
    rows = config.max_tokens * config.top_k
    stride = count_row_stride(config.ep_size, config.experts_per_rank)
    return {
        "A (dispatch send rows)": rows * (config.hidden + config.kernel_variant.send_row_pad),
        "scale block": rows * 4,
        "D (combine rows)": rows * config.hidden * 2,
        "count matrix": config.ep_size * stride * 4,
        "sync flags": config.ep_size * 16 * 4,
    }


def window_layout(config: OpConfig, window_bytes: int) -> tuple[Region, ...]:
    """The regions of a window of ``window_bytes`` for one call (§7 layout table [code]), each
    with its need from :func:`region_needs`; the sync flags sit before the barrier counter at
    int offset 2048.
    """
    w = window_bytes
    need = region_needs(config)
    scale_start = _ceil_div(w // 3, BLOCK_BYTES) * BLOCK_BYTES
    d_start = scale_start + _FIXED_REGION_BYTES
    matrix_start = w - 2 * MIB
    place = {
        "A (dispatch send rows)": (0, w // 3),
        "scale block": (scale_start, _FIXED_REGION_BYTES),
        "D (combine rows)": (d_start, max(0, matrix_start - d_start)),
        "count matrix": (matrix_start, COUNT_REGION_BYTES),
        "sync flags": (w - MIB, 2048 * 4),
    }
    return tuple(Region(name, *place[name], need[name]) for name in place)


def int32_offset_overflows(config: OpConfig) -> list[LayoutViolation]:
    """Regions whose extent (one past the last byte, relative to the region start) exceeds
    :data:`INT32_MAX`: a kernel that computes ``row · stride`` byte offsets or their loop bound
    in int32 wraps there (edge_cases.md: vllm PR #45907, DeepEP #454, sglang #6449).

    [inferred]: the reference notes do not say which offsets ``dispatch_ffn_combine`` computes
    in int32; this marks where any would wrap. Region A is first to, at
    ``M·topK·(K + 32) >= 2**31`` (region D joins it at K = 32, where 2K = K + 32):

    >>> from spec import OpConfig
    >>> cfg = OpConfig(ep_size=1, experts_per_rank=1, top_k=1, hidden=32, intermediate=16,
    ...                tokens_per_rank=(2**25,))
    >>> [v.message.split(" spans")[0] for v in int32_offset_overflows(cfg)]
    ['region A (dispatch send rows)', 'region D (combine rows)']
    """
    return [
        LayoutViolation(
            "int32-offset",
            f"region {name} spans {need} bytes > {INT32_MAX} (M·topK = {config.max_tokens}·"
            f"{config.top_k}, K = {config.hidden}): int32 byte offsets into it wrap; compute "
            "offsets in int64 or split the call into fewer tokens per rank",
        )
        for name, need in region_needs(config).items()
        if need > INT32_MAX
    ]


@dataclass(frozen=True)
class LayoutFit:
    """Whether a window holds the layout; true when no region overflows."""

    overflows: tuple[Region, ...]

    def __bool__(self) -> bool:
        return not self.overflows

    def __str__(self) -> str:
        return "fits" if self else "; ".join(map(str, self.overflows))


def layout_fits(config: OpConfig, window_bytes: int, *, regions: tuple[str, ...] = ()) -> LayoutFit:
    """Which regions of :func:`window_layout` overflow, by how many bytes.

    ``regions`` restricts the answer to regions whose name starts with one of the given
    prefixes (default: all).

    >>> from spec import OpConfig
    >>> cfg = OpConfig(ep_size=1, experts_per_rank=1, top_k=1, hidden=32, intermediate=16,
    ...                tokens_per_rank=(109227,))
    >>> print(layout_fits(cfg, hccl_required_bytes(cfg)))
    A (dispatch send rows): start 0, capacity 6990517, need 6990528, OVER by 11
    """
    over = tuple(
        r for r in window_layout(config, window_bytes)
        if r.over and (not regions or r.name.startswith(regions))
    )
    return LayoutFit(over)


def _mc2_shape(profile: Profile, shape: Shape) -> None:
    violations = check_supported(shape, profile)
    if violations:
        raise violations[0].error


def mc2_v1_a3_required_mb(*, batch: int, hidden: int, top_k: int, ep_size: int,
                          experts_per_rank: int) -> int:
    """Smallest ``HCCL_BUFFSIZE`` (MB) for ``npu_moe_distribute_dispatch`` V1 on A3 [doc]:
    ``1024²·(HCCL_BUFFSIZE − 2)/2 ≥ BS·2·(H+128)·(EP·E_local + K + 1)``.

    Raises :class:`spec.ConfigError` outside that operator's limits (:data:`MC2_V1_A3`).

    >>> mc2_v1_a3_required_mb(batch=512, hidden=7168, top_k=8, ep_size=32, experts_per_rank=8)
    3779
    """
    _mc2_shape(MC2_V1_A3, Shape(ep_size=ep_size, experts_per_rank=experts_per_rank,
                                top_k=top_k, hidden=hidden, batch=batch))
    need = batch * 2 * (hidden + 128) * (ep_size * experts_per_rank + top_k + 1)
    return 2 + _ceil_div(2 * need, MIB)


def mc2_v1_a2_required_mb(*, batch: int, hidden: int, top_k: int, ep_size: int,
                          experts_per_rank: int) -> int:
    """Smallest ``HCCL_BUFFSIZE`` (MB) for ``npu_moe_distribute_dispatch`` V1 on A2 [doc]:
    ``HCCL_BUFFSIZE ≥ 2·(BS·EP·min(E_local, K)·H·2 B + 2 MB)``.

    >>> mc2_v1_a2_required_mb(batch=256, hidden=7168, top_k=8, ep_size=16, experts_per_rank=16)
    900
    """
    _mc2_shape(MC2_V1_A2, Shape(ep_size=ep_size, experts_per_rank=experts_per_rank,
                                top_k=top_k, hidden=hidden, batch=batch))
    data = batch * ep_size * min(experts_per_rank, top_k) * hidden * 2
    return _ceil_div(2 * (data + 2 * MIB), MIB)


def mc2_v2_a3_required_mb(*, batch: int, hidden: int, top_k: int, ep_size: int,
                          experts_per_rank: int, shared_experts: int = 0) -> int:
    """Smallest ``HCCL_BUFFSIZE`` (MB) for ``npu_moe_distribute_dispatch_v2`` on A3 [doc]:
    ``2·(E_local·maxBs·EP·Align512(Align32(2H) + 64) + (K + shared)·maxBs·Align512(2H))`` bytes.

    >>> mc2_v2_a3_required_mb(batch=256, hidden=7168, top_k=8, ep_size=64, experts_per_rank=4)
    1912
    """
    _mc2_shape(MC2_V2_A3, Shape(ep_size=ep_size, experts_per_rank=experts_per_rank,
                                top_k=top_k, hidden=hidden, batch=batch))

    def align(value: int, unit: int) -> int:
        return _ceil_div(value, unit) * unit

    dispatch = experts_per_rank * batch * ep_size * align(align(2 * hidden, 32) + 64, 512)
    combine = (top_k + shared_experts) * batch * align(2 * hidden, 512)
    return _ceil_div(2 * (dispatch + combine), MIB)

