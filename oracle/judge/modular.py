"""The judges of the modular split, one per stage (:mod:`spec.modular`; ``docs/routing.md``
"Gating one stage"). Each takes a :class:`spec.modular.StageCall` and the implementation's
per-rank outputs and returns a :class:`oracle.judge.verdict.Verdict`; none raises for what the
outputs are. Messages name the rank, the local expert, the buffer row and the slot it holds.

- :func:`compare_dispatch`: per rank ``(x, source, counts)``; counts exactly, each expert's
  segment as a permutation of its routed slots, each row bit for bit its source token.
- :func:`compare_experts`: per rank ``y`` in the received layout; each rank judged as the
  one-rank fused call of its received rows (:func:`oracle.model.modular.experts_problem`)
  with :func:`oracle.judge.verdict.compare`: the same tolerance policy and row test.
- :func:`compare_combine`: per rank ``out``; inside the combine's envelope
  (:func:`oracle.model.modular.combine_envelope`) plus ``ulps``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from oracle.judge.verdict import Verdict, _as_numpy, compare, out_dtype_spacing
from oracle.model.modular import combine_envelope, dispatch_reference, experts_problem
from oracle.model.numerics import Numerics
from spec import DTYPES
from spec.errors import describe
from spec.modular import Received, StageCall, valid_rows

__all__ = ["compare_combine", "compare_dispatch", "compare_experts"]

Array = np.ndarray[Any, Any]


def _fail(stage: str, message: str, rank: int | None = None,
          where: tuple[int, ...] | None = None, ratio: float = float("inf")) -> Verdict:
    return Verdict(False, stage, message, ratio, rank, where)


def _per_rank(call: StageCall, outputs: object, what: str) -> list[object] | Verdict:
    """``outputs`` as a list of one entry per rank, each converted from torch if it is.
    Raises ValueError for an experts or combine call whose inputs were never built."""
    ep = call.problem.config.ep_size
    if call.stage != "dispatch" and not call.received:
        raise ValueError(f"this {call.stage} call has no received buffers: build it with "
                         "oracle.model.modular.stage_inputs(call), the inputs the "
                         "implementation was given")
    if isinstance(outputs, (str, bytes)) or not isinstance(outputs, Sequence):
        return _fail("ranks", f"expected a sequence of {ep} per-rank {what}; got "
                     f"{describe(outputs)}")
    if len(outputs) != ep:
        return _fail("ranks", f"expected {ep} per-rank {what} (one per rank); got {len(outputs)}")
    try:
        return [tuple(_as_numpy(v) for v in o) if isinstance(o, (tuple, list)) else _as_numpy(o)
                for o in outputs]
    except Exception as exc:  # a tensor that cannot be read: the implementation's report
        return _fail("structure", f"a per-rank {what} cannot be read as arrays "
                     f"({type(exc).__name__}: {str(exc)[:200]})")


def _rows_shape(call: StageCall, rows: int, tail: int) -> tuple[int, ...]:
    e = call.problem.config.experts_per_rank
    return (rows, tail) if call.layout == "contiguous" else (e, call.capacity, tail)


def _slot(source: Array) -> str:
    s, t, k = (int(v) for v in source)
    return f"token {t} of rank {s}, slot {k}"


def _buffer(call: StageCall, r: int, raw: object, want: Received) -> Received | Verdict:
    """One rank's dispatch output as a :class:`Received` of the contract's shapes."""
    cfg = call.problem.config
    if hasattr(raw, "x") and hasattr(raw, "source") and hasattr(raw, "counts"):
        raw = (_as_numpy(raw.x), _as_numpy(raw.source), _as_numpy(raw.counts))
    if not isinstance(raw, tuple) or len(raw) != 3:
        return _fail("structure", f"rank {r}: expected (x, source, counts) or an object with "
                     f".x, .source, .counts; got {describe(raw)}", r)
    x, source, counts = raw
    if not isinstance(counts, np.ndarray) or counts.shape != (cfg.experts_per_rank,) or (
            counts.dtype != np.int32):
        return _fail("structure", f"rank {r}: counts must be int32 of shape "
                     f"({cfg.experts_per_rank},); got {describe(counts)}", r)
    diff = np.flatnonzero(counts != want.counts)
    if diff.size:
        e = int(diff[0])
        return _fail("counts", f"rank {r}, local expert {e} (global "
                     f"{r * cfg.experts_per_rank + e}): got {int(counts[e])} rows, expected "
                     f"{int(want.counts[e])} (all: got {counts.tolist()}, expected "
                     f"{want.counts.tolist()}); padding rows are not rows"
                     + (", nor slots routed nowhere (id -1)" if call.routed else ""), r, (e,))
    rows = int(counts.sum())
    x_shape = _rows_shape(call, rows, cfg.hidden)
    if not isinstance(x, np.ndarray) or x.shape != x_shape or x.dtype != DTYPES[cfg.x_dtype]:
        return _fail("structure", f"rank {r}: x must be {cfg.x_dtype} of shape {x_shape} "
                     f"({call.layout} layout); got {describe(x)}", r)
    src_shape = _rows_shape(call, rows, 3)
    if not isinstance(source, np.ndarray) or source.shape != src_shape or (
            source.dtype.kind not in "iu"):
        return _fail("structure", f"rank {r}: source must be integers of shape {src_shape} "
                     f"(src_rank, token, slot per row); got {describe(source)}", r)
    return Received(x=x, source=source.astype(np.int64), counts=counts)


def _segment_mismatch(r: int, e: int, g: int, got: Array, want: Array) -> str | None:
    """How expert ``e``'s got source triples differ from its routed slots, or None."""
    order_g = np.lexsort(got.T[::-1])
    order_w = np.lexsort(want.T[::-1])
    if np.array_equal(got[order_g], want[order_w]):
        return None
    keys_w = {tuple(v) for v in want.tolist()}
    seen: set[tuple[int, ...]] = set()
    for i, triple in enumerate(got.tolist()):
        t = tuple(triple)
        if t not in keys_w:
            return (f"rank {r}, local expert {e}, row {i}: holds ({', '.join(map(str, t))}), "
                    f"which is not a slot routed to expert {g}")
        if t in seen:
            return f"rank {r}, local expert {e}, row {i}: {_slot(np.array(t))} a second time"
        seen.add(t)
    missing = sorted(keys_w - seen)[0]
    return (f"rank {r}, local expert {e}: {_slot(np.array(missing))} is routed to expert {g} "
            "but missing from its rows")


def compare_dispatch(call: StageCall, outputs: object) -> Verdict:
    """Judge a dispatch's per-rank ``(x, source, counts)``: counts equal; each expert's rows a
    permutation of its routed slots (order free); each row its source token bit for bit.

    >>> from spec import OpConfig, random_problem
    >>> p = random_problem(OpConfig(ep_size=2, experts_per_rank=2, top_k=2, hidden=16,
    ...                             intermediate=8, tokens_per_rank=(3, 1)))
    >>> call = StageCall(stage="dispatch", problem=p, layout="batched")
    >>> compare_dispatch(call, [(b.x, b.source, b.counts) for b in dispatch_reference(call)]).ok
    True
    """
    per_rank = _per_rank(call, outputs, "dispatch buffers")
    if isinstance(per_rank, Verdict):
        return per_rank
    cfg = call.problem.config
    x_all = np.concatenate([r.x for r in call.problem.ranks])
    starts = np.cumsum((0, *cfg.tokens_per_rank))[:-1]
    for r, (raw, want) in enumerate(zip(per_rank, dispatch_reference(call))):
        got = _buffer(call, r, raw, want)
        if isinstance(got, Verdict):
            return got
        x, source, expert = valid_rows(got, call.layout)
        _, want_source, want_expert = valid_rows(want, call.layout)
        for seg in np.flatnonzero(want.counts).tolist():
            message = _segment_mismatch(r, seg, r * cfg.experts_per_rank + seg,
                                        source[expert == seg], want_source[want_expert == seg])
            if message is not None:
                return _fail("source", message, r, (seg,))
        sent = x_all[starts[source[:, 0]] + source[:, 1]]
        differ = x.view(np.uint16) != sent.view(np.uint16)
        bad = np.flatnonzero(differ.any(axis=1))
        if bad.size:
            i = int(bad[0])
            e = int(expert[i])
            row = i - int(np.searchsorted(expert, e))
            c = int(np.argmax(differ[i]))
            return _fail("rows", f"rank {r}, local expert {e}, row {row} ({_slot(source[i])}): "
                         f"{int(differ[i].sum())} of {cfg.hidden} columns differ from the source "
                         f"token (column {c}: got {float(x[i, c])!r}, expected "
                         f"{float(sent[i, c])!r}"
                         f"); a dispatch copies token rows bit for bit", r, (e, row, c))
    return Verdict(True, "ok", "dispatch conforms: every routed slot once, in its expert's rows, "
                   "bit for bit", 0.0)


def _stage_array(call: StageCall, r: int, raw: object, shape: tuple[int, ...],
                 what: str) -> Array | Verdict:
    cfg = call.problem.config
    if not isinstance(raw, np.ndarray) or raw.shape != shape or raw.dtype != DTYPES[cfg.x_dtype]:
        return _fail("structure", f"rank {r}: {what} must be {cfg.x_dtype} of shape {shape}; "
                     f"got {describe(raw)}", r)
    return raw


def _one_rank(message: str) -> str:
    """The fused judge's message on a one-rank experts problem without its token prefix and
    its routing summary (the caller names the rank, expert, row and slot instead)."""
    message = re.sub(r"^rank 0, token \d+(, |: )", "", message)
    return re.sub(r"; token \d+ of rank 0: slots -> .*$", "", message)


def compare_experts(call: StageCall, outputs: object, *, numerics: str | Numerics = "ideal",
                    ulps: float = 0.0) -> Verdict:
    """Judge an experts stage's per-rank ``y`` (the received layout; padding not judged) as
    the one-rank fused call of each rank's received rows. ``numerics`` defaults to ``ideal``:
    GPU stacks have no Ascend kernel profile.

    >>> from oracle.model.modular import stage_inputs
    >>> from oracle.model.reference import run
    >>> from spec import OpConfig, random_problem
    >>> p = random_problem(OpConfig(ep_size=2, experts_per_rank=2, top_k=2, hidden=16,
    ...                             intermediate=8, tokens_per_rank=(3, 1)))
    >>> call = stage_inputs(StageCall(stage="experts", problem=p))
    >>> ys = [run(experts_problem(call, r)[0], numerics="ideal").ranks[0].out for r in (0, 1)]
    >>> compare_experts(call, ys).ok
    True
    """
    per_rank = _per_rank(call, outputs, "expert outputs y")
    if isinstance(per_rank, Verdict):
        return per_rank
    for r, raw in enumerate(per_rank):
        buffer = call.received[r]
        y = _stage_array(call, r, raw, buffer.x.shape, "y (the received x's layout)")
        if isinstance(y, Verdict):
            return y
        problem, expert = experts_problem(call, r)
        rows = valid_rows(Received(x=y, source=buffer.source, counts=buffer.counts),
                          call.layout)[0]
        counts = np.bincount(expert, minlength=buffer.counts.shape[0]).astype(np.int32)
        verdict = compare(problem, [(np.ascontiguousarray(rows), counts)], numerics=numerics,
                          ulps=ulps)
        if not verdict.ok:
            i = verdict.where[0] if verdict.where else 0
            e = int(expert[i]) if expert.size else 0
            row = i - int(np.searchsorted(expert, e))
            source = valid_rows(buffer, call.layout)[1]
            whose = f" ({_slot(source[i])})" if expert.size else ""
            return _fail(verdict.stage, f"rank {r}, local expert {e}, row {row}{whose}: "
                         f"{_one_rank(verdict.message)} (judged as the one-rank call of the "
                         "received rows, each routed to its expert with weight 1)", r,
                         (e, row, *(verdict.where or ())[1:]), verdict.ratio)
    return Verdict(True, "ok", "experts conform on every received row", 0.0)


def compare_combine(call: StageCall, outputs: object, *, numerics: str | Numerics = "ideal",
                    ulps: float = 0.0) -> Verdict:
    """Judge a combine's per-rank ``out`` (M_r, K): on active tokens, inside the envelope of
    ``Σ_k p_k·y_k`` (:func:`oracle.model.modular.combine_envelope`) plus ``ulps`` ulps.

    >>> from oracle.model.modular import stage_inputs
    >>> from spec import OpConfig, random_problem
    >>> p = random_problem(OpConfig(ep_size=2, experts_per_rank=2, top_k=2, hidden=16,
    ...                             intermediate=8, tokens_per_rank=(3, 1)))
    >>> call = stage_inputs(StageCall(stage="combine", problem=p))
    >>> env = combine_envelope(call)
    >>> compare_combine(call, [m.astype(p.ranks[0].x.dtype) for m in env.mid]).ok
    True
    """
    per_rank = _per_rank(call, outputs, "combined outputs out")
    if isinstance(per_rank, Verdict):
        return per_rank
    cfg = call.problem.config
    env = combine_envelope(call, numerics)
    worst = 0.0
    detail: tuple[int, int, int, float, float, float, float, float] | None = None
    for r, raw in enumerate(per_rank):
        out = _stage_array(call, r, raw, (cfg.tokens_per_rank[r], cfg.hidden), "out")
        if isinstance(out, Verdict):
            return out
        rows = env.defined[r]
        got = out[rows].astype(np.float64)
        lo, hi, mid = (a[rows].astype(np.float64) for a in (env.lo[r], env.hi[r], env.mid[r]))
        spacing = out_dtype_spacing(env.mid[r][rows], cfg.x_dtype)
        with np.errstate(invalid="ignore"):
            beyond = np.where(got > hi, got - hi, np.where(got < lo, lo - got, 0.0))
            ratio = np.where(np.isfinite(got), beyond / (ulps * spacing) if ulps else
                             np.where(beyond > 0, 1 + beyond / spacing, 0.0), np.inf)
        if ratio.size and float(ratio.max()) > worst:
            worst = float(ratio.max())
            t, c = divmod(int(np.argmax(ratio)), cfg.hidden)
            detail = (r, int(np.flatnonzero(rows)[t]), c, float(got[t, c]), float(mid[t, c]),
                      float(lo[t, c]), float(hi[t, c]), float(beyond[t, c] / spacing[t, c]))
    if detail is None or worst <= 1.0:
        return Verdict(True, "ok", "combine conforms", worst)
    r, token, c, g, m, lo_v, hi_v, n_ulps = detail
    inputs = call.problem.ranks[r]
    return _fail("out", f"rank {r}, token {token}, column {c}: got {g:.6g}, expected {m:.6g} "
                 f"(a legitimate combine gives [{lo_v:.6g}, {hi_v:.6g}]; {n_ulps:.3g} ulp of "
                 f"{cfg.x_dtype} outside); its slots -> experts "
                 f"{inputs.expert_idx[token].tolist()}, weights "
                 f"{[float(f'{p:.4g}') for p in inputs.probs[token]]}", r, (token, c), worst)
