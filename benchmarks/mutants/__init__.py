"""A catalogue of realistic defective ``dispatch_ffn_combine`` implementations.

``correct`` is an independent, vectorised implementation of the contract
(:mod:`benchmarks.mutants.correct`); each entry of ``MUTANTS`` is that implementation with one
stage changed, standing for one real bug class (its class docstring names the class and its
source). Every entry is a callable ``impl(problem) -> [(out, expert_token_nums) per rank]``, the
implementation interface of ``oracle.check_implementation``.

>>> sorted(MUTANTS)[:3]
['clamp_wrong_half', 'combine_bf16_accumulator', 'combine_reverse_order']
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from benchmarks.mutants import numerics, resources, routing
from benchmarks.mutants.correct import DispatchFfnCombine

__all__ = ["KIND", "MUTANTS", "correct"]

#: The correct implementation every mutant deviates from.
correct = DispatchFfnCombine()

_CLASSES: dict[str, tuple[str, type[DispatchFfnCombine]]] = {
    # routing (§4–§5)
    "expert_rank_modulo": ("routing", routing.ExpertRankModulo),
    "receive_offset_off_by_one": ("routing", routing.ReceiveOffsetOffByOne),
    "tile_remainder_dropped": ("routing", routing.TileRemainderDropped),
    "duplicates_deduplicated": ("routing", routing.DuplicatesDeduplicated),
    "masked_slots_counted": ("routing", routing.MaskedSlotsCounted),
    "tie_order_slot_major": ("routing", routing.TieOrderSlotMajor),
    "zero_token_rank_crash": ("routing", routing.ZeroTokenRankCrash),
    "truncate_at_greater": ("routing", routing.TruncateAtGreater),
    "counts_after_truncation": ("routing", routing.CountsAfterTruncation),
    "empty_source_row_shift": ("routing", routing.EmptySourceRowShift),
    # numerics (§6)
    "swiglu_halves_swapped": ("numerics", numerics.SwigluHalvesSwapped),
    "quantise_half_even": ("numerics", numerics.QuantiseHalfEven),
    "quantise_truncated": ("numerics", numerics.QuantiseTruncated),
    "quantise_double_rounded": ("numerics", numerics.QuantiseDoubleRounded),
    "per_tensor_activation_scale": ("numerics", numerics.PerTensorActivationScale),
    "requantise_half_away": ("numerics", numerics.RequantiseHalfAway),
    "requantise_by_division": ("numerics", numerics.RequantiseByDivision),
    "per_token_scale": ("numerics", numerics.PerTokenScale),
    "combine_bf16_accumulator": ("numerics", numerics.CombineBf16Accumulator),
    "combine_reverse_order": ("numerics", numerics.CombineReverseOrder),
    "probs_renormalised": ("numerics", numerics.ProbsRenormalised),
    "probs_ignored": ("numerics", numerics.ProbsIgnored),
    "fp16_intermediate_skipped": ("numerics", numerics.Fp16IntermediateSkipped),
    "clamp_wrong_half": ("numerics", numerics.ClampWrongHalf),
    "zero_row_nan": ("numerics", numerics.ZeroRowNaN),
    # resources (§3, §8)
    "single_expert_list_as_stacked": ("resources", resources.SingleExpertListAsStacked),
    "list_read_reversed": ("resources", resources.ListReadReversed),
    "pre_fix_count_stride": ("resources", resources.PreFixCountStride),
    "weights_read_as_contiguous": ("resources", resources.WeightsReadAsContiguous),
}

#: Mutant name -> implementation under test.
MUTANTS: dict[str, Callable[..., Any]] = {name: cls() for name, (_, cls) in _CLASSES.items()}
#: Mutant name -> "routing", "numerics" or "resources".
KIND: dict[str, str] = {name: kind for name, (kind, _) in _CLASSES.items()}
