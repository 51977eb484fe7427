"""Load an implementation under test from a ``package.module:function`` name."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ImplLoadError", "load_impl"]


class ImplLoadError(ValueError):
    """The ``MODULE:FUNC`` name does not lead to a callable."""


def load_impl(name: str) -> Callable[..., Any]:
    """Import ``package.module:function`` (the working directory is importable, as under
    pytest) and return the callable; every failure is an :class:`ImplLoadError` that says what
    to change."""
    module_name, sep, attr = name.partition(":")
    if not sep or not module_name or not attr:
        raise ImplLoadError(
            f"--impl {name!r}: expected MODULE:FUNCTION, e.g. mypkg.kernels:dispatch_ffn_combine"
        )
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    saved = np.geterr()  # a module that calls np.seterr(all="raise") must not change ours
    try:
        module = importlib.import_module(module_name)
    except (Exception, SystemExit) as exc:  # sys.exit(0) at import is no implementation
        raise ImplLoadError(
            f"cannot import module {module_name!r} for --impl {name!r}: "
            f"{type(exc).__name__}: {exc}"
        ) from None
    finally:
        np.seterr(**saved)
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ImplLoadError(
                f"module {module_name!r} has no attribute {attr!r} (--impl {name!r})"
            )
        target = getattr(target, part)
    if not callable(target):
        raise ImplLoadError(f"{name!r} is a {type(target).__name__}, not a callable")
    return target  # type: ignore[no-any-return]
