"""An implementation that reports the thread pools it was given, by raising: the gate's report
carries the message back from the child process."""

from __future__ import annotations

import os
from typing import Any

from oracle.check.isolation import THREAD_VARIABLES

try:  # a torch kernel imports torch at module level
    import torch
except ImportError:  # pragma: no cover - the extra is optional
    torch = None


def dispatch_ffn_combine(problem: Any) -> Any:
    pools = [f"{name}={os.environ.get(name)}" for name in THREAD_VARIABLES]
    pools.append(f"torch={torch.get_num_threads() if torch is not None else None}")
    raise RuntimeError("pools: " + " ".join(pools))
