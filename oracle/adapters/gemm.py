"""Where the model's and the judge's large GEMMs are done: products of a few rows with one
expert's weight (issue 26, ``benchmarks/PRODUCTION_SHAPES.md``).

At 16 rows per expert a GEMM costs what reading its weight costs, so every consumer asks
for all the products it needs of one weight at once (:func:`weight_products`): the exact
int8 GEMMs of the kernel model (:func:`oracle.model.arithmetic.exact_int_matmuls`), the
ideal model's float64 products, the sound bound's signed and ``|W|`` products and the row
test's ``W²`` and ``Wᵀ`` products.

The backend is chosen by the environment variable ``DFC_GEMM``:

- ``numpy`` (the default): the weight is converted a few MiB at a time
  (:func:`weight_chunks`) and every product taken from each converted chunk, the chunks'
  products summed in float64. With float32 chunks (``dtype``) each chunk's product is a
  float32 BLAS sum of at most ``max_rows`` terms.
- ``torch``: the weight is uploaded whole to ``DFC_GEMM_DEVICE`` (default ``cuda`` where
  torch sees one, else ``cpu``), converted there to float64, and each product is one
  float64 matmul. Every operand this module is given is exact in float64 (int8, 16-bit and
  float32 weights and rows; their squares and absolute values), so each product is the
  exact one within ``γ64_n`` of float64 summation in whatever order the device takes: the
  exact integer GEMMs (sums below 2^53) come out exact, bit for bit NumPy's; every float
  product errs by less than the float32 evaluation whose error its consumer bounds
  (``γ32_n``; :mod:`oracle.judge.bounds`, :mod:`oracle.judge.rowtest`), or, for the ideal
  model's float64 products, within the ``γ_n`` that holds for any summation order.

``torch`` is imported only when the torch backend is asked for.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

__all__ = ["BACKENDS", "DEVICE_VARIABLE", "VARIABLE", "Product", "backend", "weight_chunks",
           "weight_products"]

Array = np.ndarray[Any, Any]

#: The environment variable naming the backend, its values, and the torch device's variable.
VARIABLE = "DFC_GEMM"
BACKENDS = ("numpy", "torch")
DEVICE_VARIABLE = "DFC_GEMM_DEVICE"
#: The torch backend's arithmetic: every operand is exact in it (module docstring).
_TORCH_DTYPE = "float64"
#: A chunk is about this many bytes (256 x 4096 float32, 4 MiB): it stays in cache while
#: BLAS reads it.
_CHUNK_BYTES = 256 * 4096 * 4


@dataclass(frozen=True)
class Product:
    """One product asked of a weight ``w`` (n, C): ``rows @ form(w)`` (``rows`` (R, n)), or
    with ``transposed`` ``rows @ form(w)ᵀ`` (``rows`` (R, C)), where ``form`` is ``w``
    itself, ``|w|`` (``"abs"``) or ``w²`` (``"square"``). The NumPy backend multiplies
    ``rows`` in their own dtype: float32 rows with float32 chunks run on SGEMM."""

    rows: Array
    form: Literal["w", "abs", "square"] = "w"
    transposed: bool = False


def backend() -> str:
    """The backend ``DFC_GEMM`` names (``numpy`` when unset)."""
    name = os.environ.get(VARIABLE, "numpy") or "numpy"
    if name not in BACKENDS:
        raise ValueError(f"{VARIABLE}={name!r}: the GEMM backends are {', '.join(BACKENDS)}; "
                         f"unset it or set one of those")
    return name


def weight_chunks(w: Array, dtype: Any = np.float32,
                  max_rows: int | None = None) -> Iterator[tuple[int, Array]]:
    """``(start, chunk)``: ``w``'s rows ``start`` onwards, a few MiB at a time (at most
    ``max_rows``), converted to ``dtype`` into one reused buffer (the next chunk overwrites
    it). A consumer that takes every product it needs of a weight from each chunk reads the
    weight once and never holds a converted copy of it: at 16 rows per expert the
    conversion, not the arithmetic, is the cost (issue 26). Any layout of ``w``; int8 and
    16-bit values convert exactly to float32 and float64."""
    n = w.shape[0]
    row_bytes = max(int(np.prod(w.shape[1:])) * np.dtype(dtype).itemsize, 1)
    rows = max(_CHUNK_BYTES // row_bytes, 16)
    if max_rows is not None:
        rows = max(min(rows, max_rows), 1)
    buf = np.empty((min(rows, n), *w.shape[1:]), dtype)
    for start in range(0, n, rows):
        chunk = buf[:min(rows, n - start)]
        np.copyto(chunk, w[start:start + chunk.shape[0]], casting="unsafe")
        yield start, chunk


def weight_products(w: Array, products: Sequence[Product], dtype: Any = np.float32,
                    max_rows: int | None = None) -> list[Array]:
    """Every product in ``products`` of the 2-D weight ``w``, in float64, from one pass over
    ``w``. NumPy backend: ``w`` converted to ``dtype`` a chunk of at most ``max_rows`` rows
    at a time (:func:`weight_chunks`); a product over ``w``'s rows sums the chunks' products
    in float64, a transposed one writes each chunk's rows of the result. Torch backend:
    float64 on the device (module docstring); ``dtype`` and ``max_rows`` only shape the
    NumPy evaluation."""
    if backend() == "torch":
        return _torch_products(w, products)
    n, cols = w.shape
    outs = [np.zeros((n, p.rows.shape[0]) if p.transposed else (p.rows.shape[0], cols))
            for p in products]
    derived: dict[str, Array] = {}
    for start, chunk in weight_chunks(w, dtype, max_rows):
        stop = start + chunk.shape[0]
        forms = {"w": chunk}
        with np.errstate(over="ignore"):
            for form, ufunc in (("abs", np.abs), ("square", np.square)):
                if any(p.form == form for p in products):
                    buf = derived.setdefault(form, np.empty_like(chunk))[:chunk.shape[0]]
                    forms[form] = ufunc(chunk, out=buf)
        for p, out in zip(products, outs):
            if p.transposed:
                out[start:stop] = forms[p.form] @ p.rows.T
            else:
                out += p.rows[:, start:stop] @ forms[p.form]
    return [out.T if p.transposed else out for p, out in zip(products, outs)]


def _torch_products(w: Array, products: Sequence[Product]) -> list[Array]:
    """:func:`weight_products` in float64 on the torch device (module docstring)."""
    try:
        import torch
    except ImportError as err:
        raise ImportError(f"{VARIABLE}=torch needs torch (pip install torch, or the extra "
                          f"dfc-oracle[torch]); unset {VARIABLE} for the NumPy GEMMs") from err
    device = os.environ.get(DEVICE_VARIABLE) or ("cuda" if torch.cuda.is_available() else "cpu")
    # bfloat16 (ml_dtypes) crosses as its bits; every other weight dtype as itself.
    bits = w.view(np.uint16) if w.dtype.name == "bfloat16" else w
    with warnings.catch_warnings():  # read-only arrays: the tensors are read, never written
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        tw = torch.from_numpy(np.ascontiguousarray(bits)).to(device)
    if w.dtype.name == "bfloat16":
        tw = tw.view(torch.bfloat16)
    dtype = getattr(torch, _TORCH_DTYPE)
    tw = tw.to(dtype)
    forms = {"w": tw}
    for form, op in (("abs", torch.abs), ("square", torch.square)):
        if any(p.form == form for p in products):
            forms[form] = op(tw)
    outs = []
    for p in products:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            rows = torch.from_numpy(np.ascontiguousarray(p.rows)).to(device, dtype)
        m = forms[p.form]
        outs.append((rows @ (m.T if p.transposed else m)).cpu().numpy().astype(np.float64))
    return outs
