"""Hypothesis strategies for ``dispatch_ffn_combine`` calls: the inputs that broke real kernels.

Structure first, then data. :func:`configs` draws the shape of a call; :func:`problems` draws the
routing family, special token rows, routing weights, masks and capacity edges as explicit choices
(so each shrinks away when it does not matter), then fills the bulk arrays from a NumPy generator
seeded by one drawn integer (large arrays stay cheap and shrink by their seed). Everything is
valid by construction: no ``assume`` and no ``filter``.

Each family is labelled with :func:`hypothesis.event`, so ``--hypothesis-show-statistics`` shows
what a run covered. The families come from ``docs/contract/edge_cases.md``.

>>> from hypothesis import given
>>> @given(problems(configs=configs(ep_sizes=st.just(2))))
... def test_two_ranks(problem):
...     assert problem.config.ep_size == 2
>>> test_two_ranks()
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
from hypothesis import event
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from spec.config import MAX_EP_SIZE, OpConfig
from spec.fields import VARIANTS, Selection, variant_for
from spec.limits import CONTRACT_DOMAIN, REAL_MODELS, ShapeDomain
from spec.memory import LAYOUTS
from spec.problem import DTYPES, Problem
from spec.synth import TILE_TAGGED, normal_tokens, random_problem, softmax_probs, uniform_routing

__all__ = [
    "BLOCK_ROW_FAMILIES",
    "CAPACITY_FAMILIES",
    "COUNT_ONLY",
    "FEW_TOKENS",
    "FP8_ROW_FAMILIES",
    "MASK_FAMILIES",
    "POWER_ROW_FAMILIES",
    "PROBS_FAMILIES",
    "ROUTING_FAMILIES",
    "ROW_FAMILIES",
    "SWIGLU_ALPHAS",
    "TOKEN_FAMILIES",
    "RoutingPlan",
    "RowPlan",
    "configs",
    "problems",
    "routings",
    "token_rows",
]

#: Routing families, simplest first (Hypothesis shrinks towards the first).
ROUTING_FAMILIES = (
    "uniform",  # distinct uniform ids per token, as a real top-k router gives
    "one_expert",  # every slot to one expert: duplicates within every token (vllm-xpu-kernels #453)
    "one_rank",  # every slot to the experts of one rank
    "zipf",  # Zipf-skewed expert popularity (DeepEP #427)
    "empty_experts",  # only a few experts receive anything
    "empty_rank",  # one rank's experts receive nothing
    "duplicates",  # one id repeated 2..top_k times within every token (vllm PR #39391)
    "balanced",  # slots round-robin over ranks: every rank receives within one row of the rest
)
#: Special token rows planted into otherwise normal data (§6 numerics edges).
ROW_FAMILIES = ("normal", "zero_row", "tiny_row", "large_row", "outlier", "ties", "mixed")
#: Token rows that give the ideal judge (``numerics="ideal"``) something to see of a defect in
#: the activation quantisation, drawn beside :data:`ROW_FAMILIES` by its default search and the
#: gate's family tests: every row's amax 10^0..10^-3 of the largest one's (a per-tensor scale
#: leaves the small rows a few int8 levels, or none). Outlier channels and quotients placed
#: just below integers were measured too and caught nothing more (benchmarks/OWN_PROFILE.md).
POWER_ROW_FAMILIES = ("varied_norms",)
#: Token rows for block-scaled activations (MXFP8, FP8 groups), drawn where a search asks for
#: them (``token_rows(families=...)``): every row's blocks of the variant's group width (32
#: without one) after the first cycle through zero, amax below the amax epsilons 1e-10 and 1e-4
#: (2^-34, 2^-14), exact e4m3 ties under the scale 2^-6, and a hot block (16x), shifted by one
#: block per row so that rows' scales differ, and every other row 2^-12 times smaller (a scale
#: shared across rows leaves it two bits or none) (:meth:`RowPlan.plant`).
BLOCK_ROW_FAMILIES = ("scale_blocks",)
#: Token rows that FP8 activation scales need, drawn beside :data:`ROW_FAMILIES` by the default
#: search of a profile with an FP8 variant: one token 2^21 times louder than a normal row
#: (bf16 x). e4m3's normals span 2^15 and its subnormals three binades more, so one scale
#: shared with a louder token (a per-tensor scale instead of one per token) crushes a row only
#: past about 2^19 of its amax (benchmarks/FP8_POWER.md: 2^10 and 2^15 are not seen); float16
#: x holds no such row and gets :data:`ROW_FAMILIES`' large row.
FP8_ROW_FAMILIES = ("loud_row",)
PROBS_FAMILIES = ("softmax", "ties", "zeros", "negative", "unnormalised")
MASK_FAMILIES = ("random", "all_active", "one_rank_masked", "none_active")
#: ``max_output_size`` against the busiest rank's received rows R: R, R − 1, R + 1, or the
#: configuration's drawn value (often 0 or a few rows: most tokens lose a slot).
CAPACITY_FAMILIES = ("at_capacity", "one_past", "one_spare", "as_drawn")
#: Token counts per rank: as drawn (ragged), some ranks empty beside busy ones, all ranks but
#: one empty, one small M on every rank (1, odd, below the 20/40 vector cores: vllm-ascend
#: #9983, PR #9992), every rank empty.
TOKEN_FAMILIES = ("ragged", "some_empty", "one_busy", "few_tokens", "all_empty")
#: The families after which no output row is defined (only the counts are judged): drawn
#: rarely, so that >= 90 % of default draws judge at least one row (issue 15), and last, so
#: that they shrink away when the failure does not need them.
COUNT_ONLY = {"tokens": "all_empty", "mask": "none_active", "capacity": "as_drawn"}
#: Each common family is drawn this many times as often as a count-only one.
_COMMON_WEIGHT = 10
#: M of the ``few_tokens`` family: 1, small odd counts, and just below 20 and 40 (the vector
#: core counts of A2 and A3, where a core gets no token: vllm-ascend PR #9992 [inferred]).
FEW_TOKENS = (1, 3, 5, 7, 19, 39)
#: SwigluOAI's ``swiglu_alpha`` (open PR #11916), simplest first: not passed; 0 and negative
#: (standard SwiGLU: α is a mode switch); gpt-oss's 1.702; 1.0 (the PR's Python default
#: [inferred]); a small and a large α. W8A8 only; no kernel profile's domain has it yet.
SWIGLU_ALPHAS = (None, 0.0, -1.0, 1.702, 1.0, 0.25, 8.0)


def _mostly(families: tuple[str, ...], rare: str) -> st.SearchStrategy[str]:
    """``families`` with ``rare`` drawn about 1 time in ``_COMMON_WEIGHT · (len − 1) + 1``;
    shrinks to ``families[0]``. ``rare`` sits in the middle: Hypothesis favours the ends of
    a range, which made a last entry several times more frequent than its share."""
    common = tuple(f for f in families if f != rare) * (_COMMON_WEIGHT // 2)
    return st.sampled_from((*common, rare, *common))


def _require_strategy(name: str, value: object) -> None:
    if not isinstance(value, st.SearchStrategy):
        raise InvalidArgument(
            f"{name}={value!r} must be a Hypothesis strategy; wrap a fixed value as st.just(...)"
        )


# Built once: a strategy constructed inside every draw costs validation each time.
_TOP_K_FAMILIES = st.sampled_from(("drawn", "one", "equals_E", "above_E"))
_TOKEN_FAMILIES = _mostly(TOKEN_FAMILIES, COUNT_ONLY["tokens"])
_FEW_TOKENS = st.sampled_from(FEW_TOKENS)
_SWIGLU_ALPHAS = st.sampled_from(SWIGLU_ALPHAS)
_RANK_INDEX = st.integers(0, MAX_EP_SIZE - 1)
_CAPACITY = st.integers(0, 64)
_PROBS = st.sampled_from(PROBS_FAMILIES)
_MASKS = _mostly(MASK_FAMILIES, COUNT_ONLY["mask"])
_CAPACITIES = _mostly(CAPACITY_FAMILIES, COUNT_ONLY["capacity"])
_SEEDS = st.integers(0, 2**32 - 1)


def _known_name(owner: str, keyword: str, name: str, allowed: tuple[str, ...]) -> str:
    """``name``, drawn from the argument ``keyword`` of ``owner``; an unknown one (``"zipff"``)
    is an InvalidArgument, not a silent fallback to another family."""
    if name not in allowed:
        raise InvalidArgument(f"{owner}({keyword}=...) drew {name!r}; {keyword} must be names "
                              f"from {', '.join(allowed)}")
    return name


def _known_families(
    owner: str, families: object, allowed: tuple[str, ...]
) -> st.SearchStrategy[str]:
    """``families`` checked at every draw (:func:`_known_name`)."""
    _require_strategy("families", families)
    assert isinstance(families, st.SearchStrategy)
    return families.map(lambda name: _known_name(owner, "families", name, allowed))


def _or(given: st.SearchStrategy[Any] | None, default: st.SearchStrategy[Any]) -> Any:
    return given if given is not None else default


def _draw_int_in(draw: Any, strategy: st.SearchStrategy[int], name: str, lo: int, hi: int) -> int:
    value = draw(strategy)
    if not isinstance(value, int) or not lo <= value <= hi:
        raise InvalidArgument(f"{name} drew {value!r}; every draw must be an int in [{lo}, {hi}]")
    return value


def _token_family(family: str, counts: list[int], pick: int, few: int) -> tuple[list[int], str]:
    """The counts of ``family`` and the family they really show: at EP = 1 "some_empty" and
    "one_busy" are plain ragged counts (emptying the only rank would leave no row to judge)."""
    ep = len(counts)
    if family == "few_tokens":
        return [few] * ep, family
    if family == "all_empty":
        return [0] * ep, family
    if ep == 1 or family == "ragged":
        return counts, "ragged"
    if family == "some_empty":  # ragged, with every other rank from ``pick`` on empty
        return [0 if (r - pick) % 2 == 0 else m for r, m in enumerate(counts)], family
    return [counts[-1] if r == pick else 0 for r in range(ep)], family  # one_busy


@st.composite
def _small_configs(
    draw: Any,
    *,
    ep_sizes: st.SearchStrategy[int],
    experts_per_rank: st.SearchStrategy[int],
    top_k: st.SearchStrategy[int],
    hidden: st.SearchStrategy[int],
    intermediate: st.SearchStrategy[int],
    tokens_per_rank: st.SearchStrategy[int],
    x_dtypes: st.SearchStrategy[str],
    weight_dtypes: st.SearchStrategy[str],
    scale_dims: st.SearchStrategy[int | None],
    act_schemes: st.SearchStrategy[str | None] | None,
    weight_forms: st.SearchStrategy[str],
    masked: st.SearchStrategy[bool],
    truncation: st.SearchStrategy[bool],
    swiglu_limits: st.SearchStrategy[float | None],
    swiglu_alphas: st.SearchStrategy[float | None],
    edges: frozenset[str],
    domain: ShapeDomain,
    activation_scales: st.SearchStrategy[bool] | None = None,
) -> OpConfig:
    # Every choice is drawn whether or not it is used, so that shrinking one choice (a family,
    # an EP size) never shifts the meaning of the choices after it. EP·E around 128 (the
    # count-row boundary, §8) is not a family here: a family that overrides EP and E leaves
    # the drawn ones unused, and the shrinker cannot leave it (a g % EP bug stayed at EP=16);
    # ask for it with ep_sizes/experts_per_rank, as the bundled gate does.
    ep = _draw_int_in(draw, ep_sizes, "ep_sizes", 1, MAX_EP_SIZE)
    e = _draw_int_in(draw, experts_per_rank, "experts_per_rank", 1, 4096)
    top_k_family = draw(_TOP_K_FAMILIES)
    k = _draw_int_in(draw, top_k, "top_k", 1, 64)
    if "top_k" in edges:
        k = {"drawn": k, "one": 1, "equals_E": e, "above_E": e + 1}[top_k_family]
        event(f"top_k: {top_k_family}")
    tokens_family = draw(_TOKEN_FAMILIES)
    # The ranks take the *last* EP of 32 drawn counts: the shrinker zeroes choices from the
    # left, so the count that makes a failure ends up last, and it stays in the call (as the
    # last rank) while EP shrinks to 1.
    counts = [_draw_int_in(draw, tokens_per_rank, "tokens_per_rank", 0, 1 << 20)
              for _ in range(MAX_EP_SIZE)][MAX_EP_SIZE - ep:]
    pick = draw(_RANK_INDEX) % ep
    few = draw(_FEW_TOKENS)
    if "tokens" in edges:
        counts, tokens_family = _token_family(tokens_family, counts, pick, few)
        event(f"tokens: {tokens_family}")
    x_dtype = draw(x_dtypes)
    w_dtype = draw(weight_dtypes)
    dims = draw(scale_dims)
    scheme = draw(act_schemes) if act_schemes is not None else None  # no draw unless asked
    # drawn only when asked for: the searches that never ask keep their streams
    act = draw(activation_scales) if activation_scales is not None else False
    variant = variant_for(Selection(w_dtype, x_dtype, dims, act, scheme), strict=False)
    if variant is None:  # the float variant's weights are in x's dtype
        variant = variant_for(Selection(x_dtype, x_dtype))
        assert variant is not None
    form = draw(weight_forms)
    truncate = draw(truncation)
    cap = draw(_CAPACITY) % max(1, sum(counts) * k + 1)
    limit = draw(swiglu_limits)
    is_masked = draw(masked)
    k_hidden, i_size = draw(hidden), draw(intermediate)
    packing = max(spec.packing for spec in variant.lists.values())
    if packing > 1:  # W4A8 packs K and N = 2I eight to a word and needs N <= K
        if k_hidden % packing:
            variant = VARIANTS[0]  # W8A8
        else:
            i_size = max(packing // 2, min(i_size, k_hidden // 2) // (packing // 2)
                         * (packing // 2))
    alpha = draw(swiglu_alphas)
    cfg = OpConfig(
        ep_size=ep, experts_per_rank=e, top_k=k, hidden=k_hidden,
        intermediate=i_size, tokens_per_rank=tuple(counts),
        **asdict(variant.selection(x_dtype)),
        weight_form=form if e > 1 else "stacked",
        max_output_size=cap if truncate else None,
        swiglu_limit=limit if variant.clamped else None,
        swiglu_alpha=alpha if variant.swiglu_alpha else None,
        masked=is_masked and variant.masked,
    )
    cfg = domain.fit(cfg)
    event(f"variant: {cfg.variant}, form: {form}")
    if cfg.swiglu_alpha is not None:
        event("swiglu_alpha: " + ("SwigluOAI" if cfg.oai_alpha is not None
                                  else "<= 0 (standard SwiGLU)"))
    return cfg


@st.composite
def _realistic_configs(
    draw: Any, *, tokens_per_rank: st.SearchStrategy[int], domain: ShapeDomain
) -> OpConfig:
    models = [m for m in REAL_MODELS if not domain.violations(OpConfig(
        ep_size=1, experts_per_rank=m.experts, top_k=m.top_k, hidden=m.hidden,
        intermediate=m.intermediate, tokens_per_rank=(1,)))]
    if not models:
        raise InvalidArgument(f"no real model's shape lies in the domain {domain.describe()}")
    model = draw(st.sampled_from(models))
    name, k_hidden, i_size, experts, top_k = (
        model.name, model.hidden, model.intermediate, model.experts, model.top_k
    )
    ep = draw(st.sampled_from([d for d in range(1, MAX_EP_SIZE + 1) if experts % d == 0]))
    event(f"model: {name}")
    counts = tuple(
        _draw_int_in(draw, tokens_per_rank, "tokens_per_rank", 0, 1 << 20) for _ in range(ep)
    )
    return domain.fit(OpConfig(
        ep_size=ep, experts_per_rank=experts // ep, top_k=top_k, hidden=k_hidden,
        intermediate=i_size, tokens_per_rank=counts,
        weight_form=draw(st.sampled_from(("stacked", "list"))) if experts > ep else "stacked",
    ))


def configs(
    *,
    ep_sizes: st.SearchStrategy[int] | None = None,
    experts_per_rank: st.SearchStrategy[int] | None = None,
    top_k: st.SearchStrategy[int] | None = None,
    hidden: st.SearchStrategy[int] | None = None,
    intermediate: st.SearchStrategy[int] | None = None,
    tokens_per_rank: st.SearchStrategy[int] | None = None,
    x_dtypes: st.SearchStrategy[str] | None = None,
    weight_dtypes: st.SearchStrategy[str] | None = None,
    scale_dims: st.SearchStrategy[int | None] | None = None,
    act_schemes: st.SearchStrategy[str | None] | None = None,
    activation_scales: st.SearchStrategy[bool] | None = None,
    weight_forms: st.SearchStrategy[str] | None = None,
    masked: st.SearchStrategy[bool] | None = None,
    truncation: st.SearchStrategy[bool] | None = None,
    swiglu_limits: st.SearchStrategy[float | None] | None = None,
    swiglu_alphas: st.SearchStrategy[float | None] | None = None,
    sizes: str = "small",
    domain: ShapeDomain | None = None,
) -> st.SearchStrategy[OpConfig]:
    """Valid :class:`spec.OpConfig` values; every draw satisfies ``OpConfig``'s validation.

    Each keyword takes a strategy for that field (``tokens_per_rank`` is per rank). Where a field
    is left to its default, edge families are explicit draws besides the drawn values:
    ``top_k`` = 1 / = E / > E, token counts (:data:`TOKEN_FAMILIES`) ragged, with some or
    all-but-one ranks empty, one small M on every rank (:data:`FEW_TOKENS`), or rarely every
    rank empty; ``swiglu_alpha`` (W8A8) from :data:`SWIGLU_ALPHAS`. EP·E
    around 128 is asked for explicitly, e.g. ``ep_sizes=st.just(16),
    experts_per_rank=st.sampled_from((8, 7, 9))``. A field you set is drawn only from your
    strategy. ``scale_dims`` and ``activation_scales`` (NVFP4 W4A4's activation global
    scales) pick among variants sharing a weight dtype (:func:`spec.fields.variant_for`;
    default ``None`` and ``False``: the first); ``act_schemes`` names the activation
    quantisation where the weights cannot tell it (``"mxfp8"``: ``mxfp4_mxfp8``; default
    ``None``). ``sizes="small"``
    (default) keeps examples fast; ``sizes="realistic"`` draws the
    shapes of real models (``spec.limits.REAL_MODELS``) with an EP size that divides their
    expert count, for long runs. ``domain`` (a :class:`spec.limits.ShapeDomain`, e.g. a kernel
    profile's) keeps every draw runnable on that kernel: each drawn configuration is mapped
    into it by :meth:`ShapeDomain.fit` (default: the whole contract).

    >>> configs(ep_sizes=st.just(4)).example().ep_size
    4
    """
    given = dict(
        ep_sizes=ep_sizes, experts_per_rank=experts_per_rank, top_k=top_k, hidden=hidden,
        intermediate=intermediate, tokens_per_rank=tokens_per_rank, x_dtypes=x_dtypes,
        weight_dtypes=weight_dtypes, scale_dims=scale_dims, act_schemes=act_schemes,
        activation_scales=activation_scales, weight_forms=weight_forms, masked=masked,
        truncation=truncation, swiglu_limits=swiglu_limits, swiglu_alphas=swiglu_alphas,
    )
    for name, value in given.items():
        if value is not None:
            _require_strategy(name, value)
    # Empty ranks come from the token families (some, all, all but one empty); a default of
    # 0..6 per rank made half of a 40-example search token-free, as Hypothesis favours zero.
    tokens = tokens_per_rank if tokens_per_rank is not None else st.integers(1, 6)
    if sizes == "realistic":
        fixed = [n for n, v in given.items() if v is not None and n != "tokens_per_rank"]
        if fixed:
            raise InvalidArgument(
                f"sizes='realistic' draws real models' shapes; drop {', '.join(fixed)} or use "
                "sizes='small'"
            )
        return _realistic_configs(tokens_per_rank=tokens, domain=domain or CONTRACT_DOMAIN)
    if sizes != "small":
        raise InvalidArgument(f"sizes={sizes!r} must be 'small' or 'realistic'")
    edges = frozenset(
        edge
        for edge, fields in (
            ("top_k", (top_k,)),
            ("tokens", (tokens_per_rank,)),
        )
        if all(f is None for f in fields)
    )
    return _small_configs(
        edges=edges,
        domain=domain or CONTRACT_DOMAIN,
        # sampled_from shrinks by index, one step at a time; a one_of of ranges would need two
        # simultaneous changes to go from a large value back into the small range.
        ep_sizes=_or(ep_sizes, st.sampled_from((1, 2, 3, 4, 5, 7, 8, 12, 16, 24, 31, 32))),
        experts_per_rank=_or(experts_per_rank, st.sampled_from((1, 2, 3, 4, 5, 7, 8))),
        top_k=_or(top_k, st.sampled_from((1, 2, 3, 4, 8))),
        # K: 512-byte rows in bf16 are K = 256; 240 and 272 straddle that boundary.
        hidden=_or(hidden, st.sampled_from((16, 32, 48, 64, 240, 256, 272))),
        intermediate=_or(intermediate, st.sampled_from((8, 16, 24, 32, 64))),
        tokens_per_rank=tokens,
        x_dtypes=_or(x_dtypes, st.sampled_from(("bfloat16", "float16"))),
        # W8A8, the variant analysed in depth, half the time.
        weight_dtypes=_or(weight_dtypes, st.sampled_from(("int8", "bfloat16", "int8", "float16"))),
        scale_dims=_or(scale_dims, st.none()),
        act_schemes=act_schemes,
        activation_scales=activation_scales,
        weight_forms=_or(weight_forms, st.sampled_from(("stacked", "list"))),
        masked=_or(masked, st.booleans()),
        truncation=_or(truncation, st.booleans()),
        swiglu_limits=_or(swiglu_limits, st.none() | st.sampled_from((0.5, 7.0))),
        # A domain without SwigluOAI draws nothing here: its searches stay as they were.
        swiglu_alphas=_or(swiglu_alphas,
                          _SWIGLU_ALPHAS if (domain or CONTRACT_DOMAIN).oai else st.none()),
    )


_default_configs = configs


@dataclass(frozen=True)
class RoutingPlan:
    """A routing family with its explicit choices (which expert, which rank, how many copies of
    an id); the ids themselves come from the problem's seeded generator. ``target`` is reduced
    modulo the number of experts or ranks, so it shrinks to 0 whatever the configuration."""

    family: str
    target: int = 0
    spread: int = 1
    multiplicity: int = 2

    def copies(self, cfg: OpConfig) -> int:
        """How many slots of each token hold its repeated id ("duplicates"): 2..top_k, from
        ``multiplicity`` (shrinks to 2); 1 at top_k = 1, where no token can repeat an id."""
        return 1 if cfg.top_k < 2 else 2 + (self.multiplicity - 2) % (cfg.top_k - 1)

    def expert_ids(
        self, cfg: OpConfig, rng: np.random.Generator, tokens: int, *, first_slot: int = 0
    ) -> np.ndarray:
        """``(tokens, top_k)`` ids of one rank; ``first_slot`` is the global index of its first
        slot (ranks in order), which "balanced" deals round-robin over the ranks."""
        num, e_local, k = cfg.num_experts, cfg.experts_per_rank, cfg.top_k
        if self.family == "uniform":
            return uniform_routing(cfg, rng, tokens)
        if self.family == "one_expert":
            return np.full((tokens, k), self.target % num, dtype=np.int32)
        if self.family == "duplicates":
            return _duplicated(rng, num, tokens, k, self.copies(cfg))
        if self.family == "balanced":  # slot j to rank j % EP: per-rank rows differ by <= 1
            dest = (first_slot + self.target + np.arange(tokens * k)) % cfg.ep_size
            local = rng.integers(0, e_local, size=tokens * k)
            return (dest * e_local + local).reshape(tokens, k).astype(np.int32)
        if self.family == "one_rank":
            pool = (self.target % cfg.ep_size) * e_local + np.arange(e_local)
        elif self.family == "empty_rank":
            pool = np.setdiff1d(np.arange(num), (self.target % cfg.ep_size) * e_local
                                + np.arange(e_local))
        elif self.family == "empty_experts":  # at least one expert of several gets nothing
            pool = (self.target + np.arange(max(1, min(self.spread, num - 1)))) % num
        else:  # zipf: popularity ∝ 1/rank^1.2 over a seeded permutation of the experts
            weights = 1.0 / np.arange(1, num + 1) ** 1.2
            return _weighted_topk(rng, rng.permutation(num), weights, tokens, k)
        if pool.size == 0:  # a single rank has no other rank's experts to use
            pool = np.arange(num)
        return _weighted_topk(rng, np.unique(pool), np.ones(np.unique(pool).size), tokens, k)


def _duplicated(rng: np.random.Generator, num: int, tokens: int, k: int, copies: int) -> np.ndarray:
    """Every token holds one id in ``copies`` of its ``k`` slots (at random positions) and
    distinct others, exactly so where ``EP·E >= k − copies + 1`` (else ids also repeat)."""
    base = _weighted_topk(rng, np.arange(num), np.ones(num), tokens, k - copies + 1)
    ids = np.concatenate([np.repeat(base[:, :1], copies - 1, axis=1), base], axis=1)
    return np.take_along_axis(ids, np.argsort(rng.random((tokens, k)), axis=1), axis=1)


def _weighted_topk(
    rng: np.random.Generator, pool: np.ndarray, weights: np.ndarray, tokens: int, k: int
) -> np.ndarray:
    """Distinct ids per token from ``pool`` by weight (Gumbel top-k); with replacement when the
    pool is smaller than ``k``."""
    if pool.size < k:
        pick = rng.choice(pool.size, size=(tokens, k), p=weights / weights.sum())
    else:
        keys = np.log(weights) + rng.gumbel(size=(tokens, pool.size))
        pick = np.argsort(-keys, axis=1)[:, :k]
    return pool[pick].astype(np.int32)


def routings(*, families: st.SearchStrategy[str] | None = None) -> st.SearchStrategy[RoutingPlan]:
    """Routing plans; ``families`` defaults to every family of :data:`ROUTING_FAMILIES`.

    >>> routings(families=st.just("one_rank")).example().family
    'one_rank'
    """
    if families is not None:
        families = _known_families("routings", families, ROUTING_FAMILIES)
    return st.builds(
        RoutingPlan,
        family=_or(families, st.sampled_from(ROUTING_FAMILIES)),
        target=st.integers(0, 1023),
        spread=st.integers(1, 3),
        multiplicity=st.integers(2, 64),
    )


@dataclass(frozen=True)
class RowPlan:
    """One special token row: which family, on which rank and token (reduced modulo the ranks
    that have tokens and their token count, so it shrinks to the first token)."""

    family: str
    rank: int = 0
    token: int = 0

    def plant(self, cfg: OpConfig, rng: np.random.Generator, x: list[np.ndarray]) -> None:
        busy = [r for r, m in enumerate(cfg.tokens_per_rank) if m]
        if self.family == "normal" or not busy:
            return
        if self.family == "mixed":  # several edges in one call: found in fewer examples
            # The zero row last, so that it survives when one token holds every plant.
            for offset, family in enumerate(("ties", "tiny_row", "outlier", "zero_row")):
                RowPlan(family, self.rank, self.token + offset).plant(cfg, rng, x)
            return
        dtype = DTYPES[cfg.x_dtype]
        if self.family == "varied_norms":
            for r in busy:
                x[r] = _varied_norms(rng, x[r]).astype(dtype)
            return
        if self.family == "scale_blocks":
            for r in busy:
                x[r] = _scale_blocks(rng, x[r], cfg.kernel_variant.group or 32).astype(dtype)
            return
        if self.family == "ties":
            # x = (2n+1)/16 with one element 127/8: σ1 = 1/8 exactly and x/σ1 = n + 1/2, a tie
            # for every element; every value is exact in bf16 and fp16.
            for r in busy:
                m = cfg.tokens_per_rank[r]
                ties = (2 * rng.integers(-127, 127, size=(m, cfg.hidden)) + 1) / 16.0
                ties[:, 0] = 127 / 8
                x[r] = ties.astype(dtype)
            return
        r = busy[self.rank % len(busy)]
        t = self.token % cfg.tokens_per_rank[r]
        row = x[r][t].astype(np.float64)
        planted = {
            "zero_row": np.zeros_like(row),
            # bf16: so small that the requantisation scale 127/amax2 overflows float32 (a
            # degenerate row, oracle.model.numerics); fp16 has no such range, so 2**-20 there.
            "tiny_row": row * (2.0**-60 if cfg.x_dtype == "bfloat16" else 2.0**-20),
            # Large and outlier rows stay below overflow of the fp16 pipeline (SwiGLU ~ h²):
            # beyond it every implementation returns inf and the comparison says nothing.
            "large_row": row / max(np.abs(row).max(), 1e-30) * 2.0**5,
            "loud_row": row / max(np.abs(row).max(), 1e-30) * (
                2.0**5 if cfg.x_dtype == "float16" else 2.0**21),
            # A fixed 64: 20-60x a normal row's max, and still 4x a ties row's 127/8.
            "outlier": np.where(np.arange(row.size) == 0, 64.0, row),
        }[self.family]
        x[r] = x[r].copy()
        x[r][t] = planted.astype(dtype)


def _scale_blocks(rng: np.random.Generator, x: np.ndarray, width: int) -> np.ndarray:
    """One rank's rows ``x`` with their ``width``-column blocks rewritten in turn (block 0
    as drawn, block ``b > 0`` of row ``t`` by kind ``1 + (b − 1 + t) mod 5``): zero; amax
    2^-34 and 2^-14 (below the amax epsilons 1e-10 and 1e-4 of FP8 quantisers); e4m3
    midpoints times 2^-6 with one element 448·2^-6 = 7 (so the scale is exactly 2^-6 and
    every other ``x/σ`` an exact tie, exact in bfloat16 and float16); the block times 16
    (one hot block). Odd rows are then scaled by 2^-12 (a power of two: ties stay ties)."""
    rows = x.astype(np.float64)
    m, k = rows.shape
    if not rows.size:
        return rows
    blocks = -(-k // width)
    padded = np.zeros((m, blocks * width))
    padded[:, :k] = rows
    g = padded.reshape(m, blocks, width)
    b = np.arange(blocks)[None, :]
    kind = np.where(b == 0, 0, 1 + (b - 1 + np.arange(m)[:, None]) % 5)
    amax = np.maximum(np.abs(g).max(axis=2, keepdims=True), 1e-30)
    binade = rng.integers(-3, 8, size=g.shape)
    mid = 2.0**binade * (1 + (2 * rng.integers(0, 8, size=g.shape) + 1) / 16)
    mid = np.where(mid > 448, 2.0**-3 * (1 + 1 / 16), mid)  # beyond the grid: the smallest
    ties = np.where(rng.random(g.shape) < 0.5, -mid, mid) * 2.0**-6
    ties[..., 0] = 7.0
    out = np.where((kind == 1)[..., None], 0.0, g)
    out = np.where((kind == 2)[..., None], g / amax * 2.0**-34, out)
    out = np.where((kind == 3)[..., None], g / amax * 2.0**-14, out)
    out = np.where((kind == 4)[..., None], ties, out)
    out = np.where((kind == 5)[..., None], g * 16, out)
    out = out * np.where(np.arange(m) % 2, 2.0**-12, 1.0)[:, None, None]
    return np.asarray(out.reshape(m, blocks * width)[:, :k])


def _varied_norms(rng: np.random.Generator, x: np.ndarray) -> np.ndarray:
    """One rank's rows ``x`` rescaled to amax 8 down to 8e-3, log-uniform; the first row 8."""
    rows = x.astype(np.float64)
    amax = np.maximum(np.abs(rows).max(axis=1, keepdims=True), 1e-30)
    exponent = rng.uniform(-3.0, 0.0, size=(rows.shape[0], 1))
    exponent[0] = 0.0
    return np.asarray(rows / amax * 8.0 * 10.0**exponent)


def token_rows(*, families: st.SearchStrategy[str] | None = None) -> st.SearchStrategy[RowPlan]:
    """Special-row plans; ``families`` defaults to every family of :data:`ROW_FAMILIES` (names
    from :data:`POWER_ROW_FAMILIES`,
    :data:`BLOCK_ROW_FAMILIES` and :data:`FP8_ROW_FAMILIES` may be given too)."""
    if families is not None:
        families = _known_families("token_rows", families,
                                   ROW_FAMILIES + POWER_ROW_FAMILIES + BLOCK_ROW_FAMILIES
                                   + FP8_ROW_FAMILIES)
    return st.builds(
        RowPlan,
        family=_or(families, st.sampled_from(ROW_FAMILIES)),
        rank=st.integers(0, MAX_EP_SIZE - 1),
        token=st.integers(0, 63),
    )


def _probs(family: str, rng: np.random.Generator, m: int, k: int) -> np.ndarray:
    if family == "softmax":
        return softmax_probs(rng, m, k)
    if family == "ties":
        p = np.full((m, k), 1.0 / k)
    elif family == "zeros":
        p = np.where(rng.random((m, k)) < 0.5, 0.0, rng.random((m, k)))
    elif family == "negative":
        p = rng.uniform(-1.0, 1.0, size=(m, k))
    else:
        p = rng.uniform(0.0, 3.0, size=(m, k))
    return np.asarray(p, dtype=np.float32)


def _masks(
    family: str, rng: np.random.Generator, cfg: OpConfig, target: int
) -> tuple[list[np.ndarray], str]:
    """The masks of ``family`` and the family they really show. Only "none_active" masks every
    token: "one_rank_masked" masks one busy rank beside another (with one busy rank it is
    "random"), and "random" keeps at least one token of the call active."""
    counts = cfg.tokens_per_rank
    busy = [r for r, m in enumerate(counts) if m]
    if family == "none_active":
        return [np.zeros(m, dtype=bool) for m in counts], family
    if family == "all_active":
        return [np.ones(m, dtype=bool) for m in counts], family
    if family == "one_rank_masked" and len(busy) > 1:
        hit = busy[target % len(busy)]
        return [np.full(m, r != hit) for r, m in enumerate(counts)], family
    masks = [rng.random(m) < 0.7 for m in counts]
    if busy and not any(mask.any() for mask in masks):
        r = busy[target % len(busy)]
        masks[r][target % counts[r]] = True
    return masks, "random"


def _receive_rows(cfg: OpConfig, ids: list[np.ndarray], masks: list[np.ndarray] | None) -> int:
    """The busiest destination rank's received rows (before truncation)."""
    per_rank = np.zeros(cfg.ep_size, dtype=np.int64)
    for r, idx in enumerate(ids):
        live = idx if masks is None else idx[masks[r]]
        per_rank += np.bincount(live.reshape(-1) // cfg.experts_per_rank, minlength=cfg.ep_size)
    return int(per_rank.max())


@st.composite
def problems(
    draw: Any,
    *,
    configs: st.SearchStrategy[OpConfig] | None = None,
    routing: st.SearchStrategy[RoutingPlan] | None = None,
    values: st.SearchStrategy[RowPlan] | None = None,
    layouts: st.SearchStrategy[str] | None = None,
    domain: ShapeDomain | None = None,
) -> Problem:
    """Valid :class:`spec.Problem` values: a configuration, then its routing, special rows,
    routing weights, masks and capacity edges, then the bulk arrays from a drawn seed.

    ``max_output_size`` is exactly the busiest rank's received rows R ("at_capacity"), R − 1
    ("one_past": its last row dropped), R + 1 ("one_spare"), or rarely the configuration's drawn
    value ("as_drawn"). Rare families (:data:`COUNT_ONLY`: every rank empty, every token masked,
    the drawn capacity) leave no output row to judge; every other draw defines at least one
    row unless ``one_past`` drops the last slot of every token.

    ``layouts`` (names from :data:`spec.memory.LAYOUTS`; default: contiguous, no draw) lays out
    x and the weights of every rank in memory, as the operator's ``IgnoreContiguous()`` weights
    may come: Fortran order or every other element of a wider buffer, the same values.

    ``domain`` (a kernel profile's :class:`spec.limits.ShapeDomain`) keeps the values runnable
    on that kernel too (:meth:`ShapeDomain.fit_problem`: UE8M0 scales where it takes only
    those); without ``configs`` the configurations are drawn in it as well.
    """
    for name, value in (("configs", configs), ("routing", routing), ("values", values),
                        ("layouts", layouts)):
        if value is not None:
            _require_strategy(name, value)
    cfg = draw(configs if configs is not None else _default_configs(domain=domain))
    plan = draw(routing if routing is not None else routings())
    rows = draw(values if values is not None else token_rows())
    probs_family = draw(_PROBS)
    mask_family = draw(_MASKS)
    capacity = draw(_CAPACITIES)
    mask_family = mask_family if cfg.masked else None
    capacity = capacity if cfg.max_output_size is not None else None
    seed = draw(_SEEDS)
    layout = (_known_name("problems", "layouts", draw(layouts), LAYOUTS)
              if layouts is not None else "contiguous")
    # scaled formats: neighbouring blocks' scales 2x or 4x apart half the time (tile_tag)
    tiles = cfg.kernel_variant.name in TILE_TAGGED and draw(st.booleans())
    rng = np.random.default_rng(seed)
    x = [normal_tokens(cfg, rng, m) for m in cfg.tokens_per_rank]
    rows.plant(cfg, rng, x)
    starts = np.cumsum((0, *cfg.tokens_per_rank)) * cfg.top_k
    ids = [plan.expert_ids(cfg, rng, m, first_slot=int(starts[r]))
           for r, m in enumerate(cfg.tokens_per_rank)]
    probs = [_probs(probs_family, rng, m, cfg.top_k) for m in cfg.tokens_per_rank]
    masks = None
    if mask_family is not None:
        masks, mask_family = _masks(mask_family, rng, cfg, plan.target)
    if capacity is not None and capacity != "as_drawn":
        busiest = _receive_rows(cfg, ids, masks)
        shift = {"at_capacity": 0, "one_past": -1, "one_spare": 1}[capacity]
        cfg = replace(cfg, max_output_size=max(0, busiest + shift))
    routing_label = f"routing: {plan.family}"
    if plan.family == "duplicates":
        routing_label += f", {plan.copies(cfg)} copies"
    for label in (
        routing_label, f"rows: {rows.family}", f"probs: {probs_family}",
        f"mask: {mask_family}", f"capacity: {capacity}", f"layout: {layout}",
        *(["weights: tile-tagged"] if tiles else []),
    ):
        event(label)
    problem = random_problem(
        cfg, seed=seed, x=x, expert_idx=ids, probs=probs,
        active_mask=masks if masks is not None else [None] * cfg.ep_size, layout=layout,
        tiles=tiles,
    )
    return problem if domain is None else domain.fit_problem(problem)
