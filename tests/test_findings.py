"""The findings table: produced by the searches, printable row by row, and equal to the doc."""

from __future__ import annotations

from pathlib import Path

import pytest

from spec.findings import hunt_rules, main, render_findings_markdown

DOC = Path(__file__).resolve().parents[1] / "docs" / "findings.md"
REQUIRED = {
    "pr5665-row-alignment", "pr6156-sentinel-slot", "buffer-check-vs-layout",
    "buffer-check-whole-mb", "count-region-ep32", "buffer-message-3mb", "protocol-pr5665-race",
    "protocol-pr6156-sentinel", "protocol-short-reset",
}


def test_every_required_row_is_found() -> None:
    findings = hunt_rules()
    keys = [f.key for f in findings]
    assert len(keys) == len(set(keys)) and set(keys) >= REQUIRED
    assert all("\n" not in str(f) for f in findings)


def test_doc_is_the_rendered_table() -> None:
    assert DOC.read_text() == render_findings_markdown(), (
        "docs/findings.md is stale: run python -m spec.findings > docs/findings.md")


def test_command_reproduces_a_row(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--rule", "protocol-pr5665-race"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("protocol-pr5665-race: ") and "VIOLATION" in out
