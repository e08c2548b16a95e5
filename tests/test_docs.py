"""The README stays a short user guide whose links resolve and whose test command is CI's."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def test_readme_is_short() -> None:
    assert len(README.splitlines()) <= 350, "details belong on a docs/ page"


def test_readme_links_resolve() -> None:
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README)
    local = [link for link in links if "://" not in link]
    assert local, "the README links its documentation"
    missing = [link for link in local if not (REPO / link).exists()]
    assert missing == []


def test_readme_test_command_is_what_ci_runs() -> None:
    command = next(line for line in README.splitlines() if line.endswith("-m pytest -q"))
    assert command in (REPO / ".ci" / "run").read_text().splitlines()
    assert "-c constraints.txt" in command  # CI tests the pinned versions


def test_every_docs_page_is_in_the_nav() -> None:
    """mkdocs --strict warns on a page missing from the nav; this says which, without mkdocs."""
    nav = (REPO / "mkdocs.yml").read_text()
    pages = sorted(p.relative_to(REPO / "docs").as_posix() for p in (REPO / "docs").rglob("*.md"))
    assert [p for p in pages if p not in nav] == []


def _results_table(text: str) -> list[str]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| result |"))
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return lines[start:end]


def test_docs_home_shows_the_readme_results_table() -> None:
    """The documentation site's home repeats the README's results table (links relative to
    docs/), so neither can go stale alone."""
    readme = [line.replace("](docs/", "](") for line in _results_table(README)]
    assert _results_table((REPO / "docs" / "index.md").read_text()) == readme
