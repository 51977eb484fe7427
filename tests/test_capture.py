"""oracle.check.capture: dump every rank of a call, verify it offline, reject bad captures
clearly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="capturing torch tensors needs the extra 'torch'")

import oracle  # noqa: E402
from oracle.adapters.torch_io import scales_to_int64, to_tensor, to_torch  # noqa: E402
from oracle.check import capture  # noqa: E402
from spec import CounterexampleFileError, OpConfig, SpecError, random_problem  # noqa: E402

CFG = OpConfig(ep_size=3, experts_per_rank=2, top_k=2, hidden=32, intermediate=16,
               tokens_per_rank=(4, 0, 3), max_output_size=5, masked=True)


def _dump_run(directory: Path, *, corrupt_rank: int | None = None) -> None:
    """What a real 3-rank run does: each rank dumps the binding's tensors and its outputs."""
    problem = random_problem(CFG, seed=11)
    result = oracle.run(problem)
    for r, (inputs, res) in enumerate(zip(problem.ranks, result.ranks)):
        t = to_torch(inputs, max_output_size=CFG.max_output_size)  # int64 scales, as vLLM
        out = to_tensor(res.out)
        if r == corrupt_rank:  # one element of a defined row, off by far more than an ulp
            out[int(np.flatnonzero(res.defined)[0]), 0] += 1.0
        args = dict(x=t.x, weight1=t.weight1, weight2=t.weight2, expert_idx=t.expert_idx,
                    scale1=t.scale1, scale2=t.scale2, probs=t.probs,
                    x_active_mask=t.x_active_mask, bias1=None, bias2=None)
        capture.dump(directory, r, args, (out, torch.from_numpy(res.expert_token_nums)),
                     world_size=3, max_output_size=CFG.max_output_size, step=7)


def test_a_conforming_run_verifies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _dump_run(tmp_path)
    report = capture.verify(tmp_path)
    assert report.ok and report.problem.config == CFG
    assert capture.load(tmp_path).attrs["step"] == 7
    assert capture.verify_main(tmp_path, "ideal") == 0
    assert "conforms" in capsys.readouterr().out


def test_a_wrong_output_on_one_rank_is_reported(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    _dump_run(tmp_path, corrupt_rank=0)
    report = capture.verify(tmp_path)
    assert not report.ok and report.verdict.rank == 0
    assert capture.verify_main(tmp_path) == 1
    assert "does not conform" in capsys.readouterr().out


def test_numpy_arrays_and_spec_rank_inputs_are_accepted(tmp_path: Path) -> None:
    problem = random_problem(CFG, seed=2)
    for r, (inputs, res) in enumerate(zip(problem.ranks, oracle.run(problem).ranks)):
        capture.dump(tmp_path, r, inputs, res, world_size=3, max_output_size=5)
    assert capture.verify(tmp_path).ok


def test_scales_are_stored_as_float32_bits(tmp_path: Path) -> None:
    _dump_run(tmp_path)
    loaded = capture.load(tmp_path).problem.ranks[0]
    original = random_problem(CFG, seed=11).ranks[0]
    assert loaded.scale1 is not None and original.scale1 is not None
    assert np.array_equal(scales_to_int64(loaded.scale1[0]), scales_to_int64(original.scale1[0]))


def test_a_missing_rank_is_named(tmp_path: Path) -> None:
    _dump_run(tmp_path)
    (tmp_path / "rank1.npz").unlink()
    with pytest.raises(CounterexampleFileError, match=r"rank 1, .*no file for rank 1"):
        capture.load(tmp_path)
    assert capture.verify_main(tmp_path) == 2


def test_a_missing_manifest_is_named(tmp_path: Path) -> None:
    _dump_run(tmp_path)
    (tmp_path / capture.MANIFEST).unlink()
    with pytest.raises(CounterexampleFileError, match="no manifest"):
        capture.load(tmp_path)


def test_inconsistent_attributes_across_ranks_are_rejected(tmp_path: Path) -> None:
    _dump_run(tmp_path)
    problem = random_problem(CFG, seed=11)
    res = oracle.run(problem).ranks[1]
    capture.dump(tmp_path, 1, problem.ranks[1], res, world_size=3, max_output_size=6, step=7)
    with pytest.raises(CounterexampleFileError, match=r"rank 1, .*max_output_size.*same"):
        capture.load(tmp_path)


def test_inconsistent_shapes_across_ranks_are_rejected(tmp_path: Path) -> None:
    _dump_run(tmp_path)
    other = random_problem(OpConfig(ep_size=3, experts_per_rank=2, top_k=2, hidden=64,
                                    intermediate=16, tokens_per_rank=(4, 0, 3)), seed=1)
    res = oracle.run(other).ranks[2]
    capture.dump(tmp_path, 2, other.ranks[2], res, world_size=3, max_output_size=5, step=7)
    with pytest.raises(SpecError, match=r"rank 2, x's hidden size K: got 64"):
        capture.load(tmp_path)


def test_a_file_beyond_world_size_is_rejected(tmp_path: Path) -> None:
    _dump_run(tmp_path)
    (tmp_path / "rank3.npz").write_bytes((tmp_path / "rank0.npz").read_bytes())
    with pytest.raises(CounterexampleFileError, match="beyond world_size 3"):
        capture.load(tmp_path)


@pytest.mark.parametrize("damage", ["not_zip", "pickled", "bad_meta", "shape_lie", "renamed"])
def test_malformed_files_are_rejected(tmp_path: Path, damage: str) -> None:
    _dump_run(tmp_path)
    path = tmp_path / "rank0.npz"
    if damage == "not_zip":
        path.write_bytes(b"not an npz")
    elif damage == "pickled":  # an object array needs pickle: refused, never unpickled
        np.savez(path, meta=np.array([{"evil": 1}], dtype=object))
    elif damage == "bad_meta":
        np.savez(path, meta=np.frombuffer(b"{oops", dtype=np.uint8))
    elif damage == "shape_lie":
        with np.load(path) as files:
            arrays = dict(files)
        meta = json.loads(arrays["meta"].tobytes())
        meta["arrays"]["x"]["shape"] = [5, 32]
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        np.savez(path, **arrays)
    else:
        path.write_bytes((tmp_path / "rank2.npz").read_bytes())
    with pytest.raises(CounterexampleFileError, match=r"rank 0, .*rank0\.npz"):
        capture.load(tmp_path)


def test_dump_rejects_what_the_operator_cannot_have_seen(tmp_path: Path) -> None:
    problem = random_problem(CFG, seed=11)
    res = oracle.run(problem).ranks[0]
    with pytest.raises(SpecError, match="expert_token_nums: got dtype int64"):
        capture.dump(tmp_path, 0, problem.ranks[0], (res.out, res.expert_token_nums.astype(
            np.int64)), world_size=3)
    with pytest.raises(SpecError, match="rank: got rank 3 of world_size 3"):
        capture.dump(tmp_path, 3, problem.ranks[0], res, world_size=3)
    with pytest.raises(SpecError, match="layer: got"):
        capture.dump(tmp_path, 0, problem.ranks[0], res, world_size=3, layer=[1])


def test_swiglu_alpha_is_captured_and_old_captures_without_it_load(tmp_path: Path) -> None:
    """swiglu_alpha (PR #11916) travels as a call attribute; a capture written before it
    existed has no such key and loads with the default (None: standard SwiGLU)."""
    cfg = OpConfig(ep_size=1, experts_per_rank=2, top_k=2, hidden=32, intermediate=16,
                   tokens_per_rank=(3,), swiglu_alpha=1.702)
    problem = random_problem(cfg, seed=4)
    for r, (inputs, res) in enumerate(zip(problem.ranks, oracle.run(problem).ranks)):
        capture.dump(tmp_path / "new", r, inputs, res, world_size=1, swiglu_alpha=1.702)
    assert capture.verify(tmp_path / "new").problem.swiglu_alpha == 1.702
    _dump_run(tmp_path / "old")
    manifest = tmp_path / "old" / capture.MANIFEST
    meta = json.loads(manifest.read_text())
    del meta["attrs"]["swiglu_alpha"]
    manifest.write_text(json.dumps(meta))
    for path in (tmp_path / "old").glob("rank*.npz"):
        with np.load(path) as files:
            arrays = dict(files)
        meta = json.loads(arrays["meta"].tobytes())
        del meta["attrs"]["swiglu_alpha"]
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        np.savez(path, **arrays)
    assert capture.verify(tmp_path / "old").problem.swiglu_alpha is None
