"""A deliberately naive model of the ``vllm-triton`` kernel profile, for cross-checking.

Written from ``docs/contract/kernels.md`` (the two vLLM columns), not from
``oracle/model/kernels.py``: a Python loop per rank, token and slot; per-row NumPy float32
operations. vLLM has no receive buffer, so there is no truncation; a masked token routes nowhere and
its row is undefined.

- W8A8 (the CUDA quantiser ``scaled_int8_quant``): ``q = rint(x · fl(127/amax))`` (half to even,
  no floor), ``σ = fl(amax/127)``; int dots per ``block``-wide K block summed in a float32
  accumulator; GEMM1 ``fl(fl(acc·σ)·s1)`` cast once to x's dtype; ``silu`` in float32 rounded to
  x's dtype, times up in float32, rounded again; the same quantiser; GEMM2
  ``fl(fl(fl(acc·p)·σ2)·s2)`` cast once per slot.
- BF16/FP16 weights: float32 accumulation sequentially over K (one legitimate order; the
  profile allows any), x-dtype stores, the routed weight times the float32 accumulator.
- ``moe_sum``: top_k in {2, 3, 4} adds in x's dtype (a rounding after every float32 add);
  otherwise a float32 sum in k order and one cast.

``silu_rounded=False`` plants a defect (silu kept in float32), to show the agreement test bites.
``ftz=True`` runs it as a flush-to-zero GPU does: every float32 operand it reads and every
float32 result it writes, if subnormal, is 0 (``np.where(|v| < 2^-126, 0, v)``).
``quantise=triton_quantiser(...)`` swaps in vLLM's Triton quantiser, with a reciprocal some ulps
off (a legitimate GPU division) or a planted rounding defect.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from spec import DTYPES, Problem

__all__ = ["naive_vllm_run", "triton_quantiser"]

F32 = np.float32
Array = np.ndarray[Any, Any]


Quantise = Callable[[Array], tuple[Array, F32]]
Flush = Callable[[Array], Array]
_NORMAL32 = F32(2.0**-126)


def _keep(v: Array) -> Array:
    return v


def _flush(v: Array) -> Array:
    """Subnormal float32 values to 0, as a flush-to-zero kernel reads and writes them."""
    v = np.asarray(v, F32)
    return np.where(np.abs(v) < _NORMAL32, F32(0), v).astype(F32)


def _quantise(row: Array, fl: Flush = _keep) -> tuple[Array, F32]:
    """Per-token int8 by reciprocal multiply, half to even, no floor (zero row: q = 0)."""
    row = fl(row)
    amax = F32(np.max(np.abs(row))) if row.size else F32(0)
    sigma = F32(fl(F32(amax / F32(127))))
    if amax == 0:
        return np.zeros(row.shape, F32), F32(0)
    with np.errstate(over="ignore"):
        inv = F32(F32(127) / amax)
    if np.isinf(inv):  # amax < 127/FLT_MAX: the oracle's "zero" policy, the mathematical value
        return np.rint(row.astype(np.float64) * (127 / np.float64(amax))).astype(F32), sigma
    return np.rint(fl(row * inv)).astype(F32), sigma


def triton_quantiser(reciprocal_ulps: int = 0, rounding: str = "away") -> Quantise:
    """vLLM's Triton ``per_token_quant_int8`` (int8_utils.py): ``amax = max(amax, 1e-10)``,
    ``scale = amax/127``, ``q = round(x · (127/amax))`` with the reciprocal moved
    ``reciprocal_ulps`` float32 ulps (signed: up or down) from correctly rounded, as a fast
    GPU division may give. ``rounding``: ``"away"`` (``libdevice.round``), or a planted defect:
    ``"even"`` (ties to even) or ``"trunc"`` (toward zero)."""
    rnd = {"even": np.rint, "trunc": np.trunc,
           "away": lambda v: np.sign(v) * np.floor(np.abs(v.astype(np.float64)) + 0.5)}[rounding]
    toward = F32(np.inf) if reciprocal_ulps > 0 else F32(0)

    def quantise(row: Array) -> tuple[Array, F32]:
        amax = max(F32(np.max(np.abs(row))) if row.size else F32(0), F32(1e-10))
        inv = F32(F32(127) / amax)
        for _ in range(abs(reciprocal_ulps)):
            inv = np.nextafter(inv, toward)
        return np.asarray(rnd(row * inv), F32), F32(amax / F32(127))

    return quantise


def _blocked_int_dot(q: Array, w: Array, block: int) -> Array:
    """int dots per K block, exact in int64, each block added to a float32 accumulator."""
    acc = np.zeros(w.shape[1], F32)
    qi, wi = q.astype(np.int64), w.astype(np.int64)
    for b in range(0, q.shape[0], block):
        acc = (acc + (qi[b:b + block] @ wi[b:b + block]).astype(F32)).astype(F32)
    return acc


def _sequential_f32_dot(a: Array, w: Array, fl: Flush) -> Array:
    """Float32 accumulation in K order (exact products: 16-bit operands)."""
    acc = np.zeros(w.shape[1], F32)
    a, wf = fl(a), fl(w.astype(F32))
    for k in range(a.shape[0]):
        acc = fl(acc + fl(F32(a[k]) * wf[k]))
    return acc


def _swiglu(h: Array, out: Any, silu_rounded: bool, fl: Flush) -> Array:
    i = h.shape[0] // 2
    gate, up = fl(h[:i]), fl(h[i:])
    with np.errstate(over="ignore"):
        silu = fl(gate / fl(F32(1) + fl(np.exp(-gate))))
    if silu_rounded:
        silu = fl(silu.astype(out).astype(F32))
    return fl((fl(silu * up)).astype(out).astype(F32))


def _slot_output(x: Array, w1: Array, w2: Array, s1: Array | None, s2: Array | None, p: F32,
                 out: Any, silu_rounded: bool, block: int, quantise: Quantise,
                 fl: Flush) -> Array:
    xf = x.astype(F32)
    if s1 is None or s2 is None:  # BF16/FP16 weights
        h = fl(_sequential_f32_dot(xf, w1, fl).astype(out).astype(F32))
        a = _swiglu(h, out, silu_rounded, fl)
        return fl(fl(_sequential_f32_dot(a, w2, fl) * fl(p)).astype(out).astype(F32))
    q, sigma = quantise(xf)
    acc1 = _blocked_int_dot(q, w1, block)
    h = fl(fl(fl(acc1 * sigma) * fl(s1.astype(F32))).astype(out).astype(F32))
    a = _swiglu(h, out, silu_rounded, fl)
    q2, sigma2 = quantise(a)
    acc2 = _blocked_int_dot(q2, w2, block)
    y = fl(fl(fl(acc2 * fl(p)) * sigma2))
    return fl(fl(y * fl(s2.astype(F32))).astype(out).astype(F32))


def naive_vllm_run(
    problem: Problem, *, silu_rounded: bool = True, block: int = 32,
    quantise: Quantise | None = None, ftz: bool = False,
) -> tuple[list[Array], list[Array], list[Array]]:
    """Per rank: ``out`` (x's dtype, 0 on undefined rows), ``expert_token_nums`` (int32) and
    ``defined`` (the active tokens). ``quantise``: the W8A8 quantiser of both steps (default:
    the CUDA one, flushing with ``ftz``; :func:`triton_quantiser`)."""
    fl = _flush if ftz else _keep
    quantise = quantise or partial(_quantise, fl=fl)
    cfg = problem.config
    n_local, top_k = cfg.experts_per_rank, cfg.top_k
    out_dtype = DTYPES[cfg.x_dtype]
    outs, nums, defined = [], [], []
    counts = np.zeros(cfg.num_experts, np.int64)
    for inputs in problem.ranks:
        m = inputs.x.shape[0]
        out = np.zeros((m, cfg.hidden), out_dtype)
        ok = np.zeros(m, bool)
        for t in range(m):
            if inputs.active_mask is not None and not inputs.active_mask[t]:
                continue
            ys = []
            for k in range(top_k):
                g = int(inputs.expert_idx[t, k])
                counts[g] += 1
                owner = problem.ranks[g // n_local]
                w1, w2, s1, s2 = owner.expert_weights(g % n_local)
                ys.append(_slot_output(inputs.x[t], w1, w2, s1, s2, F32(inputs.probs[t, k]),
                                       out_dtype, silu_rounded, block, quantise, fl))
            acc = ys[0]
            for y in ys[1:]:
                acc = fl(acc + y)
                if top_k in (2, 3, 4):
                    acc = acc.astype(out_dtype).astype(F32)
            out[t] = acc.astype(out_dtype)
            ok[t] = True
        outs.append(out)
        defined.append(ok)
    per_rank = counts.reshape(cfg.ep_size, n_local).astype(np.int32)
    nums = [per_rank[r] for r in range(cfg.ep_size)]
    return outs, nums, defined
