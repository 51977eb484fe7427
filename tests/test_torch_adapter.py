"""oracle.adapters.torch_io: tensors <-> spec arrays bit for bit, the int64 scale encoding, the
wrapper."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="oracle.adapters.torch_io needs the optional extra 'torch'")

import oracle  # noqa: E402
from oracle.adapters import torch_io as ot  # noqa: E402
from spec import DTypeError, OpConfig, random_problem  # noqa: E402

CFG = OpConfig(ep_size=2, experts_per_rank=3, top_k=2, hidden=32, intermediate=16,
               tokens_per_rank=(3, 2), weight_form="list", masked=True)


def _all_bf16() -> np.ndarray:
    """Every bfloat16 bit pattern, NaNs and infinities included."""
    return np.arange(1 << 16, dtype=np.uint16).view(ml_dtypes.bfloat16)


def test_bfloat16_crosses_bit_for_bit_both_ways() -> None:
    bits = _all_bf16()
    tensor = ot.to_tensor(bits)
    assert tensor.dtype == torch.bfloat16
    assert np.array_equal(tensor.view(torch.int16).numpy().view(np.uint16), bits.view(np.uint16))
    assert np.array_equal(ot.to_numpy(tensor).view(np.uint16), bits.view(np.uint16))


def test_naive_bfloat16_conversion_would_not_be_bit_exact() -> None:
    # The detour through float32 that a naive adapter takes loses NaN payloads: the bit-level
    # view is what makes the round trip exact (this test fails if it is replaced by a cast).
    bits = _all_bf16()
    naive = torch.from_numpy(bits.astype(np.float32)).to(torch.bfloat16)
    assert not np.array_equal(naive.view(torch.int16).numpy().view(np.uint16),
                              bits.view(np.uint16))


def test_int64_scales_are_sign_extended_float32_bits() -> None:
    scales = np.array([1.0, -2.0, 3.5e-5, -0.0, np.finfo(np.float32).tiny], np.float32)
    encoded = ot.scales_to_int64(scales)
    # vLLM's torch idiom gives the same int64 values.
    assert np.array_equal(encoded, torch.from_numpy(scales).view(torch.int32).to(torch.int64))
    assert encoded[1] < 0  # sign-extended, not zero-extended
    back = ot.scales_from_int64(encoded)
    assert np.array_equal(back.view(np.uint32), scales.view(np.uint32))


def test_zero_extended_scales_are_rejected_with_the_fix() -> None:
    zero_extended = torch.tensor([-2.0]).view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    with pytest.raises(DTypeError, match=r"scale1\[0\]\[0\].*view\(torch.int32\)"):
        ot.scales_from_int64(zero_extended.numpy(), field="scale1[0]")


@pytest.mark.parametrize("scales", ot.SCALE_ENCODINGS)
def test_rank_inputs_round_trip_through_torch(scales: str) -> None:
    problem = random_problem(CFG, seed=3)
    for r, inputs in enumerate(problem.ranks):
        t = ot.to_torch(inputs, max_output_size=7, scales=scales)
        assert t.max_output_size == 7
        assert t.scale1 is not None
        assert t.scale1[0].dtype == (torch.int64 if scales == "int64" else torch.float32)
        back = ot.from_torch(t, rank=r)
        for name in ("x", "expert_idx", "probs", "active_mask"):
            a, b = getattr(inputs, name), getattr(back, name)
            assert a.dtype == b.dtype and np.array_equal(a.view(np.uint8), b.view(np.uint8))
        for name in ("w1", "w2", "scale1", "scale2"):
            for a, b in zip(getattr(inputs, name), getattr(back, name)):
                assert a.dtype == b.dtype and np.array_equal(a, b)


def test_to_torch_copies_so_an_implementation_cannot_write_into_the_problem() -> None:
    problem = random_problem(CFG, seed=3)
    t = ot.to_torch(problem.ranks[0])
    t.expert_idx.fill_(CFG.num_experts)  # what the kernel does to masked tokens' ids
    assert (problem.ranks[0].expert_idx < CFG.num_experts).all()


def _reference_in_torch(ranks: list[ot.TorchRankInputs]) -> list[tuple[object, object]]:
    """A torch 'implementation' that returns the reference model's answer, via from_torch."""
    from spec import Problem
    from spec.config import CALL_ATTRIBUTES

    problem = Problem([ot.from_torch(r) for r in ranks],
                      **{name: getattr(ranks[0], name) for name in CALL_ATTRIBUTES})
    return [(ot.to_tensor(r.out), torch.from_numpy(r.expert_token_nums))
            for r in oracle.run(problem).ranks]


def _off_by_one_count(ranks: list[ot.TorchRankInputs]) -> list[tuple[object, object]]:
    return [(out, nums + 1) for out, nums in _reference_in_torch(ranks)]


def test_wrapped_torch_function_conforms_and_a_wrong_one_does_not() -> None:
    from hypothesis import settings
    from hypothesis import strategies as st

    from spec.strategies import configs, problems

    small = problems(configs=configs(ep_sizes=st.integers(1, 2), tokens_per_rank=st.integers(0, 3)))
    quick = settings(max_examples=10)
    oracle.check_implementation(ot.implementation(_reference_in_torch), problems=small,
                                settings=quick, save_dir=None)
    with pytest.raises(oracle.ConformanceError) as caught:
        oracle.check_implementation(ot.implementation(_off_by_one_count), problems=small,
                                    settings=quick, save_dir=None)
    assert caught.value.verdict.stage == "expert_token_nums"
    assert caught.value.problem.config.ep_size == 1


# Output buffers (out_buffers=True): rows never written stay NaN and are caught (PR #9992).

BUFFERED = OpConfig(ep_size=2, experts_per_rank=2, top_k=2, hidden=32, intermediate=16,
                    tokens_per_rank=(5, 3), masked=True, max_output_size=5)


def _writes_defined_rows(skip: int | None = None):
    """A kernel that writes the reference's defined rows (except rank 0's token ``skip``) and
    counts into the given buffers, and leaves the undefined rows alone."""
    def fn(ranks: list[ot.TorchRankInputs]) -> None:
        from spec import Problem
        from spec.config import CALL_ATTRIBUTES

        problem = Problem([ot.from_torch(r) for r in ranks],
                          **{name: getattr(ranks[0], name) for name in CALL_ATTRIBUTES})
        for s, (r, want) in enumerate(zip(ranks, oracle.run(problem).ranks)):
            assert r.out is not None and r.expert_token_nums is not None
            rows = np.flatnonzero(want.defined)
            rows = rows[rows != skip] if s == 0 else rows
            r.out[torch.from_numpy(rows)] = ot.to_tensor(want.out[rows])
            r.expert_token_nums.copy_(torch.from_numpy(want.expert_token_nums))

    return fn


def _buffered_problem():
    problem = random_problem(BUFFERED, seed=11)
    defined = [r.defined for r in oracle.run(problem).ranks]
    assert defined[0].any() and not all(d.all() for d in defined)  # both kinds of rows
    return problem, defined


def test_given_buffers_are_poisoned_and_undefined_rows_stay_unjudged() -> None:
    problem, defined = _buffered_problem()
    outputs = ot.implementation(_writes_defined_rows(), out_buffers=True)(problem)
    for (out, _), d in zip(outputs, defined):
        assert np.isnan(out[~d].astype(np.float32)).all()  # never written, and not judged
    assert oracle.compare(problem, outputs).ok


def test_a_defined_row_never_written_is_caught_and_named() -> None:
    from hypothesis import strategies as st

    problem, defined = _buffered_problem()
    token = int(np.flatnonzero(defined[0])[-1])
    skipping = ot.implementation(_writes_defined_rows(skip=token), out_buffers=True)
    with pytest.raises(oracle.ConformanceError) as caught:
        oracle.check_implementation(skipping, problems=st.just(problem), save_dir=None,
                                    isolate=False)
    verdict = caught.value.verdict
    assert verdict.stage == "non_finite" and verdict.rank == 0 and verdict.where[0] == token
    assert f"never written, if out was given pre-filled with NaN): tokens [{token}]" in (
        verdict.message)
    # Without the option the same kernel gets no buffers: nothing to skip into.
    assert ot.to_torch(problem.ranks[0]).out is None


def test_counts_never_written_keep_the_poison() -> None:
    problem, _ = _buffered_problem()

    def rows_only(ranks: list[ot.TorchRankInputs]) -> None:
        _writes_defined_rows()(ranks)
        ranks[1].expert_token_nums.fill_(-1)  # type: ignore[union-attr]

    verdict = oracle.compare(problem, ot.implementation(rows_only, out_buffers=True)(problem))
    assert verdict.stage == "expert_token_nums" and "got -1 rows" in verdict.message
