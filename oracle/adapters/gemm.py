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

``torch`` is imported only when the torch backend is asked for. Inside :func:`session` (each
``oracle.run`` and ``oracle.compare`` opens one) it uploads each read-only weight once: the
model, the ideal model, the sound bound and the row test each take products of the same
weight, and at the DeepSeek-V3 shape the repeated uploads were half of ``compare``'s seconds
in ideal mode on an H100 (``benchmarks/GPU.md``, seventh part).
"""

from __future__ import annotations

import functools
import os
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, ParamSpec, TypeVar

import numpy as np

__all__ = ["BACKENDS", "DEVICE_VARIABLE", "VARIABLE", "Product", "backend", "in_session",
           "session", "weight_chunks", "weight_products"]

Array = np.ndarray[Any, Any]
_P = ParamSpec("_P")
_R = TypeVar("_R")

#: The environment variable naming the backend, its values, and the torch device's variable.
VARIABLE = "DFC_GEMM"
BACKENDS = ("numpy", "torch")
DEVICE_VARIABLE = "DFC_GEMM_DEVICE"
#: The torch backend's arithmetic: every operand is exact in it (module docstring).
_TORCH_DTYPE = "float64"
#: A chunk is about this many bytes (256 x 4096 float32, 4 MiB): it stays in cache while
#: BLAS reads it.
_CHUNK_BYTES = 256 * 4096 * 4
#: The ``"tiny"`` form keeps ``|w|`` where it is at most float32's smallest normal, 0 elsewhere.
_NORMAL32 = float(np.finfo(np.float32).smallest_normal)
#: ml_dtypes' floats that torch has too: the integer type their bits cross as, torch's name.
_TORCH_BITS = {"bfloat16": (np.uint16, "bfloat16"), "float8_e4m3fn": (np.uint8, "float8_e4m3fn"),
               "float8_e5m2": (np.uint8, "float8_e5m2")}
#: Per thread: the open sessions' depth and the torch backend's uploaded weights.
_SESSION = threading.local()


@dataclass(frozen=True)
class Product:
    """One product asked of a weight ``w`` (n, C): ``rows @ form(w)`` (``rows`` (R, n)), or
    with ``transposed`` ``rows @ form(w)ᵀ`` (``rows`` (R, C)), where ``form`` is ``w``
    itself, ``|w|`` (``"abs"``) or ``w²`` (``"square"``). The NumPy backend multiplies
    ``rows`` in their own dtype: float32 rows with float32 chunks run on SGEMM."""

    rows: Array
    form: Literal["w", "abs", "square", "tiny"] = "w"
    transposed: bool = False


@contextmanager
def session() -> Iterator[None]:
    """Within it (and in the sessions it opens), the torch backend keeps each read-only weight
    it uploads, in the weight's own dtype, and uploads it no more: a read-only array's values
    do not change while the session holds it (the problem's arrays are read-only copies). The
    uploads go when the outermost session ends. Writable arrays are uploaded at each use.
    Per thread; the NumPy backend ignores it."""
    depth = getattr(_SESSION, "depth", 0)
    if depth == 0:
        _SESSION.uploads = {}
    _SESSION.depth = depth + 1
    try:
        yield
    finally:
        _SESSION.depth = depth
        if depth == 0:
            _SESSION.uploads = None


def in_session(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """``fn`` run inside a :func:`session`."""
    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with session():
            return fn(*args, **kwargs)
    return wrapper


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
            for form, ufunc in (("abs", np.abs), ("square", np.square), ("tiny", np.abs)):
                if any(p.form == form for p in products):
                    buf = derived.setdefault(form, np.empty_like(chunk))[:chunk.shape[0]]
                    forms[form] = ufunc(chunk, out=buf)
                    if form == "tiny":
                        buf[buf > _NORMAL32] = 0
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
    dtype = getattr(torch, _TORCH_DTYPE)
    tw = _upload(torch, w, device).to(dtype)
    forms = {"w": tw}
    for form, op in (("abs", torch.abs), ("square", torch.square), ("tiny", torch.abs)):
        if any(p.form == form for p in products):
            forms[form] = op(tw)
    if "tiny" in forms:
        forms["tiny"] = torch.where(forms["tiny"] <= _NORMAL32, forms["tiny"], 0.0)
    outs = []
    for p in products:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            rows = torch.from_numpy(np.ascontiguousarray(p.rows)).to(device, dtype)
        m = forms[p.form]
        outs.append((rows @ (m.T if p.transposed else m)).cpu().numpy().astype(np.float64))
    return outs


def _kept(w: Array) -> bool:
    """Whether a session keeps ``w``'s upload: read-only arrays only."""
    return not w.flags.writeable


def _upload(torch: Any, w: Array, device: str) -> Any:
    """``w`` on ``device`` in its own dtype, once per :func:`session` for a read-only ``w``:
    the session keeps the array itself beside the tensor, so its memory, which the key
    names, is not reused while it holds it. NumPy's own dtypes cross as they are; ml_dtypes'
    bfloat16 and 8-bit floats that torch has cross as their bits (:data:`_TORCH_BITS`); the
    others (e2m1, e8m0, ...) as float32, which holds every value of a float of 16 bits or
    fewer exactly."""
    uploads = getattr(_SESSION, "uploads", None)
    key = None
    if uploads is not None and _kept(w):
        key = (w.__array_interface__["data"][0], w.shape, w.strides, w.dtype.str, device)
        if key in uploads:
            return uploads[key][1]
    carrier, name = _TORCH_BITS.get(w.dtype.name, (None, ""))
    if carrier is not None and hasattr(torch, name):
        bits = w.view(carrier)
    elif w.dtype.type.__module__ == "numpy":
        bits, name = w, ""
    else:
        bits, name = w.astype(np.float32), ""
    with warnings.catch_warnings():  # read-only arrays: the tensors are read, never written
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        tw = torch.from_numpy(np.ascontiguousarray(bits)).to(device)
    if name:
        tw = tw.view(getattr(torch, name))
    if key is not None and uploads is not None:
        uploads[key] = (w, tw)
    return tw
