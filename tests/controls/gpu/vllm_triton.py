"""vLLM's Triton ``fused_moe_kernel`` (BF16/FP16, int8 W8A8 and FP8 block-scale weights) with a
driver of ours, gated in the ``vllm-triton``, ``vllm-triton-tq`` and ``vllm-triton-fp8`` profiles.

The kernel's source is vLLM's (Apache-2.0) and is **not** part of this repository: it is
carried, git-ignored, as ``.carry/vllm/fused_moe_kernel.py`` (or the file ``DFC_VLLM_KERNEL``
names), holding ``write_zeros_to_output`` and ``fused_moe_kernel`` unchanged, cut out of
``vllm/model_executor/layers/fused_moe/fused_moe.py`` by :func:`extract`. FP8 block scale
also takes ``.carry/vllm/fp8_quant_kernel.py`` (or ``DFC_VLLM_FP8_QUANT``), vLLM's Triton
activation quantiser ``_per_token_group_quant_fp8`` cut out of
``vllm/model_executor/layers/quantization/utils/fp8_utils.py`` (without it,
:func:`group_quantise` computes the same in torch). Run this module with each file's path,
from ``tests/``: ``python -m controls.gpu.vllm_triton PATH`` (:data:`CARRIED` says which file
becomes which). The rest of vLLM's ``fused_experts`` is CUDA C++ (``moe_align_block_size``,
``silu_and_mul``, ``moe_sum``); the driver below does what those do, in torch, as
``docs/contract/kernels.md`` describes them:

- slots grouped by expert, each expert's run padded to ``BLOCK_SIZE_M`` with the invalid slot id
  T·top_k (masked tokens' slots route nowhere, §4);
- GEMM1 without the routed weight into ``(T, top_k, 2I)``; ``silu(gate) * up`` on x-dtype
  tensors (silu rounded to x's dtype, then the product, as ``silu_and_mul``);
- GEMM2 with the routed weight in its epilogue (``MUL_ROUTED_WEIGHT``, top_k 1);
- int8 W8A8 weights (per-channel scales): both GEMM inputs quantised per row as fused_moe's
  Triton ``per_token_quant_int8`` does (:func:`quantise`), the kernel's ``per_channel_quant``
  path;
- FP8 block-scale weights (e4m3, one float32 scale per 128 × 128 block): ``fused_experts``'
  ``use_fp8_w8a8`` branch with ``block_shape=[128, 128]`` (``docs/contract/formats.md``, FP8
  block scale): both GEMM inputs quantised per token and 128-column group as vLLM's
  ``per_token_group_quant_fp8`` does (:func:`group_quantise`), the kernel's block path with
  vLLM's default block-scale configuration (:data:`FP8_CONFIG`: one ``tl.dot`` per 128-wide K
  tile, scaled by its activation and weight block scales into the float32 accumulator);
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
_CARRY = Path(__file__).resolve().parents[3] / ".carry/vllm"
#: Where the carried kernel source is looked for (``DFC_VLLM_KERNEL`` overrides it).
KERNEL_SOURCE = Path(os.environ.get("DFC_VLLM_KERNEL", _CARRY / "fused_moe_kernel.py"))
#: Where the carried FP8 activation quantiser is looked for (``DFC_VLLM_FP8_QUANT``).
QUANT_SOURCE = Path(os.environ.get("DFC_VLLM_FP8_QUANT", _CARRY / "fp8_quant_kernel.py"))
#: The Triton functions :func:`extract` keeps from ``fused_moe.py``.
KERNEL_FUNCTIONS = ("write_zeros_to_output", "fused_moe_kernel")
#: The one it keeps from ``fp8_utils.py``.
QUANT_FUNCTIONS = ("_per_token_group_quant_fp8",)
#: vLLM's file name -> (the carried file, the functions kept).
CARRIED = {"fused_moe.py": (KERNEL_SOURCE, KERNEL_FUNCTIONS),
           "fp8_utils.py": (QUANT_SOURCE, QUANT_FUNCTIONS)}
#: vLLM's default configuration for small batches (``get_default_config``).
CONFIG = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 1}
#: The weights' block and the activations' group (``block_shape=[128, 128]``, DeepSeek-V3's
#: ``weight_block_size``; formats.md, FP8 block scale).
FP8_BLOCK = 128
#: ``get_default_config`` for ``fp8_w8a8`` with ``block_shape``: ``BLOCK_SIZE_N`` and
#: ``BLOCK_SIZE_K`` the block's (``invoke_fused_moe_kernel`` keeps ``BLOCK_SIZE_K <= 128``).
FP8_CONFIG = {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": FP8_BLOCK, "BLOCK_SIZE_K": FP8_BLOCK,
              "GROUP_SIZE_M": 32, "num_warps": 4, "num_stages": 3}
FP8 = torch.float8_e4m3fn
#: ``torch.finfo(torch.float8_e4m3fn).max``, vLLM's ``fp8_max`` on CUDA.
FP8_MAX = 448.0


def extract(source: str, provenance: str, functions: tuple[str, ...] = KERNEL_FUNCTIONS) -> str:
    """The module text holding only ``functions`` of a vLLM file (``source``; by default
    :data:`KERNEL_FUNCTIONS` of ``fused_moe.py``), decorators included, after the imports they
    need; ValueError names a function the source lacks."""
    lines = source.splitlines()
    found = {node.name: "\n".join(lines[node.decorator_list[0].lineno - 1 if
                                         node.decorator_list else node.lineno - 1:
                                         node.end_lineno])
             for node in ast.parse(source).body
             if isinstance(node, ast.FunctionDef) and node.name in functions}
    missing = [name for name in functions if name not in found]
    if missing:
        files = " or ".join(f"vLLM's {name} (for {', '.join(kept)})"
                            for name, (_, kept) in CARRIED.items())
        raise ValueError(f"{provenance}: no top-level function {', '.join(missing)}; pass "
                         f"{files}")
    header = ("# SPDX-License-Identifier: Apache-2.0\n"
              f"# {', '.join(functions)}, unchanged, from {provenance}.\n"
              "import triton\nimport triton.language as tl\n")
    return header + "".join(f"\n\n{found[name]}\n" for name in functions)


def _load(path: Path, name: str, variable: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"dfc_vllm_{path.stem}", path)
    if spec is None or spec.loader is None or not path.is_file():
        raise FileNotFoundError(f"vLLM's {name} source is not at {path}: carry it there (see "
                                f"this module's docstring) or set {variable}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


@functools.cache
def kernel() -> Any:
    """vLLM's ``fused_moe_kernel`` (a Triton JIT function) from :data:`KERNEL_SOURCE`."""
    return _load(KERNEL_SOURCE, "fused_moe_kernel", "DFC_VLLM_KERNEL")


@functools.cache
def quant_kernel() -> Any:
    """vLLM's ``_per_token_group_quant_fp8`` (Triton) from :data:`QUANT_SOURCE`; ``None`` where
    it is not carried (:func:`group_quantise` then quantises in torch)."""
    if not QUANT_SOURCE.is_file():
        return None
    return _load(QUANT_SOURCE, QUANT_FUNCTIONS[0], "DFC_VLLM_FP8_QUANT")


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


def group_quantise(a: torch.Tensor, triton: bool | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 per token and 128-column group as vLLM's ``per_token_group_quant_fp8`` (``eps``
    1e-10, row-major scales, no UE8M0; profile ``vllm-triton-fp8``): ``amax = max(max|a|,
    1e-10)`` per group, ``σ = amax/448``, ``q = e4m3(clamp(a/σ, ±448))``; ``(q (rows, K')
    e4m3, σ (rows, K'/128) float32)``. vLLM's quantiser takes whole groups only, so ``a`` is
    zero-padded to ``K'``, a multiple of 128 (the kernel reads no column past K) [inferred:
    vLLM's loader rejects shards that are not multiples of 128]. On CUDA the carried Triton
    kernel (:func:`quant_kernel`) runs (``triton``: whether to run it wherever ``a`` is;
    ``None``: on CUDA), launched as vLLM's Triton fallback launches it
    (``fp8_utils.py`` @364d0192 [code]: one program per group, ``BLOCK`` 128, one warp, one
    stage); else torch ops compute the same formula. vLLM itself prefers its C++ op
    ``per_token_group_fp8_quant`` on CUDA, which needs vLLM's build and was not read: the
    control runs the Triton fallback [inferred: the same formula]."""
    rows, cols = a.shape
    groups = -(-cols // FP8_BLOCK)
    padded = torch.zeros((rows, groups * FP8_BLOCK), dtype=a.dtype, device=a.device)
    padded[:, :cols] = a
    triton_quant = quant_kernel() if (a.is_cuda if triton is None else triton) else None
    if triton_quant is None:
        g = padded.float().view(rows, groups, FP8_BLOCK)  # named: no -1 at 0 rows
        sigma = g.abs().amax(dim=2).clamp_min(1e-10) / FP8_MAX
        q = (g / sigma[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        return q.view(rows, groups * FP8_BLOCK), sigma
    q = torch.empty(padded.shape, dtype=FP8, device=a.device)
    sigma = torch.empty((rows, groups), dtype=torch.float32, device=a.device)
    # vLLM's launch: one program per group, BLOCK the group, one warp, one stage; use_ue8m0
    # only where the carried version takes it (vLLM added it in 2025)
    ue8m0 = {"use_ue8m0": False} if "use_ue8m0" in triton_quant.arg_names else {}
    if rows:
        triton_quant[(rows * groups,)](
            padded, q, sigma, FP8_BLOCK, padded.shape[1], padded.stride(0), 1e-10,
            fp8_min=-FP8_MAX, fp8_max=FP8_MAX, **ue8m0, BLOCK=FP8_BLOCK, num_warps=1,
            num_stages=1)
    return q, sigma


def _gemm(a: torch.Tensor, w: torch.Tensor, c: torch.Tensor, weights: torch.Tensor,
          aligned: tuple[torch.Tensor, torch.Tensor, torch.Tensor], *, routed: bool,
          top_k: int, scales: tuple[torch.Tensor, torch.Tensor] | None = None,
          config: dict[str, int] = CONFIG) -> None:
    """One launch of vLLM's kernel as ``invoke_fused_moe_kernel`` makes it: ``w`` is (G, N, K)
    (any strides), ``c`` (T, top_k, N); ``scales`` (float32): int8 W8A8 with per-channel
    weights, ``(a's per-row scales (rows,), w's (G, N))``; FP8 block scale (``a`` e4m3, its
    rows possibly wider than K), ``(a's per group (rows, K/128), w's per block (G, K/128,
    N/128))``, the kernel's ``block_shape=[128, 128]`` path."""
    import triton
    import triton.language as tl

    sorted_ids, blocks, total = aligned
    em, (n, k) = sorted_ids.shape[0], w.shape[1:]
    grid = (triton.cdiv(em, config["BLOCK_SIZE_M"]) * triton.cdiv(n, config["BLOCK_SIZE_N"]),)
    a_scale, b_scale = scales if scales is not None else (None, None)
    fp8 = a.dtype == FP8
    if a_scale is None or b_scale is None:
        scale_strides, group = (0,) * 5, 0
    elif fp8:  # vLLM's B_scale is (E, N/128, K/128); ours (G, K/128, N/128): the strides say
        scale_strides = (a_scale.stride(0), a_scale.stride(1), b_scale.stride(0),
                         b_scale.stride(1), b_scale.stride(2))
        group = FP8_BLOCK
    else:
        scale_strides, group = (a_scale.stride(0), 0, b_scale.stride(0), 0, b_scale.stride(1)), 0
    kernel()[grid](
        a, w, c, a_scale, b_scale, weights, sorted_ids, blocks, total, n, k, em,
        c.shape[0] * c.shape[1], a.stride(0), a.stride(1), w.stride(0), w.stride(2),
        w.stride(1), c.stride(1), c.stride(2), *scale_strides, group, group,
        MUL_ROUTED_WEIGHT=routed, top_k=top_k,
        compute_type=tl.bfloat16 if c.dtype == torch.bfloat16 else tl.float16,
        use_fp8_w8a8=fp8, use_int8_w8a8=scales is not None and not fp8, use_int8_w8a16=False,
        per_channel_quant=scales is not None and not fp8, **config)


def workspaces(ranks: list[TorchRankInputs]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The two intermediate caches the driver takes as workspaces (vLLM's
    ``intermediate_cache1`` and ``3``): GEMM1's (T, top_k, 2I) and GEMM2's (T, top_k, K)."""
    x, top_k = ranks[0].x, ranks[0].expert_idx.shape[1]
    tokens, i = sum(len(r.x) for r in ranks), ranks[0].weight2[0].shape[-2]
    return {"c1": ((tokens, top_k, 2 * i), x.dtype), "c3": ((tokens, top_k, x.shape[1]), x.dtype)}


def moe(ranks: list[TorchRankInputs], workspace: dict[str, torch.Tensor] | None = None,
        ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every rank of one call through vLLM's kernel (see the module docstring); int8 weights
    take the W8A8 path (activations quantised per token), e4m3 weights the FP8 block-scale
    path (per token and 128 columns). ``workspace``: the caches of :func:`workspaces`, else
    allocated here. No host synchronisation: CUDA graphs capture it."""
    call = Call.of(ranks)
    x, (tokens, top_k) = call.x, call.expert_idx.shape
    i, k = call.w2.shape[1], x.shape[1]
    fp8 = call.w1.dtype == FP8
    quantiser = quantise if call.w1.dtype == torch.int8 else group_quantise if fp8 else None
    config = FP8_CONFIG if fp8 else CONFIG
    aligned = align(call, config["BLOCK_SIZE_M"])
    given = workspace or {}
    c1 = given.get("c1", torch.empty((tokens, top_k, 2 * i), dtype=x.dtype, device=x.device))
    c3 = given.get("c3", torch.empty((tokens, top_k, k), dtype=x.dtype, device=x.device))

    def gemm(a: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor | None, c: torch.Tensor,
             routed: bool) -> None:
        scales = None
        if quantiser is not None:  # the GEMM's input quantised, with the weights' scales
            assert w_scale is not None
            a, a_scale = quantiser(a)
            scales = (a_scale, w_scale)
        b = w.transpose(1, 2)
        if fp8 and scales is not None:  # laid out as vLLM stores FP8 weights and their block
            # scales: (E, N, K) and (E, N/128, K/128), K contiguous (the strides say so)
            b = b.contiguous()
            scales = (scales[0], scales[1].transpose(1, 2).contiguous().transpose(1, 2))
        _gemm(a, b, c, call.probs, aligned, routed=routed, top_k=1 if routed else top_k,
              scales=scales, config=config)

    gemm(x, call.w1, call.scale1, c1, routed=False)
    h = c1.view(-1, 2 * i)
    gemm(F.silu(h[:, :i]) * h[:, i:], call.w2, call.scale2, c3, routed=True)
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
#: FP8 block scale (e4m3 weights, 128 x 128 block scales; profile vllm-triton-fp8), float32
#: scales as vLLM passes them, and the planted bugs of .common.PLANTED on it, as ``fp8_<bug>``.
fp8_block = implementation(moe, device=DEVICE, scales="float32")
fp8_routed_weight_twice, fp8_expert_offset, fp8_dropped_slot = (
    implementation(plant(moe, bug), device=DEVICE, scales="float32") for bug in PLANTED)
#: Replayed from a CUDA graph per bucket of 8/16/32 tokens a rank, the caches poisoned each call.
GRAPH_BUCKETS = (8, 16, 32)
graphed = implementation(moe, device=DEVICE, graph=True, pad_to=GRAPH_BUCKETS,
                         workspaces=workspaces, out_buffers=False)
padding_counted, batch_amax = (
    implementation(plant(moe, bug), device=DEVICE, graph=True, pad_to=GRAPH_BUCKETS,
                   workspaces=workspaces) for bug in PADDING_PLANTED)


if __name__ == "__main__":
    source = Path(sys.argv[1])
    if source.name not in CARRIED:
        sys.exit(f"{source}: pass one of vLLM's {', '.join(CARRIED)} (see the docstring)")
    target, functions = CARRIED[source.name]
    target.parent.mkdir(parents=True, exist_ok=True)
    text = extract(source.read_text(), f"vLLM's {source.name}", functions)
    partial = target.with_suffix(".tmp")
    partial.write_text(text)
    partial.replace(target)
    print(f"wrote {target}")
