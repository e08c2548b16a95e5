"""The report as data: sections of blocks that the HTML and Markdown writers both render.

A block is one of ``Text`` (a paragraph), ``Note`` (a highlighted remark: a stage that was off,
a synthetic-data warning), ``Table`` and ``Image`` (a PNG file on disk).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Text:
    text: str


@dataclass
class Note:
    text: str


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    caption: str = ""
    id: str = ""


@dataclass
class Image:
    path: Path
    caption: str


Block = Text | Note | Table | Image


@dataclass
class Section:
    id: str
    title: str
    blocks: list[Block] = field(default_factory=list)

    def add(self, *blocks: Block) -> Section:
        self.blocks.extend(blocks)
        return self

    def image(self, path: Path, caption: str) -> None:
        """Add the image if the file exists, else say which file is missing."""
        if path.is_file():
            self.blocks.append(Image(path, caption))
        else:
            self.blocks.append(Note(f"{caption}: not found ({path.name})"))


def load(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def num(x: Any, digits: int = 3) -> str:
    if x is None:
        return "—"
    if isinstance(x, bool):
        return str(x).lower()
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def with_ci(x: float | None, ci: list[float] | None) -> str:
    return num(x) + (f" [{num(ci[0])}, {num(ci[1])}]" if ci else "")


def status_note(status: str, stage: str) -> Note:
    """Why a section has no content: the stage was switched off or could not run."""
    if status == "off":
        return Note(
            f"The {stage} stage was switched off for this experiment (stages.{stage}: "
            "false), so this section has no results."
        )
    if status.startswith("unavailable"):
        return Note(f"The {stage} stage did not run — {status.removeprefix('unavailable: ')}.")
    return Note(f"The {stage} stage has not finished ({status or 'not run'}).")


def scalars(d: dict[str, Any], prefix: str = "", depth: int = 2) -> list[list[str]]:
    """Flatten the numbers of a nested dict into ``key, value`` rows (lists are skipped)."""
    rows: list[list[str]] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and depth > 0:
            rows += scalars(v, key + ".", depth - 1)
        elif (isinstance(v, (int, float, str, bool)) and not isinstance(v, str)) or (
            isinstance(v, str) and len(v) < 80
        ):
            rows.append([key, num(v, 4)])
    return rows
