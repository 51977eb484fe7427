"""Platform profiles: the limits of one kernel on one platform, each with its source.

:class:`spec.Problem` validation stays platform-neutral; whether a shape runs on a given kernel
is a separate question answered here (reference notes §9). :func:`check_supported` returns every
violated limit, each carrying a :class:`spec.ConfigError` (built, not raised) in the one message
template, so a caller can list them all or raise the first.

>>> from spec import OpConfig
>>> cfg = OpConfig(ep_size=4, experts_per_rank=2, top_k=2, hidden=4096, intermediate=14336,
...                tokens_per_rank=(8,) * 4)
>>> [v.limit.name for v in check_supported(cfg, A3_W8A8)]
['n <= hidden']
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from spec.config import OpConfig
from spec.errors import ConfigError
from spec.layout import COUNT_REGION_BYTES, count_row_stride
from spec.problem import Problem
from spec.scale_layout import first_non_ue8m0, with_ue8m0_scales

__all__ = [
    "A2_W8A8",
    "A3_DOMAIN",
    "A3_W8A8",
    "CONTRACT_DOMAIN",
    "MAX_HIDDEN_A3",
    "MC2_V1_A2",
    "MC2_V1_A3",
    "MC2_V2_A3",
    "MODEL_PRESETS",
    "PROFILES",
    "REAL_MODELS",
    "VECTOR_CORES",
    "VLLM_DOMAIN",
    "Limit",
    "LimitViolation",
    "ModelShape",
    "Profile",
    "Shape",
    "ShapeDomain",
    "check_supported",
    "models_hitting",
]

#: Hidden sizes above about 9000 trap in the quantising gather; 7168 is special-cased
#: (§9 [inferred]).
MAX_HIDDEN_A3 = 9000

#: Vector (AIV) cores per die, ``n_aiv = 2·blockDim``: each serves the peers ``p ≡ core (mod
#: n_aiv)`` (variants.md, "The per-core peer offset" [doc]). A launch with a core limit has
#: fewer [inferred]; :class:`spec.protocol.PeerSchedule` takes ``n_aiv`` as a parameter.
VECTOR_CORES = {"Atlas A3 die": 48, "Ascend 910B3": 40}


@dataclass(frozen=True, kw_only=True)
class Shape:
    """The sizes a platform limit depends on. Unlike :class:`OpConfig`, EP is not capped, so the
    MC2 profiles (EP up to 768) can be checked too; ``batch`` is the largest tokens-per-rank."""

    ep_size: int
    experts_per_rank: int
    top_k: int
    hidden: int
    intermediate: int = 0
    batch: int = 0

    @classmethod
    def of(cls, config: OpConfig) -> Shape:
        """The shape of a configuration."""
        return cls(
            ep_size=config.ep_size, experts_per_rank=config.experts_per_rank,
            top_k=config.top_k, hidden=config.hidden, intermediate=config.intermediate,
            batch=config.max_tokens,
        )


@dataclass(frozen=True)
class Limit:
    """One limit: ``holds(shape)``; ``field``/``value`` name what is reported when it fails."""

    name: str
    field: str
    value: Callable[[Shape], int]
    holds: Callable[[Shape], bool]
    allowed: str
    fix: str
    source: str


@dataclass(frozen=True)
class LimitViolation:
    """A limit a shape breaks, with the error a caller can raise or print."""

    limit: Limit
    value: int
    error: ConfigError

    def __str__(self) -> str:
        return str(self.error)


@dataclass(frozen=True)
class Profile:
    """A named table of limits (one kernel on one platform)."""

    name: str
    description: str
    limits: tuple[Limit, ...]


def _bound(field: str, get: Callable[[Shape], int], low: int, high: int, source: str) -> Limit:
    name = f"{field} <= {high}" if low <= 1 else f"{low} <= {field} <= {high}"
    return Limit(name, field, get, lambda s: low <= get(s) <= high, f"{low}..{high}",
                 f"use {field} in {low}..{high}", source)


def _member(field: str, get: Callable[[Shape], int], allowed: tuple[int, ...],
            source: str) -> Limit:
    listed = ", ".join(map(str, allowed))
    return Limit(f"{field} in {{{listed}}}", field, get, lambda s: get(s) in allowed,
                 f"one of {listed}", f"choose {field} from {listed}", source)


def _ep(s: Shape) -> int:
    return s.ep_size


def _e(s: Shape) -> int:
    return s.experts_per_rank


def _k(s: Shape) -> int:
    return s.hidden


def _top_k(s: Shape) -> int:
    return s.top_k


def _batch(s: Shape) -> int:
    return s.batch


def _n(s: Shape) -> int:
    return 2 * s.intermediate


def _count_matrix_bytes(s: Shape) -> int:
    return 4 * s.ep_size * count_row_stride(s.ep_size, s.experts_per_rank)


A3_W8A8 = Profile(
    "a3-w8a8",
    "vllm-ascend dispatch_ffn_combine, W8A8 kernel on Atlas A3 (main at PR #8560)",
    (
        _bound("ep_size", _ep, 1, 32, "Python guard, PR #5787 'enable ep32' (PR #5156: 16)"),
        _bound("ep_size", _ep, 1, 40, "peers are indexed by vector core id, ~40 cores "
               "[inferred]"),
        Limit("hidden % 32 == 0", "hidden", _k, lambda s: s.hidden % 32 == 0,
              "a multiple of 32", "pad the hidden size to a multiple of 32", "§9 [inferred]"),
        Limit(f"hidden <= {MAX_HIDDEN_A3}", "hidden", _k,
              lambda s: s.hidden <= MAX_HIDDEN_A3 or s.hidden == 7168,
              f"<= {MAX_HIDDEN_A3} (7168 is special-cased)",
              "use a smaller hidden size or another kernel",
              "the quantising gather traps above ~9000, §9 [inferred]"),
        Limit("n <= hidden", "n = 2·intermediate", _n, lambda s: _n(s) <= s.hidden,
              "<= hidden", "use intermediate <= hidden / 2, or another kernel",
              "PR #9528: GMM1's output reuses a buffer of row stride K [inferred]"),
        Limit("experts_per_rank >= 2", "experts_per_rank", _e, lambda s: s.experts_per_rank >= 2,
              ">= 2", "place at least 2 experts per rank (E = 1 makes the epilogue "
              "granularity 0: SwiGLU never runs)", "§9 [inferred]"),
        Limit("count matrix <= 1 MiB", "count matrix bytes (EP·AlignUp(EP·E + 1, 128)·4)",
              _count_matrix_bytes, lambda s: _count_matrix_bytes(s) <= COUNT_REGION_BYTES,
              f"<= {COUNT_REGION_BYTES}", "use fewer experts per rank", "§8 [inferred]"),
    ),
)

A2_W8A8 = Profile(
    "a2-w8a8",
    "dispatch_ffn_combine on Atlas A2 (PR #13426, unmerged)",
    (
        _bound("ep_size", _ep, 1, 8, "PR #13426"),
        Limit("experts_per_rank >= 3", "experts_per_rank", _e, lambda s: s.experts_per_rank >= 3,
              ">= 3", "place at least 3 experts per rank", "PR #13426"),
    ),
)

MC2_V1_A3 = Profile(
    "mc2-v1-a3",
    "CANN npu_moe_distribute_dispatch V1 on Atlas A3",
    (
        Limit("hidden == 7168", "hidden", _k, lambda s: s.hidden == 7168, "7168",
              "use H = 7168", "CANN docs [doc]"),
        _bound("batch", _batch, 1, 512, "CANN docs [doc]"),
        _bound("top_k", _top_k, 1, 8, "CANN docs [doc]"),
        _member("ep_size", _ep, (8, 16, 32, 64, 128, 144, 256, 288), "CANN docs [doc]"),
        _bound("experts (EP·E)", lambda s: s.ep_size * s.experts_per_rank, 1, 512,
               "CANN docs [doc]"),
    ),
)

MC2_V1_A2 = Profile(
    "mc2-v1-a2",
    "CANN npu_moe_distribute_dispatch V1 on Atlas A2",
    (
        Limit("hidden <= 7168, % 32 == 0", "hidden", _k,
              lambda s: s.hidden <= 7168 and s.hidden % 32 == 0, "a multiple of 32 <= 7168",
              "use a hidden size that is a multiple of 32 and at most 7168", "CANN docs [doc]"),
        _bound("batch", _batch, 1, 256, "CANN docs [doc]"),
        _bound("top_k", _top_k, 1, 16, "CANN docs [doc]"),
        _member("ep_size", _ep, (16, 32, 64), "CANN docs [doc]"),
    ),
)

MC2_V2_A3 = Profile(
    "mc2-v2-a3",
    "CANN npu_moe_distribute_dispatch_v2 on Atlas A3",
    (
        _bound("ep_size", _ep, 2, 768, "CANN docs [doc]"),
        _bound("hidden", _k, 1024, 8192, "CANN docs [doc]"),
        _bound("top_k", _top_k, 1, 16, "CANN docs [doc]"),
    ),
)

#: Every profile by name.
PROFILES: dict[str, Profile] = {
    p.name: p for p in (A3_W8A8, A2_W8A8, MC2_V1_A3, MC2_V1_A2, MC2_V2_A3)
}


def check_supported(config: OpConfig | Shape, profile: Profile) -> list[LimitViolation]:
    """Every limit of ``profile`` the shape breaks; empty when the kernel supports it.

    Each violation's message names the limit, the value and the source:

    >>> shape = Shape(ep_size=64, experts_per_rank=4, top_k=8, hidden=7168, intermediate=2048)
    >>> print(check_supported(shape, A3_W8A8)[0])
    ep_size: got 64; allowed: 1..32 (limit 'ep_size <= 32', Python guard, PR #5787 'enable \
ep32' (PR #5156: 16)). Fix: use ep_size in 1..32
    """
    shape = config if isinstance(config, Shape) else Shape.of(config)
    found = []
    for limit in profile.limits:
        if limit.holds(shape):
            continue
        value = limit.value(shape)
        error = ConfigError(
            field=limit.field, given=str(value),
            allowed=f"{limit.allowed} (limit {limit.name!r}, {limit.source})", fix=limit.fix,
        )
        found.append(LimitViolation(limit, value, error))
    return found


@dataclass(frozen=True)
class ShapeDomain:
    """The calls one kernel can run: the shapes of its platform profile (``limits``, a name in
    :data:`PROFILES`) and the features it implements. A kernel profile carries one, and the
    strategies generate inside it, so every counterexample is runnable on that kernel.

    :meth:`fit` maps any configuration to one inside the domain by the smallest change of
    each field (hidden rounded up to the multiple, E raised to the minimum, I lowered to
    ``hidden/2`` where ``N <= K``, then rounded up to its multiple, EP capped, features
    dropped); :meth:`fit_problem` maps a problem's values (UE8M0 scales). Both are
    deterministic maps, so Hypothesis still shrinks through them.
    """

    name: str
    hidden_multiple: int = 1
    max_hidden: int | None = None
    min_experts_per_rank: int = 1
    n_at_most_hidden: bool = False
    max_ep: int | None = None
    truncation: bool = True
    masks: bool = True
    clamp: bool = True
    oai: bool = True
    #: Placed calls (replicas, shared experts, rsf, weights on the input, int64 or -1 ids:
    #: spec.placement); the Ascend operator takes none of them (placement.md).
    placement: bool = True
    #: The token dtypes the kernel takes (``None``: every one of ``X_DTYPES``); torch's FP8
    #: grouped GEMM writes bfloat16 only.
    x_dtypes: tuple[str, ...] | None = None
    #: I a multiple of this (the rows of W2, the columns of each half of W1).
    intermediate_multiple: int = 1
    #: The kernel's block and channel scales are UE8M0, powers of two (DeepGEMM on Blackwell
    #: packs them four to an int32: spec.scale_layout's "packed-ue8m0"); :meth:`fit_problem`
    #: rounds float32 scales up to them.
    ue8m0_scales: bool = False
    limits: str | None = None
    sources: str = ""

    def describe(self) -> str:
        parts = [self.name]
        if self.hidden_multiple > 1:
            parts.append(f"K % {self.hidden_multiple} == 0")
        if self.max_hidden is not None:
            parts.append(f"K <= {self.max_hidden}")
        if self.intermediate_multiple > 1:
            parts.append(f"I % {self.intermediate_multiple} == 0")
        if self.min_experts_per_rank > 1:
            parts.append(f"E >= {self.min_experts_per_rank}")
        if self.n_at_most_hidden:
            parts.append("N <= K")
        if self.max_ep is not None:
            parts.append(f"EP <= {self.max_ep}")
        if self.x_dtypes is not None:
            parts.append(f"x {' or '.join(self.x_dtypes)}")
        if self.ue8m0_scales:
            parts.append("scales UE8M0 (powers of two)")
        parts += [f"no {f}" for f, on in (("truncation", self.truncation), ("masks", self.masks),
                                          ("clamp", self.clamp), ("SwigluOAI", self.oai),
                                          ("placement", self.placement))
                  if not on]
        return ", ".join(parts) + (f" ({self.sources})" if self.sources else "")

    def violations(self, given: OpConfig | Problem) -> list[str]:
        """What puts ``given`` (a configuration, or a problem: its configuration and its
        values) outside the domain, one phrase each (empty: inside)."""
        config = given.config if isinstance(given, Problem) else given
        found = []
        k, e, i = config.hidden, config.experts_per_rank, config.intermediate
        if k % self.hidden_multiple:
            found.append(f"hidden {k} is not a multiple of {self.hidden_multiple}")
        if i % self.intermediate_multiple:
            found.append(f"intermediate {i} is not a multiple of {self.intermediate_multiple}")
        if self.max_hidden is not None and k > self.max_hidden:
            found.append(f"hidden {k} > {self.max_hidden}")
        if e < self.min_experts_per_rank:
            found.append(f"experts_per_rank {e} < {self.min_experts_per_rank}")
        if self.n_at_most_hidden and 2 * i > k:
            found.append(f"N = {2 * i} > hidden {k}")
        if self.max_ep is not None and config.ep_size > self.max_ep:
            found.append(f"ep_size {config.ep_size} > {self.max_ep}")
        if self.x_dtypes is not None and config.x_dtype not in self.x_dtypes:
            found.append(f"x_dtype {config.x_dtype} is not {' or '.join(self.x_dtypes)}")
        if not self.truncation and config.max_output_size is not None:
            found.append("max_output_size given (the kernel has no receive buffer)")
        if not self.masks and config.masked:
            found.append("active_mask given")
        if not self.clamp and config.swiglu_limit is not None:
            found.append("swiglu_limit given")
        if not self.oai and config.swiglu_alpha is not None:
            found.append("swiglu_alpha given")
        if self.limits is not None:
            found += [str(v.error) for v in check_supported(config, PROFILES[self.limits])]
        off = (first_non_ue8m0(given) if self.ue8m0_scales and isinstance(given, Problem)
               else None)
        if off is not None:
            found.append(f"scales not UE8M0 ({off})")
        return found

    def fit(self, config: OpConfig) -> OpConfig:
        """The configuration inside the domain nearest to ``config`` (see the class doc)."""
        k = -(-config.hidden // self.hidden_multiple) * self.hidden_multiple
        if self.max_hidden is not None and k > self.max_hidden:
            k = self.max_hidden // self.hidden_multiple * self.hidden_multiple
        i = min(config.intermediate, k // 2) if self.n_at_most_hidden else config.intermediate
        i = -(-i // self.intermediate_multiple) * self.intermediate_multiple
        ep = config.ep_size if self.max_ep is None else min(config.ep_size, self.max_ep)
        e = max(config.experts_per_rank, self.min_experts_per_rank)
        x, w = config.x_dtype, config.weight_dtype
        if self.x_dtypes is not None and x not in self.x_dtypes:  # weights in x's dtype follow
            x, w = self.x_dtypes[0], self.x_dtypes[0] if w == x else w
        return replace(
            config, hidden=k, intermediate=max(i, 1), ep_size=ep, experts_per_rank=e,
            x_dtype=x, weight_dtype=w,
            tokens_per_rank=config.tokens_per_rank[len(config.tokens_per_rank) - ep:],
            weight_form=config.weight_form if e > 1 else "stacked",
            max_output_size=config.max_output_size if self.truncation else None,
            masked=config.masked and self.masks,
            swiglu_limit=config.swiglu_limit if self.clamp else None,
            swiglu_alpha=config.swiglu_alpha if self.oai else None,
        )

    def fit_problem(self, problem: Problem) -> Problem:
        """``problem``'s values inside the domain: its float32 scales rounded up to powers of
        two where the kernel takes UE8M0 scales (:func:`spec.scale_layout.with_ue8m0_scales`),
        else ``problem`` itself. Its configuration is :meth:`fit`'s to make: the strategies map
        the drawn configuration, then the drawn problem, so Hypothesis shrinks through both."""
        return with_ue8m0_scales(problem) if self.ue8m0_scales else problem


#: The whole contract: every call :class:`spec.Problem` accepts.
CONTRACT_DOMAIN = ShapeDomain("contract")
#: The A3 kernel's shapes (§9): K a multiple of 32 and at most ~9000, E >= 2, N <= K, EP <= 32,
#: and every limit of :data:`A3_W8A8`. No SwigluOAI: its ``swiglu_alpha`` is an open PR
#: (#11916), so a kernel at HEAD is not asked for it (``--dfc-domain contract`` generates it).
A3_DOMAIN = ShapeDomain(
    "a3", hidden_multiple=32, max_hidden=MAX_HIDDEN_A3, min_experts_per_rank=2,
    n_at_most_hidden=True, max_ep=32, oai=False, placement=False, limits="a3-w8a8",
    sources="dispatch_ffn_combine.md §9; PR #5787, PR #9528; placement.md [inferred]",
)
#: vLLM's fused_moe has no receive buffer (no truncation) and no SwiGLU clamp; masked tokens
#: route nowhere (kernels.md, last row). Its "swigluoai" activation reads gate and up
#: interleaved, not as this call's halves, so the profile takes no swiglu_alpha [inferred].
VLLM_DOMAIN = ShapeDomain(
    "vllm", truncation=False, clamp=False, oai=False, sources="kernels.md [code]",
)


@dataclass(frozen=True)
class ModelShape:
    """A public MoE model's shape (``docs/contract/models.md``)."""

    name: str
    hidden: int
    intermediate: int
    experts: int
    top_k: int

    def shape(self, ep_size: int) -> Shape:
        """The per-rank shape at ``ep_size`` ranks (experts split evenly)."""
        if self.experts % ep_size:
            raise ConfigError(
                field="ep_size", given=str(ep_size),
                allowed=f"a divisor of {self.name}'s {self.experts} experts",
                fix="choose an EP size that divides the expert count",
            )
        return Shape(ep_size=ep_size, experts_per_rank=self.experts // ep_size,
                     top_k=self.top_k, hidden=self.hidden, intermediate=self.intermediate)

    @property
    def key(self) -> str:
        """The preset's name on the command line: ``"deepseek-v3"``, ``"qwen3-30b-a3b"``."""
        return self.name.split("/")[0].lower().replace(" ", "-")

    def gate_shape(self, *, ep_size: int = 2, min_experts_per_rank: int = 1) -> Shape:
        """The gate's fixed shape of this model: its K, I and top_k on ``ep_size`` ranks,
        each holding the fewest experts that still give every token top_k distinct ones
        (at least ``min_experts_per_rank``, a kernel's own floor). The expert count is cut
        because the weights are: DeepSeek-V3's 256 int8 experts are 11 GB; 8 of them are
        352 MB. What the real count changes, the routing's spread over ranks, the small
        shapes of the search test."""
        per_rank = max(-(-self.top_k // ep_size), min_experts_per_rank)
        return Shape(ep_size=ep_size, experts_per_rank=per_rank, top_k=self.top_k,
                     hidden=self.hidden, intermediate=self.intermediate)


#: The table of models.md (K, I, routed experts, top-k).
REAL_MODELS = (
    ModelShape("DeepSeek-V3/R1", 7168, 2048, 256, 8),
    ModelShape("Kimi K2", 7168, 2048, 384, 8),
    ModelShape("Qwen3-235B-A22B", 4096, 1536, 128, 8),
    ModelShape("Qwen3-30B-A3B", 2048, 768, 128, 8),
    ModelShape("Qwen3-Coder-480B-A35B", 6144, 2560, 160, 8),
    ModelShape("Qwen1.5-MoE-A2.7B", 2048, 1408, 60, 4),
    ModelShape("GLM-4.5", 5120, 1536, 160, 8),
    ModelShape("GLM-4.5-Air", 4096, 1408, 128, 8),
    ModelShape("Mixtral-8x7B", 4096, 14336, 8, 2),
    ModelShape("gpt-oss-120b", 2880, 2880, 128, 4),
    ModelShape("gpt-oss-20b", 2880, 2880, 32, 4),
    ModelShape("Llama-4-Scout", 5120, 8192, 16, 1),
)
#: The gate's model-shape presets by key (``--dfc-shapes qwen3-30b-a3b,deepseek-v3``).
MODEL_PRESETS = {m.key: m for m in REAL_MODELS}


def models_hitting(profile: Profile, *, ep_size: int = 4) -> dict[str, list[str]]:
    """Which real models break each limit of ``profile`` at ``ep_size`` ranks.

    Maps a limit name to ``"model: message"`` lines (limits no model hits are absent). The
    default EP = 4 divides every expert count of models.md.

    >>> models_hitting(A3_W8A8)["n <= hidden"][0].split(":")[0]
    'Qwen1.5-MoE-A2.7B'
    """
    hits: dict[str, list[str]] = {}
    for model in REAL_MODELS:
        for violation in check_supported(model.shape(ep_size), profile):
            hits.setdefault(violation.limit.name, []).append(f"{model.name}: {violation}")
    return hits
