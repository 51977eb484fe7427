"""Load what a user names at a door: an implementation under test from a
``package.module:function`` name, and a kernel profile from a registered name, an import name
or a profile file (:func:`load_kernel`)."""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from oracle.config.options import OptionError
from oracle.model.kernels import PROFILES, KernelProfile, profile_from_dict

__all__ = ["ImplLoadError", "load_impl", "load_kernel"]


class ImplLoadError(ValueError):
    """The ``MODULE:FUNC`` name does not lead to a callable."""


def _import_attr(name: str, what: str, form: str, example: str) -> Any:
    """The object ``package.module:attr`` names (the working directory is importable, as
    under pytest); every failure is an :class:`ImplLoadError` that says what to change."""
    module_name, sep, attr = name.partition(":")
    if not sep or not module_name or not attr:
        raise ImplLoadError(f"{what} {name!r}: expected {form}, e.g. {example}")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    saved = np.geterr()  # a module that calls np.seterr(all="raise") must not change ours
    try:
        module = importlib.import_module(module_name)
    except (Exception, SystemExit) as exc:  # sys.exit(0) at import is no implementation
        raise ImplLoadError(
            f"cannot import module {module_name!r} for {what} {name!r}: "
            f"{type(exc).__name__}: {exc}"
        ) from None
    finally:
        np.seterr(**saved)
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ImplLoadError(f"module {module_name!r} has no attribute {attr!r} "
                                f"({what} {name!r})")
        target = getattr(target, part)
    return target


def load_impl(name: str) -> Callable[..., Any]:
    """Import ``package.module:function`` and return the callable; every failure is an
    :class:`ImplLoadError` that says what to change."""
    target = _import_attr(name, "--impl", "MODULE:FUNCTION",
                          "mypkg.kernels:dispatch_ffn_combine")
    if not callable(target):
        raise ImplLoadError(f"{name!r} is a {type(target).__name__}, not a callable")
    return target  # type: ignore[no-any-return]


#: The forms ``--kernel`` takes, for every message that rejects one.
KERNEL_FORMS = ("one of {names} (registered), MODULE:NAME of an "
                "oracle.model.kernels.KernelProfile, or a profile file written by "
                "'dfc-oracle kernels --dump NAME > FILE.json'")


def load_kernel(kernel: str | KernelProfile | None) -> KernelProfile | str | None:
    """What ``--kernel`` / ``kernel=`` names, resolved once at the door: a registered name
    stays a name (the record files keep it short), a :class:`KernelProfile` stays itself, a
    path to a JSON profile file (:meth:`KernelProfile.to_dict`, as ``dfc-oracle kernels --dump``
    writes it) or ``MODULE:NAME`` of a profile becomes that profile. Anything else is an
    :class:`oracle.config.options.OptionError` on ``kernel`` that lists the accepted forms."""
    if kernel is None or isinstance(kernel, KernelProfile) or (
            isinstance(kernel, str) and kernel in PROFILES):
        return kernel
    forms = KERNEL_FORMS.format(names=", ".join(PROFILES))
    if not isinstance(kernel, str):
        raise OptionError("kernel", f"kernel={kernel!r} must be {forms}")
    path = Path(kernel)
    if path.suffix == ".json" or path.is_file():
        try:
            return profile_from_dict(json.loads(path.read_text(encoding="utf-8")))
        except OSError as exc:
            raise OptionError("kernel", f"kernel={kernel!r}: cannot read the profile file "
                              f"({exc.strerror}); pass {forms}") from None
        except (ValueError, TypeError) as exc:
            raise OptionError("kernel", f"kernel={kernel!r} is not a profile file ({exc}); "
                              "write one with 'dfc-oracle kernels --dump NAME > FILE.json' and "
                              "edit its step records") from None
    if ":" not in kernel:
        raise OptionError("kernel", f"kernel={kernel!r} must be {forms}")
    try:
        target = _import_attr(kernel, "--kernel", "MODULE:NAME", "mypkg.profiles:MINE")
    except ImplLoadError as exc:
        raise OptionError("kernel", str(exc)) from None
    if not isinstance(target, KernelProfile):
        raise OptionError("kernel", f"kernel={kernel!r} is a {type(target).__name__}, not an "
                          "oracle.model.kernels.KernelProfile (build one with "
                          "dataclasses.replace or KernelProfile.with_steps of a built-in)")
    return target
