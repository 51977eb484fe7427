"""The judge: compare an implementation's outputs with the reference model, stage by stage.

Stages, in the order they are checked (the first failing one is reported):

1. ``ranks`` — one entry per rank;
2. ``structure`` — each entry is ``(out, expert_token_nums)`` (or has those attributes) with
   the contract's shapes and dtypes;
3. ``expert_token_nums`` — exactly equal (counted before truncation, masked slots excluded);
4. ``non_finite`` — NaN or inf on a defined row where the model is finite (or the reverse);
5. ``out`` — defined rows within the tolerance policy; undefined rows are ignored.

Tolerance policy (per element, on defined rows):

- ``faithful`` (a kernel profile, :mod:`oracle.model.kernels`): inside the profile's envelope, the
  set of values a kernel with that pipeline may compute whatever it does with its freedoms
  (summation order, ``exp`` and division accuracy), plus ``ulps`` units in the last place of
  the out dtype (default 0). Where no freedom reaches a value, the comparison is bitwise.
- ``ideal``: the quantisation error bound of :func:`oracle.judge.bounds.ideal_tolerance`, derived
  step by step from the scales and shapes of the problem, plus one rounding to the out dtype.

Both then apply the row test of :mod:`oracle.judge.rowtest` to each defined token row: its error
against the float64 mathematics, projected on the ideal row, within a threshold a legitimate
kernel exceeds with probability at most ``false_alarm`` per call. Element by element, a sound
tolerance grows with the shape until it admits gross bugs; the row test keeps the power.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from oracle.adapters.gemm import in_session
from oracle.adapters.torch_io import to_numpy
from oracle.judge.bounds import ideal_tolerance
from oracle.judge.rowtest import RowVerdict, row_test
from oracle.model.arithmetic import FORMATS
from oracle.model.kernels import IdealAssumptions
from oracle.model.numerics import Numerics, resolve_numerics
from oracle.model.reference import RankResult, Result, kernel_mathematics, run
from spec import DTYPES, Problem
from spec.errors import describe

__all__ = [
    "STAGES", "Verdict", "compare", "error_ratios", "out_dtype_spacing", "routing_summary",
    "structured_outputs",
]

STAGES = (
    "call", "timeout", "ranks", "structure", "expert_token_nums", "non_finite", "out", "inputs",
)

Array = np.ndarray[Any, Any]



@dataclass(frozen=True)
class Verdict:
    """The judge's answer. ``ratio`` is the worst error-to-tolerance ratio of ``out`` (above 1 is
    a failure; ``inf`` for structural failures); ``rank`` and ``where`` locate the worst element
    (``(token, column)`` for ``out``, ``(expert,)`` for counts)."""

    ok: bool
    stage: str
    message: str
    ratio: float = 0.0
    rank: int | None = None
    where: tuple[int, ...] | None = None
    #: A pass only: the rows whose outputs the row test could not judge (its module
    #: docstring: a deterministic term such as a saturating scale outweighs the noise, a
    #: flushing scale, a zero ideal row), judged by the element-wise check alone, and the
    #: most common reason.
    untested_rows: int = 0
    untested_reason: str = ""


def out_dtype_spacing(values: Array, dtype_name: str, toward: Array | None = None) -> Array:
    """The distance to the next representable value of the out dtype at ``|values|``
    (one ulp), for bfloat16 or float16; subnormal spacing near zero. At a power of two the
    spacing below is half the spacing above: with ``toward`` (the values compared against),
    the spacing on their side, so that 2 ulps below a power of two count as 2."""
    fmt = FORMATS[dtype_name]
    digits, emin = fmt.digits, fmt.emin
    mag = np.abs(values.astype(np.float64))
    exponent = np.floor(np.log2(np.where(mag > 0, mag, 1.0)))
    exponent = np.where(mag > 0, np.maximum(exponent, emin), emin)
    spacing = 2.0 ** (exponent - (digits - 1))
    if toward is not None:
        below = (np.abs(toward.astype(np.float64)) < mag) & (mag == 2.0**exponent)
        spacing = np.where(below & (exponent > emin), spacing / 2, spacing)
    return np.asarray(spacing)


def routing_summary(problem: Problem, rank: int, token: int) -> str:
    """Where one token's slots went: expert ids, owning ranks, routing weights, mask."""
    inputs = problem.ranks[rank]
    ids = inputs.expert_idx[token].tolist()
    owners = [g // problem.config.experts_per_rank for g in ids]
    probs = [float(p) for p in inputs.probs[token]]
    active = bool(inputs.is_active()[token])
    return (
        f"token {token} of rank {rank}: slots -> experts {ids} on ranks {owners}, "
        f"probs {[float(f'{p:.4g}') for p in probs]}{'' if active else ', MASKED'}"
    )


def _entry(raw: object) -> tuple[object, object] | None:
    if hasattr(raw, "out") and hasattr(raw, "expert_token_nums"):
        return raw.out, raw.expert_token_nums
    if isinstance(raw, (tuple, list)) and len(raw) == 2:
        return raw[0], raw[1]
    return None


def _as_numpy(value: object) -> object:
    """Accept torch tensors where NumPy is expected (bfloat16 through its bit pattern)."""
    if type(value).__module__.startswith("torch"):
        return to_numpy(value)
    return value


def _fail(stage: str, message: str, rank: int | None = None,
          where: tuple[int, ...] | None = None, ratio: float = float("inf")) -> Verdict:
    return Verdict(False, stage, message, ratio, rank, where)


def structured_outputs(
    problem: Problem, outputs: object
) -> list[tuple[Array, Array]] | Verdict:
    """``outputs`` as one ``(out, expert_token_nums)`` NumPy pair per rank, or the failing
    :class:`Verdict` of stage ``ranks`` or ``structure`` that says what is wrong with them.
    Never raises for what the outputs are (issue 23: compare() raised on float8, meta and
    sparse tensors)."""
    cfg = problem.config
    if isinstance(outputs, (str, bytes)) or not isinstance(outputs, Sequence):
        return _fail("ranks", f"expected a sequence of {cfg.ep_size} per-rank results; "
                     f"got {describe(outputs)}")
    if len(outputs) != cfg.ep_size:
        return _fail("ranks", f"expected {cfg.ep_size} per-rank results (one per rank); "
                     f"got {len(outputs)}")
    checked = []
    out_dtype = DTYPES[cfg.x_dtype]
    for r, raw in enumerate(outputs):
        entry = _entry(raw)
        if entry is None:
            return _fail("structure", f"rank {r}: expected (out, expert_token_nums) or an object "
                         f"with .out and .expert_token_nums; got {describe(raw)}", r)
        try:  # a float8, meta or sparse tensor, a torch.Size: whatever converting raises
            out, nums = (_as_numpy(v) for v in entry)
        except Exception as exc:
            return _fail("structure", f"rank {r}: out or expert_token_nums cannot be read as an "
                         f"array ({type(exc).__name__}: {str(exc)[:200]}); return NumPy arrays "
                         "or dense CPU/GPU tensors of the contract's dtypes", r)
        want_out = (cfg.tokens_per_rank[r], cfg.hidden)
        if not isinstance(out, np.ndarray) or out.shape != want_out or out.dtype != out_dtype:
            return _fail("structure", f"rank {r}: out must be {cfg.x_dtype} of shape {want_out}; "
                         f"got {describe(out)}", r)
        want_nums = (cfg.experts_per_rank,)
        if not isinstance(nums, np.ndarray) or nums.shape != want_nums or nums.dtype != np.int32:
            return _fail("structure", f"rank {r}: expert_token_nums must be int32 of shape "
                         f"{want_nums}; got {describe(nums)}", r)
        checked.append((out, nums))
    return checked


def envelope_ratio(got: Array, want: RankResult, rows: Array, dtype_name: str,
                   ulps: float) -> Array:
    """Error-to-allowance ratio of ``got`` against a profile's envelope on ``rows``: the
    allowance is the envelope's side towards the error (``out_hi − out`` above, ``out − out_lo``
    below) plus ``ulps`` ulps of the out dtype. Where nothing is allowed (a pinned value), a
    mismatch of ``n`` ulps has ratio ``1 + n``; an exact match is 0."""
    assert want.out_lo is not None and want.out_hi is not None
    exp64 = want.out[rows].astype(np.float64)
    err = got.astype(np.float64) - exp64
    spacing = out_dtype_spacing(want.out[rows], dtype_name, toward=got)
    side = np.where(err > 0, want.out_hi[rows] - exp64, exp64 - want.out_lo[rows])
    allowed = np.maximum(side, 0) + ulps * spacing
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(allowed > 0, np.abs(err) / allowed, 1 + np.abs(err) / spacing)
    return np.asarray(np.where(err == 0, 0.0, ratio))


@in_session
def compare(
    problem: Problem,
    outputs: object,
    *,
    numerics: str | Numerics = "faithful",
    expected: Result | None = None,
    ulps: float = 0.0,
) -> Verdict:
    """Judge ``outputs`` (one ``(out, expert_token_nums)`` per rank) against the reference model.
    Never raises for bad outputs: every problem with them is a failing :class:`Verdict`.

    >>> from spec import OpConfig, random_problem
    >>> from oracle import run
    >>> p = random_problem(OpConfig(ep_size=1, experts_per_rank=2, top_k=1, hidden=16,
    ...                             intermediate=8, tokens_per_rank=(2,)))
    >>> compare(p, [(r.out, r.expert_token_nums) for r in run(p).ranks]).ok
    True
    """
    num = resolve_numerics(numerics)
    cfg = problem.config
    checked = structured_outputs(problem, outputs)
    if isinstance(checked, Verdict):
        return checked
    enveloped = num.mode == "faithful"  # a kernel profile: judged by its envelope
    mathematics = _mathematics(problem, num)
    if expected is None:
        # The model alone first: under a profile, most outputs of a kernel in the model's order
        # equal it bit for bit and need no envelope, which costs about 4x the model.
        expected = run(mathematics, numerics=num)
    for r, ((_, nums), want) in enumerate(zip(checked, expected.ranks)):
        diff = np.flatnonzero(nums != want.expert_token_nums)
        if diff.size:
            e = int(diff[0])
            return _fail(
                "expert_token_nums",
                f"rank {r}, local expert {e} (global {r * cfg.experts_per_rank + e}): got "
                f"{int(nums[e])} rows, expected {int(want.expert_token_nums[e])} (all: got "
                f"{nums.tolist()}, expected {want.expert_token_nums.tolist()}); counts exclude "
                "masked slots and are taken before truncation",
                r, (e,),
            )
    if enveloped and _model_bits(checked, expected):
        return Verdict(True, "ok", "outputs conform: the profile's own output, bit for bit", 0.0)
    differ = _differing_rows(checked, expected) if enveloped else None
    expected = _enveloped(mathematics, num, expected, differ)
    tolerances = _tolerances(mathematics, num, expected)
    worst: tuple[float, int, int, int] = (0.0, -1, -1, -1)
    n_bad = 0
    for r, ((out, _), want, tol) in enumerate(zip(checked, expected.ranks, tolerances)):
        rows = want.defined
        if not rows.any():
            continue
        got64 = out[rows].astype(np.float64)
        exp64 = want.out[rows].astype(np.float64)
        bad = _non_finite_mismatch(got64, exp64)
        if bad.any():
            t, c = (int(v) for v in np.argwhere(bad)[0])
            token = int(np.flatnonzero(rows)[t])
            return _fail(
                "non_finite",
                f"rank {r}, token {token}, column {c}: got {got64[t, c]}, expected "
                f"{exp64[t, c]} ({int(bad.sum())} such values){_unwritten(got64, exp64, rows)}; "
                f"{routing_summary(problem, r, token)}",
                r, (token, c),
            )
        ratio = _ratio(got64, want, tol, rows, cfg.x_dtype, ulps)
        n_bad += int((ratio > 1).sum())
        flat = int(np.argmax(ratio))
        if ratio.size and ratio.flat[flat] > worst[0]:
            t, c = divmod(flat, cfg.hidden)
            worst = (float(ratio.flat[flat]), r, int(np.flatnonzero(rows)[t]), c)
    ratio_max, r, token, c = worst
    # The model's own output is a legitimate kernel's: the row test would only repeat that
    # (under a profile, that output returned above). Not for W4A8: the row test reads int8
    # weights; its envelope holds every value the profile allows, so this skips only a
    # second, stricter look.
    if (ratio_max <= 1.0 and (enveloped or not _model_bits(checked, expected))
            and cfg.variant != "w4a8"):
        row = _row_test(kernel_mathematics(problem, num) if enveloped else mathematics, num,
                        expected, [o for o, _ in checked], differ)
        if not row.ok and row.rank is not None and row.token is not None:
            return _fail("out", f"{row.message}; {routing_summary(problem, row.rank, row.token)}",
                         row.rank, (row.token,), row.ratio)
        if row.bound_rows:
            how = "envelope" if enveloped else "sound bound"
            return Verdict(True, "ok", f"outputs conform; the row test judged "
                           f"{row.asked_rows - row.bound_rows} of {row.asked_rows} rows and left "
                           f"{row.bound_rows} to the {how} alone ({row.bound_reason})",
                           ratio_max, untested_rows=row.bound_rows,
                           untested_reason=row.bound_reason)
    if ratio_max <= 1.0:
        return Verdict(True, "ok", "outputs conform", ratio_max)
    out, _ = checked[r]
    want = expected.ranks[r]
    got = float(out[token, c].astype(np.float64))
    exp = float(want.out[token, c].astype(np.float64))
    tol_rank = tolerances[r]
    if tol_rank is None:
        assert want.out_lo is not None and want.out_hi is not None
        lo, hi = float(want.out_lo[token, c]), float(want.out_hi[token, c])
        ulp = float(out_dtype_spacing(want.out[token:token + 1, c], cfg.x_dtype)[0])
        beyond = (got - hi) if got > hi else (lo - got)
        allowance = (f"the {num.profile.name} profile allows [{lo:.6g}, {hi:.6g}] here"
                     if lo != hi else f"the {num.profile.name} profile pins this value")
        extra = f" + {ulps:g} ulp" if ulps else ""
        outside = f", {max(beyond, 0) / ulp:.3g} ulp outside the envelope" if lo != hi else ""
        detail = (f"{allowance}{extra}; |error| {abs(got - exp):.3g} = {abs(got - exp) / ulp:.3g} "
                  f"ulp of {cfg.x_dtype}{outside}")
    else:
        tol_worst = float(tol_rank[token, c])
        detail = (f"|error| {abs(got - exp):.3g} = {ratio_max:.3g} x tolerance {tol_worst:.3g}, "
                  "quantisation bound")
    n_defined = sum(int(w.defined.sum()) for w in expected.ranks) * cfg.hidden
    return _fail(
        "out",
        f"rank {r}, token {token}, column {c}: got {got:.6g}, expected {exp:.6g} ({detail}); "
        f"{n_bad} of {n_defined} defined values out of tolerance; "
        f"{routing_summary(problem, r, token)}",
        r, (token, c), ratio_max,
    )


def _mathematics(problem: Problem, num: Numerics) -> Problem:
    """The float64 mathematics of the named kernel: the ideal run, bound and row test read it
    (under a profile, only the row test: made there, when it runs). W4A8 in ideal mode is
    refused by name."""
    if problem.config.variant == "w4a8" and num.mode != "faithful":
        raise ValueError(
            "the ideal judge does not model W4A8 (its error bound and row test read int8 "
            "weights, not packed int4): judge W4A8 against a kernel profile (numerics="
            "'faithful')")
    return problem if num.mode == "faithful" else kernel_mathematics(problem, num)


def _enveloped(mathematics: Problem, num: Numerics, expected: Result,
               differ: Array | None) -> Result:
    """``expected`` with the profile's envelope (run again, on the rows in ``differ``, if it
    has none); in ideal mode, ``expected`` itself. A row equal to the model's own output has
    error 0 whatever its envelope: the model's value stands for both ends there."""
    if num.mode != "faithful" or not expected.ranks or expected.ranks[0].out_lo is not None:
        return expected
    env = run(mathematics, numerics=num, envelope=True, tokens=differ)
    cuts = np.cumsum(mathematics.config.tokens_per_rank)[:-1]
    rows = np.split(differ, cuts) if differ is not None else [None] * len(env.ranks)
    ranks = []
    for want, got, d in zip(expected.ranks, env.ranks, rows):
        assert got.out_lo is not None and got.out_hi is not None
        own = want.out.astype(np.float32)
        ranks.append(want if d is None else replace(
            want, out_lo=np.where(d[:, None], got.out_lo, own),
            out_hi=np.where(d[:, None], got.out_hi, own)))
    return replace(expected, ranks=tuple(ranks))


def _tolerances(mathematics: Problem, num: Numerics,
                expected: Result) -> list[Array] | list[None]:
    """Per rank, the ideal mode's elementwise tolerance; ``None`` under a profile (its
    envelope is the tolerance)."""
    if num.mode == "faithful":
        return [None] * mathematics.config.ep_size
    assumed = _assumptions(num, mathematics.config.x_dtype)
    return [np.asarray(t) for t in ideal_tolerance(mathematics, expected, ftz=assumed.ftz,
                                                   amax_floor=assumed.amax_floor)]


def _assumptions(num: Numerics, x_dtype: str) -> IdealAssumptions:
    """What the ideal judge assumes of the kernel: the named profile's stored dtypes, tie
    rules, floors and flushing, or (ideal mode without a profile) the coarsest legitimate
    kernel, which may flush subnormals."""
    if num.mode == "ideal" and num.kernel is None:
        return IdealAssumptions()
    return num.profile.ideal_assumptions(x_dtype)


def _non_finite_mismatch(got64: Array, exp64: Array) -> Array:
    """Where a value is NaN or inf and the reference's is not the same (the reverse too)."""
    same_special = (got64 == exp64) | (np.isnan(got64) & np.isnan(exp64))
    return np.asarray((np.isfinite(got64) != np.isfinite(exp64))
                      | (~np.isfinite(exp64) & ~same_special))


def _unwritten(got64: Array, exp64: Array, rows: Array) -> str:
    """The defined rows that are NaN in every column where the reference is finite: rows never
    written into an out buffer pre-filled with NaN (``oracle.adapters.torch_io.implementation(...,
    out_buffers=True)``; vllm-ascend PR #9992)."""
    whole = (np.isnan(got64) | ~np.isfinite(exp64)).all(axis=1) & np.isfinite(exp64).any(axis=1)
    if not whole.any():
        return ""
    tokens = np.flatnonzero(rows)[whole].tolist()
    return (f"; rows NaN in every column (never written, if out was given pre-filled with "
            f"NaN): tokens {tokens}")


def _ratio(got64: Array, want: RankResult, tol: Array | None, rows: Array, dtype_name: str,
           ulps: float) -> Array:
    """The error-to-tolerance ratio of the float64 values ``got64`` on ``rows`` (above 1
    fails); where the reference is not finite, 0 (the non-finite stage judges those)."""
    exp64 = want.out[rows].astype(np.float64)
    finite_exp = np.isfinite(exp64)
    if tol is None:
        return envelope_ratio(np.where(finite_exp, got64, exp64), want, rows, dtype_name, ulps)
    err = np.where(finite_exp, np.abs(got64 - exp64), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray(np.where(err == 0, 0.0, err / tol[rows]))  # exact passes at ulps=0


def error_ratios(
    problem: Problem,
    outputs: object,
    *,
    numerics: str | Numerics = "faithful",
    ulps: float = 0.0,
) -> list[Array] | Verdict:
    """Per rank, the ``(M_r, K)`` error-to-tolerance ratio of every out value, as
    :func:`compare` judges it elementwise (above 1 fails; 0 is exact): NaN on rows the contract
    leaves undefined, ``inf`` where out is NaN or inf and the reference is not (or the
    reverse). The failing :class:`Verdict` of stage ``ranks`` or ``structure`` when the outputs
    have no such values. The row test's verdict on whole rows is :func:`compare`'s.

    >>> from spec import OpConfig, random_problem
    >>> from oracle import run
    >>> p = random_problem(OpConfig(ep_size=1, experts_per_rank=2, top_k=1, hidden=16,
    ...                             intermediate=8, tokens_per_rank=(2,)))
    >>> [float(np.nanmax(r)) for r in error_ratios(p, [(r.out, r.expert_token_nums)
    ...                                                 for r in run(p).ranks])]
    [0.0]
    """
    num = resolve_numerics(numerics)
    checked = structured_outputs(problem, outputs)
    if isinstance(checked, Verdict):
        return checked
    mathematics = _mathematics(problem, num)
    expected = run(mathematics, numerics=num, envelope=num.mode == "faithful")
    ratios = []
    for (out, _), want, tol in zip(checked, expected.ranks, _tolerances(mathematics, num,
                                                                          expected)):
        rows = want.defined
        ratio = np.full(out.shape, np.nan)
        got64, exp64 = out[rows].astype(np.float64), want.out[rows].astype(np.float64)
        ratio[rows] = np.where(_non_finite_mismatch(got64, exp64), np.inf,
                               _ratio(got64, want, tol, rows, problem.config.x_dtype, ulps))
        ratios.append(ratio)
    return ratios


def _model_bits(checked: list[tuple[Array, Array]], expected: Result) -> bool:
    """Every defined value equals the model's own output, bit for bit."""
    return all(np.array_equal(out[want.defined].view(np.uint16),
                              want.out[want.defined].view(np.uint16))
               for (out, _), want in zip(checked, expected.ranks))


def _differing_rows(checked: list[tuple[Array, Array]], expected: Result) -> Array:
    """Per token (all ranks in order), whether its row differs from the model's own output
    in any bit. Under a profile only those need the envelope and the row test: a row equal
    to the model's has error 0 and is a legitimate kernel's row (the model's own output as a
    whole returns before either), and the row test's false-alarm budget stays shared over
    every row (:func:`oracle.judge.rowtest.row_thresholds`' ``only``). At 16 rows per
    expert, one changed row reads the weights of 8 experts of 32 (DeepSeek-V3, top-8)."""
    return np.concatenate([(out.view(np.uint16) != want.out.view(np.uint16)).any(axis=1)
                           for (out, _), want in zip(checked, expected.ranks)])


def _row_test(problem: Problem, num: Numerics, expected: Result, outs: list[Array],
              only: Array | None = None) -> RowVerdict:
    """The row test of :mod:`oracle.judge.rowtest` on outputs the elementwise check accepted;
    ``problem`` is the kernel's mathematics (:func:`oracle.model.reference.kernel_mathematics`).

    In ideal mode it is the power beyond the sound bound. Under a kernel profile it is the
    same test, against the float64 mathematics: the envelope is sound but, at production
    shapes, wide (any float32 order lets every stored intermediate move, and interval widths
    add up through GEMM2 and the combine: at K = 7168 a BF16 envelope's median width is
    about 1 400 ulps and an output scaled by 1.08 lies inside it; ``benchmarks/
    PROFILE_POWER.md``), while a kernel with the profile's pipeline is a legitimate kernel of
    the row test's model, with the profile's stored dtypes, tie rules and ``amax`` floor.
    Without a named profile, ideal mode assumes the coarsest legitimate kernel (bf16
    intermediates, either tie rule, bf16 top-k sums)."""
    assumptions = _assumptions(num, problem.config.x_dtype)
    ideal = (expected if num.mode == "ideal"
             else run(problem, numerics=replace(num, mode="ideal"), tokens=only))
    verdict = row_test(problem, ideal, outs, assumptions, only=only)
    if num.mode == "ideal" or verdict.ok:
        return verdict
    return replace(verdict, message=f"{verdict.message}; inside the {num.profile.name} "
                   "envelope element by element, but no kernel with its pipeline moves a "
                   "row this far from the mathematics")
