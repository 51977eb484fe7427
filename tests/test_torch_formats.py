"""The torch adapter on the GPU formats (``docs/contract/formats.md``): e4m3 as
``torch.float8_e4m3fn``, e8m0 scales as uint8 or ``torch.float8_e8m0fnu``, packed fp4 as uint8,
each compared with the NumPy/ml_dtypes bit patterns; and block scales handed to the kernel in
its declared layout (``spec/scale_layout.py``) while the judge compares with the logical ones,
where a kernel reading a swizzled buffer as linear is found by the search.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="oracle.adapters.torch_io needs the optional extra 'torch'")

from gate_search import failure, shrunk  # noqa: E402
from hypothesis import HealthCheck, Phase, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_scale_layout import PACKED, linear_read, packed_linear, packed_reversed  # noqa: E402

import oracle  # noqa: E402
from oracle.adapters import torch_io as ot  # noqa: E402
from oracle.check.harness import ConformanceError, check_implementation  # noqa: E402
from oracle.model.kernels import DEEPGEMM_SM100_FP8, VLLM_TRITON_FP8, KernelProfile  # noqa: E402
from oracle.model.numerics import Numerics  # noqa: E402
from spec import OpConfig, Problem, random_problem  # noqa: E402
from spec.fp8 import BLOCK, blocks  # noqa: E402
from spec.mxfp4 import e8m0_values  # noqa: E402
from spec.scale_layout import (  # noqa: E402
    physical_scales,
    to_logical,
    unpack_ue8m0,
    with_ue8m0_scales,
)
from spec.strategies import configs, problems  # noqa: E402

Array = np.ndarray[Any, Any]
ALL_BYTES = np.arange(256, dtype=np.uint8)
FP8 = "float8_e4m3fn"
needs_e8m0 = pytest.mark.skipif(not hasattr(torch, "float8_e8m0fnu"),
                                reason="this torch has no float8_e8m0fnu (torch >= 2.7)")


def rank_of(weight_dtype: str) -> Any:
    cfg = OpConfig(ep_size=1, experts_per_rank=2, top_k=2, hidden=160, intermediate=96,
                   tokens_per_rank=(3,), weight_dtype=weight_dtype)
    return random_problem(cfg, seed=1).ranks[0]


def test_e4m3_crosses_bit_for_bit_every_pattern() -> None:
    """All 256 e4m3fn patterns (the NaNs included) keep their bits both ways, and torch reads
    the values ml_dtypes means."""
    e4m3 = ALL_BYTES.view(ml_dtypes.float8_e4m3fn)
    t = ot.to_tensor(e4m3)
    assert t.dtype == torch.float8_e4m3fn
    assert np.array_equal(t.view(torch.uint8).numpy(), ALL_BYTES)
    assert np.array_equal(t.float().numpy(), e4m3.astype(np.float32), equal_nan=True)
    back = ot.to_numpy(t)
    assert back.dtype == e4m3.dtype and np.array_equal(back.view(np.uint8), ALL_BYTES)


@needs_e8m0
def test_e8m0_bytes_mean_what_spec_mxfp4_says() -> None:
    """torch.float8_e8m0fnu of every byte is 2^(s-127) as ``spec.mxfp4.e8m0_values`` computes
    (255 NaN); read back, it is the uint8 byte again."""
    t = ot.to_tensor(ALL_BYTES, dtype="float8_e8m0fnu")
    assert t.dtype == torch.float8_e8m0fnu
    assert np.array_equal(t.float().numpy(), e8m0_values(ALL_BYTES), equal_nan=True)
    back = ot.to_numpy(t)
    assert back.dtype == np.uint8 and np.array_equal(back, ALL_BYTES)
    with pytest.raises(ValueError, match="does not hold its bytes"):
        ot.to_tensor(np.ones(2, np.float32), dtype="float8_e8m0fnu")


@pytest.mark.parametrize("weight_dtype", [FP8, "uint8"])
@pytest.mark.parametrize("e8m0", ["uint8", pytest.param("float8_e8m0fnu", marks=needs_e8m0)])
def test_a_rank_round_trips_through_torch(weight_dtype: str, e8m0: str) -> None:
    """FP8 block scale and MXFP4 ranks: the dtypes kernels take, and back bit for bit. Float32
    scales take the int64 encoding; e8m0 bytes never do (they used to be read as float32
    values and encoded: 127 became the bits of 127.0)."""
    rank = rank_of(weight_dtype)
    t = ot.to_torch(rank, e8m0=e8m0)
    mx = weight_dtype == "uint8"
    assert t.weight1[0].dtype == (torch.uint8 if mx else torch.float8_e4m3fn)
    assert t.scale1[0].dtype == (getattr(torch, e8m0) if mx else torch.int64)
    back = ot.from_torch(t)
    for name in ("w1", "w2", "scale1", "scale2"):
        a, b = getattr(rank, name)[0], getattr(back, name)[0]
        assert b.dtype == a.dtype and np.array_equal(b.view(np.uint8), a.view(np.uint8)), name


def test_packed_fp4_keeps_its_bytes_and_nibble_order() -> None:
    """Packed e2m1 crosses as the bytes, even element in the low nibble (spec.mxfp4); torch's
    float4_e2m1fn_x2 reads back as the same bytes."""
    rank = rank_of("uint8")
    t = ot.to_torch(rank).weight1[0]
    assert np.array_equal(t.numpy(), rank.w1[0])
    if hasattr(torch, "float4_e2m1fn_x2"):
        assert np.array_equal(ot.to_numpy(t.view(torch.float4_e2m1fn_x2)), rank.w1[0])


# ---------------------------------------------------------------------------------------------
# Scale layouts through the adapter

#: Hypothesis' explain phase (which parts of the minimum matter) cost 54 of 88 s here: off.
SMALL = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                 suppress_health_check=list(HealthCheck),
                 phases=[Phase.explicit, Phase.generate, Phase.shrink])
FP8_PROBLEMS = problems(configs=configs(
    weight_dtypes=st.just(FP8), hidden=st.sampled_from((64, 160, 320)),
    intermediate=st.sampled_from((32, 96)), experts_per_rank=st.sampled_from((1, 2))))


def memory_of(view: Any) -> Array:
    """The memory under an MN-major ``(…, MN, W)`` view whose MN stride is 1 (DeepGEMM's
    scale tensors): ``(…, W, MN padded)``, what the kernel's pointer reads."""
    *batch, _, words = view.shape
    pad = view.stride(-1)
    storage = torch.as_strided(view, (*batch, words, pad), (*view.stride()[:-2], pad, 1))
    return ot.to_numpy(storage)


def layout_kernel(layout: str, read: Callable[[Array, int, int], Array],
                  profile: KernelProfile = VLLM_TRITON_FP8,
                  ) -> Callable[[list[ot.TorchRankInputs]], list[Any]]:
    """A torch "kernel" for FP8 block scale that receives scales in ``layout`` and reads them
    with ``read(buffer, mn, kb)``, then computes what ``profile`` does. A
    packed-ue8m0 kernel reads the memory under its int32 view, one scale per output row, and
    uses each 128-row block's first row (its rows hold one scale)."""
    def fn(ranks: list[ot.TorchRankInputs]) -> list[Any]:
        def logical(bufs: list[Any], weights: list[Any]) -> list[Any]:
            out = []
            for buf, w in zip(bufs, weights):
                kb, mn = (blocks(d, BLOCK) for d in w.shape[-2:])
                if layout == PACKED:
                    s = read(memory_of(buf), w.shape[-1], kb)[..., ::BLOCK, :]
                else:
                    s = read(ot.to_numpy(buf), mn, kb)  # the memory, as the kernel reads it
                out.append(ot.to_tensor(np.swapaxes(s, -1, -2)))
            return out
        inputs = [ot.from_torch(dataclasses.replace(
            t, scale1=logical(t.scale1, t.weight1), scale2=logical(t.scale2, t.weight2)))
            for t in ranks]
        first = ranks[0]
        problem = Problem(inputs, max_output_size=first.max_output_size,
                          swiglu_limit=first.swiglu_limit, swiglu_alpha=first.swiglu_alpha)
        return [(r.out, r.expert_token_nums)
                for r in oracle.run(problem, numerics=Numerics(kernel=profile)).ranks]
    return fn


def _search(layout: str, read: Callable[[Array, int, int], Array],
            drawn: st.SearchStrategy[Problem] = FP8_PROBLEMS) -> Problem | None:
    impl = ot.implementation(layout_kernel(layout, read), scales="float32",
                             scale_layout=layout)
    return shrunk(impl, VLLM_TRITON_FP8, drawn, SMALL)


def test_strided_layouts_reach_the_kernel_as_deepgemm_strides() -> None:
    """column-major and tma-aligned: an ``(E, MN, KB)`` tensor whose memory is MN-major, the
    MN axis padded to 4 for TMA; the values are the logical scales transposed."""
    rank = rank_of(FP8)
    s = rank.scale1[0]  # (E, KB, MN) = (2, 2, 2)
    for layout, stride in (("column-major", (4, 1, 2)), ("tma-aligned", (8, 1, 4))):
        t = ot.to_torch(rank, scales="float32", scale_layout=layout).scale1[0]
        assert tuple(t.shape) == (2, 2, 2) and t.stride() == stride, layout
        assert np.array_equal(t.numpy(), np.swapaxes(s, -1, -2))


SWIZZLED = ("swizzle-128x4", lambda b, mn, kb: to_logical(b, "swizzle-128x4", mn, kb))


def _rejected(layout: str, read: Callable[[Array, int, int], Array], problem: Problem) -> bool:
    impl = ot.implementation(layout_kernel(layout, read), scales="float32",
                             scale_layout=layout)
    return not oracle.compare(problem, impl(problem), numerics=VLLM_TRITON_FP8.name).ok


def test_a_swizzled_scale_read_as_linear_is_rejected() -> None:
    """The search's minimum (below), judged directly: EP=1 E=1 top_k=1 K=64 I=96 M=[1], whose
    W1 scales are a (2, 1) matrix S[nb, kb] (N = 192): the linear read takes row 1's scale from
    row 0's padding, 0. Both outcomes, and the same read is right where row-major is declared
    (the bug is the disagreement: vllm PR #54773)."""
    witness = random_problem(OpConfig(ep_size=1, experts_per_rank=1, top_k=1, hidden=64,
                                      intermediate=96, tokens_per_rank=(1,), weight_dtype=FP8))
    assert not _rejected(*SWIZZLED, witness)
    assert _rejected("swizzle-128x4", linear_read, witness)
    assert not _rejected("row-major", linear_read, witness)


@pytest.mark.slow
def test_search_kills_a_swizzled_scale_read_as_linear() -> None:
    """Both outcomes of the search (17 s: slow; the twin above judges its minimum). The
    counterexample needs a scale matrix of two rows or more: N = 2I or K above 128."""
    assert _search(*SWIZZLED) is None
    found = _search("swizzle-128x4", linear_read)
    assert found is not None
    assert max(found.config.n, found.config.hidden) > BLOCK
    assert _search("row-major", linear_read) is None


# ---------------------------------------------------------------------------------------------
# DeepGEMM's packed UE8M0 layout (SM100) through the adapter

#: FP8 problems with UE8M0 scales, K up to 640 (five K blocks: two words per row).
UE8M0_PROBLEMS = problems(configs=configs(
    weight_dtypes=st.just(FP8), hidden=st.sampled_from((64, 160, 640)),
    intermediate=st.sampled_from((32, 96)), experts_per_rank=st.sampled_from((1, 2)))
).map(with_ue8m0_scales)
PACKED_READ = (PACKED, lambda b, mn, kb: to_logical(b, PACKED, mn, kb))


def test_packed_ue8m0_reaches_the_kernel_as_deepgemm_int32() -> None:
    """A packed-ue8m0 kernel gets DeepGEMM's SM100 tensor: int32, ``(E, N, ceil(KB/4))`` with
    strides ``(ceil(KB/4)·round_up(N, 4), 1, round_up(N, 4))``, one row per output channel
    (K = 642: W1 has six K blocks in two words, W2 642 rows padded to 644), never the int64
    encoding of float32 scales; the memory under it is the layout's storage. Scales that are
    not powers of two are refused, the field named."""
    rank = random_problem(OpConfig(ep_size=1, experts_per_rank=2, top_k=1, hidden=642,
                                   intermediate=96, tokens_per_rank=(1,), weight_dtype=FP8),
                          seed=1).ranks[0]
    with pytest.raises(ValueError, match=r"scale1\[0\]: the packed-ue8m0 layout holds UE8M0"):
        ot.to_torch(rank, scale_layout=PACKED)
    rank = with_ue8m0_scales(Problem([rank])).ranks[0]
    t = ot.to_torch(rank, scale_layout=PACKED)
    storage = physical_scales(rank, PACKED)
    for field, shape, stride, kb in (("scale1", (2, 192, 2), (384, 1, 192), 6),
                                     ("scale2", (2, 642, 1), (644, 1, 644), 1)):
        got = getattr(t, field)[0]
        assert got.dtype == torch.int32 and tuple(got.shape) == shape, field
        assert got.stride() == stride, field
        assert np.array_equal(memory_of(got), storage[field][0]), field
        rows = np.repeat(np.swapaxes(getattr(rank, field)[0], -1, -2), BLOCK, axis=-2)
        assert np.array_equal(unpack_ue8m0(got.numpy(), kb), rows[:, :shape[1]]), field


def _packed_witness(hidden: int) -> Problem:
    """EP=1 E=1 top_k=1 K=``hidden`` I=32 M=[1] with UE8M0 scales, W1's K block 4 (if any)
    scaled by two so that it differs from block 0."""
    p = with_ue8m0_scales(random_problem(OpConfig(
        ep_size=1, experts_per_rank=1, top_k=1, hidden=hidden, intermediate=32,
        tokens_per_rank=(1,), weight_dtype=FP8)))
    s1 = p.ranks[0].scale1[0].copy()
    s1[..., 4:5, :] *= 2
    return Problem([dataclasses.replace(p.ranks[0], scale1=[s1])])


def test_a_packed_scale_read_wrong_is_rejected() -> None:
    """The search's minima (below), judged directly: the byte-reversed read is wrong on the
    smallest call (K = 64, one K block: the reversed read takes padding, 2^-127); the K-major
    read needs two words per row (K = 640, five K blocks) and is right with one (K = 512).
    DeepGEMM's reader passes both, and the K-major read is right where row-major packing is
    what the loader wrote (the bug is the disagreement)."""
    small, wide, four = (_packed_witness(k) for k in (64, 640, 512))
    for problem in (small, wide):
        assert not _rejected(*PACKED_READ, problem)
    assert _rejected(PACKED, packed_reversed, small)
    assert _rejected(PACKED, packed_linear, wide)
    assert not _rejected(PACKED, packed_linear, four)


@pytest.mark.slow
def test_search_kills_a_packed_scale_read_wrong() -> None:
    """Both outcomes of the search on FP8 problems with UE8M0 scales: DeepGEMM's reader
    passes; the K-major read is found at K > 512 (two words per row), the byte-reversed read
    at any K."""
    assert _search(*PACKED_READ, UE8M0_PROBLEMS) is None
    found = _search(PACKED, packed_linear, UE8M0_PROBLEMS)
    assert found is not None and found.config.hidden > 4 * BLOCK
    assert _search(PACKED, packed_reversed, UE8M0_PROBLEMS) is not None


# ---------------------------------------------------------------------------------------------
# A packed-ue8m0 kernel gated on DeepGEMM's SM100 profile: no map on the user's side

DEEPGEMM = DEEPGEMM_SM100_FP8
FEW = settings(SMALL, max_examples=3)
UNSHRUNK = settings(FEW, phases=[Phase.generate])  # what fails, not its minimum


def _gate(read: Callable[[Array, int, int], Array], kernel: KernelProfile = DEEPGEMM,
          drawn: st.SearchStrategy[Problem] | None = None, search: settings = FEW) -> str | None:
    """The report of the gate on the packed-ue8m0 kernel reading with ``read``, or None."""
    impl = ot.implementation(layout_kernel(PACKED, read, DEEPGEMM), scale_layout=PACKED)
    found = failure(impl, kernel, drawn, search)
    return None if found is None else found.report


def test_the_deepgemm_profile_gates_a_packed_kernel_with_no_map() -> None:
    """``kernel=deepgemm-sm100-fp8`` alone: its domain draws UE8M0 scales (and K, I multiples
    of 128, bfloat16), so DeepGEMM's reader passes the default gate; the byte-reversed reader
    fails it at a value stage, not as a refused call."""
    assert _gate(PACKED_READ[1]) is None
    report = _gate(packed_reversed, search=UNSHRUNK)
    assert report is not None and "refused" not in report and "raised" not in report, report


def test_a_given_strategy_is_mapped_to_the_kernels_scales_too() -> None:
    """A user's strategy of float32 scales (K = 640: two words per row, where the K-major
    read shows) is mapped into the kernel's domain by the gate: the K-major reader is found,
    DeepGEMM's passes."""
    wide = problems(configs=configs(
        weight_dtypes=st.just(FP8), x_dtypes=st.just("bfloat16"), hidden=st.just(640),
        intermediate=st.just(128), experts_per_rank=st.just(1), ep_sizes=st.just(1),
        truncation=st.just(False), swiglu_limits=st.none()))
    assert _gate(PACKED_READ[1], drawn=wide) is None
    report = _gate(packed_linear, drawn=wide, search=UNSHRUNK)
    assert report is not None and "refused" not in report, report


def test_the_adapters_refusal_is_reported_as_the_gates_not_the_implementations() -> None:
    """On a profile whose domain draws float32 scales, the packed layout cannot hold them: the
    report says the gate's inputs were refused before the implementation was called, and
    names the profile to gate with; an implementation that raises ValueError itself is still
    reported as raising."""
    report = _gate(PACKED_READ[1], kernel=VLLM_TRITON_FP8, drawn=FP8_PROBLEMS,
                   search=UNSHRUNK)
    assert report is not None
    assert "the gate's inputs were refused (the implementation was not called)" in report
    assert "deepgemm-sm100-fp8" in report and "implementation raised" not in report, report

    def raises(ranks: list[ot.TorchRankInputs]) -> list[Any]:
        raise ValueError("the kernel's own error")
    impl = ot.implementation(raises, scale_layout=PACKED)
    with pytest.raises(ConformanceError, match="the implementation raised: ValueError: the "
                       "kernel's own error"):
        check_implementation(impl, kernel=DEEPGEMM, settings=UNSHRUNK, save_dir=None,
                             isolate=False)
