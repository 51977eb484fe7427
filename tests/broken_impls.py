"""Deliberately broken implementations for the harness tests: each is the reference model with
one realistic defect, so a test can show the harness finds it and shrinks it."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

import oracle
from oracle.adapters.torch_io import InputsRefused
from spec import Problem

Outputs = list[tuple[Any, Any]]


def correct(problem: Problem) -> Outputs:
    return [(r.out, r.expert_token_nums) for r in oracle.run(problem).ranks]


def refused(problem: Problem) -> Outputs:
    """What the torch adapter raises for a call its declared input form cannot hold."""
    raise InputsRefused("the torch adapter refused the gate's call (a stand-in)")


def _with_probs(problem: Problem, change: Any) -> Problem:
    ranks = [dataclasses.replace(r, probs=change(np.array(r.probs))) for r in problem.ranks]
    return Problem.from_validated(ranks, problem.config)


def probs_ignored(problem: Problem) -> Outputs:
    """Combine with weight 1 for every slot."""
    return correct(_with_probs(problem, np.ones_like))


def dropped_slot(problem: Problem) -> Outputs:
    """The last slot of every token never reaches the combine."""

    def drop(p: np.ndarray) -> np.ndarray:
        p[:, -1] = 0
        return p

    return correct(_with_probs(problem, drop) if problem.config.top_k > 1 else problem)


def modulo_mapping(problem: Problem) -> Outputs:
    """Counts experts on rank g % EP instead of g // E."""
    cfg = problem.config
    counts = oracle.run(problem).trace.counts.sum(axis=0)
    wrong = np.zeros((cfg.ep_size, cfg.experts_per_rank), dtype=np.int32)
    for g, n in enumerate(counts):
        wrong[g % cfg.ep_size, (g // cfg.ep_size) % cfg.experts_per_rank] += n
    return [(r.out, wrong[i]) for i, r in enumerate(oracle.run(problem).ranks)]


def reverse_combine(problem: Problem) -> Outputs:
    """Sums the slots in reverse k order."""
    result = oracle.run(problem)
    outputs = []
    for i, rank in enumerate(result.ranks):
        y, p = result.trace.y[i], problem.ranks[i].probs
        acc = y[:, -1] * p[:, -1, None]
        for k in range(y.shape[1] - 2, -1, -1):
            acc = acc + y[:, k] * p[:, k, None]
        out = np.where(rank.defined[:, None], acc, 0).astype(rank.out.dtype)
        outputs.append((out, rank.expert_token_nums))
    return outputs


def crash_on_empty_rank(problem: Problem) -> Outputs:
    if 0 in problem.config.tokens_per_rank:
        raise RuntimeError("cannot launch a kernel with zero tokens")
    return correct(problem)


def hangs(problem: Problem) -> Outputs:
    time.sleep(30)
    return correct(problem)


def returns_none(problem: Problem) -> Any:
    return None


def int64_counts(problem: Problem) -> Outputs:
    return [(o, n.astype(np.int64)) for o, n in correct(problem)]


def nan_on_zero_row(problem: Problem) -> Outputs:
    return [(r.out, r.expert_token_nums)
            for r in oracle.run(problem, numerics=oracle.Numerics(zero_rows="nan")).ranks]


def writes_masked_ids(problem: Problem) -> Outputs:
    """Like the real operator: writes the sentinel EP·E into expert_idx of masked tokens."""
    for r in problem.ranks:
        r.expert_idx[~r.is_active()] = problem.config.num_experts
    return correct(problem)


def vllm_model(problem: Problem) -> Outputs:
    """A conforming kernel of the vllm-triton profile (its own model)."""
    return [(r.out, r.expert_token_nums)
            for r in oracle.run(problem, numerics="vllm-triton").ranks]


def needs_contiguous_weights(problem: Problem) -> Outputs:
    """A kernel that asserts contiguous weights, as one taking a data pointer would need."""
    for r in problem.ranks:
        for w in (*r.w1, *r.w2):
            if not w.flags.c_contiguous:
                raise ValueError(f"weights of strides {w.strides} are not contiguous")
    return correct(problem)
