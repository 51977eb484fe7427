"""The torch grouped-GEMM control, its module touching CUDA when imported (as a module that
builds weights or compiles kernels at import does). The gate's child process then serves the
calls itself instead of forking a worker (``oracle.check.isolation``): ``benchmarks/gpu_gate.py``
measures both ways."""

from __future__ import annotations

import torch

from .grouped_mm import DEVICE, dispatch_ffn_combine

__all__ = ["dispatch_ffn_combine"]

torch.zeros(1, device=DEVICE)  # CUDA initialised at import
