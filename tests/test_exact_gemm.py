"""``oracle.model.arithmetic.exact_int_matmuls``: int8 GEMMs on float32 BLAS blocks are the exact
integer products, equal bit for bit to the float64 product they replace (issue 26), for signed
and ``|w|`` operands, zero and NaN rows, at reduction lengths on both sides of float32's exact
range; a mutant whose float32 blocks are too long is caught."""

from __future__ import annotations

import numpy as np
import pytest

from oracle.model import arithmetic
from oracle.model.arithmetic import exact_int_matmul, exact_int_matmuls


def _operands(k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(k)
    w = rng.integers(-128, 128, size=(k, 40), dtype=np.int8)
    w[:, 0] = -128  # near the largest column sums, 127·128·k, with odd terms among them
    w[1::2, 0] = -127
    q = rng.integers(-127, 128, size=(6, k)).astype(np.float32)
    q[0] = 127
    q[1] = -0.0  # an exact 0 sum: +0, as BLAS gives
    q[2, 3] = np.nan
    v = np.abs(q[:4]) * 2  # an envelope radius: up to 254
    return w, q, v


def _mismatches(k: int) -> list[str]:
    w, q, v = _operands(k)
    want_q = q.astype(np.float64) @ w.astype(np.float64)
    want_v = v.astype(np.float64) @ np.abs(w.astype(np.float64))
    got_q, got_v = exact_int_matmuls(w, (q, False, 127), (v, True, 254))
    found = []
    for name, got, want, bound in (("signed", got_q, want_q, 127), ("absolute", got_v, want_v,
                                                                      254)):
        dtype = np.float32 if bound * 128 * k < 2**24 else np.float64
        if got.dtype != dtype:
            found.append(f"{name} dtype {got.dtype}")
        if not np.array_equal(got.astype(np.float64).view(np.uint64), want.view(np.uint64)):
            found.append(f"{name} values")
    return found


@pytest.mark.parametrize("k", [64, 515, 1032, 1033, 3000])
def test_blocked_products_are_the_float64_products(k: int) -> None:
    assert _mismatches(k) == []
    w, q, _ = _operands(k)
    alone = exact_int_matmul(q, w)
    assert np.array_equal(alone, exact_int_matmuls(w, (q, False, 127))[0], equal_nan=True)


def test_too_long_a_block_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """A chunk of 3000 rows (past float32's exact range, partial sums up to 127·128·3000 ≈
    2^25.5 with odd terms in column 0) loses bits; at most 1032 rows it cannot."""
    monkeypatch.setattr(arithmetic, "_EXACT32", 2**26)  # float32 chunks of up to 4128 rows
    assert "signed values" in _mismatches(3000)
