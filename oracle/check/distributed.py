"""Check a per-rank implementation on a real ``torch.distributed`` process group.

The operator is collective: each rank calls it with its own arguments and the group. A per-rank
implementation is therefore ``impl_rank(inputs, group) -> (out, expert_token_nums)``, called on
every rank, where ``inputs`` is the rank's :class:`oracle.adapters.torch_io.TorchRankInputs`.

:func:`check_distributed` runs the oracle's Hypothesis search (:func:`oracle.check_implementation`)
over such an implementation. Each example is drawn (deterministically under the ``dfc-ci``
profile) by the driver, scattered to the ranks, run on every rank, gathered and judged, so a
failing example shrinks like any other. Two ways to get ranks:

- **spawned** (default, one machine): ``world_size`` worker processes that live for the whole
  search, joined in a group over 127.0.0.1. A hung collective is reported as a timeout naming
  the example; a rank that raises or dies is a failure; workers are killed and respawned after
  either, and always killed at the end.
- **joined**: when ``torch.distributed`` is already initialised, or the process runs under
  ``torchrun``, every process calls :func:`check_distributed`; rank 0 drives the search and the
  other ranks serve it. Results come back through the group's store, so a rank that raises is
  reported at once with its error (stage ``'call'``), even while the others wait in a
  collective it never entered; the group is then unusable, so that example is reported as drawn
  (not shrunk) and the group is aborted rather than destroyed.

:func:`reference_rank` is a real EP implementation on the real engine, written from §4–§6 of
``docs/contract/dispatch_ffn_combine.md``: count exchange (``all_to_all_single``), dispatch,
a local grouped FFN in the ascend-a3 kernel's numerics (the W8A8 path written in torch; the
BF16/FP16-weight path by the single-process model on the received rows), return, combine. Its
steps are public so that a variant (a planted bug) can reuse all but one of them.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import os
import pickle
import shutil
import signal
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from math import inf
from multiprocessing.connection import wait
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from oracle.adapters.torch_io import (
    TorchRankInputs,
    float32_scales,
    from_torch,
    output_pair,
    to_numpy,
    to_tensor,
    to_torch,
)
from oracle.check.harness import ConformanceError, check_implementation, variant_configs
from oracle.check.isolation import kill_tree
from oracle.check.loading import load_kernel
from oracle.config.options import OptionError, check_options
from oracle.model.kernels import ASCEND_A3, KernelProfile
from oracle.model.numerics import Numerics, resolve_numerics, with_kernel
from oracle.model.reference import run
from spec import ConfigError, Problem, RankInputs
from spec.config import CallAttributes, oai_alpha
from spec.strategies import configs, problems

if TYPE_CHECKING:
    import torch
    from torch import Tensor
    from torch.distributed import ProcessGroup

__all__ = [
    "DistributedTimeout",
    "ImplRank",
    "RankFailure",
    "RoutePlan",
    "all_to_all_rows",
    "check_distributed",
    "combine",
    "default_problems",
    "dispatch",
    "expert_ffn",
    "plan_routes",
    "reference_rank",
    "return_rows",
]

Array = np.ndarray[Any, Any]
#: ``impl_rank(inputs, group) -> (out, expert_token_nums)`` (tensors), called on every rank.
ImplRank = Callable[[TorchRankInputs, "ProcessGroup"], Any]

# After one rank fails, how long to wait for the others' answers before restarting the workers.
_FAILURE_GRACE = 0.5
# Startup of all workers (the first one starts the fork server, which imports torch).
_STARTUP_TIMEOUT = 120.0
# Joined mode, a broken group: how long a rank waits for its parts to end after the abort.
_TEARDOWN = 30.0


class RankFailure(RuntimeError):
    """One or more ranks raised, died or returned something unusable on an example."""


class DistributedTimeout(ConformanceError):
    """An example did not finish within the timeout: a hung collective (or a very slow rank).

    ``problem`` is the example (not shrunk: each attempt would cost a timeout), ``pending`` the
    ranks that had not answered.
    """

    def __init__(self, err: ConformanceError, pending: Sequence[int]) -> None:
        self.pending = list(pending)
        report = (
            f"{err.report}\nranks that never returned: {self.pending} (a collective they wait "
            "in was never entered by another rank?); their processes were killed."
        )
        super().__init__(report, problem=err.problem, verdict=err.verdict, path=err.path)


# --------------------------------------------------------------------------------------------
# The reference per-rank implementation (§4–§6 of the reference notes), on torch.distributed.


def _torch() -> Any:
    import torch

    return torch


def _dist() -> Any:
    import torch.distributed as dist

    return dist


@dataclass(frozen=True)
class RoutePlan:
    """Where this rank's slots go and what it receives (§4–§5), after the count exchange.

    ``order``: this rank's active flat slot indices ``t·top_k + k``, sorted by expert (stably, so
    ties keep ascending ``i`` [inferred]): the send order. ``send_splits[d]``: rows to rank d.
    ``counts_in[s, e]``: rows source s sends to local expert e, ``c(s, e)``; ``recv_splits[s]``
    its row sums. ``buffer_index[j]``: where received row j (source-major, as the all-to-all
    delivers it) sits in the kernel's expert-major receive buffer. ``kept``: buffer rows that
    survive ``max_output_size``.
    """

    ep_size: int
    experts_per_rank: int
    order: torch.Tensor
    send_splits: list[int]
    counts_in: torch.Tensor
    recv_splits: list[int]
    buffer_index: torch.Tensor
    kept: int

    @property
    def expert_token_nums(self) -> torch.Tensor:
        """``T(e) = Σ_s c(s, e)`` per local expert, before truncation (§5), int32."""
        return self.counts_in.sum(dim=0).to(_torch().int32)


def _experts_per_rank(inputs: TorchRankInputs) -> int:
    # One tensor in the list: stacked (E, K, N); otherwise one tensor per expert (§3).
    return int(inputs.weight1[0].shape[0]) if len(inputs.weight1) == 1 else len(inputs.weight1)


def all_to_all_rows(
    rows: torch.Tensor, *, send_splits: list[int], recv_splits: list[int], group: ProcessGroup
) -> torch.Tensor:
    """``all_to_all_single`` of whole rows: ``send_splits[d]`` rows to rank d,
    ``recv_splits[s]`` rows from rank s, source-major in the result."""
    out = rows.new_empty((sum(recv_splits), *rows.shape[1:]))
    _dist().all_to_all_single(out, rows.contiguous(), output_split_sizes=recv_splits,
                              input_split_sizes=send_splits, group=group)
    return out


def plan_routes(inputs: TorchRankInputs, group: ProcessGroup) -> RoutePlan:
    """Sort the slots by expert, exchange the counts with the other ranks (one
    ``all_to_all_single`` of ``E`` counts per peer), and lay out the receive buffer (§5)."""
    torch, dist = _torch(), _dist()
    ep, e_local = dist.get_world_size(group), _experts_per_rank(inputs)
    num = ep * e_local
    ids = inputs.expert_idx.to(torch.int64).reshape(-1)
    top_k = int(inputs.expert_idx.shape[1])
    active = torch.ones_like(ids, dtype=torch.bool)
    if inputs.x_active_mask is not None:
        active = inputs.x_active_mask.to(torch.bool).repeat_interleave(top_k)
    expert = torch.where(active, ids, num)  # masked slots take the sentinel EP·E (§4)
    order = torch.sort(expert, stable=True).indices[: int(active.sum())]
    counts = torch.bincount(expert[order], minlength=num)
    counts_in = torch.empty_like(counts)
    dist.all_to_all_single(counts_in, counts, group=group)  # c(s, e) for this rank's experts
    counts_in = counts_in.reshape(ep, e_local)
    # Source-major block (s, e) of the all-to-all output goes to expert-major block (e, s).
    sm_start = torch.cumsum(counts_in.reshape(-1), 0) - counts_in.reshape(-1)
    em_start = (torch.cumsum(counts_in.t().reshape(-1), 0) - counts_in.t().reshape(-1))
    em_start = em_start.reshape(e_local, ep).t().reshape(-1)
    block = torch.repeat_interleave(torch.arange(num), counts_in.reshape(-1))
    offset = torch.arange(block.shape[0]) - sm_start[block]
    total = int(counts_in.sum())
    cap = inputs.max_output_size
    return RoutePlan(
        ep_size=ep,
        experts_per_rank=e_local,
        order=order,
        send_splits=counts.reshape(ep, e_local).sum(dim=1).tolist(),
        counts_in=counts_in,
        recv_splits=counts_in.sum(dim=1).tolist(),
        buffer_index=em_start[block] + offset,
        kept=total if cap is None else min(total, cap),
    )


def _round_half_away(v: torch.Tensor) -> torch.Tensor:
    """Round to integers, ties away from zero (§6 step 1), exactly: ``v - trunc(v)`` is exact in
    float32, so no addition of 0.5 can round up a value just below a half."""
    whole = v.trunc()
    return whole + v.sign() * ((v - whole).abs() >= 0.5)


def dispatch(inputs: TorchRankInputs, plan: RoutePlan, group: ProcessGroup) -> torch.Tensor:
    """Send each slot's row (the kernel's send row, §7) to its expert's rank and return the
    received rows in the expert-major buffer order. W8A8: every token quantised once (§6 step
    1: ``σ1 = amax/127``, ``q = round_half_away(x/σ1)``), int8 with its float32 scale appended;
    an all-zero row has ``σ1 = 0`` and is quantised to zeros (a correct kernel's result, §6 step
    1). BF16/FP16 weights: the token itself, in x's dtype (no activation quantisation,
    variants.md 'BF16 / FP16 weights')."""
    torch = _torch()
    tokens = plan.order // int(inputs.expert_idx.shape[1])
    w8a8 = _is_w8a8(inputs)
    if w8a8:
        xf = inputs.x.float()
        sigma = xf.abs().amax(dim=1) / 127
        q = _round_half_away(xf / torch.where(sigma == 0, 1.0, sigma)[:, None]).to(torch.int8)
        send = torch.cat([q[tokens], sigma[tokens].contiguous().view(torch.int8).reshape(-1, 4)],
                         1)
    else:
        send = inputs.x[tokens].view(torch.int8)  # the bits, as bytes (gloo sends int8)
    received = all_to_all_rows(send, send_splits=plan.send_splits,
                               recv_splits=plan.recv_splits, group=group)
    buffer: Tensor = torch.empty_like(received)
    buffer[plan.buffer_index] = received
    return buffer if w8a8 else buffer.view(inputs.x.dtype)


def _is_w8a8(inputs: TorchRankInputs) -> bool:
    return bool(inputs.weight1[0].dtype == _torch().int8)


def _exact_int_matmul(q: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # int8 x int8 partial sums stay below 2**53: float64 GEMM is exact, in any order.
    return q.double() @ w.double()


def _scaled_fp16(acc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``float16(float32(acc) · float32(scale))`` per output channel (§6 steps 2 and 6, pinned
    [inferred]), back as float32."""
    return (acc.float() * scale).half().float()


def expert_ffn(inputs: TorchRankInputs, plan: RoutePlan, buffer: torch.Tensor) -> torch.Tensor:
    """The local grouped FFN (§6 steps 2–7) on the kept buffer rows. Returns ``(rows, K)`` in
    x's dtype, NaN on rows dropped by truncation (the kernel never computes them, §5).

    W8A8: in torch, expert by expert; SwiGLU's ``exp`` is NumPy's float32 ``exp``, the faithful
    model's pinned choice (§6). BF16/FP16 weights: :func:`_float_ffn`."""
    torch = _torch()
    y: Tensor = torch.full((buffer.shape[0], int(inputs.x.shape[1])), float("nan"),
                           dtype=inputs.x.dtype)
    if not _is_w8a8(inputs):
        y[: plan.kept] = _float_ffn(inputs, plan, buffer[: plan.kept])
        return y
    start = 0
    for e, rows in enumerate(plan.expert_token_nums.tolist()):
        stop = min(start + rows, plan.kept)
        if stop > start:
            y[start:stop] = _ffn_rows(inputs, e, buffer[start:stop])
        start += rows
    return y


def _float_ffn(inputs: TorchRankInputs, plan: RoutePlan, rows: torch.Tensor) -> torch.Tensor:
    """The float-weight path, by the single-process model (:func:`oracle.model.reference.run`, the
    ascend-a3 profile): the kept buffer ``rows`` are the tokens of a one-rank call with this
    rank's weights, each row routed to its local expert with ``top_k = 1`` and weight 1. That
    call's ``out`` is the rows' ``y``: ``y`` already holds x-dtype values (GMM2's output), so
    the combine's ``y · 1`` and its cast to x's dtype change nothing."""
    torch = _torch()
    kept = int(rows.shape[0])
    if kept == 0:
        return rows
    expert = torch.repeat_interleave(torch.arange(plan.experts_per_rank),
                                     plan.expert_token_nums)[:kept]
    rank = replace(from_torch(inputs), x=to_numpy(rows),
                   expert_idx=to_numpy(expert.to(torch.int32)[:, None]),
                   probs=np.ones((kept, 1), np.float32), active_mask=None)
    return to_tensor(run(Problem([rank]), numerics=ASCEND_A3.name).ranks[0].out)


def _expert_tensors(inputs: TorchRankInputs, e: int) -> tuple[torch.Tensor, ...]:
    def pick(tensors: list[torch.Tensor] | None) -> torch.Tensor:
        assert tensors is not None
        return tensors[0][e] if len(inputs.weight1) == 1 else tensors[e]

    return (pick(inputs.weight1), pick(inputs.weight2),
            float32_scales(pick(inputs.scale1)), float32_scales(pick(inputs.scale2)))


def _ffn_rows(inputs: TorchRankInputs, e: int, rows: torch.Tensor) -> torch.Tensor:
    torch = _torch()
    w1, w2, s1, s2 = _expert_tensors(inputs, e)
    k_hidden, i_size = int(inputs.x.shape[1]), int(w2.shape[0])
    q, sigma1 = rows[:, :k_hidden], rows[:, k_hidden:].contiguous().view(torch.float32)
    h = _scaled_fp16(_exact_int_matmul(q, w1), s1) * sigma1  # steps 2–3
    if inputs.swiglu_limit is not None:
        limit = float(inputs.swiglu_limit)
        h = torch.minimum(h, torch.tensor(limit, dtype=torch.float32))
        h[:, i_size:] = torch.maximum(h[:, i_size:], torch.tensor(-limit, dtype=torch.float32))
    gate, up = h[:, :i_size], h[:, i_size:]
    alpha = oai_alpha(inputs.swiglu_alpha)
    if alpha is not None:  # SwigluOAI (PR #11916): exp(−fl(α·gate)), up + 1
        arg, up = gate * torch.tensor(alpha, dtype=torch.float32), up + 1
    else:
        arg = gate
    with np.errstate(over="ignore"):
        exp_neg = to_tensor(np.exp(-to_numpy(arg)))
    a = gate / (1 + exp_neg) * up  # step 4
    amax2 = a.abs().amax(dim=1)
    # A true division: torch evaluates ``127 / tensor`` as ``reciprocal(tensor) * 127``, two
    # roundings that are 1 ulp off in some rows (found by the clamp + large-row search).
    inv = torch.where(amax2 == 0, 0.0, torch.full_like(amax2, 127).div(amax2))
    q2 = torch.round(a * inv[:, None])  # step 5: ties to even; a zero row stays zero
    tiny = torch.isinf(inv)  # a degenerate row (oracle.model.numerics): its scale in float64
    if bool(tiny.any()):
        amax64 = amax2[tiny].double()
        scale64 = torch.full_like(amax64, 127).div(amax64)
        q2[tiny] = torch.round(a[tiny].double() * scale64[:, None]).float()
    c2 = _scaled_fp16(_exact_int_matmul(q2, w2), s2)  # step 6
    return (c2 * (amax2 / 127)[:, None]).to(inputs.x.dtype)  # step 7


def return_rows(y: torch.Tensor, plan: RoutePlan, group: ProcessGroup) -> torch.Tensor:
    """Send every computed row back to its source rank (the second all-to-all, with the first
    one's splits reversed); returns this rank's slot results in its send order."""
    return all_to_all_rows(y[plan.buffer_index], send_splits=plan.recv_splits,
                           recv_splits=plan.send_splits, group=group)


def combine(inputs: TorchRankInputs, plan: RoutePlan, back: torch.Tensor) -> torch.Tensor:
    """§6 step 8: ``acc = y0·p0; acc += yk·pk`` in float32, sequentially in k order, then cast
    to x's dtype. Masked slots stay NaN: the out rows of masked tokens are undefined (§4)."""
    torch = _torch()
    m, top_k = (int(s) for s in inputs.expert_idx.shape)
    k_hidden = int(inputs.x.shape[1])
    y = torch.full((m * top_k, k_hidden), float("nan"))
    y[plan.order] = back.float()
    y = y.reshape(m, top_k, k_hidden)
    acc = y[:, 0] * inputs.probs[:, 0, None]
    for k in range(1, top_k):
        acc = acc + y[:, k] * inputs.probs[:, k, None]
    out: Tensor = acc.to(inputs.x.dtype)
    return out


def reference_rank(inputs: TorchRankInputs, group: ProcessGroup) -> tuple[Any, Any]:
    """One rank of ``dispatch_ffn_combine`` (W8A8, BF16 or FP16 weights) on
    ``torch.distributed`` collectives.

    Agrees with :func:`oracle.run` (faithful numerics) bit for bit on the defined rows.
    """
    plan = plan_routes(inputs, group)
    buffer = dispatch(inputs, plan, group)
    back = return_rows(expert_ffn(inputs, plan, buffer), plan, group)
    return combine(inputs, plan, back), plan.expert_token_nums


# --------------------------------------------------------------------------------------------
# Spawned workers.


@dataclass(frozen=True)
class _Job:
    inputs: RankInputs
    attributes: CallAttributes


def _run_job(impl_rank: ImplRank, job: _Job, group: Any, scales: str) -> tuple[str, Any]:
    """Run one rank's part of one example: ("ok", (out, nums)) or ("raised", text)."""
    try:
        inputs = to_torch(job.inputs, **job.attributes, scales=scales)
        return "ok", output_pair(impl_rank(inputs, group))
    except BaseException as exc:  # SystemExit too: the rank must answer
        return "raised", _describe_failure(exc)


def _exit_with_parent(parent_pid: int) -> None:
    """A worker must not outlive the process that drives it (it may sit in a hung collective)."""
    while True:
        time.sleep(0.5)
        try:
            os.kill(parent_pid, 0)
        except ProcessLookupError:
            os._exit(1)


def _log_path(store_path: str, rank: int) -> str:
    return f"{store_path}.rank{rank}.log"


def _log_tail(store_path: str, rank: int) -> str:
    try:
        lines = Path(_log_path(store_path, rank)).read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in lines[-3:] if line.strip())


def _worker_main(
    rank: int, world_size: int, backend: str, store_path: str, conn: Any,
    impl_rank: ImplRank, parent_pid: int, scales: str, collective_timeout: float,
) -> None:
    # A process group of its own: a helper this rank forks stays in it after the rank dies,
    # and the driver kills the group (kill_tree), not only the rank.
    os.setpgid(0, 0)
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    # The backend's own messages (gloo aborts a rank on a size mismatch) go to a log whose tail
    # the driver puts into the failure report.
    log = os.open(_log_path(store_path, rank), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(log, 2)
    torch, dist = _torch(), _dist()
    torch.set_num_threads(1)  # world_size processes share the machine's cores
    if backend == "gloo":
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # connect over 127.0.0.1 only
    try:
        dist.init_process_group(
            backend, store=dist.FileStore(store_path, world_size), rank=rank,
            world_size=world_size, timeout=timedelta(seconds=collective_timeout),
        )
    except BaseException as exc:  # nccl without a GPU, an unknown backend: say why
        conn.send_bytes(pickle.dumps(("failed", _describe_failure(exc))))
        os._exit(1)
    conn.send_bytes(pickle.dumps(("ready", rank)))
    try:
        while (job := conn.recv()) is not None:
            conn.send_bytes(pickle.dumps(_run_job(impl_rank, job, dist.group.WORLD, scales)))
    except EOFError:  # the driver went away
        pass
    finally:
        dist.destroy_process_group()


class _WorkerPool:
    """``world_size`` worker processes in one process group, kept for a whole search."""

    def __init__(self, impl_rank: ImplRank, world_size: int, backend: str, scales: str,
                 collective_timeout: float) -> None:
        self._args = (impl_rank, world_size, backend, scales, collective_timeout)
        self._ctx = multiprocessing.get_context("forkserver")
        # Workers fork from a server that has imported these once: a restart costs no import.
        self._ctx.set_forkserver_preload(["torch", "torch.distributed", "oracle.check.distributed"])
        self._procs: list[Any] = []
        self._conns: list[Any] = []
        self._store_dir: str | None = None
        self._store_path = ""
        self.pending: list[int] = []
        self.closed = False
        self._start()

    def _start(self) -> None:
        impl_rank, world_size, backend, scales, collective_timeout = self._args
        self._store_dir = tempfile.mkdtemp(prefix="dfc-oracle-group-")
        store_path = self._store_path = str(Path(self._store_dir) / "store")
        try:
            self._spawn(world_size, backend, store_path, impl_rank, scales, collective_timeout)
        except BaseException:  # a worker that fails to start must not leak the store directory
            self._stop_workers(graceful=False)
            raise

    def _spawn(self, world_size: int, backend: str, store_path: str, impl_rank: ImplRank,
               scales: str, collective_timeout: float) -> None:
        for rank in range(world_size):
            parent, child = self._ctx.Pipe()
            proc = self._ctx.Process(
                target=_worker_main, name=f"dfc-oracle-rank{rank}", daemon=True,
                args=(rank, world_size, backend, store_path, child, impl_rank, os.getpid(),
                      scales, collective_timeout),
            )
            proc.start()
            child.close()
            self._procs.append(proc)
            self._conns.append(parent)
        replies = self._collect(range(world_size), _STARTUP_TIMEOUT, 1 << 16)
        missing = [r for r in range(world_size) if replies.get(r, ("",))[0] != "ready"]
        if missing:
            why = "; ".join(f"rank {r} {replies[r][0]}: {replies[r][1]}" if r in replies else
                            f"rank {r}: no answer within {_STARTUP_TIMEOUT:g} s"
                            for r in missing)
            self.close()
            raise RuntimeError(f"the {world_size}-process {backend} group did not start: {why}")

    def _collect(self, ranks: Any, timeout: float,
                 limits: int | Sequence[int]) -> dict[int, tuple[str, Any]]:
        """Answers of ``ranks`` within ``timeout`` s, each at most ``limits`` (per rank) bytes.
        A rank's death is seen by its process sentinel, not by the end of its pipe (a helper
        it forked may hold that open): it answers ("died", exit code and last words). An
        answer larger than the contract's outputs is refused before it is read ("oversized").
        After the first failure, the others get only a short grace."""
        pending = set(ranks)
        replies: dict[int, tuple[str, Any]] = {}
        deadline = time.monotonic() + timeout
        sentinels = {self._procs[r].sentinel: r for r in pending}
        while pending:
            self.pending = sorted(pending)
            left = deadline - time.monotonic()
            ready = wait(
                [self._conns[r] for r in pending]
                + [w for w, r in sentinels.items() if r in pending],
                timeout=None if left == inf else max(0.0, left))
            if not ready:
                break
            # An answer first: a rank that answered and then died has answered.
            for waited in sorted(ready, key=lambda w: w in sentinels):
                r = sentinels[waited] if waited in sentinels else self._conns.index(waited)
                if r not in pending:
                    continue
                limit = limits if isinstance(limits, int) else limits[r]
                replies[r] = self._receive(r, limit) if waited not in sentinels or (
                    self._conns[r].poll()) else self._death(r)
                pending.discard(r)
            if any(kind not in ("ok", "ready") for kind, _ in replies.values()):
                deadline = min(deadline, time.monotonic() + _FAILURE_GRACE)
        self.pending = sorted(pending)
        return replies

    def _receive(self, r: int, limit: int) -> tuple[str, Any]:
        try:
            return tuple(pickle.loads(self._conns[r].recv_bytes(limit)))
        except OSError as exc:
            if "bad message length" in str(exc):
                return ("oversized", f"an answer of more than {limit} bytes, larger than the "
                        "contract's out and expert_token_nums (refused before it was read)")
            return self._death(r)
        except EOFError:
            return self._death(r)

    def _death(self, r: int) -> tuple[str, Any]:
        self._procs[r].join(1.0)
        tail = _log_tail(self._store_path, r)
        return ("died", f"exit code {self._procs[r].exitcode}"
                + (f"; its last words: {tail}" if tail else ""))

    def run(self, problem: Problem) -> list[tuple[Array, Array]]:
        """One example on every rank. Waits as long as it takes: the harness's timeout decides
        when an example has hung (and :meth:`close` then ends the wait)."""
        world_size = self._args[1]
        if problem.ep_size != world_size:
            raise ConfigError(
                field="problems", given=f"a problem of EP={problem.ep_size}",
                allowed=f"EP = world_size = {world_size}",
                fix="draw problems with configs(ep_sizes=st.just(world_size))",
            )
        for conn, inputs in zip(self._conns, problem.ranks):
            conn.send(_Job(inputs, problem.config.call_attributes()))
        cfg = problem.config
        limits = [m * cfg.hidden * 4 + cfg.experts_per_rank * 8 + (1 << 16)
                  for m in cfg.tokens_per_rank]  # out and counts, with room for any dtype
        replies = self._collect(range(world_size), inf, limits)
        if self.closed:
            raise RuntimeError("the worker pool was closed during the example")
        failures = {r: reply for r, reply in replies.items() if reply[0] != "ok"}
        if failures or len(replies) < world_size:
            self._restart()
            silent = [r for r in range(world_size) if r not in replies]
            text = "; ".join(f"rank {r} {kind}: {what}" for r, (kind, what) in
                             sorted(failures.items()))
            if silent:
                text += f"; ranks {silent} did not return (waiting in a collective?)"
            raise RankFailure(text)
        return [replies[r][1] for r in range(world_size)]

    def _stop_workers(self, *, graceful: bool) -> None:
        if graceful:
            for conn in self._conns:
                with contextlib.suppress(OSError):  # a dead rank's pipe is closed
                    conn.send(None)
            deadline = time.monotonic() + 2.0
            for proc in self._procs:
                proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self._procs:
            if proc.is_alive():
                kill_tree(proc.pid)  # and every process it started
            elif proc.pid is not None:  # dead: a helper it forked may live on in its group
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
            proc.join()
        for conn in self._conns:
            conn.close()
        self._procs, self._conns = [], []
        if self._store_dir is not None:
            shutil.rmtree(self._store_dir, ignore_errors=True)
            self._store_dir = None

    def _restart(self) -> None:
        # After a failure the group may be broken (a closed pair, a rank in a collective):
        # kill at once rather than wait.
        self._stop_workers(graceful=False)
        self._start()

    def close(self) -> None:
        """Stop every worker and remove the group's store: gracefully between examples, at once
        when an example is still in flight (its ranks may sit in a hung collective)."""
        self.closed = True
        self._stop_workers(graceful=not self.pending)

    @property
    def pids(self) -> list[int]:
        return [int(p.pid) for p in self._procs]


# --------------------------------------------------------------------------------------------
# Joining an existing group (torchrun).
#
# Examples travel on a gloo control group (a scatter); results come back through the group's
# store, so that rank 0 hears of a rank that raised while its own part, or another rank's, still
# waits in a collective that the raising rank never entered. Every rank runs its part in a daemon
# thread, so that a rank left waiting can still be told to give the example up.

_STOP = "stop"
_POLL = 0.005
_searches = 0  # joined searches driven by this process: with its pid, a unique store prefix


@dataclass(frozen=True)
class _Example:
    key: str  # the store prefix of this example's results
    job: _Job


def _describe_failure(exc: BaseException) -> str:
    """``Type: message``, then the last frames, innermost last."""
    try:
        text = str(exc)[:2000]
    except BaseException as inner:  # a hostile __str__ must not escape
        text = f"<its __str__ raised {type(inner).__name__}>"
    frames = traceback.extract_tb(exc.__traceback__)[-3:]
    where = "; ".join(f"{Path(f.filename).name}:{f.lineno} in {f.name}" for f in frames)
    return f"{type(exc).__name__}: {text}" + (f" (last frames: {where})" if where else "")


def _in_thread(impl_rank: ImplRank, job: _Job, group: Any, scales: str) -> dict[str, Any]:
    box: dict[str, Any] = {}

    def target() -> None:
        box["reply"] = _run_job(impl_rank, job, group, scales)

    thread = threading.Thread(target=target, name="dfc-oracle-rank", daemon=True)
    box["thread"] = thread
    thread.start()
    return box


def _serve_group(impl_rank: ImplRank, group: Any, control: Any, store: Any, scales: str,
                 parts: list[threading.Thread]) -> bool:
    """A non-zero rank: run each example rank 0 scatters (its threads appended to ``parts``),
    until it scatters stop. Returns whether the group was left broken (a part may still wait
    in a collective)."""
    dist = _dist()
    rank = dist.get_rank(group)
    while True:
        box: list[Any] = [None]
        dist.scatter_object_list(box, None, src=0, group=control)
        if isinstance(box[0], tuple) and box[0][0] == _STOP:
            return bool(box[0][1])
        example: _Example = box[0]
        running = _in_thread(impl_rank, example.job, group, scales)
        parts.append(running["thread"])
        while running["thread"].is_alive():
            running["thread"].join(_POLL)
            if store.check([f"{example.key}/abandon"]):
                break  # rank 0 gave the example up: leave the part waiting
        else:
            store.set(f"{example.key}/{rank}", pickle.dumps(running["reply"]))


class _GroupImpl:
    """Rank 0's implementation for the harness: scatter, run its own part, collect.

    A rank that raises while others are left waiting in a collective leaves the group unusable:
    that example is reported as it is, not shrunk. Later examples of the search are not run
    (they are answered with the model's outputs), so the search ends on that example."""

    def __init__(self, impl_rank: ImplRank, group: Any, control: Any, store: Any, scales: str,
                 numerics: str | Numerics) -> None:
        global _searches
        _searches += 1
        self._impl_rank, self._group, self._control, self._store, self._scales = (
            impl_rank, group, control, store, scales)
        self._numerics = numerics
        self._prefix = f"dfc-oracle/{os.getpid()}/{_searches}"
        self._count = 0
        self.broken: tuple[bytes, str] | None = None  # (the example's digest, its failure)
        self.closed = False
        self.parts: list[threading.Thread] = []  # this rank's parts, one per example

    def __call__(self, problem: Problem) -> list[tuple[Array, Array]]:
        dist = _dist()
        world_size = dist.get_world_size(self._group)
        jobs = [_Job(r, problem.config.call_attributes()) for r in problem.ranks]
        digest = hashlib.sha256(pickle.dumps(jobs)).digest()
        if self.broken is not None:
            if digest == self.broken[0]:  # Hypothesis replays the failing example
                raise RankFailure(self.broken[1])
            model = run(problem, numerics=self._numerics)
            return [(r.out, r.expert_token_nums) for r in model.ranks]
        self._count += 1
        key = f"{self._prefix}/{self._count}"
        box: list[Any] = [None]
        dist.scatter_object_list(box, [_Example(key, job) for job in jobs], src=0,
                                 group=self._control)
        mine = _in_thread(self._impl_rank, jobs[0], self._group, self._scales)
        self.parts.append(mine["thread"])
        replies = self._collect(key, world_size, mine)
        failures = [f"rank {r} {kind}: {what}" for r, (kind, what) in sorted(replies.items())
                    if kind != "ok"]
        silent = [r for r in range(world_size) if r not in replies]
        if silent:
            self._store.set(f"{key}/abandon", b"1")
            failures.append(
                f"ranks {silent} did not return (waiting in a collective the failing rank "
                "never entered?); the group cannot run another example, so this one is "
                "reported as drawn, not shrunk")
            self.broken = (digest, "; ".join(failures))
        if failures:
            raise RankFailure("; ".join(failures))
        return [replies[r][1] for r in range(world_size)]

    def _collect(self, key: str, world_size: int, mine: dict[str, Any]) -> dict[int, Any]:
        """Every rank's reply; after the first failure, the others get a short grace. Waits
        as long as it takes otherwise: the harness's timeout decides when an example hung."""
        replies: dict[int, Any] = {}
        deadline = inf
        while len(replies) < world_size and time.monotonic() < deadline and not self.closed:
            if 0 not in replies:
                mine["thread"].join(_POLL)
                if not mine["thread"].is_alive():
                    replies[0] = mine["reply"]
            else:
                time.sleep(_POLL)
            for r in range(1, world_size):
                if r not in replies and self._store.check([f"{key}/{r}"]):
                    replies[r] = pickle.loads(self._store.get(f"{key}/{r}"))
                    self._store.delete_key(f"{key}/{r}")
            if deadline == inf and any(kind != "ok" for kind, _ in replies.values()):
                deadline = time.monotonic() + _FAILURE_GRACE
        return replies

    def release(self) -> None:
        """Forget the groups (after an abort), so that they can be destroyed at once."""
        self._group = self._control = None

    def stop(self) -> None:
        dist = _dist()
        self.closed = True
        box: list[Any] = [None]
        stop = (_STOP, self.broken is not None)
        dist.scatter_object_list(box, [stop] * dist.get_world_size(self._group), src=0,
                                 group=self._control)


def _under_torchrun() -> bool:
    return all(v in os.environ for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def _is_hang(err: ConformanceError) -> bool:
    return err.verdict.stage == "timeout"


def default_problems(world_size: int,
                     variants: Sequence[str] | None = None) -> st.SearchStrategy[Problem]:
    """:func:`check_distributed`'s default search: :func:`spec.strategies.problems` at EP =
    ``world_size``, of every weight variant (W8A8, BF16 and FP16 weights, all of which
    :func:`reference_rank` models) or only ``variants`` (names from
    :data:`oracle.config.options.WEIGHT_VARIANTS`)."""
    ep = st.just(world_size)
    return problems(configs=configs(ep_sizes=ep) if variants is None
                    else variant_configs(variants, ep_sizes=ep))


def check_distributed(
    impl_rank: ImplRank,
    *,
    world_size: int,
    backend: str = "gloo",
    problems: st.SearchStrategy[Problem] | None = None,
    max_examples: int | None = None,
    timeout: float = 60.0,
    numerics: str | Numerics = "faithful",
    settings: hsettings | None = None,
    scales: str = "int64",
    save_dir: str | Path | None = None,
    variants: Sequence[str] | None = None,
    kernel: str | KernelProfile | None = None,
) -> None:
    """Search for a problem on which the per-rank ``impl_rank`` disagrees with :func:`oracle.run`.

    ``problems`` defaults to :func:`default_problems`: problems at EP = ``world_size`` of
    every weight variant, or of ``variants`` only (e.g. ``["w8a8"]`` for a kernel without the
    float-weight path); ``max_examples`` overrides the active Hypothesis profile's
    (``settings``, default the active profile). ``timeout``: seconds one example may take on
    all ranks before it is reported as hung. ``scales``: how the dequant scales reach
    ``impl_rank`` (``"int64"``, vLLM's encoding, or ``"float32"``). Raises
    :class:`oracle.ConformanceError` with the minimal failing problem (a rank that raises or
    dies is a failure too), or :class:`DistributedTimeout` naming the example that hung.
    Spawned worker processes are always stopped before this returns. ``kernel`` (a registered
    name, a :class:`oracle.model.kernels.KernelProfile`, ``"MODULE:NAME"`` of one or a profile
    file, as :func:`oracle.check.loading.load_kernel` reads them) replaces the profile of
    ``numerics``: a kernel with its own rounding points is judged by its own record. Options
    outside what is allowed (:func:`oracle.config.options.check_options`) raise
    :class:`oracle.config.options.OptionError` before any process starts.

    Spawned ranks import ``impl_rank`` by name: it must be a module-level function (or a
    ``functools.partial`` of one), not a lambda or a function defined in a test body.
    """
    kernel = load_kernel(kernel)
    check_options(variants=variants, world_size=world_size, timeout=timeout,
                  numerics=numerics, max_examples=max_examples, scales=scales,
                  save_dir=save_dir, kernel=kernel)
    if not isinstance(backend, str) or not backend:
        raise OptionError("backend", f"backend={backend!r} must be a torch.distributed backend "
                          "name ('gloo' on CPUs, 'nccl' on GPUs)")
    numerics = with_kernel(resolve_numerics(numerics), kernel)
    if problems is None:
        problems = default_problems(world_size, variants)
    base = settings if settings is not None else hsettings()
    search = hsettings(base, deadline=None,
                       max_examples=base.max_examples if max_examples is None else max_examples)
    run_search = (_check_joined if _under_torchrun() or _dist().is_initialized()
                  else _check_spawned)
    run_search(impl_rank, world_size=world_size, backend=backend, problems=problems,
               settings=search, timeout=timeout, numerics=numerics, scales=scales,
               save_dir=save_dir)


def _check_spawned(
    impl_rank: ImplRank, *, world_size: int, backend: str, problems: Any, settings: hsettings,
    timeout: float, numerics: str | Numerics, scales: str, save_dir: str | Path | None,
) -> None:
    # The backend's own collective timeout is a last resort behind ours.
    pool = _WorkerPool(impl_rank, world_size, backend, scales, collective_timeout=4 * timeout)
    try:
        check_implementation(pool.run, numerics=numerics, problems=problems, settings=settings,
                             timeout=timeout, save_dir=save_dir, inputs="ignore")
    except ConformanceError as err:
        if _is_hang(err):
            raise DistributedTimeout(err, pool.pending) from None
        raise
    finally:
        pool.close()


def _check_joined(
    impl_rank: ImplRank, *, world_size: int, backend: str, problems: Any, settings: hsettings,
    timeout: float, numerics: str | Numerics, scales: str, save_dir: str | Path | None,
) -> None:
    dist = _dist()
    created = not dist.is_initialized()
    if created:
        dist.init_process_group(backend)  # torchrun's environment: RANK, WORLD_SIZE, MASTER_*
    hung = broken = False
    parts: list[threading.Thread] = []
    impl: _GroupImpl | None = None
    group = control = None
    try:
        group = dist.group.WORLD
        if dist.get_world_size(group) != world_size:
            raise ConfigError(
                field="world_size", given=repr(world_size),
                allowed=f"the group's size {dist.get_world_size(group)}",
                fix="pass world_size=torch.distributed.get_world_size()",
            )
        control = dist.new_group(backend="gloo")  # examples and results travel on the CPU
        store = dist.distributed_c10d._get_default_store()
        if dist.get_rank(group) != 0:
            broken = _serve_group(impl_rank, group, control, store, scales, parts)
            return
        impl = _GroupImpl(impl_rank, group, control, store, scales, numerics)
        parts = impl.parts
        try:
            check_implementation(impl, numerics=numerics, problems=problems, settings=settings,
                                 timeout=timeout, save_dir=save_dir, inputs="ignore")
        except ConformanceError as err:
            if _is_hang(err):  # the other ranks are stuck: torchrun stops them when we exit
                hung = impl.closed = True
                raise DistributedTimeout(err, []) from None
            impl.stop()
            broken = impl.broken is not None
            raise
        impl.stop()
        broken = impl.broken is not None
    finally:
        if created and broken:
            # A part still waits in a collective on the group: abort it, on every rank, rather
            # than destroy it (which waits for that collective).
            dist.distributed_c10d._abort_process_group()
            # Gloo's abort is a no-op: a part's collective ends only when a peer's group goes
            # (its sockets close), which may be seconds away on a loaded machine. Leave while a
            # part still waits and the peer's close reaches it during interpreter exit: the
            # process dies of SIGABRT ("terminate called without an active exception"), as
            # happened under CI with the former 2 s wait. Wait for the peers, bounded.
            deadline = time.monotonic() + _TEARDOWN
            for part in parts:
                part.join(max(0.0, deadline - time.monotonic()))
            # Drop this call's own references too, so that the groups are destroyed here and
            # not with the error's traceback at interpreter exit, where freeing gloo's failed
            # work (tensors that need the GIL) aborts the process the same way.
            group = control = None
            if impl is not None:
                impl.release()
        # Destroying a group with a hung collective would hang too.
        elif created and not hung:
            # Every rank past its last collective before any tears down: a rank that destroys
            # the group while its peer still uses it aborted at exit under torchrun.
            dist.barrier()
            dist.destroy_process_group()
