"""The reference model of one whole ``dispatch_ffn_combine`` call: every rank, every stage.

Read next to ``docs/contract/dispatch_ffn_combine.md``: :func:`route` is §4–§5, the
``_ffn_*`` functions are §6 steps 1–7, :func:`_combine` is step 8. Vectorised over tokens; the
only Python loops run over global experts (``EP·E``) and over ``top_k`` in the combine.

All ranks are concatenated into one global token axis (rank 0's tokens first), so a slot's global
index ``j = (token_offset[s] + t) · top_k + k`` orders slots by (source rank, the source's flat
slot index ``t·top_k + k``), which is exactly the order inside one (expert, source) block.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import numpy as np

from oracle.adapters.gemm import Product, in_session, weight_products
from oracle.model.arithmetic import F32, glu64, truncate_scale_bits
from oracle.model.kernels import Env, cast
from oracle.model.numerics import Numerics, resolve_numerics
from spec import DTYPES, Problem
from spec.config import OpConfig
from spec.fp8 import dequantise
from spec.int4 import PER_WORD, dequantise_groups, unpack_int4
from spec.mxfp4 import dequantise_mx
from spec.nvfp4 import dequantise_nv

__all__ = ["RankResult", "ReceiveLayout", "Result", "Routing", "Trace", "expert_values",
           "float_weight_problem", "kernel_mathematics", "route", "run"]

Array = np.ndarray[Any, Any]


@dataclass(frozen=True)
class ReceiveLayout:
    """One destination rank's receive buffer, one entry per received row, in buffer order
    (expert-major, then source rank, then the source's sorted order). Rows ``kept`` and later
    were dropped by ``max_output_size``."""

    src_rank: Array
    token: Array
    slot: Array
    local_expert: Array
    kept: int

    @property
    def rows(self) -> int:
        return int(self.src_rank.shape[0])

    @property
    def dropped(self) -> int:
        return self.rows - self.kept


@dataclass(frozen=True)
class Routing:
    """Where every slot goes (§4–§5), computed once per problem.

    ``order`` lists the global indices of the active slots in global receive order (destination
    rank, local expert, source rank, source order); ``expert_start[g]`` is where global expert
    ``g``'s block starts in ``order`` and ``expert_kept[g]`` how many of its rows survive
    truncation.
    """

    counts: Array  # (EP, EP·E) int64: cnt[s][g]
    order: Array
    expert_start: Array
    expert_kept: Array
    slot_kept: Array  # (total slots,) bool: computed (active and not truncated)
    receive: tuple[ReceiveLayout, ...]


@dataclass(frozen=True)
class Trace:
    """The intermediates a kernel engineer compares stage by stage.

    ``token_scale[r]``: per-token quantisation scales ``σ1 = amax/127`` (float32).
    ``y[r]``: ``(M_r, top_k, K)`` per-slot expert outputs (faithful: float32 holding x-dtype
    values; ideal: float64), NaN where the slot was not computed (masked or dropped).
    ``combined[r]``: the combine accumulator before the final cast (float32 faithful, float64
    ideal).
    ``h[r]`` (ideal only, empty otherwise): ``(M_r, top_k, 2I)`` float64 GEMM1 outputs ``h*``
    before the clamp, NaN where the slot was not computed (the row test's Jacobian reads them).
    """

    counts: Array
    receive: tuple[ReceiveLayout, ...]
    token_scale: tuple[Array, ...]
    y: tuple[Array, ...]
    combined: tuple[Array, ...]
    h: tuple[Array, ...] = ()


@dataclass(frozen=True)
class RankResult:
    """One rank's outputs. Rows where ``defined`` is False (masked tokens, tokens that lost a
    slot to truncation) are undefined by the contract; the model writes 0 there.
    ``out_lo``/``out_hi`` (``run(..., envelope=True)``, as float32): the envelope of every
    ``out`` a kernel of the profile may produce."""

    out: Array
    expert_token_nums: Array
    defined: Array
    out_lo: Array | None = None
    out_hi: Array | None = None


@dataclass(frozen=True)
class Result:
    ranks: tuple[RankResult, ...]
    trace: Trace
    numerics: Numerics


def _concat(arrays: list[Array], dtype: Any, tail: tuple[int, ...]) -> Array:
    return np.concatenate(arrays) if arrays else np.zeros((0, *tail), dtype=dtype)


def route(problem: Problem) -> Routing:
    """Counts, receive layouts and truncation of every rank (§4–§5)."""
    cfg = problem.config
    ep, e_local, top_k, num = cfg.ep_size, cfg.experts_per_rank, cfg.top_k, cfg.num_experts
    tokens = np.array(cfg.tokens_per_rank, dtype=np.int64)
    ids = _concat([r.expert_idx.reshape(-1) for r in problem.ranks], np.int32, ()).astype(np.int64)
    active = np.repeat(
        _concat([r.is_active() for r in problem.ranks], bool, ()), top_k
    )
    src = np.repeat(np.arange(ep), tokens * top_k)
    # Masked slots take the sentinel EP·E: not counted, not routed (§4).
    expert = np.where(active, ids, num)
    counts = np.bincount(src * (num + 1) + expert, minlength=ep * (num + 1))
    counts = counts.reshape(ep, num + 1)[:, :num]
    # A stable sort by expert keeps (source rank, source order) inside each expert's block.
    order = np.argsort(expert, kind="stable")[: int(active.sum())]
    per_expert = counts.sum(axis=0)
    expert_start = np.concatenate([[0], np.cumsum(per_expert)[:-1]])
    # Position of each expert's block inside its destination's buffer.
    per_dest = per_expert.reshape(ep, e_local)
    pos_in_dest = (np.cumsum(per_dest, axis=1) - per_dest).reshape(-1)
    cap = cfg.max_output_size
    expert_kept = per_expert if cap is None else np.clip(cap - pos_in_dest, 0, per_expert)
    in_block = np.arange(order.shape[0]) - np.repeat(expert_start, per_expert)
    kept_sorted = in_block < np.repeat(expert_kept, per_expert)
    slot_kept = np.zeros(expert.shape[0], dtype=bool)
    slot_kept[order[kept_sorted]] = True
    token_offset = np.concatenate([[0], np.cumsum(tokens)[:-1]])
    g = expert[order]
    s = src[order]
    dest = g // e_local
    bounds = np.searchsorted(dest, np.arange(ep + 1))
    kept_per_dest = expert_kept.reshape(ep, e_local).sum(axis=1)
    receive = tuple(
        ReceiveLayout(
            src_rank=s[lo:hi],
            token=order[lo:hi] // top_k - token_offset[s[lo:hi]],
            slot=order[lo:hi] % top_k,
            local_expert=g[lo:hi] % e_local,
            kept=int(kept_per_dest[d]),
        )
        for d, (lo, hi) in enumerate(pairwise(bounds))
    )
    return Routing(counts, order, expert_start, expert_kept, slot_kept, receive)


#: How a W4A16 variant's weights become x's dtype (:attr:`spec.fields.Variant.dequantise`),
#: from an expert's lists and the GEMM's number (1, 2).
_DEQUANTISERS: dict[str, Callable[[dict[str, Array], int, Any], Array]] = {
    "mxfp4": lambda lists, i, dtype: dequantise_mx(lists[f"w{i}"], lists[f"scale{i}"], dtype),
    "int4": lambda lists, i, dtype: dequantise_groups(
        lists[f"w{i}"], lists[f"scale{i}"], lists[f"zero{i}"], dtype),
    "nvfp4": lambda lists, i, dtype: dequantise_nv(
        lists[f"w{i}"], lists[f"scale{i}"], lists[f"gscale{i}"], dtype),
}


def _as_float_weights(lists: dict[str, Array], how: str, x_dtype: Any) -> dict[str, Array]:
    """``w1``, ``w2`` dequantised with their scales into ``x_dtype``, the scales dropped."""
    return {f"w{i}": _DEQUANTISERS[how](lists, i, x_dtype) for i in (1, 2)}


def expert_values(problem: Problem, g: int) -> dict[str, Array]:
    """Global expert ``g``'s tensors by field name, W4A8 weights unpacked to their int4 values
    (int8), W4A16 weights dequantised to x's dtype (MXFP4 x MXFP8: to float32, exact, as its
    kernel multiplies them with quantised activations): what the numerics read."""
    cfg = problem.config
    variant = cfg.kernel_variant
    lists = problem.ranks[g // cfg.experts_per_rank].expert_lists(g % cfg.experts_per_rank)
    if variant.dequantise is not None:
        return _as_float_weights(lists, variant.dequantise,
                                 F32 if variant.quantised else DTYPES[cfg.x_dtype])
    for name, spec in variant.lists.items():
        if spec.packing == PER_WORD:  # int4 packed eight to a word
            lists[name] = unpack_int4(lists[name])
    return lists


def _ideal_product(rows: Array, w: Array, scale: Array | None) -> Array:
    """``rows @ (w·diag(scale))`` in float64 (``rows @ w`` without scales): ``w`` converted a
    chunk at a time (:func:`oracle.adapters.gemm.weight_products`), the chunks' products
    summed in float64 and the per-channel scale applied to the result. Never a dequantised
    copy of ``w``: at K = 7168 writing one costs as much as the GEMM (issue 26). For int8 and
    16-bit weights and x each product ``x_j·w_jc`` is exact in float64, so this makes ``n − 1``
    additions and one scaling: ``n`` roundings, within ``γ_n`` like any float64 evaluation
    (the sound bound's ``ideal_float64`` term, :mod:`oracle.judge.bounds`), whichever backend
    sums them. Block scales (FP8: one per 128 x 128 block) are expanded
    (:func:`spec.fp8.dequantise`)."""
    if scale is not None and scale.ndim == w.ndim:
        return np.asarray(rows @ dequantise(w, scale))
    out = weight_products(w, [Product(rows)], np.float64)[0]
    return out if scale is None else out * scale.astype(np.float64)


def _ffn_ideal(
    x: Array, w1: Array, s1: Array | None, w2: Array, s2: Array | None, cfg: OpConfig,
) -> tuple[Array, Array]:
    """``h = x·W1d`` and ``W2ᵀ(silu(gate)·up)`` in float64 on dequantised weights, with the
    clamp if any (the SwigluOAI activation where the call selects it,
    :func:`oracle.model.arithmetic.glu64`)."""
    h = _ideal_product(x.astype(np.float64), w1, s1)
    i, limit = cfg.intermediate, cfg.swiglu_limit
    gate = h[:, :i] if limit is None else np.minimum(h[:, :i], limit)
    up = h[:, i:] if limit is None else np.clip(h[:, i:], -limit, limit)
    _, silu, factor = glu64(gate, up, cfg.oai_alpha)
    return h, _ideal_product(silu * factor, w2, s2)


def kernel_mathematics(problem: Problem, numerics: Numerics) -> Problem:
    """``problem`` as the ideal model should read it to give the float64 mathematics of the
    kernel ``numerics`` names: itself, or a copy with the halves of ``w1`` and ``scale1``
    swapped where the profile's SwiGLU takes the gate from the second half (CUTLASS,
    kernels.md 'Other kernels'; the ideal model reads the gate first), and with the scales
    truncated to 19 bits where ``truncate_scales`` says the kernel reads them so."""
    cfg = problem.config
    variant = cfg.kernel_variant
    if variant.dequantise is not None and variant.quantised:
        return problem  # MXFP4 x MXFP8: the judges read its activation scheme (gate first)
    if variant.dequantise is not None:  # W4A16: the float weights the kernel multiplies with
        problem = float_weight_problem(problem)
        cfg, variant = problem.config, problem.config.kernel_variant
    if any(s.packing != 1 for s in variant.lists.values()):  # W4A8: gate first, raw scales
        return problem
    profile = numerics.profile  # the ideal judge's default profile may lack the variant
    swap = (variant.name in profile.variants
            and not profile.pipeline(variant.name).swiglu.gate_first)
    chop = numerics.truncate_scales and "scale1" in variant.lists
    if not swap and not chop:
        return problem

    def halves(tensors: Sequence[Array]) -> list[Array]:
        return [np.roll(t, cfg.intermediate, axis=-1) if swap else t for t in tensors]

    def scales(tensors: Sequence[Array] | None, swapped: bool) -> list[Array] | None:
        if tensors is None:
            return None
        out = halves(tensors) if swapped else list(tensors)
        return [truncate_scale_bits(t) for t in out] if chop else out

    ranks = [dataclasses.replace(r, w1=halves(r.w1), scale1=scales(r.scale1, True),
                                 scale2=scales(r.scale2, False)) for r in problem.ranks]
    return Problem(ranks, **cfg.call_attributes())


def float_weight_problem(problem: Problem) -> Problem:
    """A W4A16 problem (:attr:`spec.fields.Variant.dequantise`) as the BF16/FP16-weight
    problem of its dequantised weights (stacked): the same mathematics and kernel numerics.
    MXFP4 x MXFP8 becomes the same float-weight problem, its mathematics (exact where x's
    dtype holds the dequantised weights: always in bfloat16, in float16 for scales 2^-23 to
    2^13); its judges add the activation quantisation's noise
    (:attr:`spec.fields.Variant.e4m3_activations`)."""
    cfg = problem.config
    how, dtype = cfg.kernel_variant.dequantise, DTYPES[cfg.x_dtype]
    assert how is not None
    ranks = []
    for rank in problem.ranks:
        per_expert = [_as_float_weights(rank.expert_lists(e), how, dtype)
                      for e in range(cfg.experts_per_rank)]
        ranks.append(dataclasses.replace(
            rank, w1=[np.stack([w["w1"] for w in per_expert])],
            w2=[np.stack([w["w2"] for w in per_expert])], scale1=None, scale2=None,
            zero1=None, zero2=None, gscale1=None, gscale2=None))
    attrs = cfg.call_attributes()
    attrs["act_scheme"] = None  # float weights select their row
    return Problem(ranks, **attrs)


def _combine_ideal(y: Array, probs: Array) -> Array:
    """§6 step 8 in float64: ``Σ_k y_k·p_k``, sequentially in k order."""
    acc = y[:, 0] * probs[:, 0, None].astype(np.float64)
    for k in range(1, y.shape[1]):
        acc = acc + y[:, k] * probs[:, k, None].astype(np.float64)
    return np.asarray(acc)


@in_session
def run(
    problem: Problem, *, numerics: str | Numerics = "faithful", envelope: bool = False,
    reads: Array | None = None,
    tokens: Array | None = None,
) -> Result:
    """The whole collective call: every rank's ``out``, ``expert_token_nums`` and ``defined``,
    plus the :class:`Trace` of intermediates.

    ``numerics``: ``"faithful"`` (the default kernel profile, ``ascend-a3``), a profile name
    (``"vllm-triton"``, see :mod:`oracle.model.kernels`), ``"ideal"``, or a :class:`Numerics`.
    ``envelope=True`` (faithful only) also computes, per rank, ``out_lo``/``out_hi``: every
    ``out`` a kernel of the profile may produce, whatever it does with its freedoms.
    ``reads`` (diagnosis of a layout defect): per global slot, the slot whose expert output
    the combine reads instead of its own, −1 for a row never written (zeros).
    ``tokens`` (one bool per token, all ranks in order) computes the slots of those tokens
    alone (the other rows of ``out``, ``y`` and ``combined`` are NaN where defined): each
    row's values are those of the whole run, since routing and counts are the whole call's
    and every step after them works row by row (the judge reads the rows it needs, issue 26).

    >>> from spec import OpConfig, random_problem
    >>> cfg = OpConfig(ep_size=2, experts_per_rank=2, top_k=2, hidden=32, intermediate=16,
    ...                tokens_per_rank=(3, 1))
    >>> result = run(random_problem(cfg, seed=0))
    >>> [r.out.shape for r in result.ranks], result.ranks[0].expert_token_nums.dtype
    ([(3, 32), (1, 32)], dtype('int32'))
    """
    num = resolve_numerics(numerics)
    cfg = problem.config
    ep, e_local, top_k, k_hidden = cfg.ep_size, cfg.experts_per_rank, cfg.top_k, cfg.hidden
    routing = route(problem)
    x_dtype = DTYPES[cfg.x_dtype]
    x = _concat([r.x for r in problem.ranks], x_dtype, (k_hidden,))
    probs = _concat([r.probs for r in problem.ranks], F32, (top_k,))
    slot_p = probs.reshape(-1)
    ideal = num.mode == "ideal"
    env = envelope and not ideal
    profile = num.profile
    pipeline = None if ideal else profile.pipeline(cfg.kernel_variant.name)
    xf = x.astype(F32)
    x_env = Env(xf, xf, xf) if env else Env(xf)
    inputs, sigma1 = x_env, None
    if pipeline is not None and pipeline.quantise is not None:  # §6 step 1
        inputs, sigma1, _ = pipeline.quantise(x_env, num.zero_rows)
    total_tokens = x.shape[0]
    shape = (total_tokens * top_k, k_hidden)
    y = np.full(shape, np.nan, dtype=np.float64 if ideal else F32)
    y_lo, y_hi = (np.full(shape, np.nan, F32), np.full(shape, np.nan, F32)) if env else (y, y)
    h = np.full((total_tokens * top_k, 2 * cfg.intermediate) if ideal else (0, 0), np.nan)
    for g in np.flatnonzero(routing.expert_kept):
        start = routing.expert_start[g]
        slots = routing.order[start : start + routing.expert_kept[g]]
        if tokens is not None:
            slots = slots[tokens[slots // top_k]]
            if not slots.size:
                continue
        tok = slots // top_k
        weights = expert_values(problem, int(g))
        w1, w2, s1, s2 = (weights.get(name) for name in ("w1", "w2", "scale1", "scale2"))
        assert w1 is not None and w2 is not None
        if pipeline is None:
            if "a1_gscale" in weights:  # NVFP4 W4A4: the weights' values e2m1·s/γ_w
                w1, w2 = (dequantise_nv(weights[f"w{i}"], weights[f"scale{i}"],
                                        weights[f"gscale{i}"], F32) for i in (1, 2))
                s1 = s2 = None
            h[slots], y[slots] = _ffn_ideal(x[tok], w1, s1, w2, s2, cfg)
            continue
        if s1 is not None and s2 is not None:
            weights["scale1"], weights["scale2"] = num.read_scales(s1, s2)
        ys = pipeline.ffn(inputs.take(tok), None if sigma1 is None else sigma1.take(tok),
                          weights, slot_p[slots], cfg, num.zero_rows)
        y[slots] = ys.mid
        if env:
            y_lo[slots], y_hi[slots] = ys.lo, ys.hi
    if reads is not None:
        y, y_lo, y_hi = (np.where(reads[:, None] < 0, 0, a[reads]) for a in (y, y_lo, y_hi))
    y3 = y.reshape(total_tokens, top_k, k_hidden)
    defined = np.asarray(routing.slot_kept.reshape(total_tokens, top_k).all(axis=1))
    lows: tuple[Array | None, ...] = (None,) * ep
    highs = lows
    if ideal:
        combined = _combine_ideal(y3, probs)
    else:
        y_env = Env(y3, *((y_lo.reshape(y3.shape), y_hi.reshape(y3.shape)) if env else ()))
        acc = profile.combine(y_env, probs, x_dtype)
        combined = acc.mid
    out = np.where(defined[:, None], combined, 0).astype(x_dtype)
    bounds = np.concatenate([[0], np.cumsum(cfg.tokens_per_rank)])
    per_expert = routing.counts.sum(axis=0).reshape(ep, e_local).astype(np.int32)

    def split(a: Array) -> tuple[Array, ...]:
        return tuple(a[lo:hi] for lo, hi in pairwise(bounds))

    if not ideal and acc.lo is not None and acc.hi is not None:  # the cast is monotone
        lows, highs = split(cast(x_dtype)(acc.lo)), split(cast(x_dtype)(acc.hi))
    ranks = tuple(
        RankResult(out=o, expert_token_nums=per_expert[r], defined=d, out_lo=lo, out_hi=hi)
        for r, (o, d, lo, hi) in enumerate(zip(split(out), split(defined), lows, highs))
    )
    sigma_trace = (sigma1.mid if sigma1 is not None
                   else np.abs(xf).max(axis=1, initial=0) / F32(127))
    trace = Trace(
        counts=routing.counts,
        receive=routing.receive,
        token_scale=split(sigma_trace),
        y=split(y3),
        combined=split(combined),
        h=split(h.reshape(total_tokens, top_k, 2 * cfg.intermediate)) if ideal else (),
    )
    return Result(ranks=ranks, trace=trace, numerics=num)
