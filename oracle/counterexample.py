"""Counterexample files: a failing :class:`spec.Problem` (and what the implementation returned)
as one ``.npz`` holding the arrays and a JSON manifest.

Nothing read is trusted: the file is opened with ``allow_pickle=False``, every array is checked
against the manifest (name, dtype from a fixed list, shape), and the problem is rebuilt through
:class:`spec.Problem`'s full validation. A malformed or hostile file raises
:class:`spec.CounterexampleFileError`. bfloat16 arrays are stored as their uint16 bit patterns,
so they round-trip exactly.
"""

from __future__ import annotations

import functools
import json
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spec import DTYPES, OpConfig, Problem, RankInputs, SpecError
from spec.errors import CounterexampleFileError

__all__ = [
    "ALLOWED_DTYPES",
    "FORMAT",
    "Counterexample",
    "arrays_of",
    "encode_arrays",
    "load",
    "parse_header",
    "read_array",
    "save",
]

FORMAT = "dfc-oracle-counterexample"
VERSION = 1
_STORED = {"bfloat16": np.dtype(np.uint16)}  # stored as bit patterns
#: The only dtypes a file may declare.
ALLOWED_DTYPES = ("bfloat16", "float16", "float32", "int8", "int32", "bool")
_RANK_FIELDS = ("x", "expert_idx", "probs", "active_mask")
_LIST_FIELDS = ("w1", "w2", "scale1", "scale2")
_MAX_ELEMENTS = 1 << 31

Array = np.ndarray[Any, Any]


@dataclass(frozen=True)
class Counterexample:
    """What a counterexample file holds."""

    problem: Problem
    outputs: list[tuple[Array, Array]] | None
    meta: dict[str, Any]


def _bad(path: Path, what: str, fix: str = "regenerate the file with dfc-oracle") -> SpecError:
    return CounterexampleFileError(
        field=str(path), given=what, allowed=f"a {FORMAT} file (version {VERSION})", fix=fix
    )


def arrays_of(
    problem: Problem, outputs: list[tuple[Array, Array]] | None = None
) -> dict[str, Array]:
    """Every array of ``problem`` (and ``outputs``) by name: ``r{rank}.{field}`` and
    ``r{rank}.{list}.{index}`` for TensorList entries, as the file stores them."""
    arrays: dict[str, Array] = {}
    for r, inputs in enumerate(problem.ranks):
        for name in _RANK_FIELDS:
            value = getattr(inputs, name)
            if value is not None:
                arrays[f"r{r}.{name}"] = value
        for name in _LIST_FIELDS:
            for i, t in enumerate(getattr(inputs, name) or ()):
                arrays[f"r{r}.{name}.{i}"] = t
        if outputs is not None:
            arrays[f"r{r}.out"], arrays[f"r{r}.expert_token_nums"] = outputs[r]
    return arrays


def encode_arrays(arrays: dict[str, Array]) -> tuple[dict[str, Array], dict[str, Any]]:
    """Arrays as stored in an .npz (bfloat16 as uint16 bit patterns), and the manifest entry
    (dtype and shape) that :func:`read_array` checks each of them against."""
    stored = {k: a.view(_STORED[str(a.dtype)]) if str(a.dtype) in _STORED else a
              for k, a in arrays.items()}
    specs = {k: {"dtype": str(a.dtype), "shape": list(a.shape)} for k, a in arrays.items()}
    return stored, specs


def save(
    path: str | Path,
    problem: Problem,
    *,
    outputs: list[tuple[Array, Array]] | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write ``problem`` (and the implementation's ``outputs``, if any) to ``path`` (.npz).
    ``meta`` holds JSON-serialisable facts (the report, the implementation, numerics)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = arrays_of(problem, outputs)
    stored, specs = encode_arrays(arrays)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "config": asdict(problem.config),
        "arrays": specs,
        "meta": meta or {},
    }
    stored["manifest"] = np.frombuffer(json.dumps(manifest).encode(), dtype=np.uint8)
    with path.open("wb") as f:
        np.savez_compressed(f, **stored)  # type: ignore[arg-type]
    return path


def parse_header(
    raw: bytes, file_format: str, version: int, bad: Callable[..., SpecError]
) -> dict[str, Any]:
    """A JSON manifest of ``file_format`` and ``version``; anything else raises ``bad(given)``
    or ``bad(given, fix)`` (the caller's error, naming its file)."""
    try:
        manifest = json.loads(raw.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"a manifest that is not JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != file_format:
        raise bad("a manifest of another format")
    if manifest.get("version") != version:
        raise bad(f"version {manifest.get('version')!r}", "use a matching dfc-oracle")
    return manifest


def _read_manifest(path: Path, files: Any) -> dict[str, Any]:
    if "manifest" not in files.files:
        raise _bad(path, "no manifest entry")
    try:
        raw = files["manifest"]
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise _bad(path, f"a manifest that cannot be read safely ({exc})") from None
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise _bad(path, f"a manifest of {raw.dtype} {raw.shape}")
    manifest = parse_header(raw.tobytes(), FORMAT, VERSION, functools.partial(_bad, path))
    if not isinstance(manifest.get("arrays"), dict) or not isinstance(manifest.get("config"), dict):
        raise _bad(path, "a manifest without 'arrays' and 'config'")
    return manifest


def read_array(path: Path, files: Any, key: str, spec: object) -> Array:
    """One array of an open .npz, checked against its manifest entry (dtype from a fixed list,
    shape, size) and decoded (bfloat16 from its bit pattern)."""
    if not isinstance(spec, dict) or spec.get("dtype") not in ALLOWED_DTYPES:
        raise _bad(path, f"array {key!r} with a dtype outside {ALLOWED_DTYPES}")
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise _bad(path, f"array {key!r} with shape {shape!r}")
    if int(np.prod(shape, dtype=np.int64)) > _MAX_ELEMENTS:
        raise _bad(path, f"array {key!r} of {shape} elements, more than any call here")
    if key not in files.files:
        raise _bad(path, f"no array {key!r} though the manifest lists it")
    dtype = np.dtype(DTYPES.get(spec["dtype"], spec["dtype"]))
    try:
        stored = files[key]
    except (ValueError, OSError, zipfile.BadZipFile) as exc:  # e.g. a pickled object array
        raise _bad(path, f"array {key!r} that cannot be read safely ({exc})") from None
    if stored.dtype != _STORED.get(spec["dtype"], dtype) or list(stored.shape) != shape:
        raise _bad(path, f"array {key!r} stored as {stored.dtype} {stored.shape}, "
                   f"not {spec['dtype']} {tuple(shape)} as its manifest says")
    return np.asarray(stored.view(dtype))


def load(path: str | Path) -> Counterexample:
    """Read and validate a counterexample file (``allow_pickle=False``)."""
    path = Path(path)
    try:
        files = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise _bad(path, "no such file", "check the path printed by the failing run") from None
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise _bad(path, f"not a readable .npz ({exc})") from None
    if not isinstance(files, np.lib.npyio.NpzFile):
        raise _bad(path, "a single array, not an .npz archive")
    with files:
        manifest = _read_manifest(path, files)
        arrays = {k: read_array(path, files, k, v) for k, v in manifest["arrays"].items()}
    try:
        config = OpConfig(**manifest["config"])
    except (TypeError, SpecError) as exc:
        raise _bad(path, f"an invalid config ({exc})") from None

    def entry(key: str) -> Array | None:
        return arrays.get(key)

    def tensor_list(r: int, name: str) -> list[Array] | None:
        items: list[Array] = []
        while (t := entry(f"r{r}.{name}.{len(items)}")) is not None:
            items.append(t)
        return items or None

    ranks = []
    for r in range(config.ep_size):
        x, idx, probs = entry(f"r{r}.x"), entry(f"r{r}.expert_idx"), entry(f"r{r}.probs")
        w1, w2 = tensor_list(r, "w1"), tensor_list(r, "w2")
        if x is None or idx is None or probs is None or w1 is None or w2 is None:
            raise _bad(path, f"rank {r}'s inputs incomplete (x, expert_idx, probs, w1, w2)")
        ranks.append(RankInputs(x, idx, probs, w1, w2, scale1=tensor_list(r, "scale1"),
                                scale2=tensor_list(r, "scale2"),
                                active_mask=entry(f"r{r}.active_mask")))
    try:
        problem = Problem(ranks, max_output_size=config.max_output_size,
                          swiglu_limit=config.swiglu_limit)
    except SpecError as exc:
        raise _bad(path, f"arrays that fail validation ({exc})") from None
    if problem.config != config:
        raise _bad(path, f"arrays of {problem.config.summary()} under a manifest config "
                   f"{config.summary()}")
    outputs = None
    if entry("r0.out") is not None:
        outputs = []
        for r in range(config.ep_size):
            out, nums = entry(f"r{r}.out"), entry(f"r{r}.expert_token_nums")
            if out is None or nums is None:
                raise _bad(path, f"outputs of rank {r} missing while rank 0 has them")
            outputs.append((out, nums))
    meta = manifest.get("meta")
    return Counterexample(problem, outputs, meta if isinstance(meta, dict) else {})
