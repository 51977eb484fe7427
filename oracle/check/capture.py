"""Capture what every rank of a real run saw and produced, and verify it offline.

Inside a real run (any backend, any device), after the operator's call, every rank calls::

    from oracle.check.capture import dump
    dump("capture/step0", rank, inputs, (out, expert_token_nums), world_size=world_size,
         max_output_size=max_output_size)

``inputs`` is a mapping with the torch binding's argument names (``x``, ``weight1``, ``weight2``,
``expert_idx``, ``scale1``, ``scale2``, ``probs`` and optionally ``x_active_mask``), an
:class:`oracle.adapters.torch_io.TorchRankInputs` or a :class:`spec.RankInputs`; tensors or arrays.
Each rank writes ``rank<r>.npz``; rank 0 also writes ``manifest.json``. Then, on any machine::

    dfc-oracle verify capture/step0 [--numerics faithful|ideal]

reassembles the collective call and judges it with :func:`oracle.compare`.

Nothing read is trusted: files are opened with ``allow_pickle=False``, every array is checked
against its rank's manifest, every rank must agree with ``manifest.json`` on the call's
attributes, and the call is rebuilt through :class:`spec.Problem`'s validation. Problems raise
:class:`spec.CounterexampleFileError` (or the :class:`spec.SpecError` that validation names).
Masked tokens' ids are not read, so capturing ``expert_idx`` after the kernel wrote its sentinel
into it (§4 of the reference notes) is fine.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from oracle.adapters.torch_io import TorchRankInputs, from_torch, output_pair
from oracle.files.atomic import atomic_write
from oracle.files.counterexample import (
    ALLOWED_DTYPES,
    Archive,
    encode_arrays,
    load_guarded,
    open_regular,
    parse_header,
    read_array,
)
from oracle.judge.verdict import Verdict, compare
from oracle.model.numerics import Numerics
from spec import MAX_EP_SIZE, CounterexampleFileError, Problem, RankInputs, SpecError
from spec.config import CALL_ATTRIBUTES
from spec.errors import describe
from spec.fields import FIELDS

__all__ = ["FORMAT", "MANIFEST", "Capture", "VerifyReport", "dump", "load", "verify", "verify_main"]

FORMAT = "dfc-oracle-capture"
VERSION = 1
MANIFEST = "manifest.json"
#: Attributes of the call itself; any other keyword of :func:`dump` is free-form context.
#: Call attributes added after format version 1: a capture without one took its default (None).
_LATER_ATTRIBUTES = ("swiglu_alpha", "act_scheme")
_MAX_MANIFEST = 1 << 20
_BINDING_NAMES = tuple(f.binding for f in FIELDS)

Array = np.ndarray[Any, Any]


def _rank_file(directory: Path, rank: int) -> Path:
    return directory / f"rank{rank}.npz"


def _bad(path: Path, given: str, fix: str = "capture the run again with oracle.check.capture.dump",
         rank: int | None = None) -> CounterexampleFileError:
    return CounterexampleFileError(
        rank=rank, field=str(path), given=given,
        allowed=f"a {FORMAT} directory (version {VERSION}): {MANIFEST} and rank<r>.npz per rank",
        fix=fix,
    )


def _rank_inputs(inputs: Any) -> RankInputs:
    if isinstance(inputs, RankInputs):
        return inputs
    if isinstance(inputs, TorchRankInputs):
        return from_torch(inputs)
    if isinstance(inputs, Mapping):
        unknown = sorted(set(inputs) - set(_BINDING_NAMES))
        if unknown:
            raise SpecError(
                field="inputs", given=f"keys {unknown}", allowed=", ".join(_BINDING_NAMES),
                fix="name the tensors as the torch binding does",
            )
        fields: dict[str, Any] = {name: inputs.get(name) for name in _BINDING_NAMES}
        return from_torch(TorchRankInputs(**fields))  # arrays pass through its converters
    raise SpecError(
        field="inputs", given=describe(inputs),
        allowed="a mapping of the binding's argument names, TorchRankInputs or RankInputs",
        fix="pass dict(x=x, weight1=weight1, ...) as given to the operator",
    )


def _arrays(inputs: RankInputs, out: Array, nums: Array) -> dict[str, Array]:
    return {**inputs.arrays(binding=True), "out": out, "expert_token_nums": nums}


def _json_attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in attrs.items():
        if not (value is None or isinstance(value, (bool, int, float, str))):
            raise SpecError(
                field=key, given=describe(value), allowed="None, a bool, int, float or str",
                fix=f"pass {key} as a plain Python value (e.g. int({key}))",
            )
    return dict(sorted(attrs.items()))


def dump(directory: str | Path, rank: int, inputs: Any, outputs: Any, **attrs: Any) -> Path:
    """Write one rank's inputs and outputs of one call; returns the rank's file.

    ``outputs`` is ``(out, expert_token_nums)`` or an object with those attributes. ``attrs``
    must include ``world_size`` unless ``torch.distributed`` is initialised (then its world
    size is used); ``max_output_size``, ``swiglu_limit``, ``swiglu_alpha`` and ``act_scheme`` are
    the call's attributes (default ``None``: no truncation, no clamp, standard SwiGLU, the
    activation quantisation the weights select); anything else
    (step, layer, …) is kept as context. Every rank must pass the same ``attrs``;
    :func:`verify` checks it.
    """
    directory = Path(directory)
    if "world_size" not in attrs:
        import torch.distributed as dist

        if not dist.is_initialized():
            raise SpecError(
                field="world_size", given="nothing", allowed="the number of ranks of the call",
                fix="pass world_size=... (or call dump inside an initialised process group)",
            )
        attrs["world_size"] = dist.get_world_size()
    if isinstance(inputs, TorchRankInputs):
        for name in CALL_ATTRIBUTES:
            attrs.setdefault(name, getattr(inputs, name))
    for name in CALL_ATTRIBUTES:
        attrs.setdefault(name, None)
    meta_attrs = _json_attrs(attrs)
    world_size = meta_attrs["world_size"]
    if not isinstance(rank, int) or not isinstance(world_size, int) or not (
        0 <= rank < world_size <= MAX_EP_SIZE
    ):
        raise SpecError(
            field="rank", given=f"rank {rank!r} of world_size {world_size!r}",
            allowed=f"0 <= rank < world_size <= {MAX_EP_SIZE}",
            fix="pass this process's rank in the EP group and the group's size",
        )
    arrays = _arrays(_rank_inputs(inputs), *output_pair(outputs))
    for key, a in arrays.items():
        # a fused call's arrays: no int64 (the files allow it for placed calls' logical ids)
        allowed = ("int32",) if key == "expert_token_nums" else tuple(
            d for d in ALLOWED_DTYPES if d != "int64")
        if str(a.dtype) not in allowed:
            raise SpecError(
                rank=rank, field=key, given=f"dtype {a.dtype}", allowed=", ".join(allowed),
                fix="pass the tensors the operator saw (expert_token_nums is int32)",
            )
    stored, specs = encode_arrays(arrays)
    meta = {
        "format": FORMAT, "version": VERSION, "rank": rank, "attrs": meta_attrs, "arrays": specs,
    }
    stored["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    directory.mkdir(parents=True, exist_ok=True)
    path = _rank_file(directory, rank)
    atomic_write(path, lambda f: np.savez(f, **stored))  # type: ignore[arg-type]
    if rank == 0:
        manifest = {"format": FORMAT, "version": VERSION, "attrs": meta_attrs}
        atomic_write(directory / MANIFEST, lambda f: f.write(json.dumps(manifest).encode()))
    return path


def _read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    if not directory.is_dir():
        raise _bad(directory, "no such directory", "check the capture directory's path")
    if not os.path.lexists(path):
        raise _bad(path, "no manifest (rank 0 writes it)", "check that rank 0 called dump")
    with open_regular(path, functools.partial(_bad, path)) as f:
        raw = f.read(_MAX_MANIFEST + 1)
    if len(raw) > _MAX_MANIFEST:
        raise _bad(path, f"a manifest of more than {_MAX_MANIFEST} bytes")
    manifest = parse_header(raw, FORMAT, VERSION, functools.partial(_bad, path))
    attrs = manifest.get("attrs")
    if not isinstance(attrs, dict):
        raise _bad(path, "a manifest without attributes")
    world_size = attrs.get("world_size")
    if not isinstance(world_size, int) or not 1 <= world_size <= MAX_EP_SIZE:
        raise _bad(path, f"world_size {world_size!r}", "capture a call of 1..32 ranks")
    for name in CALL_ATTRIBUTES:
        if name not in attrs and name not in _LATER_ATTRIBUTES:
            raise _bad(path, f"no attribute {name!r}")
    return manifest


def _read_rank(directory: Path, rank: int, attrs: dict[str, Any]) -> dict[str, Array]:
    path = _rank_file(directory, rank)
    if not os.path.lexists(path):
        present = sorted(p.name for p in directory.glob("rank*.npz"))[:40]
        raise _bad(path, f"no file for rank {rank} (present: {present})",
                   f"copy every rank's file into {directory} (rank {rank} must call dump)",
                   rank)
    with Archive(path, functools.partial(_bad, path, rank=rank)) as files:
        try:
            meta = json.loads(files.manifest("meta").decode())
        except (ValueError, UnicodeDecodeError, RecursionError):  # not JSON
            meta = None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(
            meta.get("arrays"), dict
        ):
            raise _bad(path, "a meta entry that is not a capture's", rank=rank)
        if meta.get("rank") != rank:
            raise _bad(path, f"the file of rank {meta.get('rank')!r} under rank {rank}'s name",
                       "keep the files' names as dump wrote them", rank)
        if meta.get("attrs") != attrs:
            raise _bad(path, f"attributes {meta.get('attrs')} while {MANIFEST} has {attrs}",
                       "every rank must pass the same attributes to dump (one call, one "
                       "capture directory)", rank)
        unlisted = sorted(set(files.files) - set(meta["arrays"]) - {"meta"})
        if unlisted:
            raise _bad(path, f"members the meta entry does not list ({unlisted[:5]})", rank=rank)
        try:
            return {k: read_array(path, files, k, v) for k, v in meta["arrays"].items()}
        except CounterexampleFileError as exc:
            raise _bad(path, exc.given, rank=rank) from None


@dataclass(frozen=True)
class Capture:
    """A captured call: the problem, each rank's outputs, and the attributes of the capture."""

    problem: Problem
    outputs: list[tuple[Array, Array]]
    attrs: dict[str, Any]


def load(directory: str | Path) -> Capture:
    """Read and validate a capture directory (see the module docstring)."""
    return load_guarded(_load, Path(directory), _bad, "capture")


def _load(directory: Path) -> Capture:
    attrs = _read_manifest(directory)["attrs"]
    world_size = attrs["world_size"]
    extra = sorted(
        p.name for p in directory.glob("rank*.npz")
        if p.name not in {_rank_file(directory, r).name for r in range(world_size)}
    )
    if extra:
        raise _bad(directory, f"files {extra} beyond world_size {world_size}",
                   "capture one call per directory")
    ranks, outputs = [], []
    for r in range(world_size):
        arrays = _read_rank(directory, r, attrs)

        required = [f"{f.binding}.0" if f.tensor_list else f.binding
                    for f in FIELDS if f.required]
        missing = [k for k in (*required, "out", "expert_token_nums") if k not in arrays]
        if missing:
            raise _bad(_rank_file(directory, r), f"no arrays {missing}", rank=r)
        ranks.append(RankInputs.from_arrays(arrays, binding=True))
        outputs.append((arrays["out"], arrays["expert_token_nums"]))
    problem = Problem(ranks, **{name: attrs.get(name) for name in CALL_ATTRIBUTES})
    return Capture(problem, outputs, attrs)


@dataclass(frozen=True)
class VerifyReport:
    """The verdict on a captured call, with what was checked."""

    directory: Path
    problem: Problem
    attrs: dict[str, Any]
    verdict: Verdict
    numerics: str

    @property
    def ok(self) -> bool:
        return self.verdict.ok

    def __str__(self) -> str:
        context = {k: v for k, v in self.attrs.items() if k not in (*CALL_ATTRIBUTES, "world_size")}
        lines = [
            f"capture {self.directory}: {self.problem.config.summary()}"
            + (f" {context}" if context else ""),
            f"numerics {self.numerics}: "
            + ("conforms" if self.ok else f"does not conform (stage '{self.verdict.stage}')"),
        ]
        if not self.ok:
            lines.append(f"what failed: {self.verdict.message}")
        return "\n".join(lines)


def verify(directory: str | Path, *, numerics: str | Numerics = "faithful") -> VerifyReport:
    """Judge a captured call with :func:`oracle.compare`. Raises :class:`spec.SpecError` for an
    invalid capture; a non-conforming kernel is a report with ``ok`` False."""
    capture = load(directory)
    verdict = compare(capture.problem, capture.outputs, numerics=numerics)
    label = numerics if isinstance(numerics, str) else numerics.describe()
    return VerifyReport(Path(directory), capture.problem, capture.attrs, verdict, label)


def verify_main(directory: str | Path, numerics: str | Numerics = "faithful") -> int:
    """``dfc-oracle verify``: print the report; exit 0 (conforms), 1 (does not), 2 (invalid
    capture)."""
    try:
        report = verify(directory, numerics=numerics)
    except SpecError as exc:
        print(f"invalid capture: {exc}")
        return 2
    print(report)
    return 0 if report.ok else 1
