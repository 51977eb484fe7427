"""``oracle.adapters.gemm``: the one place the model's and the judge's weight GEMMs are done
(issue 26). The NumPy backend's chunked products are the float64 products (exactly where the
operands make them exact); ``DFC_GEMM=torch`` gives the exact int8 GEMMs, and so the kernel
profiles' outputs, bit for bit, and the judge's float values within their stated margins,
with the same verdicts; a torch backend in float32 loses the exact sums and is caught; a
bad ``DFC_GEMM`` and a missing torch are named."""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
import pytest

import oracle
from oracle.adapters import gemm
from oracle.adapters.gemm import Product, weight_products
from oracle.model.arithmetic import exact_int_matmuls
from spec import OpConfig, random_problem
from spec.fields import GATE_VARIANTS


def _operands(k: int = 1101) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An int8 weight whose column 0 (-127 throughout) against q = 127 sums to an odd
    integer past 2^24, which float32 cannot hold: a float32 sum loses bits there."""
    rng = np.random.default_rng(k)
    w = rng.integers(-128, 128, size=(k, 24), dtype=np.int8)
    w[:, 0] = -127
    q = rng.integers(-127, 128, size=(5, k)).astype(np.float32)
    q[0] = 127
    return w, q, rng.standard_normal((3, 24)).astype(np.float32)


def test_numpy_products_are_the_float64_products() -> None:
    w, q, t = _operands()
    w64 = w.astype(np.float64)
    signed, absolute, square, transposed = weight_products(
        w, [Product(q), Product(q, "abs"), Product(q, "square"), Product(t, transposed=True)],
        max_rows=1000)
    assert np.array_equal(signed, q @ w64)  # chunks of 1000 rows: integer sums below 2^24
    assert signed[0, 0] == -127 * 127 * 1101  # odd, past 2^24: no float32 holds it
    assert np.array_equal(absolute, q @ np.abs(w64))
    np.testing.assert_allclose(square, q @ w64**2, rtol=1000 * 2.0**-24)  # γ_1000 in float32
    t64 = t.astype(np.float64)  # a float32 sum of 24 terms: within γ_24 of Σ|terms|
    assert (np.abs(transposed - t64 @ w64.T) <= 25 * 2.0**-24 * (np.abs(t64) @ np.abs(w64).T)).all()


def test_an_unknown_backend_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DFC_GEMM", "cupy")
    with pytest.raises(ValueError, match=r"DFC_GEMM='cupy'.*numpy, torch"):
        weight_products(*_operands()[:1], [Product(np.ones((1, 1101), np.float32))])


def test_torch_backend_without_torch_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DFC_GEMM", "torch")
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match="DFC_GEMM=torch needs torch"):
        weight_products(*_operands()[:1], [Product(np.ones((1, 1101), np.float32))])


def _exact_mismatch(monkeypatch: pytest.MonkeyPatch) -> bool:
    w, q, _ = _operands()
    monkeypatch.delenv("DFC_GEMM", raising=False)
    want = exact_int_matmuls(w, (q, False, 127), (q, True, 127))
    monkeypatch.setenv("DFC_GEMM", "torch")
    monkeypatch.setenv("DFC_GEMM_DEVICE", "cpu")
    got = exact_int_matmuls(w, (q, False, 127), (q, True, 127))
    return not all(g.dtype == x.dtype and np.array_equal(g.view(np.uint64), x.view(np.uint64))
                   for g, x in zip(got, want))


def test_torch_exact_gemms_are_numpys_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch", reason="the torch GEMM backend needs the extra 'torch'")
    assert not _exact_mismatch(monkeypatch)


def test_a_float32_torch_backend_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch", reason="the torch GEMM backend needs the extra 'torch'")
    monkeypatch.setattr(gemm, "_TORCH_DTYPE", "float32")
    assert _exact_mismatch(monkeypatch)


def test_torch_backend_judges_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    """K = 1100 (past float32's exact int8 range): the profile's output bit for bit, the
    ideal model within float64 reordering, the verdicts (model's own output, a scaled row)
    the same under both backends."""
    pytest.importorskip("torch", reason="the torch GEMM backend needs the extra 'torch'")
    cfg = OpConfig(ep_size=2, experts_per_rank=2, top_k=2, hidden=1100, intermediate=32,
                   tokens_per_rank=(3, 2))
    p = random_problem(cfg, seed=3)
    found = {}
    for name in ("numpy", "torch"):
        monkeypatch.setenv("DFC_GEMM", name)
        monkeypatch.setenv("DFC_GEMM_DEVICE", "cpu")
        run, ideal = oracle.run(p), oracle.run(p, numerics="ideal")
        own = [(r.out, r.expert_token_nums) for r in run.ranks]
        scaled = [(r.out * np.array(2, r.out.dtype), r.expert_token_nums)
                  for r in run.ranks]
        verdicts = [(v.stage, v.ok) for v in (oracle.compare(p, own, numerics="ideal"),
                                              oracle.compare(p, scaled, numerics="ideal"))]
        found[name] = ([r.out.view(np.uint16) for r in run.ranks],
                       np.concatenate(ideal.trace.combined), verdicts)
    (bits_n, ideal_n, verdicts_n), (bits_t, ideal_t, verdicts_t) = found.values()
    assert all(np.array_equal(a, b) for a, b in zip(bits_n, bits_t))
    np.testing.assert_allclose(ideal_t, ideal_n, rtol=1e-12, atol=1e-300)
    assert verdicts_n == verdicts_t == [("ok", True), ("out", False)]


#: The ideal judge does not model W4A8 (packed int4 weights with int8 activations).
_IDEAL_VARIANTS = [g.name for g in GATE_VARIANTS if g.name != "w4a8"]


@pytest.mark.parametrize("variant", _IDEAL_VARIANTS)
def test_torch_backend_takes_every_gate_variants_weights(variant: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Every format's weights reach the torch backend (e4m3 and e2m1 weights, bfloat16 and
    float16 ones, int8 and int4): the ideal model within float64 reordering of NumPy's, the
    ideal judge's verdicts on the ideal output and on a doubled one the same. FP8 weights
    once raised a TypeError there (torch.from_numpy takes no ml_dtypes array; found at
    DeepSeek-V3's shape on an H100, benchmarks/GPU.md, thirteenth part)."""
    pytest.importorskip("torch", reason="the torch GEMM backend needs the extra 'torch'")
    gate = next(g for g in GATE_VARIANTS if g.name == variant)
    cfg = OpConfig(ep_size=2, experts_per_rank=2, top_k=2, hidden=256, intermediate=128,
                   tokens_per_rank=(3, 2), **dataclasses.asdict(gate.selection))
    p = random_problem(cfg, seed=1)
    found = {}
    for name in ("numpy", "torch"):
        monkeypatch.setenv("DFC_GEMM", name)
        monkeypatch.setenv("DFC_GEMM_DEVICE", "cpu")
        ideal = oracle.run(p, numerics="ideal")
        own = [(r.out, r.expert_token_nums) for r in ideal.ranks]
        doubled = [(r.out * np.array(2, r.out.dtype), r.expert_token_nums)
                   for r in ideal.ranks]
        found[name] = (np.concatenate(ideal.trace.combined),
                       [(v.stage, v.ok) for v in (oracle.compare(p, own, numerics="ideal"),
                                                  oracle.compare(p, doubled, numerics="ideal"))])
    (ideal_n, verdicts_n), (ideal_t, verdicts_t) = found.values()
    # float64 in another order: within 1e-12 of the output's scale (sums cancel to small values)
    np.testing.assert_allclose(ideal_t, ideal_n, rtol=0, atol=1e-12 * np.abs(ideal_n).max())
    assert verdicts_n == verdicts_t and verdicts_n[0] == ("ok", True) and not verdicts_n[1][1]


def _counted_uploads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """The torch backend on the CPU, each upload's shape recorded."""
    torch = pytest.importorskip("torch", reason="the torch GEMM backend needs the extra 'torch'")
    monkeypatch.setenv("DFC_GEMM", "torch")
    monkeypatch.setenv("DFC_GEMM_DEVICE", "cpu")
    uploads: list[tuple[int, ...]] = []
    from_numpy = torch.from_numpy

    def counted(a: np.ndarray) -> object:
        uploads.append(a.shape)
        return from_numpy(a)
    monkeypatch.setattr(torch, "from_numpy", counted)
    return uploads


def test_a_session_uploads_a_read_only_weight_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Three consumers of one read-only weight in one session: one upload of it (and one of
    each product's rows); a view of the same memory is the same weight; outside a session,
    every call uploads it again."""
    uploads = _counted_uploads(monkeypatch)
    w, q, _ = _operands()
    w.flags.writeable = False
    want = q @ w.astype(np.float64)
    with gemm.session():
        for view in (w, w[:], w.view()):
            got, = weight_products(view, [Product(q)])
            assert np.array_equal(got, want)
    assert uploads.count(w.shape) == 1
    weight_products(w, [Product(q)])
    weight_products(w, [Product(q)])
    assert uploads.count(w.shape) == 3


def _second_product_after_a_change() -> tuple[np.ndarray, np.ndarray]:
    """A writable weight changed between two products of one session: the second product
    and the changed weight's product. Fortran order: the upload is a copy even on the CPU
    (a contiguous CPU tensor would share the array's memory and never go stale)."""
    w, q, _ = _operands()
    w = np.asfortranarray(w)
    with gemm.session():
        weight_products(w, [Product(q)])
        w[0] = 1
        return weight_products(w, [Product(q)])[0], q @ w.astype(np.float64)


def test_a_session_never_keeps_a_writable_weight(monkeypatch: pytest.MonkeyPatch) -> None:
    """The second product is the changed weight's; the mutant that keeps writable weights
    too returns the stale one."""
    _counted_uploads(monkeypatch)
    assert np.array_equal(*_second_product_after_a_change())
    monkeypatch.setattr(gemm, "_kept", lambda w: True)
    assert not np.array_equal(*_second_product_after_a_change())


@pytest.mark.parametrize("name", ["numpy", "torch"])
def test_the_tiny_form_keeps_only_subnormal_weights(name: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """``"tiny"``: ``rows @ (|w| where |w| <= 2^-126, else 0)``, the weights a flushing kernel
    may read as 0 (``FloatGemm(ftz=True)``): the normal weights' share is left out, which
    ``"abs"`` would keep."""
    if name == "torch":
        pytest.importorskip("torch", reason="the torch GEMM backend needs the extra 'torch'")
    monkeypatch.setenv("DFC_GEMM", name)
    monkeypatch.setenv("DFC_GEMM_DEVICE", "cpu")
    rng = np.random.default_rng(0)
    w = rng.standard_normal((300, 7)).astype(np.float32)
    w[::3] *= np.float32(2.0**-130)  # a third subnormal
    w[1, 2] = np.finfo(np.float32).smallest_normal  # the boundary counts as tiny
    rows = np.abs(rng.standard_normal((4, 300)))
    w64 = np.abs(w.astype(np.float64))
    want = rows @ np.where(w64 <= 2.0**-126, w64, 0)
    tiny, absolute = weight_products(w, [Product(rows, "tiny"), Product(rows, "abs")],
                                     np.float64, max_rows=64)
    np.testing.assert_allclose(tiny, want, rtol=1e-14)
    assert (absolute > 1e3 * tiny).all()
