"""One token, stage by stage: the reference intermediates of every slot at each rounding point
of a kernel profile (issue 13), for ``dfc-oracle explain``.

:func:`token_stages` recomputes, for one (rank, token), what :func:`oracle.run` computes on the
way to its ``out`` row, by calling the profile's step objects (:mod:`oracle.model.kernels`) on the
same rows in the same batches (each slot's whole expert batch, so a BLAS call sees the shapes
the reference gave it and every value is the reference's bit for bit): §6 steps 1–7 per slot,
then the combine (step 8). Each value carries the profile's envelope, so that
:meth:`TokenStages.explanation` can say whether the implementation's ``out`` row equals, within
that envelope, the combine of the reference ``y`` with one slot left out or with the routing
weights ignored: a defect of the combine alone. Whole-call defects are
:mod:`oracle.explain.diagnose`'s.

>>> from spec import OpConfig, random_problem
>>> p = random_problem(OpConfig(ep_size=1, experts_per_rank=2, top_k=2, hidden=32,
...                             intermediate=8, tokens_per_rank=(2,)), seed=0)
>>> [s.name for s in token_stages(p, 0, 1).slots[0].stages]
['q', 'sigma1', 'h', 'a', 'q2', 'sigma2', 'y']
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from oracle.judge.verdict import envelope_ratio, out_dtype_spacing
from oracle.model.arithmetic import F32
from oracle.model.kernels import Env, cast
from oracle.model.numerics import Numerics, resolve_numerics
from oracle.model.reference import RankResult, expert_values, route
from spec import DTYPES, Problem

__all__ = ["SlotStages", "Stage", "TokenStages", "token_stages"]

Array = np.ndarray[Any, Any]
#: Columns of each vector printed before its max-abs.
COLUMNS = 4


@dataclass(frozen=True)
class Stage:
    """One rounding point: its §6 step, its name, and the value there (a row, or a scalar
    scale) with the profile's envelope."""

    step: str
    name: str
    value: Env


@dataclass(frozen=True)
class SlotStages:
    """Slot ``slot`` of the token: global ``expert`` (on rank ``owner``), and its stages in
    pipeline order; no stages where the slot was not computed (``why_not`` says why)."""

    slot: int
    expert: int
    owner: int
    prob: float
    stages: tuple[Stage, ...] = ()
    why_not: str = ""

    @property
    def y(self) -> Env:
        return self.stages[-1].value


@dataclass(frozen=True)
class TokenStages:
    """Token ``token`` of rank ``rank`` through the ``profile``'s pipeline. ``combined``: the
    combine before its final cast (float32); ``out``: the reference's ``out`` row with its
    envelope (float32 holding x-dtype values); both ``None`` where the row is undefined."""

    rank: int
    token: int
    profile: str
    x_dtype: str
    slots: tuple[SlotStages, ...]
    probs: Array
    combine: Any
    combined: Env | None
    out: Env | None

    def describe(self, got: Array | None = None, ulps: float = 0.0) -> str:
        """The stage table; with ``got`` (the implementation's ``out`` row), its error per
        column in ulps of the out dtype, and :meth:`explanation`."""
        lines = [f"stages of rank {self.rank} token {self.token} (reference {self.profile}; "
                 f"each vector: its first {COLUMNS} columns, then max|v|):"]
        for s in self.slots:
            head = f"  slot {s.slot} -> expert {s.expert} on rank {s.owner}, p={s.prob:.4g}"
            lines.append(head + (f": not computed ({s.why_not})" if s.why_not else ""))
            lines += [_line(f"    {st.step:<4} {st.name}", st.value.mid) for st in s.stages]
        if self.combined is None or self.out is None:
            lines.append("  8    out row undefined: not judged")
            return "\n".join(lines)
        lines.append(_line("  8    combined", self.combined.mid))
        lines.append(_line("       out (reference)", self.out.mid))
        if got is None:
            return "\n".join(lines)
        got32 = got.astype(F32)
        lines.append(_line("       out (yours)", got32))
        err = self.error_ulps(got)
        worst = int(np.argmax(np.abs(np.nan_to_num(err, nan=np.inf))))
        lines.append(_line("       error (ulp)", err, f"max |error| {abs(err[worst]):.4g} ulp "
                           f"at column {worst}"))
        lines.append(f"  first stage that explains it: {self.explanation(got, ulps)}")
        return "\n".join(lines)

    def error_ulps(self, got: Array) -> Array:
        """``got − out`` per column, in ulps of the out dtype at the reference value."""
        assert self.out is not None
        want = self.out.mid
        err = got.astype(np.float64) - want.astype(np.float64)
        spacing = out_dtype_spacing(want, self.x_dtype, toward=got.astype(F32))
        with np.errstate(invalid="ignore"):
            return np.asarray(err / spacing)

    def explanation(self, got: Array, ulps: float = 0.0) -> str:
        """Whether ``got`` equals, within the profile's envelope plus ``ulps``, the combine of
        the reference ``y`` with one slot left out or with the routing weights ignored."""
        if self.combined is None or self.out is None:
            return "none, the row is undefined"
        if self._within(got, self.out, ulps):
            return (f"none: the row is within the {self.profile} envelope element by element "
                    "(a row-test failure is a property of the whole row)")
        tried = [(f"slot {k} left out", self._combined(drop=k)) for k in range(len(self.slots))]
        if self.combine.weight == "combine":  # else the weight is inside y: a step-7 matter
            tried.append(("the routing weights ignored (every weight 1)", self._combined()))
        for what, candidate in tried:
            if self._within(got, candidate, ulps):
                return (f"step 8 (combine): your out row equals, within the {self.profile} "
                        f"envelope, the combine of the reference y with {what}")
        return (f"not the combine alone (tried: {'; '.join(w for w, _ in tried)}); compare "
                "the stages of steps 1-7")

    def first_difference(self, theirs: Sequence[Mapping[str, Any]]) -> str:
        """The implementation's own intermediates (the stage hook: one mapping per slot, by
        this walk's stage names, e.g. ``{"h": ..., "q2": ...}``; any subset) against the walk's,
        in pipeline order: the first value outside the profile's envelope, in words."""
        if len(theirs) != len(self.slots):
            return (f"your intermediates: {len(theirs)} slots given, the token has "
                    f"{len(self.slots)} (one mapping per slot, in k order)")
        known = {st.name for s in self.slots for st in s.stages}
        given = {name for slot in theirs for name in slot}
        if not given & known:
            return (f"your intermediates: none named like a stage ({', '.join(sorted(given))}); "
                    f"the stages are {', '.join(n for n in _order(self.slots))}")
        agree: list[str] = []
        for name in _order(self.slots):
            for s, mine in zip(self.slots, theirs):
                if name not in mine or not s.stages:
                    continue
                stage = next(st for st in s.stages if st.name == name)
                found = _outside(np.asarray(mine[name], np.float64), stage.value)
                if found is not None:
                    col, got, want = found
                    where = f", column {col}" if stage.value.mid.ndim else ""
                    ulp = _ulps_apart(got, want)
                    before = f" (agreeing before it: {', '.join(agree)})" if agree else ""
                    return (f"your {name} (step {stage.step}) first differs at slot {s.slot}"
                            f"{where}: {got:.9g} vs the reference's {want:.9g}, {ulp} float32 "
                            f"ulp apart, outside the {self.profile} envelope{before}")
            if name in given:
                agree.append(name)
        return (f"your intermediates ({', '.join(agree)}) all lie in the {self.profile} "
                "envelope: the difference comes after them")

    def _combined(self, drop: int | None = None) -> Env:
        """The out row of the combine of the reference ``y`` with slot ``drop`` left out (its
        ``y`` zero: ``acc + 0`` is ``acc`` exactly), or, for ``None``, every weight 1."""
        rows = [s.y for s in self.slots]
        if drop is not None:
            zero = np.zeros_like(rows[drop].mid)
            rows[drop] = Env(zero, zero, zero)
        y = _token_of(rows)
        probs = self.probs[None] if drop is not None else np.ones((1, len(rows)), F32)
        acc = self.combine(y, probs, DTYPES[self.x_dtype])
        return _to_out(acc, self.x_dtype)

    def _within(self, got: Array, want: Env, ulps: float) -> bool:
        assert want.lo is not None and want.hi is not None
        ref = RankResult(want.mid[None], np.zeros(0, np.int32), np.ones(1, bool),
                         want.lo[None], want.hi[None])
        finite = np.isfinite(want.mid)
        got64 = got.astype(np.float64)
        if not (np.isfinite(got64) == finite).all():
            return False
        ratio = envelope_ratio(np.where(finite, got64, want.mid)[None], ref, np.ones(1, bool),
                               self.x_dtype, ulps)
        return bool((ratio <= 1).all())


def _order(slots: Sequence[SlotStages]) -> list[str]:
    """The stage names in pipeline order (of the first computed slot)."""
    return next(([st.name for st in s.stages] for s in slots if s.stages), [])


def _outside(got: Array, want: Env) -> tuple[int, float, float] | None:
    """The first element (flat index, yours, reference) outside ``want``'s envelope, or of
    another shape; ``None`` where every element lies inside (NaN matches NaN)."""
    mid = np.asarray(want.mid, np.float64).reshape(-1)
    lo = mid if want.lo is None else np.asarray(want.lo, np.float64).reshape(-1)
    hi = mid if want.hi is None else np.asarray(want.hi, np.float64).reshape(-1)
    flat = got.reshape(-1)
    if flat.size != mid.size:
        return 0, float("nan"), float(mid[0]) if mid.size else float("nan")
    with np.errstate(invalid="ignore"):
        bad = ~(((flat >= lo) & (flat <= hi)) | (np.isnan(flat) & np.isnan(mid)))
    if not bad.any():
        return None
    i = int(np.flatnonzero(bad)[0])
    return i, float(flat[i]), float(mid[i])


def _ulps_apart(a: float, b: float) -> str:
    """How many float32 values lie between ``a`` and ``b`` (same sign), as text."""
    if not (np.isfinite(a) and np.isfinite(b)) or (a < 0) != (b < 0):
        return "many"
    bits = np.array([abs(a), abs(b)], F32).view(np.int32)
    return str(abs(int(bits[0]) - int(bits[1])))


def _token_of(rows: list[Env]) -> Env:
    """One token's slot rows as the combine takes them: ``(1, top_k, K)``."""
    return Env(*(np.stack([getattr(r, f) for r in rows])[None] for f in ("mid", "lo", "hi")))


def _to_out(acc: Env, x_dtype: str) -> Env:
    """The final cast of the combine (monotone: the envelope's ends cast too)."""
    to_x = cast(DTYPES[x_dtype])
    assert acc.lo is not None and acc.hi is not None
    return Env(to_x(acc.mid[0]), to_x(acc.lo[0]), to_x(acc.hi[0]))


def _line(label: str, value: Array, tail: str = "") -> str:
    v = np.asarray(value, dtype=np.float64).reshape(-1)
    if v.size == 1:
        return f"{label:<24} {v[0]:.6g}"
    first = ", ".join(f"{c:.4g}" for c in v[:COLUMNS])
    more = ", ..." if v.size > COLUMNS else ""
    tail = tail or f"max|v| {np.abs(v).max(initial=0):.4g}"
    return f"{label:<24} [{first}{more}]  {tail}"


def token_stages(
    problem: Problem, rank: int, token: int, numerics: str | Numerics = "faithful"
) -> TokenStages:
    """The reference intermediates of token ``token`` of rank ``rank`` under the kernel
    profile of ``numerics`` (its switches included; ideal numerics use their profile, as
    :mod:`oracle.explain.diagnose` does). Every value equals :func:`oracle.run`'s bit for bit:
    ``σ1`` its ``Trace.token_scale``, ``y`` its ``Trace.y``, the combine its ``Trace.combined``."""
    num = replace(resolve_numerics(numerics), mode="faithful")
    profile = num.profile
    cfg = problem.config
    pipeline = profile.pipeline(cfg.kernel_variant.name)
    top_k, e_local = cfg.top_k, cfg.experts_per_rank
    routing = route(problem)
    x_dtype = DTYPES[cfg.x_dtype]
    xf = np.concatenate([r.x for r in problem.ranks]).astype(F32)
    slot_p = np.concatenate([r.probs for r in problem.ranks]).astype(F32).reshape(-1)
    index = int(sum(cfg.tokens_per_rank[:rank])) + token
    inputs = problem.ranks[rank]
    slots = []
    for k in range(top_k):
        g = int(inputs.expert_idx[token, k])
        prob = float(inputs.probs[token, k])
        j = index * top_k + k
        if not routing.slot_kept[j]:
            why = ("masked (active_mask False)" if not inputs.is_active()[token]
                   else "dropped by max_output_size")
            slots.append(SlotStages(k, g, g // e_local, prob, why_not=why))
            continue
        start = int(routing.expert_start[g])
        batch = routing.order[start : start + int(routing.expert_kept[g])]
        row = int(np.flatnonzero(batch == j)[0])
        weights = expert_values(problem, g)
        s1, s2 = weights.get("scale1"), weights.get("scale2")
        rows = xf[batch // top_k]
        x = Env(rows, rows, rows)
        if s1 is not None and s2 is not None:
            weights["scale1"], weights["scale2"] = num.read_scales(s1, s2)
        named: tuple[tuple[str, str, Env], ...] = ()
        a, sigma1 = x, None
        if pipeline.quantise is not None:
            a, sigma1, _ = pipeline.quantise(x, num.zero_rows)
            named = (("1", "q", a), ("1", "sigma1", sigma1))
        named += pipeline.stages(a, sigma1, weights, slot_p[batch], cfg, num.zero_rows)
        stages = tuple(Stage(step, name, v.take(row)) for step, name, v in named)
        slots.append(SlotStages(k, g, g // e_local, prob, stages))
    probs = np.asarray(inputs.probs[token], F32)
    combined = out = None
    if all(s.stages for s in slots):
        acc = profile.combine(_token_of([s.y for s in slots]), probs[None], x_dtype)
        assert acc.lo is not None and acc.hi is not None
        combined = Env(acc.mid[0], acc.lo[0], acc.hi[0])
        out = _to_out(acc, cfg.x_dtype)
    return TokenStages(rank, token, profile.name, cfg.x_dtype, tuple(slots), probs,
                       profile.combine, combined, out)
