"""A third family of real GPU kernels as a control (issue 26): the experts' GEMMs done by JAX's
grouped GEMM, ``jax.lax.ragged_dot`` (XLA's, on whatever its GPU backend lowers it to), gated
in the ``torch-grouped-mm`` profile, whose rounding points it keeps: each GEMM accumulated in
float32 (``preferred_element_type``) and rounded once to x's dtype, silu rounded to x's dtype
and the product rounded again, then the routed weight and the top-k sum of
:meth:`.common.Call.combine`.

The slots are grouped by expert in torch (:meth:`.common.Call.by_expert`) and cross to JAX and
back through DLPack, on the device both share, after a synchronisation on each side. JAX is
told not to take most of the GPU's memory at start (``XLA_PYTHON_CLIENT_PREALLOCATE``), which
would leave none for torch in the same process. XLA may drop a rounding to x's dtype between
fused float32 operations (``--xla_allow_excess_precision``, on by default): the driver turns
that off, so each rounding above is made as written; the profile's envelope would reject a
silu left in float32 where its x-dtype rounding moves the output.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
if "xla_allow_excess_precision" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_allow_excess_precision=false").strip()

import jax
import jax.numpy as jnp
import torch

from oracle.adapters.torch_io import TorchRankInputs, implementation

from .common import PLANTED, Call, plant

DEVICE = "cuda"
_JAX_DTYPES = {torch.bfloat16: jnp.bfloat16, torch.float16: jnp.float16}


def _to_jax(t: torch.Tensor) -> jax.Array:
    if t.is_cuda:
        torch.cuda.synchronize(t.device)
    return jax.dlpack.from_dlpack(t.contiguous())


def _to_torch(a: jax.Array) -> torch.Tensor:
    return torch.from_dlpack(a.block_until_ready())


@jax.jit
def _experts(xs: jax.Array, w1: jax.Array, w2: jax.Array, sizes: jax.Array) -> jax.Array:
    """Both grouped GEMMs and SwiGLU: ``xs`` (slots, K) grouped by expert, ``sizes`` (G,)
    the groups' lengths, ``w1`` (G, K, 2I), ``w2`` (G, I, K); y (slots, K) in x's dtype."""
    dtype = xs.dtype
    i = w2.shape[1]
    h = jax.lax.ragged_dot(xs, w1, sizes, preferred_element_type=jnp.float32).astype(dtype)
    gate, up = h[:, :i].astype(jnp.float32), h[:, i:].astype(jnp.float32)
    silu = (gate * jax.nn.sigmoid(gate)).astype(dtype)
    a = (silu.astype(jnp.float32) * up).astype(dtype)
    return jax.lax.ragged_dot(a, w2, sizes, preferred_element_type=jnp.float32).astype(dtype)


def moe(ranks: list[TorchRankInputs]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every rank of one call through :func:`_experts` (see the module docstring)."""
    call = Call.of(ranks)
    if call.x.dtype not in _JAX_DTYPES:
        raise TypeError(f"the JAX control takes bf16 or fp16 x, got {call.x.dtype}")
    order, token, offs = call.by_expert()  # masked tokens' slots left out
    if not len(order):  # no slot routed: nothing for the GEMMs (a 0-row DLPack fails)
        return call.combine(call.x.new_zeros((0, call.x.shape[1])), order, token)
    sizes = torch.diff(offs, prepend=offs.new_zeros(1))
    y = _to_torch(_experts(_to_jax(call.x[token]), _to_jax(call.w1), _to_jax(call.w2),
                           _to_jax(sizes)))
    return call.combine(y.to(call.x.device), order, token)


dispatch_ffn_combine = implementation(moe, device=DEVICE)
# The planted bugs of .common.PLANTED, each importable by name (the gate's child process).
routed_weight_twice, expert_offset, dropped_slot = (
    implementation(plant(moe, bug), device=DEVICE) for bug in PLANTED)
