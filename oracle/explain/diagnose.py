"""Diagnosis: name the known defect whose output an implementation's failing output equals.

Each :class:`Defect` of :data:`CATALOGUE` is one realistic bug, as data: a phrase, one sentence
a kernel engineer can act on, and how the oracle computes its output — a changed kernel profile
(``dataclasses.replace`` of the judged one), a changed problem (the inputs the buggy kernel
effectively reads), the receive rows its combine reads, or changed counts. :func:`diagnose`
runs the oracle once per entry on the same problem and reports, in this order of strength:

- the entries whose output equals the implementation's **bit for bit** on every row both define
  (and whose ``expert_token_nums`` equal it);
- failing that, the entry closest to it **within the judge's tolerance**: the envelope of the
  defective kernel (the judged profile's freedoms — summation order, ``exp`` accuracy — around
  the entry's output), plus the ``ulps`` the file was judged with;
- else "no known defect matches".

An entry that changes nothing the judge looks at on this problem (no truncation for an
off-by-one in it, ties that never occur, a combine of one slot) is left out and listed.
Diagnosis computes with the judged kernel profile. Judged in ideal mode without one, it speaks
of no profile the user did not choose: the entries that change a rounding point are left out
(the mathematics has none), and each other entry's inputs are judged by the ideal judge itself
(the reference is "the ideal mathematics"; a match is within its tolerance, never bitwise).

>>> from spec import OpConfig, random_problem
>>> from oracle import run
>>> p = random_problem(OpConfig(ep_size=1, experts_per_rank=2, top_k=2, hidden=32,
...                             intermediate=16, tokens_per_rank=(3,)), seed=0)
>>> ones = diagnose(p, [(r.out, r.expert_token_nums) for r in run(p).ranks])
>>> ones.conforms
True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

from oracle.judge.verdict import Verdict, compare, envelope_ratio, structured_outputs
from oracle.model.kernels import (
    Combine,
    Env,
    FloatGemm,
    IntGemm,
    KernelProfile,
    Quantiser,
    cast,
    to_f32,
)
from oracle.model.numerics import Numerics, resolve_numerics
from oracle.model.reference import RankResult, Result, route, run
from spec import DTYPES, Problem, RankInputs

__all__ = ["CATALOGUE", "Defect", "Diagnosis", "diagnose"]

Array = np.ndarray[Any, Any]
_STORES = ("fp16", "x", "x_away")


# ---------------------------------------------------------------- combine steps of defects


@dataclass(frozen=True)
class _ReversedCombine(Combine):
    """The profile's combine over the slots in reverse k order."""

    def __call__(self, y: Env, probs: Array, x_dtype: Any) -> Env:
        return super().__call__(y.take((slice(None), slice(None, None, -1))), probs[:, ::-1],
                                x_dtype)


@dataclass(frozen=True)
class _Bf16Combine(Combine):
    """The weighted sum kept in a bfloat16 accumulator: the first term and every partial sum
    rounded to bfloat16 (the weighted terms themselves are float32 products). Every step is
    monotone, so the envelope is the same sum over the terms' lower and upper ends."""

    def __call__(self, y: Env, probs: Array, x_dtype: Any) -> Env:
        w = (probs.astype(np.float32)[:, :, None] if self.weight == "combine"
             else np.ones((1, 1, 1), np.float32))
        mid = to_f32(y.mid * w)
        if y.lo is None or y.hi is None:
            return Env(_bf16_sum(mid))
        a, b = to_f32(y.lo * w), to_f32(y.hi * w)
        return Env(_bf16_sum(mid), _bf16_sum(np.minimum(a, b)), _bf16_sum(np.maximum(a, b)))


def _bf16_sum(terms: Array) -> Array:
    """``(tokens, top_k, K)`` terms summed in k order in a bfloat16 accumulator."""
    bf16 = cast(DTYPES["bfloat16"])
    acc = bf16(terms[:, 0])
    for k in range(1, terms.shape[1]):
        acc = bf16(to_f32(acc + terms[:, k]))
    return acc


def _combine_as(kind: type[Combine]) -> Callable[[KernelProfile], KernelProfile]:
    def change(p: KernelProfile) -> KernelProfile:
        c = p.combine
        return replace(p, combine=kind(c.weight, c.sum, c.x_dtype_topk))

    return change


@dataclass(frozen=True)
class _PerTensorQuantiser(Quantiser):
    """The profile's token quantisation with one scale for the whole call: every row's amax
    replaced by the largest over all rows (no envelope: the defect's own value)."""

    def __call__(self, a: Env, zero_rows: str) -> tuple[Env, Env, Array]:
        amax = np.abs(a.mid).max(initial=np.float32(0))
        column = np.full((a.mid.shape[0], 1), amax, np.float32)  # every row's amax the call's
        q, sigma, degenerate = super().__call__(Env(np.hstack([a.mid, column])), zero_rows)
        return Env(q.mid[:, :-1]), sigma, degenerate


def _per_tensor(p: KernelProfile) -> KernelProfile:
    return p.map_steps("quantise", lambda q: _PerTensorQuantiser(
        **{f.name: getattr(q, f.name) for f in fields(Quantiser)}))


# ---------------------------------------------------------------- kernel profile changes


def _flip(ties: str) -> str:
    return "even" if ties == "away" else "away"


def _swiglus(p: KernelProfile, **fields: Any) -> KernelProfile:
    return p.map_steps("swiglu", lambda s: replace(s, **fields))


def _epilogues(p: KernelProfile, change: Callable[[tuple[str, ...]], tuple[str, ...]],
               gemms: tuple[str, ...], kinds: tuple[type, ...]) -> KernelProfile:
    """``p`` with ``change`` applied to the epilogue of each GEMM step named in ``gemms``
    that is one of ``kinds``, in every pipeline."""
    def edit(step: Any) -> Any:
        if not isinstance(step, kinds):
            return step
        gemm: Any = step
        return replace(gemm, epilogue=change(gemm.epilogue))

    return p.map_steps(gemms, edit)


def _with_slot(ops: tuple[str, ...]) -> tuple[str, ...]:
    """The routed weight applied just before the epilogue's final store."""
    if "slot" in ops:
        return ops
    return (*ops[:-1], "slot", ops[-1]) if ops and ops[-1] in _STORES else (*ops, "slot")


def _without_slot(ops: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(op for op in ops if op != "slot")


#: The int8 GEMMs (W8A8; W4A8's split GEMMs store fp16 by construction).
_INT_GEMMS = ("gemm1", "gemm2"), (IntGemm,)
#: GEMM2 of the W8A8 and float pipelines (W4A8's split GEMM has no epilogue list).
_GEMM2 = ("gemm2",), (IntGemm, FloatGemm)


def _weight_in_gemm2(p: KernelProfile) -> KernelProfile:
    if p.combine.weight == "gemm2":
        return p
    return replace(_epilogues(p, _with_slot, *_GEMM2), combine=replace(p.combine, weight="gemm2"))


def _weight_in_combine(p: KernelProfile) -> KernelProfile:
    if p.combine.weight == "combine":
        return p
    return replace(_epilogues(p, _without_slot, *_GEMM2),
                   combine=replace(p.combine, weight="combine"))


def _weight_twice(p: KernelProfile) -> KernelProfile:
    return replace(_epilogues(p, _with_slot, *_GEMM2), combine=replace(p.combine, weight="combine"))


def _swap_store(old: str, new: str | None) -> Callable[[tuple[str, ...]], tuple[str, ...]]:
    return lambda ops: tuple(op for op in (new if op == old else op for op in ops)
                             if op is not None)


def _swiglu_cast_ties(p: KernelProfile) -> KernelProfile:
    """The float pipeline's SwiGLU cast with the other tie rule (a profile without a float
    pipeline, a GPU format's, is returned as it is: the defect does not apply)."""
    if "float" not in p.variants:
        return p
    flipped = {"x_away": "x", "x": "x_away"}
    return p.map_steps("swiglu", lambda s: replace(s, store=flipped.get(s.store or "", s.store)),
                       ("float",))


# ---------------------------------------------------------------- problem changes


def _each_rank(problem: Problem, change: Callable[[RankInputs], RankInputs],
               max_output_size: int | None = None) -> Problem:
    cfg = problem.config
    cap = cfg.max_output_size if max_output_size is None else max_output_size
    attributes = cfg.call_attributes()
    attributes["max_output_size"] = cap
    return Problem([change(r) for r in problem.ranks], **attributes)


def _probs_ones(problem: Problem) -> Problem:
    return _each_rank(problem, lambda r: replace(r, probs=np.ones_like(r.probs)))


def _probs_renormalised(problem: Problem) -> Problem | None:
    if any((r.probs.sum(axis=1) == 0).any() for r in problem.ranks):
        return None
    return _each_rank(problem, lambda r: replace(
        r, probs=(r.probs / r.probs.sum(axis=1, keepdims=True)).astype(np.float32)))


def _probs_squared(problem: Problem) -> Problem:
    return _each_rank(problem, lambda r: replace(
        r, probs=(r.probs * r.probs).astype(np.float32)))


def _last_slot_dropped(problem: Problem) -> Problem:
    def drop(r: RankInputs) -> RankInputs:
        probs = np.array(r.probs)
        probs[:, -1] = 0  # y·0 + acc = acc exactly: the slot adds nothing
        return replace(r, probs=probs)

    return _each_rank(problem, drop)


def _ids_shifted(by: int) -> Callable[[Problem], Problem]:
    def shift(problem: Problem) -> Problem:
        num = problem.config.num_experts
        return _each_rank(problem, lambda r: replace(
            r, expert_idx=((r.expert_idx.astype(np.int64) + by) % num).astype(np.int32)))

    return shift


def _experts_round_robin(problem: Problem) -> Problem | None:
    """The inputs whose contiguous placement is ``problem``'s round-robin one: global expert g
    on rank g % EP as local expert g // EP becomes id (g % EP)·E + g // EP."""
    cfg = problem.config
    if cfg.ep_size == 1 or cfg.experts_per_rank == 1:
        return None  # the two placements agree

    def place(r: RankInputs) -> RankInputs:
        g = r.expert_idx.astype(np.int64)
        moved = (g % cfg.ep_size) * cfg.experts_per_rank + g // cfg.ep_size
        return replace(r, expert_idx=np.where(g < cfg.num_experts, moved, g).astype(np.int32))

    return _each_rank(problem, place)


def _cap_shifted(by: int) -> Callable[[Problem], Problem | None]:
    def shift(problem: Problem) -> Problem | None:
        cap = problem.config.max_output_size
        if cap is None or cap + by < 0:
            return None
        return _each_rank(problem, lambda r: r, max_output_size=cap + by)

    return shift


def _read_late_after_empty_sources(problem: Problem) -> Array | None:
    """Per slot, the slot whose result a combine reads that starts each (expert, source) block
    one row late for every source before it that sends the expert nothing: the kept receive
    rows of all ranks in buffer order, each read ``late`` rows on (−1: past the last row)."""
    cfg = problem.config
    routing = route(problem)
    empty = routing.counts == 0
    late_by_block = np.cumsum(empty, axis=0) - empty  # (EP, EP·E): empty sources before s
    if cfg.ep_size == 1 or not late_by_block.any():
        return None
    buffer = routing.order[routing.slot_kept[routing.order]]  # kept rows, rank after rank
    src = np.repeat(np.arange(cfg.ep_size), np.array(cfg.tokens_per_rank) * cfg.top_k)
    ids = np.concatenate([r.expert_idx.reshape(-1) for r in problem.ranks]).astype(np.int64)
    late = late_by_block[src[buffer], ids[buffer]]
    if not late.any():
        return None
    target = np.arange(buffer.size) + late
    reads = np.arange(src.size)
    reads[buffer] = np.where(target < buffer.size, buffer[np.minimum(target, buffer.size - 1)], -1)
    return reads


def _counts_after_truncation(problem: Problem) -> Array:
    cfg = problem.config
    return np.asarray(route(problem).expert_kept.reshape(cfg.ep_size, -1).astype(np.int32))


# ---------------------------------------------------------------- the catalogue


@dataclass(frozen=True)
class Defect:
    """One known defect: ``phrase`` completes "the reference with …"; ``advice`` is what to
    look at. Its output is the oracle's on ``inputs(problem)`` (``None``: not applicable)
    with the profile ``kernel(profile)``, its combine reading each slot's result from the slot
    ``reads(problem)`` names (a receive-layout defect; ``None``: not applicable), and
    ``counts(problem)`` as ``expert_token_nums``."""

    key: str
    phrase: str
    advice: str
    kernel: Callable[[KernelProfile], KernelProfile] | None = None
    inputs: Callable[[Problem], Problem | None] | None = None
    counts: Callable[[Problem], Array] | None = None
    reads: Callable[[Problem], Array | None] | None = None

    def outputs(self, problem: Problem, numerics: Numerics) -> Result | None:
        """The oracle's run of this defect on ``problem`` (counts replaced where the defect
        changes them); ``None`` where it does not apply."""
        changed = problem if self.inputs is None else self.inputs(problem)
        if changed is None:
            return None
        reads = None if self.reads is None else self.reads(problem)
        if self.reads is not None and reads is None:
            return None
        profile = numerics.profile
        mutant = profile if self.kernel is None else self.kernel(profile)
        if changed is problem and mutant == profile and self.counts is None and reads is None:
            return None
        result = run(changed, numerics=replace(numerics, mode="faithful", kernel=mutant),
                     envelope=True, reads=reads)
        if self.counts is None:
            return result
        nums = self.counts(problem)
        ranks = tuple(replace(r, expert_token_nums=n) for r, n in zip(result.ranks, nums))
        return replace(result, ranks=ranks)


#: Every known defect; adding one is one entry (and, for a new kind of change, one function).
CATALOGUE: tuple[Defect, ...] = (
    Defect("gate_up_swapped", "the gate and up halves of W1 swapped",
           "SwiGLU takes the gate from W1's first I columns and up from the last I: check the "
           "checkpoint's gate/up order and the slice offsets of the activation",
           kernel=lambda p: p.map_steps("swiglu",
                                        lambda s: replace(s, gate_first=not s.gate_first))),
    Defect("probs_ignored", "the routing weights ignored (every weight 1)",
           "multiply each slot's expert output by probs[t, k] before summing the slots",
           inputs=_probs_ones),
    Defect("probs_renormalised", "the routing weights renormalised to sum 1",
           "use probs as given: the router already normalised them (or chose not to)",
           inputs=_probs_renormalised),
    Defect("probs_twice", "the routing weights applied twice (each slot weighted by probs²)",
           "multiply each slot's output by probs[t, k] once: look for a second multiply in "
           "the combine or an already weighted y",
           inputs=_probs_squared),
    Defect("weight_twice", "the routed weight applied twice (GEMM2 epilogue and combine)",
           "apply probs[t, k] once: remove it from either GEMM2's epilogue or the combine",
           kernel=_weight_twice),
    Defect("weight_in_gemm2", "the routed weight applied in GEMM2's epilogue, before the final "
           "cast, instead of in the float32 combine",
           "scale by probs[t, k] in the combine, after y is stored in x's dtype",
           kernel=_weight_in_gemm2),
    Defect("weight_in_combine", "the routed weight applied in the combine instead of GEMM2's "
           "epilogue", "scale by probs[t, k] in GEMM2's epilogue, before y is stored",
           kernel=_weight_in_combine),
    Defect("rows_shifted_by_empty_rank", "receive rows read one position late for each "
           "source rank before them that sends the expert nothing (a block's start taken as "
           "the previous block's last row + 1, an empty block's last row as its start)",
           "compute each (expert, source) block's first row as the exclusive prefix sum of the "
           "counts of the sources before it (§5), which an empty source adds 0 to",
           reads=_read_late_after_empty_sources),
    Defect("last_slot_dropped", "the last top-k slot left out of the combine",
           "sum all top_k slots of a token: check the loop bound of the combine",
           inputs=_last_slot_dropped),
    Defect("combine_bf16", "the combine accumulated in bf16",
           "keep the combine's accumulator in float32 and cast once at the end",
           kernel=_combine_as(_Bf16Combine)),
    Defect("combine_reversed", "the combine summed in reverse k order",
           "sum the slots sequentially in k order, k = 0 first (float32 addition does not "
           "commute in its roundings)", kernel=_combine_as(_ReversedCombine)),
    Defect("step1_ties", "step 1 (token quantisation) rounding ties the other way",
           "round x/σ1 to int8 with the profile's tie rule (ascend-a3: half away from zero)",
           kernel=lambda p: p.map_steps("quantise", lambda q: replace(q, ties=_flip(q.ties)))),
    Defect("step1_truncated", "step 1 (token quantisation) truncating x/σ1 toward zero "
           "instead of rounding it", "round x/σ1 to the nearest integer (a plain (int8) cast "
           "truncates): every value loses up to a whole step toward zero",
           kernel=lambda p: p.map_steps("quantise", lambda q: replace(q, ties="trunc"))),
    Defect("per_tensor_scale", "one activation scale for the whole call (the largest |x| of "
           "every token) instead of one per token", "take amax over each token's own row in "
           "step 1 (a per-token σ1): small tokens lose their int8 levels to the largest one",
           kernel=_per_tensor),
    Defect("step5_ties", "step 5 (requantisation) rounding ties the other way",
           "round a·127/amax to int8 with the profile's tie rule (ascend-a3: half to even)",
           kernel=lambda p: p.map_steps("requantise",
                                        lambda q: replace(q, ties=_flip(q.ties)))),
    Defect("swiglu_cast_ties", "the SwiGLU output cast to x's dtype with ties the other way "
           "(BF16/FP16 weights)", "cast the SwiGLU result with the profile's tie rule "
           "(ascend-a3: CAST_ROUND, half away from zero)", kernel=_swiglu_cast_ties),
    Defect("bf16_intermediates", "bf16 instead of fp16 intermediates (GEMM dequant outputs)",
           "store the dequantised GEMM1/GEMM2 outputs as float16 even when x is bfloat16",
           kernel=lambda p: _epilogues(p, _swap_store("fp16", "x"), *_INT_GEMMS)),
    Defect("f32_intermediates", "the GEMM dequant outputs kept in float32 (no fp16 store)",
           "round the dequantised GEMM outputs to float16 as the kernel stores them",
           kernel=lambda p: _epilogues(p, _swap_store("fp16", None), *_INT_GEMMS)),
    Defect("silu_unrounded", "silu not rounded to x's dtype before the product",
           "store silu(gate) in x's dtype before multiplying by up",
           kernel=lambda p: _swiglus(p, silu_store=None)),
    Defect("swiglu_unrounded", "the SwiGLU output not rounded to x's dtype before GEMM2",
           "store silu(gate)·up in x's dtype before GEMM2",
           kernel=lambda p: _swiglus(p, store=None)),
    Defect("ids_plus_one", "every expert id read one too high (wrapping at EP·E)",
           "index experts from 0: global expert g is local expert g % E of rank g // E",
           inputs=_ids_shifted(1)),
    Defect("ids_minus_one", "every expert id read one too low (wrapping at 0)",
           "index experts from 0 (ids are not 1-based): global expert g is local expert g % E "
           "of rank g // E", inputs=_ids_shifted(-1)),
    Defect("experts_round_robin", "experts placed round-robin (global expert g on rank g % EP) "
           "instead of in contiguous blocks", "place global expert g on rank g // E as its "
           "local expert g % E (§4): the DeepEP/Megatron contiguous layout",
           inputs=_experts_round_robin),
    Defect("cap_minus_one", "max_output_size − 1 receive rows kept (truncation off by one)",
           "keep every receive row with index < max_output_size (the last one is lost)",
           inputs=_cap_shifted(-1)),
    Defect("cap_plus_one", "max_output_size + 1 receive rows kept (truncation off by one)",
           "keep receive rows with index < max_output_size (not <=)", inputs=_cap_shifted(1)),
    Defect("counts_after_truncation", "expert_token_nums counted after truncation",
           "count every routed row per local expert before max_output_size drops any",
           counts=_counts_after_truncation),
)


# ---------------------------------------------------------------- matching


@dataclass(frozen=True)
class Diagnosis:
    """What :func:`diagnose` found. ``exact``: the entries equal bit for bit (the first is
    named; the others cannot be told apart from it on this problem); ``close``: failing that,
    the entry within the judge's tolerance with the smallest worst error-to-tolerance ratio,
    and that ratio; ``inert``: the keys of entries that change nothing judged here;
    ``tried``: the keys of every entry that applied to the problem."""

    verdict: Verdict
    profile: str
    exact: tuple[Defect, ...] = ()
    close: tuple[Defect, float] | None = None
    inert: tuple[str, ...] = ()
    tried: tuple[str, ...] = ()

    @property
    def conforms(self) -> bool:
        return self.verdict.ok

    @property
    def defect(self) -> Defect | None:
        """The named defect, or ``None`` (conforming outputs, or no match)."""
        if self.exact:
            return self.exact[0]
        return self.close[0] if self.close is not None else None

    def describe(self) -> str:
        if self.conforms:
            return "diagnosis: none needed, the outputs conform"
        if self.verdict.stage in ("call", "timeout", "ranks", "structure"):
            return (f"diagnosis: none, the outputs failed at stage '{self.verdict.stage}' "
                    "before any value could be compared")
        if self.exact:
            d = self.exact[0]
            lines = [f"diagnosis: your output equals the reference ({self.profile}) with "
                     f"{d.phrase}, bit for bit on every defined row.", f"  fix: {d.advice}"]
            if len(self.exact) > 1:
                lines.append("  equally consistent on this problem: "
                             + "; ".join(o.phrase for o in self.exact[1:]))
            return "\n".join(lines)
        if self.close is not None:
            d, ratio = self.close
            return (f"diagnosis: no known defect matches bit for bit; the closest is the "
                    f"reference ({self.profile}) with {d.phrase}, within the judge's tolerance "
                    f"(worst error {ratio:.3g} of the allowed).\n  fix: {d.advice}")
        inert = f"; {len(self.inert)} change nothing judged here" if self.inert else ""
        return (f"diagnosis: no known defect matches ({len(self.tried)} tried against "
                f"{self.profile}{inert}: {', '.join(self.tried)})")


def _same(got: Array, want: Array) -> bool:
    """Equal bit for bit (NaN matches any NaN)."""
    g, w = got.astype(np.float64), want.astype(np.float64)
    same_bits = got.view(np.uint16) == want.view(np.uint16)
    return bool((same_bits | (np.isnan(g) & np.isnan(w))).all())


def _inert(entry: Result, reference: Result) -> bool:
    """The entry changes nothing the judge looks at: same counts, and on the reference's
    defined rows it defines every row and equals the reference."""
    for e, r in zip(entry.ranks, reference.ranks):
        if not np.array_equal(e.expert_token_nums, r.expert_token_nums):
            return False
        if (r.defined & ~e.defined).any() or not _same(e.out[r.defined], r.out[r.defined]):
            return False
    return True


def _worst_ratio(got: list[tuple[Array, Array]], entry: Result, reference: Result,
                 dtype: str, ulps: float) -> float:
    """Bitwise: 0. Else the worst error-to-tolerance ratio of ``got`` against the entry's
    output with the reference's envelope around it (``inf`` if the counts differ)."""
    worst = 0.0
    for (out, nums), e, r in zip(got, entry.ranks, reference.ranks):
        if not np.array_equal(nums, e.expert_token_nums):
            return float("inf")
        rows = r.defined & e.defined  # rows the entry leaves undefined: anything goes there
        if not rows.any() or _same(out[rows], e.out[rows]):
            continue
        if e.out_lo is not None and e.out_hi is not None:
            moved = e  # the defect's own envelope: a kernel with it and the profile's freedoms
        else:
            assert r.out_lo is not None and r.out_hi is not None
            out64, ref64 = e.out.astype(np.float64), r.out.astype(np.float64)
            moved = RankResult(e.out, e.expert_token_nums, e.defined,
                               out_lo=out64 - (ref64 - r.out_lo),
                               out_hi=out64 + (r.out_hi - ref64))
        got64, want64 = out[rows].astype(np.float64), e.out[rows].astype(np.float64)
        if not (np.isfinite(got64) == np.isfinite(want64)).all():
            return float("inf")
        finite = np.isfinite(want64)
        ratio = envelope_ratio(np.where(finite, got64, want64), moved, rows, dtype, ulps)
        worst = max(worst, float(ratio.max(initial=0.0)))
    return worst


def diagnose(
    problem: Problem,
    outputs: object,
    *,
    numerics: str | Numerics = "faithful",
    ulps: float = 0.0,
    catalogue: Sequence[Defect] = CATALOGUE,
) -> Diagnosis:
    """Judge ``outputs`` as :func:`oracle.compare` does; if they fail, run every applicable
    ``catalogue`` entry on ``problem`` and name the one they equal (see the module docstring).
    One oracle run per entry: meant for counterexample sizes."""
    num = resolve_numerics(numerics)
    if num.mode == "ideal" and num.kernel is None:
        return _diagnose_ideal(problem, outputs, num, ulps, catalogue)
    faithful = replace(num, mode="faithful", kernel=num.profile)
    reference = run(problem, numerics=faithful, envelope=True)
    verdict = compare(problem, outputs, numerics=num, ulps=ulps,
                      expected=reference if num.mode == "faithful" else None)
    profile = num.profile.name
    got = structured_outputs(problem, outputs)
    if verdict.ok or isinstance(got, Verdict):
        return Diagnosis(verdict, profile)
    exact: list[Defect] = []
    inert: list[str] = []
    ratios: list[tuple[float, int, Defect]] = []
    tried: list[str] = []
    for i, defect in enumerate(catalogue):
        entry = defect.outputs(problem, faithful)
        if entry is None:
            continue
        tried.append(defect.key)
        if _inert(entry, reference):
            inert.append(defect.key)
            continue
        ratio = _worst_ratio(got, entry, reference, problem.config.x_dtype, ulps)
        if ratio == 0.0:
            exact.append(defect)
        elif ratio <= 1.0:
            ratios.append((ratio, i, defect))
    close = None
    if not exact and ratios:
        ratio, _, defect = min(ratios, key=lambda t: t[:2])
        close = (defect, ratio)
    return Diagnosis(verdict, profile, tuple(exact), close, tuple(inert), tuple(tried))




IDEAL = "the ideal mathematics"


def _diagnose_ideal(problem: Problem, outputs: object, num: Numerics, ulps: float,
                    catalogue: Sequence[Defect]) -> Diagnosis:
    """:func:`diagnose` in ideal mode without a profile: each entry that changes the inputs or
    the counts (not a rounding point, nor the rows the combine reads, which the ideal judge
    does not model) is judged by the ideal judge on its inputs; the one with the smallest
    worst error-to-tolerance ratio that passes is named."""
    verdict = compare(problem, outputs, numerics=num, ulps=ulps)
    got = structured_outputs(problem, outputs)
    if verdict.ok or isinstance(got, Verdict):
        return Diagnosis(verdict, IDEAL)
    passing: list[tuple[float, int, Defect]] = []
    tried: list[str] = []
    for i, defect in enumerate(catalogue):
        if defect.kernel is not None or defect.reads is not None:
            continue
        changed = problem if defect.inputs is None else defect.inputs(problem)
        if changed is None:
            continue
        tried.append(defect.key)
        judged: list[tuple[Array, Array]] = got
        if defect.counts is not None:
            if not all(np.array_equal(nums, c)
                       for (_, nums), c in zip(got, defect.counts(problem))):
                continue
            judged = [(out, r.expert_token_nums) for (out, _), r in zip(got, run(
                problem, numerics=replace(num, mode="faithful")).ranks)]
        entry = compare(changed, judged, numerics=num, ulps=ulps)
        if entry.ok:
            passing.append((entry.ratio, i, defect))
    close = None
    if passing:
        ratio, _, defect = min(passing, key=lambda t: t[:2])
        close = (defect, ratio)
    return Diagnosis(verdict, IDEAL, (), close, (), tuple(tried))
