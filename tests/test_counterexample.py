"""Counterexample files round-trip exactly and reject malformed or hostile content."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import oracle
from oracle.files.counterexample import load, save
from spec import CounterexampleFileError, Problem
from spec.memory import LAYOUTS, layout_of
from spec.strategies import problems


def _arrays(problem: Problem) -> list[np.ndarray]:
    out = []
    for r in problem.ranks:
        out += [r.x, r.expert_idx, r.probs, *r.w1, *r.w2, *(r.scale1 or ()), *(r.scale2 or ())]
        if r.active_mask is not None:
            out.append(r.active_mask)
    return out


@given(problems(layouts=st.sampled_from(LAYOUTS)))
@settings(max_examples=25)
def test_problems_and_outputs_round_trip_bit_for_bit(tmp_path_factory, problem: Problem) -> None:
    """…and each array's memory layout class (a strided-weight failure replays strided)."""
    path = tmp_path_factory.mktemp("ce") / "p.npz"
    outputs = [(r.out, r.expert_token_nums) for r in oracle.run(problem).ranks]
    save(path, problem, outputs=outputs, meta={"stage": "out"})
    saved = load(path)
    assert saved.problem.config == problem.config and saved.meta == {"stage": "out"}
    for a, b in zip(_arrays(problem), _arrays(saved.problem), strict=True):
        assert a.dtype == b.dtype and layout_of(a) == layout_of(b)
        assert np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()
    assert saved.outputs is not None
    for (o1, n1), (o2, n2) in zip(outputs, saved.outputs, strict=True):
        assert o1.dtype == o2.dtype and np.array_equal(o1.view(np.uint16), o2.view(np.uint16))
        assert np.array_equal(n1, n2)


@pytest.fixture
def saved_file(tmp_path):
    from spec import OpConfig, random_problem

    problem = random_problem(OpConfig(ep_size=2, experts_per_rank=2, top_k=2, hidden=16,
                                      intermediate=8, tokens_per_rank=(2, 1)), seed=3)
    return save(tmp_path / "good.npz", problem)


def _rewrite(src, dst, change) -> None:
    """Copy an .npz, letting ``change(name, bytes) -> bytes | None`` edit or drop members."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = change(item.filename, zin.read(item.filename))
            if data is not None:
                zout.writestr(item, data)


def _npy(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)
    return buf.getvalue()


def _manifest_edit(edit):
    def change(name, data):
        if name != "manifest.npy":
            return data
        manifest = json.loads(np.load(__import__("io").BytesIO(data)).tobytes())
        edit(manifest)
        return _npy(np.frombuffer(json.dumps(manifest).encode(), np.uint8))

    return change


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda n, d: None if n == "manifest.npy" else d, "no manifest entry"),
        (lambda n, d: _npy(np.frombuffer(b"not json", np.uint8)) if n == "manifest.npy" else d,
         "not JSON"),
        (_manifest_edit(lambda m: m.update(format="other")), "another format"),
        (_manifest_edit(lambda m: m.update(version=99)), "version 99"),
        (_manifest_edit(lambda m: m["arrays"]["r0.x"].update(dtype="object")), "dtype outside"),
        (_manifest_edit(lambda m: m["arrays"]["r0.x"].update(shape=[2**20, 2**20])),
         "more than any call"),
        (_manifest_edit(lambda m: m["config"].update(ep_size=3)), "invalid config"),
        (_manifest_edit(lambda m: m["arrays"]["r0.x"].update(layout="diagonal")),
         "with layout diagonal"),
        (lambda n, d: None if n == "r1.probs.npy" else d, "no array 'r1.probs'"),
        (lambda n, d: _npy(np.zeros(3, np.float64)) if n == "r0.probs.npy" else d,
         "stored as float64"),
        (lambda n, d: _npy(np.array([{"pickled": 1}], dtype=object)) if n == "r0.x.npy" else d,
         "cannot be read safely"),
    ],
)
def test_malformed_files_are_rejected_with_a_spec_error(saved_file, tmp_path, change,
                                                        message) -> None:
    bad = tmp_path / "bad.npz"
    _rewrite(saved_file, bad, change)
    with pytest.raises(CounterexampleFileError, match=message):
        load(bad)


def test_missing_and_non_npz_files_are_rejected(tmp_path) -> None:
    with pytest.raises(CounterexampleFileError, match="no such file"):
        load(tmp_path / "absent.npz")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(CounterexampleFileError, match="not a readable"):
        load(tmp_path / "junk.npz")
    np.save(tmp_path / "one.npy", np.zeros(3))
    with pytest.raises(CounterexampleFileError, match=r"not an \.npz"):
        load(tmp_path / "one.npy")


def test_a_file_from_before_swiglu_alpha_loads_with_the_default(saved_file, tmp_path) -> None:
    """Files written before the SwigluOAI attribute have no ``swiglu_alpha`` in their config;
    they load as standard SwiGLU, and a file with one keeps it."""
    old = tmp_path / "old.npz"
    _rewrite(saved_file, old, _manifest_edit(lambda m: m["config"].pop("swiglu_alpha")))
    assert load(old).problem.swiglu_alpha is None
    alpha = tmp_path / "alpha.npz"
    _rewrite(saved_file, alpha, _manifest_edit(lambda m: m["config"].update(swiglu_alpha=1.702)))
    assert load(alpha).problem.config.oai_alpha == float(np.float32(1.702))
