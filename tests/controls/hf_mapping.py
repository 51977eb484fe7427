"""How a Hugging Face ``transformers`` MoE block maps onto one ``dispatch_ffn_combine`` Problem.

This module is the one place that states the mapping; the controls in this folder only use it.
Checked against ``transformers`` 5.24.0 (``models/*/modeling_*.py``), where every MoE block keeps
all its routed experts fused in one module, ``block.experts``:

==========================  ===============  ==================================================
transformers 5.x            shape            what the block computes with it
==========================  ===============  ==================================================
``experts.gate_up_proj``    ``(G, 2I, K)``   ``F.linear(x, gate_up_proj[g]).chunk(2)``:
                                             gate = the first ``I`` outputs, up = the last ``I``
``experts.down_proj``       ``(G, K, I)``    ``F.linear(silu(gate) * up, down_proj[g])``
==========================  ===============  ==================================================

``F.linear(x, W)`` is ``x @ W.T``. Our TensorLists hold ``w1[g]`` as ``(K, N = 2I)`` with the
gate columns first, then up, and ``w2[g]`` as ``(I, K)`` (reference notes §2–§3), hence

- ``w1[g] = gate_up_proj[g].T`` — the same gate/up order, one transpose;
- ``w2[g] = down_proj[g].T``;
- the block's expert ``g`` is our global expert ``g``: rank ``g // E``, local index ``g % E``
  (§4), so splitting the block over ``EP`` simulated ranks gives each rank a contiguous run of
  ``E = G / EP`` experts and changes no id.

**Routing.** The top-k ids and weights are the arguments ``block.experts`` receives, captured by a
forward pre-hook: whatever the router does (softmax or sigmoid, group limits, correction bias,
renormalisation, scaling) is taken exactly as the block computed it. The ids (int64, all below
``G``) become int32; the weights are already float32 and pass through unchanged, since the
operator uses ``probs`` as given (§2).

**Dtypes.** The operator takes x in bfloat16 or float16 and BF16/FP16-variant weights in x's
dtype (§2), while the control runs the block in float32. Both must compute from identical
values, so the block's expert weights are rounded to that dtype (round to nearest even, by
``ml_dtypes``) and the rounded values are loaded back into the block; the tokens are drawn in
that dtype and the block receives their exact float32 widening. Router weights stay float32:
they never enter the Problem, only the ids and weights they produce do.

**Outside the operator.** It has no shared experts (§1): blocks that carry one get its down
projection zeroed, so it adds exactly ``+0.0``. The activation must be SwiGLU with SiLU, the
operator's only one [code]; gpt-oss's experts (interleaved gate/up, biases, a clamped sigmoid
with ``alpha``) are therefore not a control.

>>> block = build_block("mixtral", TinyShape(hidden=8, intermediate=4, experts=4, top_k=2),
...                     dtype="bfloat16", seed=0)
>>> w1, w2 = stacked_weights(block, dtype="bfloat16")
>>> w1.shape, w2.shape
((4, 8, 8), (4, 4, 8))
"""

# transformers' block and config classes are untyped.
# mypy: allow-untyped-calls

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import DeepseekV3Config, MixtralConfig, Qwen3MoeConfig
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

from spec import DTYPES, Problem, RankInputs

__all__ = [
    "BLOCK_KINDS",
    "EXPERT_KERNELS",
    "SIZE_MULTIPLE",
    "Block",
    "BlockKind",
    "BlockRun",
    "TinyShape",
    "build_block",
    "run_block",
    "snap",
    "stacked_weights",
    "to_problem",
]

#: The expert kernels transformers 5.x dispatches between (``config._experts_implementation``):
#: a loop over the experts hit, a batched matmul over every slot, and a grouped matmul over
#: slots sorted by expert — three independent computations of the same block.
EXPERT_KERNELS = ("eager", "batched_mm", "grouped_mm")
#: Sizes a kernel needs K and I to be multiples of: torch's CPU grouped matmul wants row strides
#: of a multiple of 16 bytes (four float32), else it raises "strides should be multiple of 16
#: bytes" (torch 2.13).
SIZE_MULTIPLE = {"eager": 1, "batched_mm": 1, "grouped_mm": 4}


#: A transformers MoE block (a ``torch.nn.Module`` with ``.gate`` and ``.experts``); ``Any``
#: because torch types submodule attributes as ``Tensor | Module``.
Block = Any


@dataclass(frozen=True)
class TinyShape:
    """A block's size: hidden ``K``, expert intermediate ``I``, ``experts`` = ``G`` (all experts
    of the block, ``EP·E`` in the operator's terms) and ``top_k``."""

    hidden: int
    intermediate: int
    experts: int
    top_k: int


@dataclass(frozen=True)
class BlockKind:
    """One transformers MoE block class: how to build it at a tiny shape, and what to do to it
    after random initialisation so that it computes only what the operator computes."""

    name: str
    build: Callable[[TinyShape, str], Block]
    prepare: Callable[[Block, np.random.Generator], None]
    #: DeepSeek-V3's group scoring takes the top 2 experts of a group.
    min_experts: int = 1


def _config(config_class: Any, kernel: str, **fields: Any) -> Any:
    """``config_class(**fields)`` with its experts dispatched to ``kernel`` (the
    ``experts_implementation`` keyword of transformers' base config class)."""
    return config_class(**fields, experts_implementation=kernel)


def _mixtral(shape: TinyShape, kernel: str) -> Block:
    """Softmax over all experts in float32, top-k, renormalised to sum 1."""
    return MixtralSparseMoeBlock(
        _config(
            MixtralConfig, kernel, hidden_size=shape.hidden,
            intermediate_size=shape.intermediate, num_local_experts=shape.experts,
            num_experts_per_tok=shape.top_k,
        )
    )


def _qwen3_moe(shape: TinyShape, kernel: str) -> Block:
    """Softmax, top-k, *not* renormalised (``norm_topk_prob=False``, Qwen3MoeConfig's default):
    the weights sum to less than 1."""
    return Qwen3MoeSparseMoeBlock(
        _config(
            Qwen3MoeConfig, kernel, hidden_size=shape.hidden,
            moe_intermediate_size=shape.intermediate, num_experts=shape.experts,
            num_experts_per_tok=shape.top_k, norm_topk_prob=False,
        )
    )


def _deepseek_v3(shape: TinyShape, kernel: str) -> Block:
    """Sigmoid scores, top-k chosen on scores plus a correction bias, weights gathered from the
    unbiased scores, renormalised, then scaled by ``routed_scaling_factor`` (2.5): the weights
    sum to 2.5. One expert group (the group limit needs G divisible by the group count)."""
    return DeepseekV3MoE(
        _config(
            DeepseekV3Config, kernel, hidden_size=shape.hidden,
            moe_intermediate_size=shape.intermediate, n_routed_experts=shape.experts,
            num_experts_per_tok=shape.top_k, n_group=1, topk_group=1, n_shared_experts=1,
        )
    )


def _no_changes(block: Block, rng: np.random.Generator) -> None:
    """The block computes only the operator's part as it is."""


def _deepseek_v3_prepare(block: Block, rng: np.random.Generator) -> None:
    """Silence the shared expert; give the router a non-zero correction bias, so that experts are
    chosen on other values than the weights the block then applies (probs are used as given)."""
    block.shared_experts.down_proj.weight.zero_()
    bias = block.gate.e_score_correction_bias
    bias.copy_(torch.from_numpy(0.1 * rng.standard_normal(bias.shape)))


#: The block classes used as controls, by short name.
BLOCK_KINDS: dict[str, BlockKind] = {
    kind.name: kind
    for kind in (
        BlockKind("mixtral", _mixtral, _no_changes),
        BlockKind("qwen3_moe", _qwen3_moe, _no_changes),
        BlockKind("deepseek_v3", _deepseek_v3, _deepseek_v3_prepare, min_experts=2),
    )
}


def snap(values: np.ndarray, dtype: str) -> np.ndarray:
    """``values`` rounded to ``dtype`` (round to nearest even), widened back to float32: the
    float32 array the block computes with, holding exactly the Problem's values.

    >>> snap(np.array([1 + 2**-10], np.float32), "bfloat16")
    array([1.], dtype=float32)
    """
    return np.asarray(values).astype(DTYPES[dtype]).astype(np.float32)


def build_block(
    kind: str, shape: TinyShape, *, dtype: str, seed: int, kernel: str = "eager"
) -> Block:
    """A randomly initialised block of that kind in eval mode, float32 on CPU, whose expert
    weights are exactly representable in ``dtype``.

    Every parameter is drawn ``N(0, 1/fan_in)`` (the blocks allocate them uninitialised); then the
    expert weights are snapped to ``dtype`` and the kind's ``prepare`` runs.
    """
    if torch.get_float32_matmul_precision() != "highest":
        raise RuntimeError(
            "torch float32 matmul precision is "
            f"{torch.get_float32_matmul_precision()!r}; the controls' error bound assumes "
            "'highest' (true float32 GEMMs): torch.set_float32_matmul_precision('highest')"
        )
    spec = BLOCK_KINDS[kind]
    rng = np.random.default_rng(seed)
    block = spec.build(shape, kernel).eval()
    if block.experts.config.hidden_act != "silu":
        raise ValueError(f"{kind}: the operator's activation is SwiGLU with SiLU only")
    with torch.no_grad():
        for param in block.parameters():
            draw = rng.standard_normal(tuple(param.shape)) / np.sqrt(param.shape[-1])
            param.copy_(torch.from_numpy(draw))
        for param in (block.experts.gate_up_proj, block.experts.down_proj):
            param.copy_(torch.from_numpy(snap(param.detach().numpy(), dtype)))
        spec.prepare(block, rng)
    return block


@dataclass(frozen=True)
class BlockRun:
    """One forward pass of a block: the tokens ``x`` (T, K) in the Problem's dtype, the block's
    float32 output ``out`` (T, K), and the routing its experts received: ``expert_idx`` (T, k)
    int32 and ``probs`` (T, k) float32."""

    x: np.ndarray
    out: np.ndarray
    expert_idx: np.ndarray
    probs: np.ndarray


def run_block(block: Block, x: np.ndarray) -> BlockRun:
    """Run ``block`` on the exact float32 widening of ``x`` (T, K) (bfloat16 or float16) as one
    sequence, capturing the top-k ids and weights its experts receive."""
    seen: list[tuple[Any, ...]] = []

    def capture(module: Block, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen.append(args)

    hook = block.experts.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            out = block(torch.from_numpy(x.astype(np.float32))[None])
    finally:
        hook.remove()
    (_hidden, ids, weights), = seen
    assert weights.dtype == torch.float32, "the controls run the block in float32"
    return BlockRun(
        x=x,
        out=out[0].numpy(),
        expert_idx=ids.numpy().astype(np.int32),
        probs=weights.numpy(),
    )


def stacked_weights(block: Block, *, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """The block's experts as our stacked weights in ``dtype``: ``w1`` (G, K, 2I) with the gate
    columns first and ``w2`` (G, I, K) — the mapping stated in this module's docstring.

    Raises ``ValueError`` when a weight is not representable in ``dtype`` (the block would then
    compute with other values than the Problem).
    """
    gate_up = block.experts.gate_up_proj.detach().numpy()
    down = block.experts.down_proj.detach().numpy()
    w1 = np.swapaxes(gate_up, 1, 2).astype(DTYPES[dtype])
    w2 = np.swapaxes(down, 1, 2).astype(DTYPES[dtype])
    for name, ours, theirs in (("gate_up_proj", w1, gate_up), ("down_proj", w2, down)):
        if not np.array_equal(np.swapaxes(ours, 1, 2).astype(np.float32), theirs):
            raise ValueError(f"experts.{name} is not representable in {dtype}: snap it first")
    return np.ascontiguousarray(w1), np.ascontiguousarray(w2)


def to_problem(
    run: BlockRun,
    w1: np.ndarray,
    w2: np.ndarray,
    *,
    tokens_per_rank: Sequence[int],
    weight_form: str = "stacked",
) -> Problem:
    """The block's forward pass as one collective call over ``EP = len(tokens_per_rank)``
    simulated ranks: rank ``r`` holds the next ``tokens_per_rank[r]`` tokens of the sequence and
    the ``E = G / EP`` experts ``r·E … r·E + E − 1`` in ``weight_form`` ("stacked" or "list").
    """
    ep, experts = len(tokens_per_rank), int(w1.shape[0])
    if experts % ep or sum(tokens_per_rank) != run.x.shape[0]:
        raise ValueError(
            f"{experts} experts and {run.x.shape[0]} tokens do not split over "
            f"tokens_per_rank={tuple(tokens_per_rank)}"
        )
    e_local = experts // ep
    bounds = np.cumsum([0, *tokens_per_rank])

    def tensor_list(stacked: np.ndarray, r: int) -> list[np.ndarray]:
        mine = stacked[r * e_local : (r + 1) * e_local]
        return [mine] if weight_form == "stacked" else list(mine)

    return Problem(
        [
            RankInputs(
                x=run.x[lo:hi],
                expert_idx=run.expert_idx[lo:hi],
                probs=run.probs[lo:hi],
                w1=tensor_list(w1, r),
                w2=tensor_list(w2, r),
            )
            for r, (lo, hi) in enumerate(itertools.pairwise(bounds))
        ]
    )
