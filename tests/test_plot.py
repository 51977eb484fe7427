"""``dfc-oracle explain FILE --plot OUT.png`` (issue 13): the picture holds the three panels with
the counterexample's own numbers (routing counts, truncation line, the judge's ratios), and
without matplotlib ``--plot`` is a usage error that says how to install it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import broken_impls
import numpy as np
import pytest

import oracle
from oracle.cli import main
from oracle.explain.plot import INSTALL, PANELS
from oracle.files.counterexample import save
from oracle.judge.verdict import compare
from spec import OpConfig, Problem, random_problem

Array = np.ndarray[Any, Any]


def _problem() -> Problem:
    """EP 2, truncated: some receive rows dropped, some out rows undefined."""
    cfg = OpConfig(ep_size=2, experts_per_rank=2, top_k=3, hidden=32, intermediate=16,
                   tokens_per_rank=(4, 3), max_output_size=8)
    return random_problem(cfg, seed=5)


def _saved(tmp_path: Path, problem: Problem, outputs: Any) -> Path:
    verdict = compare(problem, outputs)
    return save(tmp_path / "cx.npz", problem, outputs=outputs,
                meta={"stage": verdict.stage, "message": verdict.message,
                      "numerics": oracle.Numerics().to_dict(), "ulps": 0.0})


def _panel(fig: Any, title: str) -> Any:
    return next(ax for ax in fig.axes if ax.get_title(loc="left").startswith(title))


def test_the_figure_draws_the_counterexamples_own_numbers() -> None:
    pytest.importorskip("matplotlib")
    from oracle.explain.plot import counterexample_figure

    problem = _problem()
    outputs = broken_impls.probs_ignored(problem)
    verdict = compare(problem, outputs)
    assert verdict.stage == "out" and verdict.rank is not None and verdict.where is not None
    fig = counterexample_figure(problem, outputs, numerics=oracle.Numerics())
    titled = [ax for ax in fig.axes if ax.get_title(loc="left")]
    assert len(titled) == 3
    routing, buffers, errors = (_panel(fig, panel) for panel in PANELS)
    counts = oracle.model.reference.route(problem).counts
    assert np.array_equal(routing.images[0].get_array(), counts)
    assert [line.get_xdata()[0] for line in buffers.lines if line.get_color() == "red"] == [7.5]
    assert "rows dropped past max_output_size = 8" in buffers.get_title(loc="left")
    # The heat map: ranks stacked, undefined rows masked, the worst value the verdict's.
    shown = errors.images[0].get_array()
    assert shown.shape == (7, 32)
    defined = np.concatenate([r.defined for r in oracle.run(problem).ranks])
    assert np.array_equal(np.ma.getmaskarray(shown).all(axis=1), ~defined)
    labels = [label.get_text() for label in errors.get_yticklabels()]
    assert [label.endswith("(lost a slot)") for label in labels] == (~defined).tolist()
    token, column = verdict.where
    row = token + (problem.config.tokens_per_rank[0] if verdict.rank else 0)
    assert shown[row, column] == pytest.approx(np.log10(verdict.ratio))
    assert f"worst {verdict.ratio:.3g} at rank {verdict.rank} token {token}" in errors.get_title(
        loc="left")


def test_a_conforming_output_draws_no_value_above_one() -> None:
    pytest.importorskip("matplotlib")
    from oracle.explain.plot import counterexample_figure

    problem = _problem()
    fig = counterexample_figure(problem, broken_impls.correct(problem),
                                numerics=oracle.Numerics())
    errors = _panel(fig, PANELS[2])
    assert errors.images[0].get_array().max() <= 0
    assert "0 of " in errors.get_title(loc="left")


def test_explain_plot_writes_a_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    problem = _problem()
    path = _saved(tmp_path, problem, broken_impls.probs_ignored(problem))
    png = tmp_path / "cx.png"
    assert main(["explain", str(path), "--no-stages", "--plot", str(png)]) == 0
    assert f"picture saved: {png}" in capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_a_file_without_outputs_gets_routing_and_buffers_only(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from oracle.explain.plot import counterexample_figure

    fig = counterexample_figure(_problem(), None, numerics=oracle.Numerics())
    errors = _panel(fig, PANELS[2])
    assert not errors.images and "the file holds no outputs" in errors.texts[0].get_text()


def test_plot_without_matplotlib_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    problem = _problem()
    path = _saved(tmp_path, problem, broken_impls.probs_ignored(problem))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib: ImportError
    png = tmp_path / "cx.png"
    assert main(["explain", str(path), "--plot", str(png)]) == 2
    assert INSTALL in capsys.readouterr().err and not png.exists()
    # Without --plot, explain needs no matplotlib.
    assert main(["explain", str(path), "--no-stages"]) == 0
