"""Memory layouts of input arrays: what a kernel may be handed besides a C-contiguous tensor.

The operator declares its weights ``IgnoreContiguous()`` (``docs/contract/edge_cases.md``,
"non-contiguous weights or inputs"; intel-xpu-backend-for-triton #7455 and Liger-Kernel PR
#1377 for kernels that ignored strides): a caller may pass a transposed or sliced view, and a
kernel that reads one as if it were contiguous computes with the wrong values. The oracle
treats every array as its values; the strategies hand implementations the layouts below so that
such a kernel is caught, and :class:`spec.Problem`, the child process and counterexample files
keep an array's layout class when they copy it.

>>> import numpy as np
>>> a = with_layout(np.arange(6.0).reshape(2, 3), "strided")
>>> layout_of(a), a.tolist()
('strided', [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]])
"""

from __future__ import annotations

import numpy as np

__all__ = ["LAYOUTS", "copy_array", "layout_of", "with_layout"]

#: ``contiguous``: C order. ``fortran``: column-major (a transposed view's memory). ``strided``:
#: every other element of the last axis of a buffer twice as wide (a sliced view's memory).
LAYOUTS = ("contiguous", "fortran", "strided")


def layout_of(a: np.ndarray) -> str:
    """The layout class of ``a`` (an array that is both C and Fortran ordered is contiguous)."""
    if a.flags.c_contiguous:
        return "contiguous"
    return "fortran" if a.flags.f_contiguous else "strided"


def with_layout(a: np.ndarray, layout: str) -> np.ndarray:
    """A fresh writable array with the values of ``a``, laid out as ``layout``; a 0-d array, or
    an empty one, is contiguous whatever is asked."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {LAYOUTS}")
    if layout == "contiguous" or a.ndim == 0 or a.size == 0:
        return np.array(a, order="C", copy=True)
    if layout == "fortran":
        return np.array(a, order="F", copy=True)
    wide = np.empty((*a.shape[:-1], 2 * a.shape[-1]), dtype=a.dtype)
    view = wide[..., ::2]
    view[...] = a
    return view


def copy_array(a: np.ndarray) -> np.ndarray:
    """A writable copy of ``a`` with its values and its layout class."""
    return with_layout(a, layout_of(a))
