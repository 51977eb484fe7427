"""Damaged or hostile counterexample and capture files end in a SpecError (exit 2), never in a
traceback, unbounded memory or a read that never ends."""

from __future__ import annotations

import contextlib
import io
import os
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import oracle
from oracle.check import capture
from oracle.cli import main
from oracle.files import counterexample
from spec import OpConfig, SpecError, random_problem

PROBLEM = random_problem(OpConfig(ep_size=2, experts_per_rank=2, top_k=2, hidden=16,
                                  intermediate=8, tokens_per_rank=(2, 1), masked=True), seed=3)
OUTPUTS = [(r.out, r.expert_token_nums) for r in oracle.run(PROBLEM).ranks]
FUZZ = settings(max_examples=150, derandomize=True, database=None, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[str, bytes]:
    root = tmp_path_factory.mktemp("originals")
    saved = counterexample.save(root / "ce.npz", PROBLEM, outputs=OUTPUTS, meta={"stage": "out"})
    for r, (inputs, out) in enumerate(zip(PROBLEM.ranks, OUTPUTS)):
        capture.dump(root / "cap", r, inputs, out, world_size=2)
    return {"ce": saved.read_bytes(), "rank0": (root / "cap" / "rank0.npz").read_bytes(),
            "rank1": (root / "cap" / "rank1.npz").read_bytes(),
            "manifest": (root / "cap" / "manifest.json").read_bytes()}


@st.composite
def corruptions(draw, data: bytes) -> bytes:
    """``data`` with a few byte flips, a truncation, an insertion or a deletion."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(("flip", "flip", "truncate", "insert", "delete")))
        at = draw(st.integers(0, max(len(out) - 1, 0)))
        if kind == "flip" and out:
            out[at] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del out[at:]
        elif kind == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            del out[at:at + draw(st.integers(1, 64))]
    return bytes(out)


def _loads_or_spec_error(load, path: Path) -> None:
    with contextlib.suppress(SpecError):
        load(path)


@FUZZ
@given(data=st.data())
def test_corrupted_counterexample_files_are_spec_errors(originals, tmp_path, data) -> None:
    path = tmp_path / "ce.npz"
    path.write_bytes(data.draw(corruptions(originals["ce"])))
    _loads_or_spec_error(counterexample.load, path)


@FUZZ
@given(data=st.data(), which=st.sampled_from(("rank0", "rank1", "manifest")))
def test_corrupted_capture_files_are_spec_errors(originals, tmp_path, data, which) -> None:
    directory = tmp_path / "cap"
    directory.mkdir(exist_ok=True)
    for name, suffix in (("rank0", ".npz"), ("rank1", ".npz"), ("manifest", ".json")):
        raw = originals[name] if name != which else data.draw(corruptions(originals[name]))
        (directory / f"{name}{suffix}").write_bytes(raw)
    _loads_or_spec_error(capture.load, directory)


def test_explain_exits_2_on_damage(originals, tmp_path, capsys) -> None:
    path = tmp_path / "ce.npz"
    path.write_bytes(originals["ce"][:-40])
    assert main(["explain", str(path)]) == 2
    assert "Traceback" not in capsys.readouterr().err


def _with_member(source: bytes, path: Path, name: str, payload: bytes, count: int = 1) -> None:
    path.write_bytes(source)
    with zipfile.ZipFile(path, "a") as z:
        for i in range(count):
            z.writestr(name.format(i), payload)


def test_links_fifos_and_devices_are_refused(originals, tmp_path) -> None:
    real = tmp_path / "real.npz"
    real.write_bytes(originals["ce"])
    (tmp_path / "link.npz").symlink_to(real)
    with pytest.raises(SpecError, match="symbolic link"):
        counterexample.load(tmp_path / "link.npz")
    os.mkfifo(tmp_path / "fifo.npz")
    start = time.perf_counter()
    with pytest.raises(SpecError, match="not a regular file"):
        counterexample.load(tmp_path / "fifo.npz")
    directory = tmp_path / "cap"
    directory.mkdir()
    (directory / "rank0.npz").write_bytes(originals["rank0"])
    (directory / "rank1.npz").write_bytes(originals["rank1"])
    (directory / "manifest.json").symlink_to("/dev/zero")
    with pytest.raises(SpecError, match="symbolic link"):
        capture.load(directory)
    (directory / "manifest.json").unlink()
    os.mkfifo(directory / "manifest.json")
    with pytest.raises(SpecError, match="not a regular file"):
        capture.load(directory)
    assert time.perf_counter() - start < 5


def test_declared_sizes_and_member_counts_are_checked_before_decompressing(
    originals, tmp_path
) -> None:
    # A member that inflates far beyond what its manifest entry allows: refused unread.
    bomb = tmp_path / "bomb.npz"
    bomb.write_bytes(originals["ce"])
    with zipfile.ZipFile(bomb, "a", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("extra.npy", b"\0" * (64 << 20))
    start = time.perf_counter()
    with pytest.raises(SpecError, match=r"members the manifest does not list|declaring"):
        counterexample.load(bomb)
    many = tmp_path / "many.npz"
    _with_member(originals["ce"], many, "m{}.npy", b"", count=counterexample.MAX_MEMBERS)
    with pytest.raises(SpecError, match="members, more than any call has"):
        counterexample.load(many)
    assert time.perf_counter() - start < 10


def test_an_npy_header_declaring_a_huge_shape_is_refused_without_allocating(
    originals, tmp_path
) -> None:
    # The member named like a real array claims a gigantic shape in its own .npy header.
    header = np.lib.format.header_data_from_array_1_0(np.zeros(1, np.float32))
    header["shape"] = (1 << 40,)
    stream = io.BytesIO()
    np.lib.format.write_array_header_1_0(stream, header)
    path = tmp_path / "huge.npz"
    with zipfile.ZipFile(io.BytesIO(originals["ce"])) as old, zipfile.ZipFile(path, "w") as new:
        for info in old.infolist():
            data = stream.getvalue() if info.filename == "r0.probs.npy" else old.read(info)
            new.writestr(info.filename, data)
    with pytest.raises(SpecError, match=r"r0\.probs"):
        counterexample.load(path)
