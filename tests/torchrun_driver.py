"""A torchrun script, as a user's cluster job would look: every rank calls check_distributed,
rank 0 drives the search (the "joined" mode of oracle.check.distributed). Run by
test_distributed.py:

    python -m torch.distributed.run --standalone --nproc_per_node=N torchrun_driver.py IMPL

The search draws every weight variant. Rank 0 prints ``CONFORMS``, or ``FOUND <minimal
configuration>``, the verdict's stage and the report. Every rank then prints ``PARTS ALIVE n``:
how many of its implementation threads still run as it leaves.

A second argument ``late`` makes rank 1 tear the group down 5 s late (a loaded machine);
``late-2s`` also restores the former 2 s wait for the parts after an abort (the mutant).
"""

from __future__ import annotations

import os
import sys
import threading
import time

import torch.distributed as dist
from hypothesis import settings
from hypothesis import strategies as st

from oracle import ConformanceError
from oracle.check import distributed as D
from spec.strategies import configs, problems


def return_expert_major(inputs, group):  # type: ignore[no-untyped-def]
    """The planted bug of test_distributed.py: wrong split boundaries on the way back."""
    plan = D.plan_routes(inputs, group)
    y = D.expert_ffn(inputs, plan, D.dispatch(inputs, plan, group))
    back = D.all_to_all_rows(y, send_splits=plan.recv_splits, recv_splits=plan.send_splits,
                             group=group)
    return D.combine(inputs, plan, back), plan.expert_token_nums


def rank_one_raises(inputs, group):  # type: ignore[no-untyped-def]
    """Planted failure: rank 1 raises before the first collective, so rank 0 is left waiting in
    the count exchange."""
    if dist.get_rank(group) == 1:
        raise ValueError("planted failure on rank 1")
    return D.reference_rank(inputs, group)


def two_ranks_raise(inputs, group):  # type: ignore[no-untyped-def]
    """Planted failures for 4 ranks, before the first collective: rank 1 raises on every
    example, rank 3 only on examples where it has an even number of tokens."""
    rank = dist.get_rank(group)
    if rank == 1:
        raise ValueError("planted failure on rank 1")
    if rank == 3 and inputs.x.shape[0] % 2 == 0:
        raise KeyError("planted failure on rank 3")
    return D.reference_rank(inputs, group)


IMPLS = {"reference": D.reference_rank, "return_expert_major": return_expert_major,
         "rank_one_raises": rank_one_raises, "two_ranks_raise": two_ranks_raise}



def _late_teardown(abort):  # type: ignore[no-untyped-def]
    def late(*args, **kwargs):  # type: ignore[no-untyped-def]
        time.sleep(5.0)
        return abort(*args, **kwargs)
    return late


if __name__ == "__main__":
    world = int(os.environ["WORLD_SIZE"])
    mode = sys.argv[2] if len(sys.argv) > 2 else ""
    if mode.startswith("late") and os.environ["RANK"] == "1":
        c10d = dist.distributed_c10d
        c10d._abort_process_group = _late_teardown(c10d._abort_process_group)
    if mode == "late-2s":
        D._TEARDOWN = 2.0
    strategy = problems(configs=configs(ep_sizes=st.just(world),
                                        experts_per_rank=st.integers(2, 4),
                                        tokens_per_rank=st.integers(1, 4)))
    search = settings(derandomize=True, database=None, deadline=None)
    try:
        D.check_distributed(IMPLS[sys.argv[1]], world_size=world, problems=strategy,
                            settings=search, max_examples=20, timeout=60)
    except ConformanceError as exc:
        print("FOUND", exc.problem.config.summary(), flush=True)
        print(f"STAGE {exc.verdict.stage}", exc.report, sep="\n", flush=True)
    else:
        if int(os.environ["RANK"]) == 0:
            print("CONFORMS", flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    alive = [t for t in threading.enumerate() if t.name == "dfc-oracle-rank" and t.is_alive()]
    print(f"PARTS ALIVE {len(alive)}", flush=True)
