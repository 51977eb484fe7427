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

from .common import PLANTED, Call, plant

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
    """``moe_align_block_size``'s three tensors: the slot ids grouped by expert, each group
    padded to a multiple of ``block`` with the invalid id T·top_k; the expert of each block;
    the padded total (one int32)."""
    flat, experts = call.expert_idx.reshape(-1), call.num_experts
    slots = torch.where(call.active_slots(), flat, experts)
    order = torch.argsort(slots, stable=True)
    counts = torch.bincount(slots, minlength=experts + 1)[:experts]
    order = order[:int(counts.sum())]
    padded = -(-counts // block) * block
    start = torch.cumsum(padded, 0) - padded
    first = torch.cumsum(counts, 0) - counts
    expert = flat[order]
    position = start[expert] + torch.arange(len(order), device=flat.device) - first[expert]
    total = int(padded.sum())
    sorted_ids = torch.full((total,), flat.numel(), dtype=torch.int32, device=flat.device)
    sorted_ids[position] = order.to(torch.int32)
    blocks = torch.repeat_interleave(torch.arange(experts, dtype=torch.int32,
                                                  device=flat.device), padded // block)
    return sorted_ids, blocks, torch.tensor([total], dtype=torch.int32, device=flat.device)


def _gemm(a: torch.Tensor, w: torch.Tensor, c: torch.Tensor, weights: torch.Tensor,
          aligned: tuple[torch.Tensor, torch.Tensor, torch.Tensor], *, routed: bool,
          top_k: int) -> None:
    """One launch of vLLM's kernel as ``invoke_fused_moe_kernel`` makes it for float weights:
    ``w`` is (G, N, K) (any strides), ``c`` (T, top_k, N)."""
    import triton
    import triton.language as tl

    sorted_ids, blocks, total = aligned
    em, (n, k) = sorted_ids.shape[0], w.shape[1:]
    grid = (triton.cdiv(em, CONFIG["BLOCK_SIZE_M"]) * triton.cdiv(n, CONFIG["BLOCK_SIZE_N"]),)
    kernel()[grid](
        a, w, c, None, None, weights, sorted_ids, blocks, total, n, k, em,
        c.shape[0] * c.shape[1], a.stride(0), a.stride(1), w.stride(0), w.stride(2),
        w.stride(1), c.stride(1), c.stride(2), 0, 0, 0, 0, 0, 0, 0,
        MUL_ROUTED_WEIGHT=routed, top_k=top_k,
        compute_type=tl.bfloat16 if a.dtype == torch.bfloat16 else tl.float16,
        use_fp8_w8a8=False, use_int8_w8a8=False, use_int8_w8a16=False,
        per_channel_quant=False, **CONFIG)


def moe(ranks: list[TorchRankInputs]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every rank of one call through vLLM's kernel (see the module docstring)."""
    call = Call.of(ranks)
    x, (tokens, top_k) = call.x, call.expert_idx.shape
    i, k = call.w2.shape[1], x.shape[1]
    aligned = align(call, CONFIG["BLOCK_SIZE_M"])
    c1 = torch.empty((tokens, top_k, 2 * i), dtype=x.dtype, device=x.device)
    c3 = torch.empty((tokens, top_k, k), dtype=x.dtype, device=x.device)
    if int(aligned[2]):
        _gemm(x, call.w1.transpose(1, 2), c1, call.probs, aligned, routed=False, top_k=top_k)
        h = c1.view(-1, 2 * i)
        act = F.silu(h[:, :i]) * h[:, i:]
        _gemm(act, call.w2.transpose(1, 2), c3, call.probs, aligned, routed=True, top_k=1)
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


if __name__ == "__main__":
    source = Path(sys.argv[1])
    KERNEL_SOURCE.parent.mkdir(parents=True, exist_ok=True)
    text = extract(source.read_text(), f"vLLM's {source.name}")
    partial = KERNEL_SOURCE.with_suffix(".tmp")
    partial.write_text(text)
    partial.replace(KERNEL_SOURCE)
    print(f"wrote {KERNEL_SOURCE}")
