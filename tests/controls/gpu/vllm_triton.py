"""vLLM's Triton ``fused_moe_kernel`` (BF16/FP16 weights) with a driver of ours, gated in the
``vllm-triton`` profile.

The kernel's source is vLLM's (Apache-2.0) and is **not** part of this repository: it is
carried, git-ignored, as ``.carry/vllm/fused_moe_kernel.py`` (or the file ``DFC_VLLM_KERNEL``
names), holding ``write_zeros_to_output`` and ``fused_moe_kernel`` unchanged, cut out of
``vllm/model_executor/layers/fused_moe/fused_moe.py`` by :func:`extract` (run this module with
that file's path, from ``tests/``: ``python -m controls.gpu.vllm_triton PATH``). The rest of vLLM's
``fused_experts`` is CUDA C++ (``moe_align_block_size``, ``silu_and_mul``, ``moe_sum``); the
driver below does what those do, in torch, as ``docs/contract/kernels.md`` describes them:

- slots grouped by expert, each expert's run padded to ``BLOCK_SIZE_M`` with the invalid slot id
  T·top_k (masked tokens' slots route nowhere, §4);
- GEMM1 without the routed weight into ``(T, top_k, 2I)``; ``silu(gate) * up`` on x-dtype
  tensors (silu rounded to x's dtype, then the product, as ``silu_and_mul``);
- GEMM2 with the routed weight in its epilogue (``MUL_ROUTED_WEIGHT``, top_k 1);
- int8 W8A8 weights (per-channel scales): both GEMM inputs quantised per row as fused_moe's
  Triton ``per_token_quant_int8`` does (:func:`quantise`), the kernel's ``per_channel_quant``
  path;
- ``moe_sum``: for top_k 2–4 adds in x's dtype in slot order, else a float32 sum, one cast.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from oracle.adapters.torch_io import TorchRankInputs, implementation

from .common import PADDING_PLANTED, PLANTED, Call, plant

DEVICE = "cuda"
#: Where the carried kernel source is looked for (``DFC_VLLM_KERNEL`` overrides it).
KERNEL_SOURCE = Path(os.environ.get(
    "DFC_VLLM_KERNEL", Path(__file__).resolve().parents[3] / ".carry/vllm/fused_moe_kernel.py"))
#: The Triton functions :func:`extract` keeps.
KERNEL_FUNCTIONS = ("write_zeros_to_output", "fused_moe_kernel")
#: vLLM's default configuration for small batches (``get_default_config``).
CONFIG = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 1}


def extract(source: str, provenance: str) -> str:
    """The module text holding only :data:`KERNEL_FUNCTIONS` of vLLM's ``fused_moe.py``
    (``source``), decorators included, after the imports they need; ValueError names a
    function the source lacks."""
    lines = source.splitlines()
    found = {node.name: "\n".join(lines[node.decorator_list[0].lineno - 1 if
                                         node.decorator_list else node.lineno - 1:
                                         node.end_lineno])
             for node in ast.parse(source).body
             if isinstance(node, ast.FunctionDef) and node.name in KERNEL_FUNCTIONS}
    missing = [name for name in KERNEL_FUNCTIONS if name not in found]
    if missing:
        raise ValueError(f"{provenance}: no top-level function {', '.join(missing)}; pass "
                         "vllm/model_executor/layers/fused_moe/fused_moe.py")
    header = ("# SPDX-License-Identifier: Apache-2.0\n"
              f"# {', '.join(KERNEL_FUNCTIONS)}, unchanged, from {provenance}.\n"
              "import triton\nimport triton.language as tl\n")
    return header + "".join(f"\n\n{found[name]}\n" for name in KERNEL_FUNCTIONS)


@functools.cache
def kernel() -> Any:
    """vLLM's ``fused_moe_kernel`` (a Triton JIT function) from :data:`KERNEL_SOURCE`."""
    spec = importlib.util.spec_from_file_location("dfc_vllm_fused_moe_kernel", KERNEL_SOURCE)
    if spec is None or spec.loader is None or not KERNEL_SOURCE.is_file():
        raise FileNotFoundError(f"vLLM's kernel source is not at {KERNEL_SOURCE}: carry it "
                                "there (see this module's docstring) or set DFC_VLLM_KERNEL")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.fused_moe_kernel


def align(call: Call, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``moe_align_block_size``'s three tensors, without a host synchronisation (so a CUDA graph
    can capture it): the slot ids grouped by expert, each group padded to a multiple of
    ``block`` with the invalid id T·top_k, in a buffer of the most the padded total can be
    (T·top_k + G·(block − 1), rounded up to whole blocks); the expert of each block (past the
    padded total: any, the kernel returns there); the padded total (one int32)."""
    flat, experts = call.expert_idx.reshape(-1), call.num_experts
    n, device = flat.numel(), flat.device
    slots = torch.where(call.active_slots(), flat, experts)  # inactive: a spare expert
    counts = torch.zeros(experts + 1, dtype=torch.int64, device=device).scatter_add_(
        0, slots, torch.ones_like(slots))[:experts]
    padded = -(-counts // block) * block
    start = torch.cumsum(padded, 0) - padded
    first = torch.cumsum(counts, 0) - counts
    order = torch.argsort(slots, stable=True)
    expert = slots[order]
    size = -(-(n + experts * (block - 1)) // block) * block
    e = expert.clamp(max=experts - 1)
    position = torch.where(expert < experts,
                           start[e] + torch.arange(n, device=device) - first[e], size)
    sorted_ids = torch.full((size + 1,), n, dtype=torch.int32, device=device)
    sorted_ids[position] = order.to(torch.int32)
    ends = torch.cumsum(padded, 0) // block
    blocks = torch.searchsorted(ends, torch.arange(size // block, device=device), right=True)
    return (sorted_ids[:size], blocks.clamp(max=experts - 1).to(torch.int32),
            padded.sum().reshape(1).to(torch.int32))


def quantise(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row int8 quantisation as fused_moe's Triton ``per_token_quant_int8`` computes it
    (profile ``vllm-triton-tq``): ``amax = max(max|a|, 1e-10)``, ``q = round(a·(127/amax))``
    with ties away from zero, scale ``amax/127``; ``(q int8, scale float32 (rows,))``."""
    af = a.float()
    amax = af.abs().amax(dim=-1).clamp_min(1e-10)
    t = af * (127.0 / amax)[:, None]
    whole = torch.trunc(t)
    q = whole + torch.where((t - whole).abs() >= 0.5, torch.sign(t), torch.zeros_like(t))
    return q.clamp(-128, 127).to(torch.int8), amax / 127.0


def _gemm(a: torch.Tensor, w: torch.Tensor, c: torch.Tensor, weights: torch.Tensor,
          aligned: tuple[torch.Tensor, torch.Tensor, torch.Tensor], *, routed: bool,
          top_k: int, scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """One launch of vLLM's kernel as ``invoke_fused_moe_kernel`` makes it: ``w`` is (G, N, K)
    (any strides), ``c`` (T, top_k, N); ``scales``: int8 W8A8 with per-channel weights, ``(a's
    per-row scales (rows,), w's (G, N))``, float32."""
    import triton
    import triton.language as tl

    sorted_ids, blocks, total = aligned
    em, (n, k) = sorted_ids.shape[0], w.shape[1:]
    grid = (triton.cdiv(em, CONFIG["BLOCK_SIZE_M"]) * triton.cdiv(n, CONFIG["BLOCK_SIZE_N"]),)
    a_scale, b_scale = scales if scales is not None else (None, None)
    scale_strides = ((a_scale.stride(0), 0, b_scale.stride(0), 0, b_scale.stride(1))
                     if a_scale is not None and b_scale is not None else (0,) * 5)
    kernel()[grid](
        a, w, c, a_scale, b_scale, weights, sorted_ids, blocks, total, n, k, em,
        c.shape[0] * c.shape[1], a.stride(0), a.stride(1), w.stride(0), w.stride(2),
        w.stride(1), c.stride(1), c.stride(2), *scale_strides, 0, 0,
        MUL_ROUTED_WEIGHT=routed, top_k=top_k,
        compute_type=tl.bfloat16 if c.dtype == torch.bfloat16 else tl.float16,
        use_fp8_w8a8=False, use_int8_w8a8=scales is not None, use_int8_w8a16=False,
        per_channel_quant=scales is not None, **CONFIG)


def workspaces(ranks: list[TorchRankInputs]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The two intermediate caches the driver takes as workspaces (vLLM's
    ``intermediate_cache1`` and ``3``): GEMM1's (T, top_k, 2I) and GEMM2's (T, top_k, K)."""
    x, top_k = ranks[0].x, ranks[0].expert_idx.shape[1]
    tokens, i = sum(len(r.x) for r in ranks), ranks[0].weight2[0].shape[-2]
    return {"c1": ((tokens, top_k, 2 * i), x.dtype), "c3": ((tokens, top_k, x.shape[1]), x.dtype)}


def moe(ranks: list[TorchRankInputs], workspace: dict[str, torch.Tensor] | None = None,
        ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every rank of one call through vLLM's kernel (see the module docstring); int8 weights
    take the W8A8 path (activations quantised per token). ``workspace``: the caches of
    :func:`workspaces`, else allocated here. No host synchronisation: CUDA graphs capture it."""
    call = Call.of(ranks)
    x, (tokens, top_k) = call.x, call.expert_idx.shape
    i, k = call.w2.shape[1], x.shape[1]
    aligned = align(call, CONFIG["BLOCK_SIZE_M"])
    given = workspace or {}
    c1 = given.get("c1", torch.empty((tokens, top_k, 2 * i), dtype=x.dtype, device=x.device))
    c3 = given.get("c3", torch.empty((tokens, top_k, k), dtype=x.dtype, device=x.device))
    int8 = call.w1.dtype == torch.int8
    a, scales1 = x, None
    if int8:
        assert call.scale1 is not None
        a, a_scale = quantise(x)
        scales1 = (a_scale, call.scale1)
    _gemm(a, call.w1.transpose(1, 2), c1, call.probs, aligned, routed=False, top_k=top_k,
          scales=scales1)
    h = c1.view(-1, 2 * i)
    act, scales2 = F.silu(h[:, :i]) * h[:, i:], None
    if int8:
        assert call.scale2 is not None
        act, a_scale = quantise(act)
        scales2 = (a_scale, call.scale2)
    _gemm(act, call.w2.transpose(1, 2), c3, call.probs, aligned, routed=True, top_k=1,
          scales=scales2)
    if 2 <= top_k <= 4:
        out = c3[:, 0]
        for j in range(1, top_k):
            out = out + c3[:, j]
    else:
        out = c3.sum(dim=1)
    return call.per_rank(out)


dispatch_ffn_combine = implementation(moe, device=DEVICE)
# The planted bugs of .common.PLANTED, each importable by name (the gate's child process).
routed_weight_twice, expert_offset, dropped_slot = (
    implementation(plant(moe, bug), device=DEVICE) for bug in PLANTED)
#: W8A8 (int8 weights, per-channel scales; profile vllm-triton-tq), scales passed as float32.
w8a8 = implementation(moe, device=DEVICE, scales="float32")
#: Replayed from a CUDA graph per bucket of 8/16/32 tokens a rank, the caches poisoned each call.
GRAPH_BUCKETS = (8, 16, 32)
graphed = implementation(moe, device=DEVICE, graph=True, pad_to=GRAPH_BUCKETS,
                         workspaces=workspaces, out_buffers=False)
padding_counted, batch_amax = (
    implementation(plant(moe, bug), device=DEVICE, graph=True, pad_to=GRAPH_BUCKETS,
                   workspaces=workspaces) for bug in PADDING_PLANTED)


if __name__ == "__main__":
    source = Path(sys.argv[1])
    KERNEL_SOURCE.parent.mkdir(parents=True, exist_ok=True)
    text = extract(source.read_text(), f"vLLM's {source.name}")
    partial = KERNEL_SOURCE.with_suffix(".tmp")
    partial.write_text(text)
    partial.replace(KERNEL_SOURCE)
    print(f"wrote {KERNEL_SOURCE}")
