"""Every option of a search, checked once before it starts.

One place for every door: :func:`oracle.check_implementation`, ``dfc-oracle check``/``replay``/
``hunt``, the pytest gate, :func:`oracle.check.distributed.check_distributed`, and the judgement a
counterexample file records (:func:`oracle.files.counterexample.judged_with`). A value outside what
is allowed is an :class:`OptionError` whose message is one sentence saying what is allowed (the
CLI prints it with exit code 2, the plugin raises ``pytest.UsageError``, a file's record becomes
a :class:`spec.SpecError`), instead of a gate that passes everything (``ulps=inf``), marks
everything hung (``timeout=0``) or ends in a traceback after a full search (``timeout=1e10``
overflows the system's wait). Every number is finite and bounded.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from oracle.config.settings import SETTINGS_PROFILES
from oracle.model.kernels import PROFILES as KERNELS
from oracle.model.kernels import KernelProfile
from oracle.model.numerics import Numerics
from spec.config import MAX_EP_SIZE
from spec.fields import GATE_VARIANTS
from spec.limits import MODEL_PRESETS

__all__ = ["DEFAULT_INPUTS", "DEFAULT_VARIANTS", "INPUT_POLICIES", "MAX_EXAMPLES", "MAX_TIMEOUT",
           "MAX_ULPS", "NUMERICS_MODES", "SCALE_ENCODINGS", "WEIGHT_VARIANTS", "OptionError",
           "check_options"]

#: What to do when an implementation writes into its inputs:
#:
#: - ``"sentinel"`` (the default): allow exactly the real operator's write: the expert ids of
#:   masked tokens (``active_mask`` False) become the sentinel EP·E (§4 of the reference notes:
#:   the kernel writes them back into the caller's ``expert_idx``); any other write (another
#:   id, an active token's id, a masked id set to anything but EP·E, ``x``, ``probs``, weights,
#:   scales) fails at stage ``inputs``. It is the default because it is the contract: ``strict``
#:   fails the real operator on every masked call, and a gate that fails the reference
#:   behaviour gets switched to ``report``, which lets real damage through (a kernel that turns
#:   the caller's global ids into local ones passes with a warning).
#: - ``"strict"``: no write at all (a kernel that promises to leave its inputs alone);
#: - ``"report"``: any write passes with a warning; ``"ignore"``: writes are not looked at.
INPUT_POLICIES = ("sentinel", "strict", "report", "ignore")
DEFAULT_INPUTS = "sentinel"
NUMERICS_MODES = ("faithful", "ideal")
#: The weight variants an implementation may support (``spec.OpConfig.variant``).
WEIGHT_VARIANTS = tuple(g.name for g in GATE_VARIANTS)
#: Those checked unless asked otherwise: W4A8 (packed int4 weights) is opt-in.
DEFAULT_VARIANTS = tuple(g.name for g in GATE_VARIANTS if g.default)
#: Seconds one call may take: a day. Larger waits overflow the system's timers (select,
#: thread joins: ``--timeout 1e10`` ended a correct run in OverflowError).
MAX_TIMEOUT = 86400.0
#: ulps beyond the envelope: 2**16 steps span every finite value of a 16-bit out dtype, so a
#: larger slack only hides that nothing is judged.
MAX_ULPS = 65536.0
#: Examples of one search.
MAX_EXAMPLES = 1_000_000
#: How the dequant scales reach a torch implementation (:func:`oracle.adapters.torch_io.to_torch`).
SCALE_ENCODINGS = ("int64", "float32")


class OptionError(ValueError):
    """An option outside what is allowed; ``option`` is its keyword name (``max_examples``)."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(message)
        self.option = option


def _number(option: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise OptionError(option, f"{option}={value!r} must be a number")
    try:
        return float(value)
    except OverflowError:  # an int beyond any float
        return math.inf


def check_options(
    *,
    numerics: object = "faithful",
    ulps: object = 0.0,
    timeout: object = 60.0,
    inputs: object = DEFAULT_INPUTS,
    save_dir: object = None,
    max_examples: object = None,
    profile: object = None,
    kernel: object = None,
    domain: object = "kernel",
    variants: object = None,
    world_size: object = None,
    scales: object = "int64",
    threads: object = 1,
    shapes: object = (),
) -> None:
    """Raise :class:`OptionError` for the first option outside what is allowed; ``None`` (or
    the default) for an option a door does not have."""

    if not isinstance(numerics, Numerics) and (not isinstance(numerics, str)
                                               or numerics not in (*NUMERICS_MODES, *KERNELS)):
        raise OptionError("numerics", f"numerics={numerics!r} must be one of "
                          f"{', '.join((*NUMERICS_MODES, *KERNELS))} (or an oracle.Numerics)")
    if kernel is not None and not isinstance(kernel, KernelProfile) and (
        not isinstance(kernel, str) or kernel not in KERNELS
    ):
        raise OptionError("kernel", f"kernel={kernel!r} must be one of {', '.join(KERNELS)} "
                          "(or an oracle.model.kernels.KernelProfile)")
    if domain not in ("kernel", "contract"):
        raise OptionError("domain", f"domain={domain!r} must be 'kernel' (the kernel "
                          "profile's shapes) or 'contract' (every shape the contract allows)")
    if variants is not None and (
        isinstance(variants, str) or not isinstance(variants, (list, tuple))
        or not variants or not all(isinstance(v, str) and v in WEIGHT_VARIANTS for v in variants)
    ):
        raise OptionError("variants", f"variants={variants!r} must be one or more of "
                          f"{', '.join(WEIGHT_VARIANTS)} (comma-separated on the command line)")
    mode = numerics.mode if isinstance(numerics, Numerics) else numerics
    if variants is not None and "w4a8" in variants and mode == "ideal":
        raise OptionError("variants", "w4a8 is judged against a kernel profile only: use "
                          "numerics='faithful' (the ideal judge's bound reads int8 weights)")
    u = _number("ulps", ulps)
    if not (math.isfinite(u) and 0 <= u <= MAX_ULPS):
        raise OptionError("ulps", f"ulps={ulps!r} must be a finite number from 0 to "
                          f"{MAX_ULPS:g} (ulps of the out dtype allowed beyond the kernel "
                          "profile's envelope; 0, the default, allows the envelope only)")
    t = _number("timeout", timeout)
    if not (math.isfinite(t) and 0 < t <= MAX_TIMEOUT):
        raise OptionError("timeout", f"timeout={timeout!r} must be a finite number of seconds "
                          f"> 0 and <= {MAX_TIMEOUT:g} (one call of the implementation)")
    if not isinstance(inputs, str) or inputs not in INPUT_POLICIES:
        raise OptionError("inputs", f"inputs={inputs!r} must be one of "
                          f"{', '.join(INPUT_POLICIES)}")
    _integer("max_examples", max_examples, MAX_EXAMPLES, "examples of the search")
    _integer("world_size", world_size, MAX_EP_SIZE, "ranks, one process each")
    if not isinstance(scales, str) or scales not in SCALE_ENCODINGS:
        raise OptionError("scales", f"scales={scales!r} must be one of "
                          f"{', '.join(SCALE_ENCODINGS)} (how the dequant scales reach the "
                          "implementation: vLLM's int64 bit patterns, or float32)")
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
    ):
        raise OptionError("threads", f"threads={threads!r} must be an integer >= 1 (the "
                          "implementation's OpenMP, BLAS and torch threads in its child "
                          "process), or None to leave them as the environment sets them "
                          "(0 on the command line)")
    if isinstance(shapes, str) or not isinstance(shapes, (list, tuple)) or not set(shapes) <= set(
        MODEL_PRESETS
    ):
        raise OptionError("shapes", f"shapes={shapes!r} must be model-shape presets from "
                          f"{', '.join(MODEL_PRESETS)} (comma-separated on the command line)")
    if profile is not None and (not isinstance(profile, str) or profile not in SETTINGS_PROFILES):
        raise OptionError("profile", f"profile={profile!r} must be one of "
                          f"{', '.join(SETTINGS_PROFILES)}")
    if save_dir is not None:
        _check_save_dir(save_dir)


def _integer(option: str, value: object, most: int, what: str) -> None:
    """``value`` is None (the door's default) or an int in ``1..most``."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or not 1 <= value <= most):
        raise OptionError(option, f"{option}={value!r} must be an integer from 1 to {most} "
                          f"({what})")


def _check_save_dir(value: Any) -> None:
    """The directory must exist and be writable, or be creatable under a writable directory."""
    if not isinstance(value, (str, os.PathLike)):
        raise OptionError("save_dir", f"save_dir={value!r} must be a directory path (or None "
                          "not to save)")
    path = Path(value)
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise OptionError("save_dir", f"save_dir={str(value)!r}: {str(probe)!r} is not a "
                          "directory; pass a writable directory (or None not to save)")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OptionError("save_dir", f"save_dir={str(value)!r}: {str(probe)!r} is not "
                          "writable; pass a writable directory (or None not to save)")
