"""The distributed harness removes its store directory on every exit path."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest


def test_a_worker_that_cannot_start_leaves_no_store_directory() -> None:
    pytest.importorskip("torch")
    from oracle.check.distributed import _WorkerPool

    def stores() -> set[Path]:
        return set(Path(tempfile.gettempdir()).glob("dfc-oracle-group-*"))

    before = stores()
    with pytest.raises(Exception, match=r"(?i)pickle|serializ"):  # a lambda cannot reach a rank
        _WorkerPool(lambda inputs, group: None, 2, "gloo", "int64", 10.0)
    assert stores() == before
