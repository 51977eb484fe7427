"""Run the implementation under test in a child process, so nothing it does can fool the gate.

In process, an implementation that calls ``os._exit(0)`` ends the gate with exit code 0 and no
output (CI passes); a segfault or ``abort()`` ends it without a report; a call that holds the
GIL cannot be timed out. :class:`ChildProcess` imports the implementation by its
``module:function`` name in a child interpreter (start-up paid once, reused across examples) and
talks to it over two pipes of its own (the child's stdout and stderr stay free for the
implementation's prints; their last lines go into reports):

- request: a small JSON header (the config, each array's name, dtype, shape, layout and offset
  in a file both processes map, :class:`_SharedFile`); the parent writes the arrays there, the
  child checks every extent and hands the implementation a :class:`spec.Problem` of views of
  that file, so the parent reads back whatever it wrote into its inputs and judges it itself;
- answer: a JSON header and, for a result, the raw bytes of one ``(out, expert_token_nums)`` pair
  of plain ndarrays per rank. The child converts and checks the implementation's result with the
  judge's :func:`oracle.judge.verdict.structured_outputs` (nothing is pickled); the parent checks
  the header against the shapes and dtypes the contract expects before it reads a byte of payload.

A watchdog kills the child and every process it started (SIGKILL, :func:`kill_tree`) when a
call exceeds the timeout, whatever it holds; a child that ends during a call (any exit code, a
signal) is a failing call with its exit status, the last lines of its stderr and the example;
the next call starts a new child. What the child says can fail a call, never pass one: a
structure verdict it sends is a failure, and the inputs and outputs are judged in the parent.

:func:`plain_outputs` and :class:`InputWatch` are shared with the in-process path of
:mod:`oracle.check.harness`.

The child's thread pools are pinned (``threads``, one by default): the BLAS and OpenMP pools
through their environment variables (:data:`THREAD_VARIABLES`) and torch's with
``torch.set_num_threads`` after the implementation is loaded. A kernel run with torch's full
OpenMP pool on cores the search shares took 66 s to 437 s for one green gate (issue 21);
pinned, the wall time is the kernel's own.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import fcntl
import inspect
import json
import math
import mmap
import os
import select
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import IO, Any

import numpy as np

from oracle.adapters.torch_io import InputsRefused
from oracle.check.loading import ImplLoadError, load_impl
from oracle.files.counterexample import arrays_of, rank_arrays
from oracle.judge.verdict import Verdict, structured_outputs
from spec import DTYPES, OpConfig, Problem, RankInputs
from spec import __file__ as _SPEC_INIT
from spec.fields import LIST_FIELDS
from spec.memory import LAYOUTS, layout_of, with_layout
from spec.placement import PlacedCall, placed_attributes

__all__ = [
    "THREAD_VARIABLES",
    "CallOutcome",
    "ChildProcess",
    "InputWatch",
    "InputWrite",
    "descendants",
    "describe_exception",
    "failure_of",
    "importable_name",
    "kill_tree",
    "plain_outputs",
]

Array = np.ndarray[Any, Any]
_HEAD = 12  # header length (4 bytes) and payload length (8 bytes), big-endian
_MAX_HEADER = 1 << 20
_STDERR_LINES = 20
_END_OF_REQUESTS = 90  # a worker's exit code when the parent closed its requests
#: The environment variables that size the OpenMP and BLAS thread pools a kernel may start.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                    "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")


@dataclass(frozen=True)
class CallOutcome:
    """How one call ended: ``status`` is ``"ok"`` (``outputs`` holds the plain per-rank pairs, or
    the failing :class:`Verdict` of converting them), ``"raised"``, ``"refused"`` (the
    oracle's torch adapter refused the call before entering it: :func:`failure_of`), ``"hung"``
    or ``"crashed"`` (``message`` says how); ``changed`` lists the inputs the implementation
    wrote into."""

    status: str
    message: str = ""
    outputs: list[tuple[Array, Array]] | Verdict | None = None
    changed: tuple[InputWrite, ...] = ()


@dataclass(frozen=True)
class InputWrite:
    """One input the implementation wrote into: ``name`` as
    :func:`oracle.files.counterexample.arrays_of` names it (``r0.expert_idx``); ``detail``, what
    changed in one phrase (field, rank, the first element that is not the operator's write-back, its
    index, old and new value, how many
    elements); ``sentinel``, True when every changed element is a masked token's expert id set to
    the sentinel EP·E: the real operator's documented write-back (§4 of the reference notes)."""

    name: str
    detail: str
    sentinel: bool = False

    def __str__(self) -> str:
        return self.detail

    @classmethod
    def from_wire(cls, value: object) -> tuple[InputWrite, ...]:
        """The TensorList writes a worker reported (a JSON list of objects; anything else is
        none). Only the worker sees Python lists; what it says can fail a call, never pass one:
        none of them is the sentinel write-back."""
        if not isinstance(value, list):
            return ()
        return tuple(cls(str(w.get("name")), str(w.get("detail")))
                     for w in value if isinstance(w, dict))


def describe_exception(exc: BaseException, skip_frames: int = 1) -> str:
    """``Type: message at file:line``, even when the exception's ``__str__`` itself fails. The
    location is the user's own frame: the innermost one in a real file (a frozen dataclass
    raises in generated ``<string>`` code) outside the oracle, ``spec``, the standard library
    and installed packages (NumPy raises in its own files), then outside the oracle and
    ``spec`` only (the user's package may be installed), else the innermost frame."""
    try:
        text = str(exc)
    except BaseException as inner:  # a hostile __str__ must not escape
        text = f"<its __str__ raised {type(inner).__name__}>"
    frames = traceback.extract_tb(exc.__traceback__)[skip_frames:]
    real = [(f, os.path.realpath(f.filename)) for f in frames if not f.filename.startswith("<")]
    mine = [f for f, path in real if not path.startswith(_ORACLE)]
    users = [f for f, path in real if not path.startswith(_ORACLE + _LIBRARIES)]
    chosen = users or mine or frames
    where = f" at {chosen[-1].filename}:{chosen[-1].lineno}" if chosen else ""
    return f"{type(exc).__name__}: {text[:2000]}{where}"


def failure_of(exc: BaseException) -> tuple[str, str]:
    """How a call that raised ``exc`` ended, as :class:`CallOutcome` says it: ``("refused",
    why)`` where the oracle's torch adapter refused the drawn call before entering the
    implementation (:class:`oracle.adapters.torch_io.InputsRefused`), else ``("raised",
    describe_exception(exc))``. Either fails the call."""
    if isinstance(exc, InputsRefused):
        return "refused", str(exc)[:2000]
    return "raised", describe_exception(exc)


def _folder(path: str) -> str:
    return os.path.join(os.path.realpath(path), "")


#: Frames that are not the user's: this package and ``spec``; the standard library and
#: installed packages.
_ORACLE = (_folder(os.path.dirname(os.path.dirname(__file__))),  # the oracle package
           _folder(os.path.dirname(_SPEC_INIT)))
_LIBRARIES = tuple(_folder(sysconfig.get_paths()[k]) for k in ("stdlib", "purelib", "platlib"))


def plain_outputs(problem: Problem, raw: object) -> list[tuple[Array, Array]] | Verdict:
    """The implementation's result as one ``(out, expert_token_nums)`` pair of plain, C-ordered
    ndarrays per rank, or the failing ``ranks``/``structure`` :class:`Verdict`. Never raises: an
    output whose attributes raise, or a tensor that cannot be converted, is a ``structure``
    failure; ndarray subclasses (``numpy.ma`` masked arrays hide NaN from the judge,
    ``np.matrix``) are refused."""
    try:
        checked = structured_outputs(problem, raw)
    except Exception as exc:  # whatever the result's objects raise
        return Verdict(False, "structure", "the outputs cannot be read: "
                       + describe_exception(exc, skip_frames=0), float("inf"))
    if isinstance(checked, Verdict):
        return checked
    plain = []
    for r, pair in enumerate(checked):
        for name, a in zip(("out", "expert_token_nums"), pair):
            if type(a) is not np.ndarray:
                return Verdict(False, "structure", f"rank {r}: {name} is a "
                               f"{type(a).__module__}.{type(a).__qualname__}, an ndarray "
                               "subclass the judge does not read; return a plain ndarray "
                               "(np.asarray, after filling any masked values)", float("inf"), r)
        plain.append((np.ascontiguousarray(pair[0]), np.ascontiguousarray(pair[1])))
    return plain


class InputWatch:
    """What the implementation was handed, to say afterwards what it wrote into: every array
    (by the names of :func:`oracle.files.counterexample.arrays_of`) and every TensorList's entries.
    References and the sentinel EP·E are taken before the call, so a damaged ``Problem``
    cannot hide a write."""

    def __init__(self, given: Problem) -> None:
        self._arrays = arrays_of(given)
        self._sentinel = given.config.num_experts
        self._lists = [
            (f"r{r}.{name}", tensors, list(tensors))
            for r, inputs in enumerate(given.ranks) for name in LIST_FIELDS
            if (tensors := getattr(inputs, name)) is not None
        ]

    def changed(self, originals: dict[str, Array]) -> list[InputWrite]:
        """The arrays that differ from ``originals`` (:func:`written`), and the lists whose
        entries were added, removed or replaced (:meth:`list_writes`)."""
        return written(self._arrays, originals, self._sentinel) + self.list_writes()

    def list_writes(self) -> list[InputWrite]:
        """The TensorLists whose entries were added, removed or replaced (Python objects: only
        the process that ran the implementation can see them)."""
        return [InputWrite(name, f"{name} (entries added, removed or replaced)")
                for name, tensors, entries in self._lists
                if len(tensors) != len(entries)
                or any(a is not b for a, b in zip(tensors, entries))]


def written(handed: dict[str, Array], originals: dict[str, Array],
            sentinel: int) -> list[InputWrite]:
    """The arrays ``handed`` to an implementation (by name) that differ from ``originals``
    bitwise, each as an :class:`InputWrite` (``sentinel``: the call's EP·E)."""
    writes = []
    for name, a in handed.items():
        want = originals[name]
        if a.shape != want.shape or a.dtype != want.dtype:
            writes.append(InputWrite(name, f"{name}: {want.dtype} {list(want.shape)} became "
                                     f"{a.dtype} {list(a.shape)}"))
        elif (differs := _differs(a, want)).any():
            writes.append(_write(name, a, want, differs, originals, sentinel))
    return writes


def _write(name: str, a: Array, want: Array, differs: Array, originals: dict[str, Array],
           sentinel: int) -> InputWrite:
    rank, field = name[1:].split(".", 1)
    why = f"rank {rank}"
    forbidden = differs
    if field == "expert_idx":
        mask = originals.get(f"r{rank}.active_mask")
        masked = np.zeros(len(a), bool) if mask is None else ~mask.astype(bool)
        forbidden = differs & ~(masked[:, None] & (a == sentinel))
    first = tuple(int(i) for i in np.argwhere(forbidden if forbidden.any() else differs)[0])
    if field == "expert_idx":
        token = first[0]
        why += (f", token {token} is active" if not masked[token] else
                f", token {token} is masked: the sentinel EP·E = {sentinel}"
                if a[first] == sentinel else
                f", token {token} is masked but only the sentinel EP·E = {sentinel} "
                "may be written")
    index = ", ".join(map(str, first))
    return InputWrite(name, f"{name}[{index}]: {want[first]} -> {a[first]} ({why}; "
                      f"{int(differs.sum())} of {a.size} elements written)",
                      sentinel=not forbidden.any())


def _differs(a: Array, want: Array) -> Array:
    """Elementwise ``a`` is not bit-for-bit ``want`` (same shape and dtype): a write of -0.0
    over 0.0 counts, an untouched NaN does not."""
    bits = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}.get(a.dtype.itemsize)
    if bits is None:
        return np.asarray(a != want, bool)
    differs: Array = np.ascontiguousarray(a).view(bits) != np.ascontiguousarray(want).view(bits)
    return differs


def importable_name(fn: Callable[..., Any]) -> str | None:
    """``module:qualname`` when importing that name gives ``fn`` back (so a child process can
    load it), else None (a lambda, a closure, a function of ``__main__``)."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if not module or not qualname or module == "__main__" or "<" in qualname:
        return None
    target: Any = sys.modules.get(module)
    for part in qualname.split("."):
        target = getattr(target, part, None)
    return f"{module}:{qualname}" if target is fn else None


def check_signature(fn: Callable[..., Any], name: str) -> None:
    """An implementation must accept one positional argument (the :class:`spec.Problem`)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # builtins and C extensions without a signature: judged by their calls
    try:
        sig.bind(None)
    except TypeError as exc:
        raise ImplLoadError(f"{name} must take one argument, the problem (impl(problem)); its "
                            f"signature is {sig} ({exc})") from None


# ---------------------------------------------------------------------------------------------
# Wire format: header length, payload length, JSON header, raw array bytes.


def _declare(name: str, a: Array) -> list[Any]:
    """How a request declares one array: name, dtype, shape, layout class (:mod:`spec.memory`);
    its bytes are its values in C order."""
    return [name, str(a.dtype), list(a.shape), layout_of(a)]


def _encode(header: dict[str, Any], arrays: list[tuple[str, Array]]) -> list[bytes | memoryview]:
    header = {**header, "arrays": [_declare(k, a) for k, a in arrays]}
    head = json.dumps(header).encode()
    chunks = [np.ascontiguousarray(a) for _, a in arrays]
    size = sum(c.nbytes for c in chunks)
    return [len(head).to_bytes(4, "big") + size.to_bytes(8, "big"), head,
            *(c.reshape(-1).view(np.uint8).data for c in chunks if c.nbytes)]


def _declared(spec: object) -> tuple[str, np.dtype[Any], list[int], str, int]:
    """Name, dtype, shape, layout and element count of a declaration (:func:`_declare`); one
    that is not a plain array's is a ValueError."""
    if not isinstance(spec, list) or len(spec) != 4:
        raise ValueError(f"not an array declaration: {str(spec)[:100]}")
    name, dtype_name, shape, layout = spec
    dtype = DTYPES.get(dtype_name) or np.dtype(dtype_name)
    if (dtype.hasobject or not isinstance(shape, list)
            or not all(isinstance(s, int) and s >= 0 for s in shape) or layout not in LAYOUTS):
        raise ValueError(f"array {name!r}: {dtype_name} {shape} {layout}")
    return str(name), dtype, shape, layout, int(np.prod(shape, dtype=np.int64))


def _view(buffer: Any, declared: tuple[str, np.dtype[Any], list[int], str, int],
          offset: int) -> tuple[str, Array]:
    """The declared array whose values start at ``offset`` of ``buffer``, read-only, in its
    layout."""
    name, dtype, shape, layout, count = declared
    values = np.frombuffer(buffer, dtype, count, offset).reshape(shape)
    if layout != "contiguous":
        values = with_layout(values, layout)
        values.flags.writeable = False
    return name, values


def _decode_arrays(specs: object, payload: bytes) -> list[tuple[str, Array]]:
    """Arrays of ``payload`` as declared by ``specs``, each read-only in its declared layout
    (:mod:`spec.memory`); a declaration that does not account for the payload exactly is a
    ValueError."""
    if not isinstance(specs, list):
        raise ValueError("no array list")
    arrays, offset = [], 0
    for spec in specs:
        declared = _declared(spec)
        end = offset + declared[4] * declared[1].itemsize
        if end > len(payload):
            raise ValueError(f"array {declared[0]!r} beyond the payload")
        arrays.append(_view(payload, declared, offset))
        offset = end
    if offset != len(payload):
        raise ValueError("payload longer than its arrays")
    return arrays


def _read_exact(fd: int, n: int, deadline: float | None) -> bytes | None:
    """``n`` bytes from ``fd``; None at end of file; TimeoutError past ``deadline``."""
    parts, left = [], n
    while left:
        if deadline is not None:
            wait = deadline - time.monotonic()
            if wait <= 0 or not select.select([fd], [], [], wait)[0]:
                raise TimeoutError
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            return None
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def _write_all(fd: int, chunks: list[bytes | memoryview], deadline: float | None) -> None:
    for chunk in chunks:
        view = memoryview(chunk)
        while view:
            if deadline is not None:
                wait = deadline - time.monotonic()
                if wait <= 0 or not select.select([], [fd], [], wait)[1]:
                    raise TimeoutError
            view = view[os.write(fd, view):]


def _read_message(
    fd: int, deadline: float | None, max_payload: int
) -> tuple[dict[str, Any], bytes] | None:
    head = _read_exact(fd, _HEAD, deadline)
    if head is None:
        return None
    n_head, n_payload = int.from_bytes(head[:4], "big"), int.from_bytes(head[4:], "big")
    if n_head > _MAX_HEADER or n_payload > max_payload:
        raise ValueError(f"a message of {n_head} + {n_payload} bytes, more than expected")
    raw = _read_exact(fd, n_head, deadline)
    payload = _read_exact(fd, n_payload, deadline) if n_payload else b""
    if raw is None or payload is None:
        return None
    header = json.loads(raw.decode())
    if not isinstance(header, dict):
        raise ValueError("a header that is not a JSON object")
    return header, payload


def _image_shape(shape: list[int], layout: str) -> list[int]:
    """The C-ordered shape of the memory an array of ``shape`` in ``layout`` occupies
    (:mod:`spec.memory`: a Fortran array's transpose; a strided one's buffer twice as wide; an
    empty or 0-d array is contiguous whatever its declaration says)."""
    if layout == "contiguous" or not shape or 0 in shape:
        return shape
    return shape[::-1] if layout == "fortran" else [*shape[:-1], 2 * shape[-1]]


def _in_layout(image: Array, shape: list[int], layout: str) -> Array:
    """The array of ``shape`` in ``layout`` whose memory is ``image`` (a view, never a copy)."""
    if layout == "contiguous" or not shape or 0 in shape:
        return image.reshape(shape)
    return image.T if layout == "fortran" else image[..., ::2]


class _SharedFile:
    """A file both processes map, holding a request's input arrays in their memory layouts.

    The parent writes the arrays into it; the worker hands the implementation views of it (no
    copy): what the implementation writes into its inputs lands in the file, and the parent
    reads it back after the call and decides the ``inputs`` verdict itself (issue 23: decided in
    the worker, a patched oracle there let an implementation that zeroes ``x`` pass
    ``--inputs strict``). On Linux it is a memfd sealed against shrinking, so the worker cannot
    cut the parent's mapping short (a SIGBUS in the parent); the parent maps only the bytes it
    wrote, and the worker checks every declared extent against the file's size."""

    def __init__(self, fd: int, *, owner: bool) -> None:
        self.fd, self._owner = fd, owner
        self._map: mmap.mmap | None = None

    @classmethod
    def create(cls) -> _SharedFile:
        try:
            fd = os.memfd_create("dfc-oracle-arrays", os.MFD_ALLOW_SEALING)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
        except (AttributeError, OSError):  # not Linux: an unlinked temporary file
            with tempfile.TemporaryFile() as f:
                fd = os.dup(f.fileno())
        return cls(fd, owner=True)

    def _mapped(self, size: int) -> mmap.mmap:
        if self._map is None or len(self._map) < size:
            if self._owner:  # the parent grows the file (geometrically) and maps what it made
                length = max(size, 2 * len(self._map)) if self._map is not None else size
                if os.fstat(self.fd).st_size < length:
                    os.ftruncate(self.fd, length)
            else:
                length = os.fstat(self.fd).st_size
                if length < size:
                    raise ValueError(f"shared arrays up to byte {size}, beyond the file's "
                                     f"{length}")
            # A new map; the old one closes when the arrays viewing it are gone.
            self._map = mmap.mmap(self.fd, length, access=mmap.ACCESS_WRITE)
        return self._map

    def put(self, arrays: list[tuple[str, Array]]) -> list[list[Any]]:
        """Write ``arrays`` one after the other (64-byte aligned), each in its layout; their
        declarations (:func:`_declare`), each with its offset."""
        specs: list[list[Any]] = []
        offset = 0
        for name, a in arrays:
            specs.append([*_declare(name, a), offset])
            offset += -(-math.prod(_image_shape(list(a.shape), layout_of(a))) * a.itemsize
                        // 64) * 64
        for (_, a), (_, view) in zip(arrays, self.get(specs) if offset else []):
            view[...] = a
        return specs

    def get(self, specs: object) -> list[tuple[str, Array]]:
        """The arrays ``specs`` declares, writable views of the file in their layouts; a
        declaration that is not an array inside the file is a ValueError."""
        if not isinstance(specs, list):
            raise ValueError("no shared array list")
        placed = []
        for spec in specs:
            if not isinstance(spec, list) or not spec:
                raise ValueError(f"not a shared array declaration: {str(spec)[:100]}")
            declared, offset = _declared(spec[:-1]), spec[-1]
            if not isinstance(offset, int) or offset < 0:
                raise ValueError(f"shared array {declared[0]!r} at offset {offset!r}")
            image = _image_shape(declared[2], declared[3])
            placed.append((declared, offset, image, math.prod(image) * declared[1].itemsize))
        end = max((o + n for _, o, _, n in placed), default=0)
        if not end:
            return [(d[0], np.zeros(d[2], d[1])) for d, *_ in placed]
        source = self._mapped(end)
        return [(d[0], _in_layout(np.frombuffer(source, d[1], n // d[1].itemsize, o)
                                  .reshape(image), d[2], d[3]))
                for d, o, image, n in placed]

    def close(self) -> None:
        self._map = None
        os.close(self.fd)


# ---------------------------------------------------------------------------------------------
# The child.


def _problem_from(header: dict[str, Any], shared: _SharedFile) -> Problem | PlacedCall:
    """The implementation's problem, or placed call when the header carries a placement
    record: views of the shared file (:class:`_SharedFile`), so that the parent sees every
    write into them."""
    handed = dict(shared.get(header.get("shared", [])))
    fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v
                              for k, v in header["config"].items()}
    config = OpConfig(**fields)
    ranks = [RankInputs.from_arrays(rank_arrays(handed, r)).map_arrays(lambda a: a, lists=True)
             for r in range(config.ep_size)]
    if "placement" in header:
        return PlacedCall.from_record(ranks, header["placement"], handed,
                                      **placed_attributes(config))
    return Problem.from_validated(ranks, config)


def _serve(impl: Callable[..., Any], rfd: int, wfd: int, shared: _SharedFile) -> None:
    while (message := _read_message(rfd, None, 1 << 62)) is not None:
        given = _problem_from(message[0], shared)
        problem = given.problem if isinstance(given, PlacedCall) else given
        shell = Problem.from_validated(problem.ranks, problem.config)  # what the judge reads
        watch = InputWatch(problem)
        saved = np.geterr()
        arrays: list[tuple[str, Array]] = []
        try:
            result: Any = impl(given)
        except BaseException as exc:  # SystemExit and KeyboardInterrupt too
            status, why = failure_of(exc)
            answer: dict[str, Any] = {"status": status, "message": why}
        else:
            np.seterr(**saved)  # an implementation's np.seterr(all="raise") stays its own
            outputs = plain_outputs(shell, result)
            if isinstance(outputs, Verdict):
                answer = {"status": "verdict", "stage": outputs.stage,
                          "message": outputs.message, "rank": outputs.rank}
            else:
                answer = {"status": "ok"}
                arrays = [(f"r{r}.{k}", a) for r, pair in enumerate(outputs)
                          for k, a in zip(("out", "expert_token_nums"), pair)]
        finally:
            np.seterr(**saved)
        # Only what the parent cannot see: TensorList entries replaced (Python objects). The
        # arrays' writes the parent reads from the shared file itself.
        answer["lists"] = [asdict(w) for w in watch.list_writes()]
        _write_all(wfd, _encode(answer, arrays), None)


def _threads() -> int:
    """This process's threads: every OS thread where the system lists them (Linux), else the
    Python threads."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


def _serve_and_exit(impl: Callable[..., Any], rfd: int, wfd: int, shared: _SharedFile) -> None:
    try:
        _serve(impl, rfd, wfd, shared)
    except BaseException:  # the parent reports the exit code and stderr
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(3)
    os._exit(_END_OF_REQUESTS)


def child_main(name: str, rfd: int, wfd: int, shared_fd: int, pinned: int = 0) -> None:
    """The child's entry point: load ``name``, pin torch's threads to ``pinned`` (0: leave
    them), say so, answer requests until end of file; then leave with ``os._exit`` so that
    threads the implementation left behind cannot keep it."""
    _become_subreaper()  # before the implementation runs a line
    shared = _SharedFile(shared_fd, owner=False)
    threads = _threads()
    try:
        impl = load_impl(name)
        check_signature(impl, name)
    except ImplLoadError as exc:
        _write_all(wfd, _encode({"status": "load_error", "message": str(exc)}, []), None)
        os._exit(0)
    if pinned and "torch" in sys.modules:  # the environment pins OpenMP; torch also reads this
        sys.modules["torch"].set_num_threads(pinned)
    _write_all(wfd, _encode({"status": "ready"}, []), None)
    if _threads() > threads:
        # Loading started threads (torch's OpenMP pool after a tensor operation at import, or
        # the module's own): a fork copies none of them, and a forked worker that waits for one
        # hangs (measured: torch's first product in such a fork never returns). Serve here; a
        # crash then costs the parent a new child (an interpreter start and the imports).
        _serve_and_exit(impl, rfd, wfd, shared)
    # This process stays a loaded template: each worker is a fork of it, so a crash costs a
    # fork (milliseconds) instead of an interpreter start and imports (about 1 s), and the
    # search can shrink a crashing example like any other failure.
    while True:
        pid = os.fork()
        if pid == 0:
            _serve_and_exit(impl, rfd, wfd, shared)
        while (ended := os.waitpid(-1, 0))[0] != pid:  # orphans we reap are zombies no more
            pass
        code = os.waitstatus_to_exitcode(ended[1])
        if code == _END_OF_REQUESTS:
            os._exit(0)
        _write_all(wfd, _encode({"status": "died", "returncode": code}, []), None)


# ---------------------------------------------------------------------------------------------
# Killing every process an implementation started.
#
# The template is a child subreaper (Linux prctl PR_SET_CHILD_SUBREAPER): a process the
# implementation starts stays its descendant whatever it does (os.setsid() leaves the process
# group, a daemon's double fork orphans the grandchild: both once escaped a killpg), so the
# parent finds every one by walking /proc from the template, stops them (a stopped process
# cannot fork), walks again until nothing new appears, and only then kills them all.

_PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>


def _become_subreaper() -> None:
    """Make this process the reaper of its orphaned descendants (Linux; elsewhere a no-op)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """State letter, parent pid and process group of ``pid`` from /proc, or None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0].decode(), int(fields[1]), int(fields[2])


def descendants(root: int) -> list[int]:
    """Every process below ``root`` (Linux /proc; elsewhere none are found), parents first."""
    try:
        pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return []
    children: dict[int, list[int]] = {}
    for pid in pids:
        if (stat := _proc_stat(pid)) is not None:
            children.setdefault(stat[1], []).append(pid)
    found, queue = [], [root]
    while queue:
        for child in children.get(queue.pop(0), ()):
            found.append(child)
            queue.append(child)
    return found


def _alive(pid: int) -> bool:
    stat = _proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def kill_tree(root: int) -> tuple[list[int], list[int]]:
    """SIGKILL ``root``, its process group and every descendant (:func:`descendants`):
    ``(the descendants that had left root's process group, those still alive a second
    later)``."""
    seen: list[int] = []
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(root, signal.SIGSTOP)  # the template forks no new worker meanwhile
    for _ in range(100):  # each round stops what the last one found; stopped, none can fork
        new = [p for p in descendants(root) if p not in seen]
        if not new:
            break
        for pid in new:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGSTOP)
        seen += new
    escaped = [p for p in seen if (stat := _proc_stat(p)) is not None and stat[2] != root]
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(root, signal.SIGKILL)
    for pid in [root, *seen]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 1.0
    while (left := [p for p in seen if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.01)
    return escaped, left


# ---------------------------------------------------------------------------------------------
# The parent.


def _how_it_ended(returncode: object) -> str:
    if not isinstance(returncode, int):
        return "stopped answering"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return (f"exited with code {returncode} without returning a result (os._exit, a C-level "
            "exit, or an error before the result could be sent)")


class ChildProcess:
    """The implementation ``name`` (``module:function``) in a child process, reused across calls
    and restarted after a crash or a timeout. Use as a context manager, or call :meth:`close`.

    :meth:`start` raises :class:`oracle.check.loading.ImplLoadError` when the child cannot load the
    implementation (the message says why, with its exit status and stderr if it died).
    """

    def __init__(self, name: str, *, start_timeout: float = 120.0,
                 threads: int | None = 1) -> None:
        self.name = name
        #: Threads of the child's OpenMP, BLAS and torch pools (None: as the environment says).
        self.threads = threads
        self.start_timeout = start_timeout
        self._shared: _SharedFile | None = None
        self.starts = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._rfd = self._wfd = -1
        self._stderr: collections.deque[str] = collections.deque(maxlen=_STDERR_LINES)
        self._drain: threading.Thread | None = None
        #: Called before every call (the CLI counts calls with it).
        self.on_call: Callable[[], None] | None = None

    def __enter__(self) -> ChildProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def start(self) -> None:
        """Start the child unless it is running; wait until it has loaded the implementation."""
        if self.alive:
            return
        self._reap()
        req_r, req_w = os.pipe()
        ans_r, ans_w = os.pipe()
        for fd in (req_w, ans_w):  # Linux: fewer round trips for megabytes of weights
            with contextlib.suppress(OSError, AttributeError):
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, 1 << 20)
        path = [p for p in sys.path if p]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
        if self.threads is not None:
            env.update(dict.fromkeys(THREAD_VARIABLES, str(self.threads)))
        code = ("import sys; from oracle.check.isolation import child_main; "
                "child_main(sys.argv[1], *map(int, sys.argv[2:]))")
        self._shared = _SharedFile.create()
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", code, self.name, str(req_r), str(ans_w),
                 str(self._shared.fd), str(self.threads or 0)],
                pass_fds=(req_r, ans_w, self._shared.fd), stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd(),
                start_new_session=True,
            )
        finally:
            os.close(req_r)
            os.close(ans_w)
        self._rfd, self._wfd = ans_r, req_w
        self.starts += 1
        self._stderr = collections.deque(maxlen=_STDERR_LINES)
        assert self._proc.stdout is not None
        self._drain = threading.Thread(target=_drain, args=(self._proc.stdout, self._stderr),
                                       name="dfc-oracle-child-stderr", daemon=True)
        self._drain.start()
        try:
            message = _read_message(self._rfd, time.monotonic() + self.start_timeout, 0)
        except TimeoutError:
            self._kill()
            raise ImplLoadError(f"{self.name}: the child process did not load it within "
                                f"{self.start_timeout:g} s{self._tail()}") from None
        except ValueError as exc:
            self._kill()
            raise ImplLoadError(f"{self.name}: the child process answered garbage ({exc})"
                                f"{self._tail()}") from None
        if message is None:
            self._reap()
            raise ImplLoadError(f"{self.name}: the child process loading it "
                                f"{_how_it_ended(self._returncode())}{self._tail()}")
        header, _ = message
        if header.get("status") == "load_error":
            self._reap()
            raise ImplLoadError(str(header.get("message")))
        if header.get("status") != "ready":
            self._kill()
            raise ImplLoadError(f"{self.name}: unexpected answer {header!r} from the child")

    def call(self, given: Problem | PlacedCall, timeout: float) -> CallOutcome:
        """Run the implementation once on (a copy of) ``given``, a problem or a placed call
        (sent with its placement record); never raises for what the implementation does."""
        if self.on_call is not None:
            self.on_call()
        if not self.alive:
            self._reap()
            try:
                self.start()
            except ImplLoadError as exc:
                return CallOutcome("crashed", f"the implementation's process could not be "
                                   f"restarted: {exc}")
        problem = given.problem if isinstance(given, PlacedCall) else given
        cfg = problem.config
        originals = arrays_of(problem)
        header: dict[str, Any] = {"config": asdict(cfg)}
        sent = dict(originals)
        if isinstance(given, PlacedCall):
            header["placement"], record = given.record()
            sent.update(record)  # read-only copies in the child's call: not inputs it can write
        assert self._shared is not None
        shared = self._shared.put(list(sent.items()))
        request = _encode({**header, "shared": shared}, [])
        expected = [(f"r{r}.{k}", dtype, shape, "contiguous") for r in range(cfg.ep_size)
                    for k, dtype, shape in
                    (("out", cfg.x_dtype, [cfg.tokens_per_rank[r], cfg.hidden]),
                     ("expert_token_nums", "int32", [cfg.experts_per_rank]))]
        max_payload = sum(int(np.prod(s)) * DTYPES.get(d, np.dtype(d)).itemsize
                          for _, d, s, _ in expected)
        deadline = time.monotonic() + timeout
        self._stderr.clear()
        try:
            _write_all(self._wfd, request, deadline)
            message = _read_message(self._rfd, deadline, max_payload)
        except TimeoutError:
            killed = self._kill()
            return CallOutcome("hung", f"no result after {timeout:g} s (hung, or far too slow); "
                               f"{killed}{self._tail()}")
        except (BrokenPipeError, ConnectionResetError):
            message = None
        except (ValueError, UnicodeDecodeError) as exc:
            self._kill()
            return CallOutcome("crashed", f"its process sent an unreadable answer ({exc})")
        if message is None:
            self._reap()
            return CallOutcome("crashed", f"its process {_how_it_ended(self._returncode())} "
                               f"during the call{self._tail()}")
        if message[0].get("status") == "died":
            code = message[0].get("returncode")
            return CallOutcome("crashed", f"its process {_how_it_ended(code)} during the call"
                               f"{self._tail()}")
        # Decided here, from the shared file the implementation's inputs live in: nothing the
        # worker says about its arrays is trusted.
        assert self._shared is not None
        handed = {k: a for k, a in self._shared.get(shared) if k in originals}
        writes = written(handed, originals, cfg.num_experts)
        return self._outcome(*message, expected, tuple(writes))

    def _outcome(self, header: dict[str, Any], payload: bytes,
                 expected: list[tuple[str, str, list[int], str]],
                 writes: tuple[InputWrite, ...]) -> CallOutcome:
        changed = writes + InputWrite.from_wire(header.get("lists"))
        status = header.get("status")
        if status in ("raised", "refused"):
            return CallOutcome(status, str(header.get("message")), changed=changed)
        if status == "verdict":
            stage = header.get("stage")
            rank = header.get("rank")
            verdict = Verdict(False, stage if stage in ("ranks", "structure") else "structure",
                              str(header.get("message")), float("inf"),
                              rank if isinstance(rank, int) else None)
            return CallOutcome("ok", outputs=verdict, changed=changed)
        if status != "ok" or [list(a) for a in header.get("arrays", ())] != [
            list(e) for e in expected
        ]:
            self._kill()
            return CallOutcome("crashed", "its process sent an answer that does not match the "
                               f"contract's shapes: {str(header)[:500]}")
        try:
            arrays = dict(_decode_arrays(header["arrays"], payload))
        except (ValueError, TypeError) as exc:
            self._kill()
            return CallOutcome("crashed", f"its process sent an unreadable answer ({exc})")
        pairs = [(arrays[f"r{r}.out"], arrays[f"r{r}.expert_token_nums"])
                 for r in range(len(expected) // 2)]
        return CallOutcome("ok", outputs=pairs, changed=changed)

    def close(self) -> None:
        """Stop the child and every process it started (SIGKILL): a daemon the implementation
        left running must not outlive the search. Killed before the template could leave on
        end of file, which would orphan them beyond our reach."""
        self._kill()

    def _kill(self) -> str:
        """SIGKILL the template, its worker and every process they started (:func:`kill_tree`),
        whatever they hold; what happened, in words."""
        if self._proc is None:
            return "its process had already ended"
        escaped, left = ([], []) if self._proc.poll() is not None else kill_tree(self._proc.pid)
        self._reap()
        what = "its process was killed (SIGKILL)"
        if escaped:
            what += (f", with {len(escaped)} process(es) it started that had left its process "
                     "group (os.setsid, a daemon)")
        if left:
            what += (f"; {len(left)} of them still run (pids {left[:10]}): kill them "
                     "yourself")
        return what

    def _returncode(self) -> int | None:
        return None if self._proc is None else self._proc.returncode

    def _reap(self) -> None:
        """Wait for a finished (or killed) child, collect its stderr, close our pipe ends and
        the shared file."""
        if self._proc is not None:
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                kill_tree(self._proc.pid)
                self._proc.wait()
        if self._drain is not None:
            self._drain.join(timeout=1)
        for fd in (self._rfd, self._wfd):
            if fd >= 0:
                os.close(fd)
        self._rfd = self._wfd = -1
        if self._shared is not None:
            self._shared.close()
            self._shared = None

    def _tail(self) -> str:
        if self._drain is not None and self._proc is not None and self._proc.poll() is not None:
            self._drain.join(timeout=1)
        elif self._proc is not None and self._proc.stdout is not None:
            # A worker died: let the drain thread catch up with what it wrote before dying.
            for _ in range(20):
                if not select.select([self._proc.stdout], [], [], 0)[0]:
                    break
                time.sleep(0.005)
            time.sleep(0.002)
        lines = list(self._stderr)
        if not lines:
            return ""
        return "; last lines of its stderr:\n    " + "\n    ".join(lines)

    def __del__(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            kill_tree(self._proc.pid)


def _drain(stream: IO[bytes], lines: collections.deque[str]) -> None:
    """Keep the last lines of the child's stdout and stderr (so the pipe never fills)."""
    for raw in iter(lambda: stream.readline(4096), b""):
        text = raw.decode(errors="replace").rstrip()
        if text:
            lines.append(text[:400])
    stream.close()
