"""A user's own kernel profile and a kernel that implements it, for the tests of every door
that takes ``--kernel MODULE:NAME`` or a profile file: the Ascend A3 pipeline with vLLM's
``silu_and_mul`` rounding (silu stored in x's dtype before the multiply: two roundings where
A3 has one). The default profile fails this kernel; its own profile passes it."""

from __future__ import annotations

import dataclasses
from typing import Any

import oracle
from oracle.model.kernels import ASCEND_A3, VLLM_TRITON
from spec import Problem

SILU_ROUNDED = dataclasses.replace(
    ASCEND_A3.map_steps("swiglu", lambda s: dataclasses.replace(s, silu_store="x")),
    name="a3-silu-rounded", summary="A3 with silu stored in x's dtype before the multiply",
    sources="tests/own_profiles.py")

#: Not a profile: what ``--kernel own_profiles:NOT_A_PROFILE`` must reject.
NOT_A_PROFILE = {"name": "a3-silu-rounded"}


def dispatch_ffn_combine(problem: Problem) -> list[tuple[Any, Any]]:
    """The kernel with SILU_ROUNDED's rounding points."""
    result = oracle.run(problem, numerics=oracle.Numerics(kernel=SILU_ROUNDED))
    return [(r.out, r.expert_token_nums) for r in result.ranks]


def probs_ignored(problem: Problem) -> list[tuple[Any, Any]]:
    """The same kernel with a structural bug: every routed weight taken as 1."""
    ranks = [dataclasses.replace(r, probs=r.probs * 0 + 1) for r in problem.ranks]
    return dispatch_ffn_combine(Problem.from_validated(ranks, problem.config))


#: vLLM's Triton kernel rounding once where it rounds twice: silu not stored in x's dtype
#: before the product, in the W8A8 pipeline only (one knob of ``dfc-oracle fit``).
VLLM_SILU_ONCE = dataclasses.replace(
    VLLM_TRITON.map_steps("swiglu", lambda s: dataclasses.replace(s, silu_store=None),
                          ("w8a8",)),
    name="vllm-silu-once", summary="vLLM Triton with silu not rounded before the product",
    sources="tests/own_profiles.py")


def vllm_silu_once(problem: Problem) -> list[tuple[Any, Any]]:
    """The kernel with VLLM_SILU_ONCE's rounding points."""
    result = oracle.run(problem, numerics=oracle.Numerics(kernel=VLLM_SILU_ONCE))
    return [(r.out, r.expert_token_nums) for r in result.ranks]


def intermediates(problem: Problem, rank: int, token: int) -> list[dict[str, Any]]:
    """The stage hook of ``dispatch_ffn_combine``: its intermediates of one token, one mapping
    per slot by stage name (here computed by the oracle's walk of its own profile)."""
    from oracle.explain.stages import token_stages

    walk = token_stages(problem, rank, token, oracle.Numerics(kernel=SILU_ROUNDED))
    return [{st.name: st.value.mid for st in s.stages} for s in walk.slots]


def intermediates_raising(problem: Problem, rank: int, token: int) -> Any:
    raise RuntimeError("no hook here")


#: A3 whose float pipeline rounds silu to x's dtype before the product (twice) where its W8A8
#: pipeline rounds once: one knob of one variant's pipeline, which ``dfc-oracle fit`` must
#: change there only.
A3_FLOAT_SILU_ROUNDED = dataclasses.replace(
    ASCEND_A3.map_steps("swiglu", lambda s: dataclasses.replace(s, silu_store="x"),
                        ("float",)),
    name="a3-float-silu-rounded", summary="A3 with silu stored in x's dtype in the float "
    "pipeline only", sources="tests/own_profiles.py")


def a3_float_silu_rounded(problem: Problem) -> list[tuple[Any, Any]]:
    """The kernel with A3_FLOAT_SILU_ROUNDED's rounding points."""
    result = oracle.run(problem, numerics=oracle.Numerics(kernel=A3_FLOAT_SILU_ROUNDED))
    return [(r.out, r.expert_token_nums) for r in result.ranks]
