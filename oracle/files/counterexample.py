"""Counterexample files: a failing :class:`spec.Problem` (and what the implementation returned)
as one ``.npz`` holding the arrays and a JSON manifest.

Nothing read is trusted (:class:`Archive`): only a regular file is opened (no link, FIFO or
device); member counts and declared sizes are checked before anything is decompressed, every
read is bounded by the size the manifest implies, every array's ``.npy`` header must match its
manifest entry (name, dtype from a fixed list, shape) before its data is read, nothing is
unpickled, and the problem is rebuilt through :class:`spec.Problem`'s full validation. A
malformed or hostile file raises :class:`spec.CounterexampleFileError`, whatever is wrong with
it. bfloat16 arrays are stored as their uint16 bit patterns, so they round-trip exactly.

Version 2 adds the placement record of a placed call (:meth:`spec.placement.PlacedCall.record`:
fields under the manifest's ``placement``, arrays ``placement.*`` and ``shared.*``); the
``problem`` is then the call's mapped-id problem, and the call is rebuilt from both through its
own validation. Version 1 files (no placement) still load; a file without placement is still
written as version 1, so an older dfc-oracle reads it.

Version 3 adds the record of one stage of the modular split (:class:`spec.modular.StageCall`):
fields under the manifest's ``stage_call`` (``stage``, ``layout``, ``max_tokens_per_rank``),
arrays ``stage.r{rank}.x``, ``.source``, ``.counts`` (the received buffers the stage read; none
for a dispatch) and ``stage.r{rank}.routed`` (a placed call's routed slots, when it has them).
The call is rebuilt through its own validation, and its buffers must be the ones the
reference builds for it (:func:`oracle.model.modular.dispatch_reference`: the same sources and
counts; for the experts stage the same rows): a file cannot hand a stage inputs no dispatch
makes. The stage implementation's outputs are not stored (their shapes are the
implementation's); ``replay`` reruns it.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import stat
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

import numpy as np

from oracle.config.options import OptionError, check_options
from oracle.files.atomic import atomic_write
from oracle.model.modular import dispatch_reference
from oracle.model.numerics import Numerics
from spec import DTYPES, MAX_EP_SIZE, OpConfig, Problem, RankInputs, SpecError
from spec.errors import CounterexampleFileError
from spec.fields import ARRAY_FIELDS, FIELDS, LIST_FIELDS
from spec.memory import LAYOUTS, layout_of, with_layout
from spec.modular import Received, StageCall, valid_rows
from spec.placement import PlacedCall, placed_attributes

__all__ = [
    "ALLOWED_DTYPES",
    "FORMAT",
    "Archive",
    "Counterexample",
    "arrays_of",
    "encode_arrays",
    "judged_with",
    "load",
    "load_guarded",
    "open_regular",
    "parse_header",
    "rank_arrays",
    "read_array",
    "save",
]

FORMAT = "dfc-oracle-counterexample"
VERSION = 1
#: The version of a file that holds a placed call (a placement record).
PLACED_VERSION = 2
#: The version of a file that holds one stage's call (a stage record).
STAGE_VERSION = 3
#: The JSON fields of a stage record and what each may hold.
STAGE_FIELDS = ("stage", "layout", "max_tokens_per_rank")
_STORED: dict[str, np.dtype[Any]] = {  # ml_dtypes formats stored as bit patterns
    "bfloat16": np.dtype(np.uint16),
    "float8_e4m3fn": np.dtype(np.uint8), "uint4": np.dtype(np.uint8),
    "float4_e2m1fn": np.dtype(np.uint8)}
#: The only dtypes a file may declare.
#: The spec's dtypes, float32 (scales, probs) and bool (masks): nothing else is read.
ALLOWED_DTYPES = (*DTYPES, "float32", "bool", "int64")  # int64: logical ids, phy2log
_MAX_ELEMENTS = 1 << 31
#: Members of one archive: the manifest, the plain arrays of each rank and its two outputs, and
#: the per-expert TensorLists of up to 4096 experts in all (8x the platform's EP·E <= 512).
MAX_MEMBERS = 1 + (len(ARRAY_FIELDS) + 3) * MAX_EP_SIZE + len(LIST_FIELDS) * 4096 + 1 + (
    4 * MAX_EP_SIZE)  # a stage record's x, source, counts, routed per rank
_MAX_MANIFEST = 16 << 20
_MAX_NPY_HEADER = 1 << 16
_DEFLATE_RATIO = 1100  # deflate cannot expand more than about 1032:1
#: Everything a damaged archive can raise while being read; each becomes a SpecError.
READ_ERRORS = (OSError, EOFError, ValueError, TypeError, KeyError, IndexError, OverflowError,
               MemoryError, RecursionError, NotImplementedError, RuntimeError,
               zipfile.BadZipFile, zlib.error)

Array = np.ndarray[Any, Any]
T = TypeVar("T")


@dataclass(frozen=True)
class Counterexample:
    """What a counterexample file holds."""

    problem: Problem
    outputs: list[tuple[Array, Array]] | None
    meta: dict[str, Any]
    placed: PlacedCall | None = None  # a placed call's whole record (``problem`` its ids mapped)
    stage: StageCall | None = None  # one stage's call (``problem`` its problem; no outputs)

    def judged_with(self) -> tuple[Numerics, float]:
        """The numerics and ``ulps`` the file was judged with (:func:`judged_with`)."""
        return judged_with(self.meta)


def judged_with(meta: dict[str, Any]) -> tuple[Numerics, float]:
    """The numerics (whole profile and switches) and ``ulps`` a counterexample was judged with;
    files written before profiles existed get the defaults of their time (1 ulp). The record's
    ``ulps`` and input-write policy are checked by :func:`oracle.config.options.check_options`, as
    the options of a search are (a file saying ``"ulps": Infinity`` would pass everything). Raises
    SpecError naming the field for a malformed record."""
    ulps = meta.get("ulps", 1.0)
    try:
        check_options(ulps=ulps, inputs=meta.get("inputs", "strict"))
    except OptionError as exc:
        raise SpecError(field=f"manifest.json meta.{exc.option}", given=str(exc)[:200],
                        allowed="the record dfc-oracle writes",
                        fix="regenerate the file with dfc-oracle") from None
    try:
        numerics = Numerics.from_dict(meta.get("numerics", {"mode": "faithful"}))
    except (TypeError, ValueError) as exc:
        raise SpecError(field="manifest.json meta.numerics", given=str(exc)[:200],
                        allowed="the record dfc-oracle writes",
                        fix="regenerate the file with dfc-oracle") from None
    return numerics, float(ulps)


def _bad(path: Path, what: str, fix: str = "regenerate the file with dfc-oracle") -> SpecError:
    return CounterexampleFileError(
        field=str(path), given=what, allowed=f"a {FORMAT} file (version {VERSION}, "
        f"{PLACED_VERSION} with a placement record or {STAGE_VERSION} with a stage record)",
        fix=fix
    )


def arrays_of(
    problem: Problem, outputs: list[tuple[Array, Array]] | None = None
) -> dict[str, Array]:
    """Every array of ``problem`` (and ``outputs``) by name: ``r{rank}.{field}`` and
    ``r{rank}.{list}.{index}`` for TensorList entries, as the file stores them."""
    arrays: dict[str, Array] = {}
    for r, inputs in enumerate(problem.ranks):
        arrays.update((f"r{r}.{name}", a) for name, a in inputs.arrays().items())
        if outputs is not None:
            arrays[f"r{r}.out"], arrays[f"r{r}.expert_token_nums"] = outputs[r]
    return arrays


def rank_arrays(arrays: dict[str, Array], rank: int) -> dict[str, Array]:
    """The arrays of one rank named as :meth:`spec.RankInputs.arrays` names them (the
    ``r{rank}.`` prefix of :func:`arrays_of` removed)."""
    prefix = f"r{rank}."
    return {k[len(prefix):]: a for k, a in arrays.items() if k.startswith(prefix)}


def encode_arrays(arrays: dict[str, Array]) -> tuple[dict[str, Array], dict[str, Any]]:
    """Arrays as stored in an .npz (bfloat16 as uint16 bit patterns), and the manifest entry
    (dtype, shape, and the layout class of a non-contiguous array, :mod:`spec.memory`) that
    :func:`read_array` checks each of them against."""
    stored = {k: a.view(_STORED[str(a.dtype)]) if str(a.dtype) in _STORED else a
              for k, a in arrays.items()}
    specs: dict[str, Any] = {}
    for k, a in arrays.items():
        specs[k] = {"dtype": str(a.dtype), "shape": list(a.shape)}
        if layout_of(a) != "contiguous":
            specs[k]["layout"] = layout_of(a)
    return stored, specs


def save(
    path: str | Path,
    problem: Problem,
    *,
    outputs: list[tuple[Array, Array]] | None = None,
    meta: dict[str, Any] | None = None,
    placed: PlacedCall | None = None,
    stage: StageCall | None = None,
) -> Path:
    """Write ``problem`` (and the implementation's ``outputs``, if any) to ``path`` (.npz),
    atomically (:func:`oracle.files.atomic.atomic_write`: an earlier file of that name stays whole
    if this write fails; a link there is refused, never followed; failures raise
    :class:`oracle.files.atomic.SaveError`). ``meta`` holds JSON-serialisable facts (the report, the
    implementation, numerics). A ``placed`` call is saved whole: ``problem`` must be its
    ``problem``, and its placement record goes with it (version 2); so is a ``stage`` call
    (version 3, without ``outputs``). Returns the absolute path."""
    if placed is not None and stage is not None:
        raise ValueError("a counterexample holds a placed call or a stage call, not both")
    arrays = arrays_of(problem, outputs)
    fields = None
    if placed is not None:
        fields, record = placed.record()
        arrays.update(record)
    if stage is not None:
        arrays.update(_stage_arrays(stage))
    stored, specs = encode_arrays(arrays)
    version = PLACED_VERSION if placed is not None else STAGE_VERSION if stage else VERSION
    manifest = {
        "format": FORMAT,
        "version": version,
        "config": asdict(problem.config),
        "arrays": specs,
        "meta": meta or {},
    }
    if fields is not None:
        manifest["placement"] = fields
    if stage is not None:
        manifest["stage_call"] = {"stage": stage.stage, "layout": stage.layout,
                                  "max_tokens_per_rank": stage.max_tokens_per_rank}
    stored["manifest"] = np.frombuffer(json.dumps(manifest).encode(), dtype=np.uint8)
    return atomic_write(path, lambda f: np.savez_compressed(f, **stored))  # type: ignore[arg-type]


def _stage_arrays(call: StageCall) -> dict[str, Array]:
    """A stage record's arrays (module doc)."""
    arrays: dict[str, Array] = {}
    for r, b in enumerate(call.received):
        arrays.update({f"stage.r{r}.x": b.x, f"stage.r{r}.source": b.source,
                       f"stage.r{r}.counts": b.counts})
    arrays.update((f"stage.r{r}.routed", m) for r, m in enumerate(call.routed))
    return arrays


def open_regular(path: Path, bad: Callable[..., SpecError]) -> IO[bytes]:
    """``path`` opened for reading if it is a regular file; a link, a FIFO, a device or a
    directory raises ``bad(given, fix)`` (reading one could block or never end)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise bad("no such file", "check the path printed by the failing run") from None
    except OSError as exc:
        raise bad(f"a path that cannot be inspected ({exc})", "check the path") from None
    if stat.S_ISLNK(info.st_mode):
        raise bad("a symbolic link", "pass the file itself, not a link to it")
    if not stat.S_ISREG(info.st_mode):
        raise bad("not a regular file (a FIFO, a device or a directory)", "pass the file itself")
    try:
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        fd = os.open(path, flags)
    except OSError as exc:
        raise bad(f"a file that cannot be opened ({exc})", "check the file's permissions") from None
    f = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # replaced between the two looks
        f.close()
        raise bad("not a regular file", "pass the file itself")
    return f


class Archive:
    """An ``.npz`` read without trusting it: members by name (without ``.npy``), each read
    with a bound, arrays decoded only after their ``.npy`` header matched what is expected.
    Every failure raises ``bad(given)``. Use as a context manager."""

    def __init__(self, path: Path, bad: Callable[..., SpecError]) -> None:
        self.path, self._bad = path, bad
        self._file = open_regular(path, bad)
        try:
            size = os.fstat(self._file.fileno()).st_size
            self._zip = zipfile.ZipFile(self._file)
            infos = self._zip.infolist()
            if len(infos) > MAX_MEMBERS:
                raise bad(f"{len(infos)} members, more than any call has ({MAX_MEMBERS})")
            self._members: dict[str, zipfile.ZipInfo] = {}
            for info in infos:
                key = info.filename.removesuffix(".npy")
                if key == info.filename or key in self._members or info.is_dir():
                    raise bad(f"a member {info.filename[:80]!r} that is not one .npy array")
                self._members[key] = info
            declared = sum(i.file_size for i in infos)
            if declared > _DEFLATE_RATIO * size + (1 << 20):
                raise bad(f"members declaring {declared} bytes in a file of {size} bytes")
        except SpecError:
            self._file.close()
            raise
        except READ_ERRORS as exc:
            self._file.seek(0)
            single = self._file.read(6) == b"\x93NUMPY"
            self._file.close()
            if single:
                raise bad("a single array, not an .npz archive") from None
            raise bad(f"not a readable .npz ({type(exc).__name__}: {str(exc)[:200]})") from None

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *exc: object) -> None:
        self._zip.close()
        self._file.close()

    @property
    def files(self) -> list[str]:
        return list(self._members)

    def __contains__(self, key: str) -> bool:
        """Whether member ``key`` exists, in constant time (``key in files.files`` made loading
        quadratic in the member count: 4x the members took 5.5x the time; issue 23)."""
        return key in self._members

    def _read(self, key: str, limit: int) -> bytes:
        info = self._members[key]
        if info.file_size > limit:
            raise self._bad(f"member {key!r} declaring {info.file_size} bytes, more than its "
                            f"manifest entry allows ({limit})")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise self._bad(f"member {key!r} compressed with method {info.compress_type}")
        try:
            with self._zip.open(info) as member:
                data = member.read(limit + 1)
        except READ_ERRORS as exc:
            raise self._bad(f"member {key!r} that cannot be read ({type(exc).__name__}: "
                            f"{str(exc)[:200]})") from None
        if len(data) > limit:
            raise self._bad(f"member {key!r} longer than its manifest entry allows ({limit})")
        return data

    def _npy(self, key: str, limit: int) -> tuple[np.dtype[Any], tuple[int, ...], bool, bytes]:
        """The dtype, shape, Fortran order and data bytes of the .npy member ``key``."""
        raw = self._read(key, limit + _MAX_NPY_HEADER)
        stream = io.BytesIO(raw)
        try:
            version = np.lib.format.read_magic(stream)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f".npy version {version}")
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(stream, max_header_size=_MAX_NPY_HEADER)
        except READ_ERRORS as exc:
            raise self._bad(f"array {key!r} with a damaged .npy header ({type(exc).__name__}: "
                            f"{str(exc)[:200]})") from None
        return dtype, tuple(shape), bool(fortran), raw[stream.tell():]

    def array(self, key: str, dtype: np.dtype[Any], shape: tuple[int, ...]) -> Array:
        """Member ``key`` as an array, which must be ``dtype`` of ``shape`` (read-only)."""
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        got, got_shape, fortran, data = self._npy(key, nbytes)
        if got.hasobject:
            raise self._bad(f"array {key!r} that cannot be read safely (pickled objects)")
        if got != dtype or got_shape != tuple(shape):
            raise self._bad(f"array {key!r} stored as {got} {got_shape}, not {dtype} "
                            f"{tuple(shape)} as its manifest says")
        if len(data) != nbytes:
            raise self._bad(f"array {key!r} with {len(data)} bytes of data, not {nbytes}")
        return np.frombuffer(data, dtype).reshape(shape, order="F" if fortran else "C")

    def manifest(self, key: str) -> bytes:
        """The raw bytes of a JSON manifest stored as a 1-D uint8 array under ``key``."""
        if key not in self._members:
            raise self._bad(f"no {key} entry")
        got, shape, _, data = self._npy(key, _MAX_MANIFEST)
        if got != np.uint8 or len(shape) != 1 or len(data) != shape[0]:
            raise self._bad(f"a {key} entry of {got} {shape}, not a JSON text as uint8")
        return data


def parse_header(
    raw: bytes, file_format: str, version: int | tuple[int, ...], bad: Callable[..., SpecError]
) -> dict[str, Any]:
    """A JSON manifest of ``file_format`` and ``version`` (or one of several); anything else
    raises ``bad(given)`` or ``bad(given, fix)`` (the caller's error, naming its file)."""
    try:
        manifest = json.loads(raw.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"a manifest that is not JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != file_format:
        raise bad("a manifest of another format")
    if manifest.get("version") not in (version if isinstance(version, tuple) else (version,)):
        raise bad(f"version {manifest.get('version')!r}", "use a matching dfc-oracle")
    return manifest


def _read_manifest(path: Path, files: Archive) -> dict[str, Any]:
    manifest = parse_header(files.manifest("manifest"), FORMAT,
                            (VERSION, PLACED_VERSION, STAGE_VERSION),
                            functools.partial(_bad, path))
    for key, version, what in (("placement", PLACED_VERSION, "placement"),
                               ("stage_call", STAGE_VERSION, "stage")):
        if (key in manifest) != (manifest["version"] == version):
            raise _bad(path, f"version {manifest['version']} "
                       f"{'with' if key in manifest else 'without'} a {what} record")
    if not isinstance(manifest.get("arrays"), dict) or not isinstance(manifest.get("config"), dict):
        raise _bad(path, "a manifest without 'arrays' and 'config'")
    return manifest


def read_array(path: Path, files: Archive, key: str, spec: object) -> Array:
    """One array of an open :class:`Archive`, checked against its manifest entry (dtype from a
    fixed list, shape, size) and decoded (bfloat16 from its bit pattern)."""
    if not isinstance(spec, dict) or spec.get("dtype") not in ALLOWED_DTYPES:
        raise _bad(path, f"array {key!r} with a dtype outside {ALLOWED_DTYPES}")
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(
        type(s) is int and 0 <= s <= _MAX_ELEMENTS for s in shape
    ) or len(shape) > 4:
        raise _bad(path, f"array {key!r} with shape {str(shape)[:80]}")
    if math.prod(shape) > _MAX_ELEMENTS:
        raise _bad(path, f"array {key!r} of {shape} elements, more than any call here")
    if key not in files:
        raise _bad(path, f"no array {key!r} though the manifest lists it")
    layout = spec.get("layout", "contiguous")
    if layout not in LAYOUTS:
        raise _bad(path, f"array {key!r} with layout {str(layout)[:40]}, not one of {LAYOUTS}")
    dtype = np.dtype(DTYPES.get(spec["dtype"], spec["dtype"]))
    stored = files.array(key, _STORED.get(spec["dtype"], dtype), tuple(shape)).view(dtype)
    return stored if layout == "contiguous" else with_layout(stored, layout)


def _read_arrays(path: Path, files: Archive, specs: dict[str, Any], meta: str) -> dict[str, Array]:
    """Every array the manifest lists; a member it does not list is a damaged file."""
    unlisted = sorted(set(files.files) - set(specs) - {meta})
    if unlisted:
        raise _bad(path, f"members the manifest does not list ({unlisted[:5]})")
    return {k: read_array(path, files, k, v) for k, v in specs.items()}


def load_guarded(read: Callable[[Path], T], path: Path, bad: Callable[[Path, str], SpecError],
                 what: str) -> T:
    """``read(path)``, with a last net: whatever a damaged ``what`` raises that is not already a
    :class:`SpecError` becomes ``bad``'s error, never a traceback."""
    try:
        return read(path)
    except SpecError:
        raise
    except READ_ERRORS as exc:
        raise bad(path, f"an unreadable {what} ({type(exc).__name__}: {str(exc)[:200]})") from None


def load(path: str | Path) -> Counterexample:
    """Read and validate a counterexample file (see the module docstring)."""
    return load_guarded(_load, Path(path), _bad, "file")


def _load(path: Path) -> Counterexample:
    with Archive(path, functools.partial(_bad, path)) as files:
        manifest = _read_manifest(path, files)
        arrays = _read_arrays(path, files, manifest["arrays"], "manifest")
    try:
        config = OpConfig(**manifest["config"])
    except (TypeError, SpecError) as exc:
        raise _bad(path, f"an invalid config ({exc})") from None

    def entry(key: str) -> Array | None:
        return arrays.get(key)

    ranks = []
    for r in range(config.ep_size):
        given = rank_arrays(arrays, r)
        missing = [f.name for f in FIELDS if f.required
                   and (f.name if not f.tensor_list else f"{f.name}.0") not in given]
        if missing:
            raise _bad(path, f"rank {r}'s inputs incomplete (no {', '.join(missing)})")
        ranks.append(RankInputs.from_arrays(given))
    try:
        problem = Problem(ranks, **config.call_attributes())
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
    placed = _placed(path, problem, manifest.get("placement"), arrays) if (
        "placement" in manifest) else None
    stage = _stage(path, problem, manifest.get("stage_call"), arrays) if (
        "stage_call" in manifest) else None
    if stage is not None and outputs is not None:
        raise _bad(path, "a stage record with fused-call outputs (a stage file stores none)")
    return Counterexample(problem, outputs, meta if isinstance(meta, dict) else {}, placed,
                          stage)


def _stage(path: Path, problem: Problem, fields: object, arrays: dict[str, Array]) -> StageCall:
    """The stage call of a version-3 file, validated as a new call is, its buffers checked
    against the reference's (module doc)."""
    if not isinstance(fields, dict) or set(fields) != set(STAGE_FIELDS):
        raise _bad(path, f"a stage record {str(fields)[:80]}, not the fields {STAGE_FIELDS}")
    stage, layout, most = (fields[k] for k in STAGE_FIELDS)
    if not isinstance(stage, str) or not isinstance(layout, str):
        raise _bad(path, f"a stage record naming stage {stage!r} and layout {layout!r}")
    ep = problem.config.ep_size
    names = ("x", "source", "counts")
    received = tuple(Received(*(arrays[f"stage.r{r}.{n}"] for n in names)) for r in range(ep)
                     if all(f"stage.r{r}.{n}" in arrays for n in names))
    routed = tuple(arrays[f"stage.r{r}.routed"] for r in range(ep)
                   if f"stage.r{r}.routed" in arrays)
    known = {f"stage.r{r}.{n}" for r in range(len(received)) for n in names} | {
        f"stage.r{r}.routed" for r in range(len(routed))}
    stray = sorted(k for k in arrays if k.startswith("stage.") and k not in known)
    if stray:
        raise _bad(path, f"stage arrays the record does not define ({stray[:3]})")
    try:
        call = StageCall(stage=stage, problem=problem, layout=layout, max_tokens_per_rank=most,
                         routed=routed, received=received)
    except SpecError as exc:
        raise _bad(path, f"a stage record that fails validation ({exc})") from None
    if stage != "dispatch" and len(received) != ep:
        raise _bad(path, f"a {stage} record with {len(received)} received buffers, not {ep}")
    for r, (got, want) in enumerate(zip(received, dispatch_reference(call))):
        if [(a.dtype, a.shape) for a in (got.x, got.source, got.counts)] != [
                (a.dtype, a.shape) for a in (want.x, want.source, want.counts)] or (
                not np.array_equal(got.counts, want.counts)):
            raise _bad(path, f"rank {r}'s received buffer of {got.x.dtype} {got.x.shape}, "
                       f"{got.source.dtype} {got.source.shape}, counts {got.counts.tolist()}: "
                       f"not the dispatch of its call ({want.x.dtype} {want.x.shape}, "
                       f"{want.source.dtype} {want.source.shape}, counts "
                       f"{want.counts.tolist()})")
        (x, source, _), (x_w, source_w, _) = (valid_rows(b, layout) for b in (got, want))
        if not np.array_equal(source, source_w) or (
                stage == "experts" and x.tobytes() != x_w.tobytes()):
            raise _bad(path, f"rank {r}'s received rows unlike the dispatch of its call (a "
                       "stage is judged on the reference's buffers)")
    return call


def _placed(path: Path, problem: Problem, fields: object, arrays: dict[str, Array]) -> PlacedCall:
    """The placed call of a version-2 file, validated as a new call is; its mapped ids must be
    the file's."""
    try:
        placed = PlacedCall.from_record(problem.ranks, fields, arrays,
                                        **placed_attributes(problem.config))
    except SpecError as exc:
        raise _bad(path, f"a placement record that fails validation ({exc})") from None
    for r, (mine, theirs) in enumerate(zip(placed.problem.ranks, problem.ranks)):
        if not np.array_equal(mine.expert_idx, theirs.expert_idx):
            raise _bad(path, f"rank {r}'s physical expert ids unlike those its placement "
                       "record chooses")
    return placed
