"""The generated configuration reference: every key has a meaning, and the committed page is
the one the current dataclasses generate."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from medxfer.config_reference import (
    field_experimental,
    field_meanings,
    missing_meanings,
    render,
)

PAGE = Path(__file__).resolve().parents[1] / "docs" / "reference" / "configuration.md"


def test_every_config_key_has_a_one_line_meaning() -> None:
    assert missing_meanings() == [], (
        "add a comment beside (or right above) these config fields: the reference shows it"
    )


def test_committed_reference_is_up_to_date() -> None:
    assert PAGE.read_text() == render(), (
        "regenerate: python -m medxfer.config_reference > docs/reference/configuration.md"
    )


@dataclass
class _Example:
    documented: int = 1  # on its own line
    # above the field,
    # over two lines
    above: str = "x"  # and beside it
    bare: float = 0.0


def test_meanings_come_from_the_comments_above_and_beside_a_field() -> None:
    assert field_meanings(_Example) == {
        "documented": "on its own line",
        "above": "above the field, over two lines and beside it",
        "bare": "",
    }


@dataclass
class _Experimental:
    # experimental: docs/studies/x.md, no gain
    # what it does
    tried: int = 0  # in units


def test_an_experimental_line_is_a_tag_not_a_meaning() -> None:
    assert field_meanings(_Experimental) == {"tried": "what it does in units"}
    assert field_experimental(_Experimental) == {"tried": "docs/studies/x.md, no gain"}
    assert "| `structured.steps` | int | `1` |  | **experimental** (docs/studies/structured.md" in (
        render()
    )
