"""Profile fitting: which rounding points does a kernel use (``dfc-oracle fit``, issue 21)?

Given a kernel's outputs on some problems, :func:`fit` searches the records reachable from the
built-in kernel profiles by changing **rounding-point knobs only** (:data:`KNOBS`: the stored
dtype of each intermediate, tie rules, division or reciprocal, the ``amax`` floor, the int8
accumulation, where the routed weight applies, the combine's sum, the SwiGLU layout) for the
records under which every output lies in the envelope, bitwise where the record pins it.
Routing, counts, the weights a slot reads and the freedoms (``exp`` ulps, summation order) are
never changed, so a structural bug cannot be fitted away: its nearest record still fails.

The search is a greedy descent on one number, the output values that lie outside the
candidate's envelope over all calls: from a built-in, every one-knob change is scored and the
best taken, for at most :data:`MAX_CHANGES` changes. Each knob changes one variant's pipeline
(or the shared combine), and the count is kept per variant, so a change is rescored on its
variant's calls alone. Where the calls span several variants, a kernel that differs from a
built-in in one pipeline fits that built-in bitwise on the other variants' calls: the descent
starts from each built-in that leaves the fewest variants unfitted (until one fits), not
merely from the one with the fewest values outside, which may be many knobs away. A record
that fits is then checked against its own one-knob neighbours: those that fit too are the
ambiguity, each with the inputs that would separate them (the knob's ``separates``).

>>> from spec import OpConfig, random_problem
>>> from oracle import run
>>> from oracle.model.kernels import ASCEND_A3
>>> p = random_problem(OpConfig(ep_size=1, experts_per_rank=2, top_k=2, hidden=32,
...                             intermediate=16, tokens_per_rank=(3,)), seed=0)
>>> found = fit([(p, [(r.out, r.expert_token_nums) for r in run(p).ranks])])
>>> found.best == ASCEND_A3, found.changes
(True, ())
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from oracle.explain.diagnose import _weight_in_combine, _weight_in_gemm2
from oracle.judge.verdict import Verdict, compare, error_ratios
from oracle.model.kernels import (
    PROFILES,
    Combine,
    FloatGemm,
    IntGemm,
    KernelProfile,
    Quantiser,
    Swiglu,
)
from oracle.model.numerics import Numerics
from spec import Problem

__all__ = ["KNOBS", "MAX_CHANGES", "Fit", "Knob", "fit"]

#: One call of the kernel: the problem and its outputs (one ``(out, expert_token_nums)`` per
#: rank).
Call = tuple[Problem, Any]
#: Knob changes a fitted record may differ from its built-in by.
MAX_CHANGES = 3
_ABSENT = object()  # a knob the record has no such rounding point for


@dataclass(frozen=True)
class Knob:
    """One rounding point of a record: ``read(profile)`` its value (``_ABSENT`` where the record
    has no such point), ``write(profile, value)`` the record with it changed, ``values`` every
    value allowed, ``separates`` the inputs on which the values give different outputs."""

    name: str
    values: tuple[Any, ...]
    read: Callable[[KernelProfile], Any]
    write: Callable[[KernelProfile, Any], KernelProfile]
    separates: str
    none: str = "none"  # how the value None reads

    @property
    def variant(self) -> str | None:
        """The variant whose pipeline this knob changes (``None``: the shared combine)."""
        head = self.name.split(".")[0]
        return None if head == "combine" else head

    def changes(self, profile: KernelProfile) -> list[tuple[str, KernelProfile]]:
        """``(description, record)`` for every other value of this knob in ``profile``."""
        now = self.read(profile)
        if now is _ABSENT:
            return []
        return [(f"{self.name}: {self._said(now)} -> {self._said(v)}", self.write(profile, v))
                for v in self.values if v != now]

    def _said(self, value: Any) -> str:
        return self.none if value is None else str(value)


def _step_field(variant: str, step: str, kind: type, name: str, values: tuple[Any, ...],
                separates: str, none: str = "none") -> Knob:
    """A field of one step record of one variant's pipeline."""
    def read(p: KernelProfile) -> Any:
        pipe = dict(p.pipelines).get(variant)
        s = getattr(pipe, step, None) if pipe is not None else None
        return getattr(s, name) if isinstance(s, kind) else _ABSENT

    def write(p: KernelProfile, value: Any) -> KernelProfile:
        return p.map_steps(step, lambda s: dataclasses.replace(s, **{name: value}), (variant,))

    return Knob(f"{variant}.{step}.{name}", values, read, write, separates, none)


_STORE_OPS = ("fp16", "x")


def _gemm_store(variant: str, step: str, separates: str) -> Knob:
    """The dtype a GEMM's epilogue first stores its output in (GEMM2's final cast to x's dtype,
    which every profile has, is not a knob): fp16, x's dtype, or none (stays float32)."""
    def store_at(ops: tuple[str, ...]) -> int | None:
        last = len(ops) - 1 if step == "gemm2" else len(ops)
        return next((i for i, op in enumerate(ops[:last]) if op in _STORE_OPS), None)

    def read(p: KernelProfile) -> Any:
        pipe = dict(p.pipelines).get(variant)
        s = getattr(pipe, step, None) if pipe is not None else None
        if not isinstance(s, (IntGemm, FloatGemm)):
            return _ABSENT
        at = store_at(s.epilogue)
        return _ABSENT if at is None else s.epilogue[at]

    def write(p: KernelProfile, value: Any) -> KernelProfile:
        def edit(s: Any) -> Any:
            at = store_at(s.epilogue)
            assert at is not None
            ops = (*s.epilogue[:at], *((value,) if value else ()), *s.epilogue[at + 1:])
            return dataclasses.replace(s, epilogue=ops)

        return p.map_steps(step, edit, (variant,))

    return Knob(f"{variant}.{step}.store", (*_STORE_OPS, None), read, write, separates,
                "float32 (no store)")


def _routed_weight() -> Knob:
    def read(p: KernelProfile) -> Any:
        return p.combine.weight

    def write(p: KernelProfile, value: Any) -> KernelProfile:
        return _weight_in_gemm2(p) if value == "gemm2" else _weight_in_combine(p)

    return Knob("combine.weight", ("combine", "gemm2"), read, write,
                "top_k >= 2 with unequal weights: y·p rounded before or after y's store")


def _combine_sum() -> Knob:
    def read(p: KernelProfile) -> Any:
        return (p.combine.sum, p.combine.x_dtype_topk)

    def write(p: KernelProfile, value: Any) -> KernelProfile:
        sum_, topk = value
        return dataclasses.replace(p, combine=Combine(p.combine.weight, sum_, topk))

    return Knob("combine.sum", (("f32_seq", ()), ("moe_sum", (2, 3, 4))), read, write,
                "top_k 2-4: partial sums rounded to x's dtype or kept in float32")


_QUANTISE = {
    "scale": (("divide", "reciprocal"), "rows where fl(a/σ) and fl(a·fl(127/amax)) round to "
              "different integers (about one element in a few hundred)"),
    "ties": (("away", "even"), "values exactly halfway between two integers after scaling "
             "(x rows holding amax/254 multiples; rare in random data)"),
    "amax_floor": ((None, 1e-10), "a row with amax below 1e-10 (a near-zero token)"),
}


def _knobs() -> tuple[Knob, ...]:
    knobs: list[Knob] = []
    for variant in ("w8a8", "w4a8", "float"):
        for step in ("quantise", "requantise"):
            for name, (values, separates) in _QUANTISE.items():
                knobs.append(_step_field(variant, step, Quantiser, name, values, separates))
        for step in ("gemm1", "gemm2"):
            knobs.append(_step_field(
                variant, step, IntGemm, "accumulate", ("int32", "f32_blocks"),
                "K > 1032: int8 partial sums beyond 2^24 rounded in a float32 accumulator"))
            knobs.append(_gemm_store(
                variant, step, "any call: the stored dtype's rounding shows in most values"))
        knobs += [
            _step_field(variant, "swiglu", Swiglu, "silu_store", (None, "x"),
                        "any call: silu rounded to x's dtype before the product",
                        "float32 (no store)"),
            _step_field(variant, "swiglu", Swiglu, "store", (None, "x", "x_away"),
                        "float32 vs x's dtype: any call; ties even vs away: products exactly "
                        "halfway between two x-dtype values (rare)", "float32 (no store)"),
            _step_field(variant, "swiglu", Swiglu, "gate_first", (True, False),
                        "any call: which half of W1 is the gate"),
        ]
    return (*knobs, _routed_weight(), _combine_sum())


#: Every rounding-point knob :func:`fit` may change, in every variant's pipeline.
KNOBS: tuple[Knob, ...] = _knobs()


@dataclass(frozen=True)
class Fit:
    """What :func:`fit` found. ``best``: the record with the fewest values outside its envelope
    (all fit: ``outside == 0``); ``base`` the built-in it was reached from and ``changes`` the
    knob changes from it; ``ambiguous``: other records that fit too, one knob away, with the
    inputs that would separate them; ``verdict``: the worst call's verdict under ``best``
    (``None`` when every call fits); ``structural``: a failure no record can fix (counts,
    shapes, a crash), in words."""

    best: KernelProfile
    base: str
    changes: tuple[str, ...]
    outside: int
    calls: int
    ambiguous: tuple[tuple[str, str], ...] = ()
    verdict: Verdict | None = None
    structural: str | None = None

    @property
    def fits(self) -> bool:
        return self.outside == 0 and self.structural is None

    def describe(self) -> str:
        """The finding in words, for the report."""
        if self.structural is not None:
            return f"nothing fits: {self.structural}; fitting changes rounding points only"
        changed = "; ".join(self.changes) or "no change"
        if not self.fits:
            where = f"\n  where it fails: {self.verdict.message}" if self.verdict else ""
            return (f"nothing fits: no record within {MAX_CHANGES} rounding-point changes of "
                    f"a built-in profile holds every output of {self.calls} calls. The nearest "
                    f"is {self.base} with {changed} ({self.outside} values outside its "
                    f"envelope){where}\n  a structural defect (routing, weights, the combine's "
                    "terms) or a rounding point no knob describes: dfc-oracle explain on a "
                    "counterexample found with this record names the known defects")
        lines = [f"fits: {self.base} with {changed}: every output of {self.calls} calls lies "
                 "in its envelope"]
        if self.ambiguous:
            lines.append("  equally consistent, one knob away (these calls cannot tell them "
                         "apart):")
            lines += [f"    {change}: separated by {how}" for change, how in self.ambiguous]
        return "\n".join(lines)


class _Scorer:
    """Values outside each record's envelope over all calls, with the worst call's verdict.

    A call of one variant is judged by that variant's pipeline and the combine only, so the
    count is kept per variant, keyed by what judges it: a record that changes one pipeline is
    rescored on that variant's calls alone. A count above ``bound`` stops counting (the record
    cannot be the better one)."""

    def __init__(self, calls: Sequence[Call]) -> None:
        self.groups: dict[str, list[Call]] = {}
        for call in calls:
            self.groups.setdefault(call[0].config.kernel_variant.name, []).append(call)
        self.seen: dict[tuple[Any, ...], tuple[int, Verdict | None, bool]] = {}

    def __call__(self, profile: KernelProfile, bound: float = np.inf) -> int:
        return self.scored(profile, bound)[0]

    def scored(self, profile: KernelProfile, bound: float = np.inf) -> tuple[int, Verdict | None]:
        outside, worst = 0, None
        for variant in self.groups:
            n, verdict = self.part(variant, profile, bound - outside)
            outside += n
            if verdict is not None and (worst is None or verdict.ratio > worst.ratio):
                worst = verdict
            if outside > bound:
                break
        return outside, worst

    def part(self, variant: str, profile: KernelProfile,
             bound: float = np.inf) -> tuple[int, Verdict | None]:
        """The count over the calls of ``variant`` alone."""
        key = (variant, profile.name, profile.pipeline(variant), profile.combine, profile.domain)
        known = self.seen.get(key)
        if known is None or (not known[2] and known[0] <= bound):
            known = self.seen[key] = self._score(self.groups[variant], profile, bound)
        return known[0], known[1]

    def unfitted(self, profile: KernelProfile) -> int:
        """How many drawn variants have a call outside ``profile``'s envelope."""
        return sum(self.part(variant, profile)[0] > 0 for variant in self.groups)

    @staticmethod
    def _score(calls: Sequence[Call], profile: KernelProfile,
               bound: float) -> tuple[int, Verdict | None, bool]:
        numerics = Numerics(kernel=profile)
        outside, worst = 0, None
        for problem, outputs in calls:
            verdict = compare(problem, outputs, numerics=numerics)
            if verdict.ok:
                continue
            ratios = error_ratios(problem, outputs, numerics=numerics)
            # A row the row test rejects with every value in the envelope still fails: 1.
            n = 1 if isinstance(ratios, Verdict) else max(1, sum(
                int(np.count_nonzero(np.nan_to_num(r, nan=0.0) > 1)) for r in ratios))
            outside += n
            if worst is None or verdict.ratio > worst.ratio:
                worst = verdict
            if outside > bound:
                return outside, worst, False
        return outside, worst, True


def _structural(calls: Sequence[Call], base: KernelProfile) -> str | None:
    """A failure before any out value is compared (ranks, structure, counts): no rounding
    point changes it."""
    for problem, outputs in calls:
        verdict = compare(problem, outputs, numerics=Numerics(kernel=base))
        if verdict.stage in ("ranks", "structure", "expert_token_nums"):
            return f"stage '{verdict.stage}': {verdict.message}"
    return None


def _descend(score: _Scorer, start: KernelProfile,
             knobs: Sequence[Knob]) -> tuple[KernelProfile, tuple[str, ...]]:
    """Greedy descent from ``start``: the best one-knob change while it lowers the count, for
    at most :data:`MAX_CHANGES` changes."""
    best = start
    changes: tuple[str, ...] = ()
    while score(best) and len(changes) < MAX_CHANGES:
        nearest, nearer = score(best), None
        for knob in knobs:
            for desc, p in knob.changes(best):
                if score(p, bound=nearest - 1) < nearest:
                    nearest, nearer = score(p), (desc, p)
        if nearer is None:
            break
        best, changes = nearer[1], (*changes, nearer[0])
    return best, changes


def fit(calls: Sequence[Call], bases: Sequence[KernelProfile] | None = None) -> Fit:
    """The record of rounding points that best explains ``calls`` (see the module doc),
    starting from ``bases`` (default: every registered profile)."""
    drawn = {problem.config.kernel_variant.name for problem, _ in calls}
    bases = [p for p in (PROFILES.values() if bases is None else bases)
             if drawn <= set(p.variants)]  # a profile without a drawn variant cannot fit
    if not calls or not bases:
        raise ValueError("fit needs at least one call and one base profile with a pipeline "
                         "for every variant the calls draw")
    structural = _structural(calls, bases[0])
    if structural is not None:
        return Fit(bases[0], bases[0].name, (), 0, len(calls), structural=structural)
    knobs = [k for k in KNOBS if k.variant is None or k.variant in drawn]
    score = _Scorer(calls)
    # A kernel that differs from a built-in in one variant's pipeline fits that built-in
    # bitwise on every other variant's calls, however many values the changed pipeline moves:
    # descend from each base that leaves the fewest drawn variants unfitted, until one fits.
    # Where no base fits any variant, from the one with the fewest values outside.
    ranked = sorted(bases, key=lambda base: (score.unfitted(base), score(base)))
    fewest = score.unfitted(ranked[0])
    starts = ([b for b in ranked if score.unfitted(b) == fewest]
              if fewest < len(score.groups) else ranked[:1])
    tried: list[tuple[KernelProfile, KernelProfile, tuple[str, ...]]] = []
    for base in starts:
        tried.append((base, *_descend(score, base, knobs)))
        if not score(tried[-1][1]):
            break
    start, best, changes = min(tried, key=lambda t: (score(t[1]), len(t[2])))
    outside, verdict = score.scored(best)
    ambiguous: tuple[tuple[str, str], ...] = ()
    if outside == 0:
        ambiguous = tuple((desc, knob.separates) for knob in knobs
                          for desc, p in knob.changes(best) if score(p, bound=0) == 0)
    name = best.name if not changes else f"{start.name}+fit"
    summary = best.summary if not changes else (
        f"{start.name} with {'; '.join(changes)} (dfc-oracle fit)")
    if changes:
        best = dataclasses.replace(best, name=name, summary=summary,
                                   sources=f"dfc-oracle fit on {len(calls)} calls, from "
                                   f"{start.name}: {start.sources}")
    return Fit(best, start.name, changes, outside, len(calls), ambiguous, verdict)
