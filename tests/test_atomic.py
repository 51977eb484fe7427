"""Saving never loses data (issue 23): a failed, concurrent or redirected save leaves every
earlier file whole and never writes through a link. Each property is shown failing on the
writer the project used before (``_open_and_write``: open the destination, write into it)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st

from oracle.check.harness import ConformanceError, check_implementation
from oracle.files.atomic import SaveError, atomic_write
from oracle.files.counterexample import load, save
from spec import CounterexampleFileError, OpConfig, random_problem

PROBLEM = random_problem(OpConfig(ep_size=2, experts_per_rank=2, top_k=2, hidden=16,
                                  intermediate=8, tokens_per_rank=(2, 1)), seed=3)
ONE = settings(max_examples=1, database=None, deadline=None)


def _open_and_write(path, write):
    """The mutant: the non-atomic save of round 1."""
    with Path(path).open("wb") as f:
        write(f)
    return Path(path)


def _disk_full_after(n: int):
    def write(f):
        f.write(b"\0" * n)
        raise OSError(errno.ENOSPC, "No space left on device")
    return write


@pytest.mark.parametrize("writer", [atomic_write, _open_and_write])
def test_a_save_failing_part_way_leaves_the_earlier_file_whole(tmp_path, writer) -> None:
    path = save(tmp_path / "ce.npz", PROBLEM)
    before = path.read_bytes()
    with pytest.raises(OSError):
        writer(path, _disk_full_after(1000))
    if writer is _open_and_write:
        assert len(path.read_bytes()) == 1000  # the earlier counterexample is lost
        with pytest.raises(CounterexampleFileError):
            load(path)
        return
    assert path.read_bytes() == before and load(path).problem.config == PROBLEM.config
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ce.npz"]  # no temporary file left


@pytest.mark.parametrize("writer", [atomic_write, _open_and_write])
def test_two_saves_of_one_name_at_once_leave_a_complete_file(tmp_path, writer) -> None:
    """The interleaving that broke about half the rounds of two xdist workers, made certain:
    the second save runs whole while the first is half written."""
    path = tmp_path / "ce.npz"
    mine = save(tmp_path / "a.npz", PROBLEM).read_bytes()
    other = random_problem(PROBLEM.config, seed=4)
    theirs = save(tmp_path / "b.npz", other).read_bytes()
    half = len(mine) // 2

    def first(f):
        f.write(mine[:half])
        f.flush()
        writer(path, lambda g: g.write(theirs))  # the other process, start to end
        f.write(mine[half:])
    writer(path, first)
    if writer is _open_and_write:
        with pytest.raises(CounterexampleFileError):
            load(path)
        return
    assert path.read_bytes() == mine  # the last to finish, whole
    assert load(path).problem.config == PROBLEM.config


@pytest.mark.parametrize("writer", [atomic_write, _open_and_write])
def test_a_link_planted_at_the_name_is_never_followed(tmp_path, writer) -> None:
    target = tmp_path / "precious"
    target.write_bytes(b"keep me")
    link = tmp_path / "ce.npz"
    link.symlink_to(target)
    if writer is _open_and_write:
        writer(link, lambda f: f.write(b"overwritten"))
        assert target.read_bytes() == b"overwritten"
        return
    with pytest.raises(SaveError, match="refused to write over a symbolic link"):
        writer(link, lambda f: f.write(b"overwritten"))
    assert target.read_bytes() == b"keep me" and link.is_symlink()


def test_a_directory_that_cannot_be_created_is_a_save_error(tmp_path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(SaveError, match="its directory cannot be created"):
        atomic_write(tmp_path / "file" / "sub" / "ce.npz", lambda f: f.write(b""))


def _probs_ignored_after_chdir(problem):
    import broken_impls

    os.chdir(_probs_ignored_after_chdir.elsewhere)
    return broken_impls.probs_ignored(problem)


def test_an_implementation_that_changes_directory_does_not_move_the_file(
    tmp_path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    _probs_ignored_after_chdir.elsewhere = tmp_path / "elsewhere"  # type: ignore[attr-defined]
    with pytest.raises(ConformanceError) as info:
        check_implementation(_probs_ignored_after_chdir, save_dir="saved", isolate=False,
                             problems=st.just(PROBLEM), settings=ONE)
    assert info.value.path == tmp_path / "saved" / info.value.path.name
    assert info.value.path.is_file() and not (tmp_path / "elsewhere" / "saved").exists()


def test_a_failed_save_is_reported_beside_a_complete_report(tmp_path, monkeypatch) -> None:
    import broken_impls

    real = np.savez_compressed

    def disk_full(f, **arrays):
        real(f, **arrays)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(np, "savez_compressed", disk_full)
    with pytest.raises(ConformanceError) as info:
        check_implementation(broken_impls.probs_ignored, save_dir=tmp_path, isolate=False,
                             problems=st.just(PROBLEM), settings=ONE)
    report = info.value.report
    assert "does not conform (stage 'out'" in report and "what failed:" in report
    assert "counterexample NOT saved:" in report and "No space left on device" in report
    assert info.value.path is None and list(tmp_path.iterdir()) == []
