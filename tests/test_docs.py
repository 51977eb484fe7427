"""The repository stands alone: its code and documents cite the operator's contract under
``docs/contract/`` and never a path outside the repository, every ``.md`` page they cite exists,
and every ``§N`` they cite is a section of ``docs/contract/dispatch_ffn_combine.md`` (a bare
``§N`` always means that page, ``docs/contract/README.md``). Each check takes text, so the tests
also show it failing on a planted bad citation."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
CONTRACT = ROOT / "docs" / "contract"
OPERATOR_PAGE = CONTRACT / "dispatch_ffn_combine.md"
#: What the checks read: every Python and Markdown file under these folders, and the README.
SCANNED = ("spec", "oracle", "tests", "benchmarks", "docs")
#: Where a bare page name (``variants.md``) may live, first match wins.
BARE_NAME_DIRS = (CONTRACT, ROOT / "docs", ROOT / "benchmarks", ROOT)
#: Paths outside the repository that code once cited. Each is written in two pieces so that
#: this file does not cite it itself; the planted citations below are built the same way.
OUTSIDE = ("shared" + "/reference", "/wo" + "rk/")

_PAGE = re.compile(r"[\w./-]*\w\.md\b")
_URL = re.compile(r"\w+://\S+")
_SECTION = re.compile(r"§\s?(\d+)(?:\s*[–-]\s*§?\s?(\d+))?")
_HEADING = re.compile(r"^#+\s+§(\d+)\b", re.M)
#: A page name followed by a quoted section title: ``variants.md, "The per-core peer offset"``.
_QUOTED = re.compile(r"([\w-]+\.md),? ['\"]([^'\"\n]{3,60})['\"]")


def outside_citations(text: str) -> list[str]:
    """Each line of ``text`` that cites a path outside the repository, as ``line N: ...``."""
    return [f"line {n}: {line.strip()}" for n, line in enumerate(text.splitlines(), 1)
            if any(path in line for path in OUTSIDE)]


def _exists(page: str) -> bool:
    if "/" in page:
        return (ROOT / page.removeprefix("./")).is_file()
    return any((folder / page).is_file() for folder in BARE_NAME_DIRS)


def missing_pages(text: str) -> list[str]:
    """Each ``.md`` page ``text`` cites (a repository path, or a bare name looked up in
    :data:`BARE_NAME_DIRS`) that does not exist, as ``line N: page``. URLs are not pages here."""
    return [f"line {n}: {page}" for n, line in enumerate(text.splitlines(), 1)
            for page in _PAGE.findall(_URL.sub("", line)) if not _exists(page)]


def cited_sections(text: str) -> set[int]:
    """Every section number ``text`` cites; a range ``§4–§6`` or ``§4-6`` cites 4, 5 and 6."""
    found: set[int] = set()
    for first, last in _SECTION.findall(text):
        found.update(range(int(first), int(last or first) + 1))
    return found


def missing_sections(text: str, page_text: str) -> list[int]:
    """The sections ``text`` cites that ``page_text`` has no ``§N`` heading for."""
    headings = {int(n) for n in _HEADING.findall(page_text)}
    return sorted(cited_sections(text) - headings)


def missing_titles(text: str) -> list[str]:
    """Each page name followed by a quoted title in ``text`` (:data:`_QUOTED`) whose contract
    page has no heading starting with that title, as the page name and the quoted title."""
    found = []
    for page, title in _QUOTED.findall(text):
        path = CONTRACT / page
        headings = re.findall(r"^#+\s+(.*)$", path.read_text(encoding="utf-8"), re.M) \
            if path.is_file() else []
        if not any(h.startswith(title) for h in headings):
            found.append(f"{page} {title!r}")
    return found


def unindexed_pages(index_text: str, pages: list[str]) -> list[str]:
    """The ``pages`` that the index ``index_text`` does not link as ``[name](name)``."""
    return [p for p in pages if f"[{p}]({p})" not in index_text]


def _scanned_files() -> list[Path]:
    files = [ROOT / "README.md"]
    for folder in SCANNED:
        files += sorted(p for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".md"))
    return files


def _findings(check: str) -> list[str]:
    page_text = OPERATOR_PAGE.read_text(encoding="utf-8")
    found = []
    for path in _scanned_files():
        text = path.read_text(encoding="utf-8")
        where = path.relative_to(ROOT)
        if check == "outside":
            found += [f"{where}: {f}" for f in outside_citations(text)]
        elif check == "pages":
            found += [f"{where}: {f}" for f in missing_pages(text)]
        elif check == "titles":
            found += [f"{where}: {f}" for f in missing_titles(text)]
        else:
            found += [f"{where}: §{n}" for n in missing_sections(text, page_text)]
    return found


def _planted(*parts: str) -> str:
    """A bad citation, built from pieces so that this file's own text does not contain it."""
    return "".join(parts)


def test_no_file_cites_a_path_outside_the_repository() -> None:
    found = _findings("outside")
    assert not found, (
        f"{len(found)} citation(s) of a path outside the repository: {found}; cite the page "
        "under docs/contract/ (same file name) instead")


def test_every_cited_page_exists() -> None:
    found = _findings("pages")
    assert not found, (
        f"{len(found)} cited .md page(s) do not exist: {found}; fix the name, or add the page "
        "(a contract page goes to docs/contract/ with a line in its README.md)")


def test_every_cited_section_exists() -> None:
    found = _findings("sections")
    assert not found, (
        f"{len(found)} cited section(s) have no '## §N' heading in "
        f"docs/contract/dispatch_ffn_combine.md: {found}; cite an existing section or add it")


def test_every_cited_section_title_is_a_heading_of_its_page() -> None:
    found = _findings("titles")
    assert not found, (
        f"{len(found)} quoted section title(s) are no heading of their page: {found}; quote "
        "the heading as the page writes it")


def test_the_index_links_every_contract_page_and_the_readme_links_the_index() -> None:
    pages = sorted(p.name for p in CONTRACT.glob("*.md") if p.name != "README.md")
    assert len(pages) == 7
    assert unindexed_pages((CONTRACT / "README.md").read_text(encoding="utf-8"), pages) == []
    assert "docs/contract/README.md" in (ROOT / "README.md").read_text(encoding="utf-8")


# --- Each check on a planted bad citation and on its corrected form. ---


def test_outside_citations_flags_a_planted_path_and_passes_its_fix() -> None:
    for bad in (_planted("(``", OUTSIDE[0], "/kernels", ".md``)"),
                _planted("(``", OUTSIDE[1], "x/models", ".md``)")):
        assert outside_citations(f"ok\n{bad}\n") == [f"line 2: {bad}"]
    assert outside_citations("(``docs/contract/kernels.md``)") == []


@pytest.mark.parametrize("bad, good", [
    (_planted("docs/contract/kernel", ".md"), "docs/contract/kernels.md"),
    (_planted("variant", ".md, W4A8"), "variants.md, W4A8"),
    (_planted("docs/finding", ".md"), "docs/findings.md"),
])
def test_missing_pages_flags_a_planted_page_and_passes_its_fix(bad: str, good: str) -> None:
    assert missing_pages(f"see {bad}") == [f"line 1: {bad.split(',')[0]}"]
    assert missing_pages(f"see {good}") == []
    assert missing_pages("https://example.org/NOWHERE.md") == []


@pytest.mark.parametrize("bad, missing", [
    (_planted("dispatch_ffn_combine.md §", "11"), [11]),
    (_planted("§9–§", "12"), [11, 12]),
    (_planted("§", "0 step 1"), [0]),
])
def test_missing_sections_flags_a_planted_section_and_passes_its_fix(
        bad: str, missing: list[int]) -> None:
    page = OPERATOR_PAGE.read_text(encoding="utf-8")
    assert missing_sections(bad, page) == missing
    assert missing_sections("§4–§6, §4-5, §6 step 8, §10", page) == []
    assert missing_sections("§3", page.replace("## §3 ", "## ")) == [3]


def test_missing_titles_flags_a_planted_title_and_passes_its_fix() -> None:
    bad = _planted("kernels", ".md 'Other kernel types'")
    assert missing_titles(bad) == [bad]
    assert missing_titles('kernels.md, "Other kernels"; variants.md \'BF16 / FP16 weights\'') == []


def test_unindexed_pages_flags_a_page_the_index_leaves_out() -> None:
    index = (CONTRACT / "README.md").read_text(encoding="utf-8")
    assert unindexed_pages(index, ["models.md"]) == []
    assert unindexed_pages(index.replace("[models.md](models.md)", "models"),
                           ["models.md"]) == ["models.md"]
