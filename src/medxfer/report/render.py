"""Sections -> a self-contained ``report.html`` (inline CSS, PNGs as base64 data URIs, no
script, no network) and its ``report.md`` twin (images linked by relative path)."""

from __future__ import annotations

import base64
import html
import os
import re
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

from medxfer.report.blocks import Image, Note, Section, Table, Text

CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;max-width:1100px;
margin:2em auto;padding:0 1em;color:#1d232a;line-height:1.45}
h1{font-size:1.7em;margin-bottom:.2em}h2{border-bottom:2px solid #dfe3e8;padding-bottom:.2em;
margin-top:2em}nav a{margin-right:.9em;font-size:.92em}
table{border-collapse:collapse;margin:.8em 0;font-size:.9em}caption{text-align:left;
font-weight:600;padding:.3em 0;color:#444}th,td{border:1px solid #d0d5db;padding:.3em .6em;
text-align:left;vertical-align:top}th{background:#f2f4f7}tr:nth-child(even) td{background:#fafbfc}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #e3e6ea}
figcaption{font-size:.88em;color:#555}.note{background:#fff7e0;border-left:4px solid #f0b400;
padding:.5em .8em;margin:.8em 0}.meta{color:#666;font-size:.9em}code{background:#f2f4f7;
padding:0 .25em}
"""


def _inline(text: str) -> str:
    """Escape, then render `code` spans."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _html_table(t: Table) -> str:
    ident = f' id="{html.escape(t.id)}"' if t.id else ""
    cap = f"<caption>{_inline(t.caption)}</caption>" if t.caption else ""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in t.header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in t.rows
    )
    return f"<table{ident}>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html_block(b: Text | Note | Table | Image) -> str:
    if isinstance(b, Text):
        return f"<p>{_inline(b.text)}</p>"
    if isinstance(b, Note):
        return f'<p class="note">{_inline(b.text)}</p>'
    if isinstance(b, Table):
        return _html_table(b)
    alt = html.escape(b.caption, quote=True)
    return (
        f'<figure><img src="{data_uri(b.path)}" alt="{alt}">'
        f"<figcaption>{_inline(b.caption)}</figcaption></figure>"
    )


def to_html(title: str, sections: list[Section], subtitle: str = "") -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    nav = "".join(f'<a href="#{s.id}">{html.escape(s.title)}</a>' for s in sections)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="meta">medxfer experiment report · {stamp}{" · " if subtitle else ""}'
        f"{html.escape(subtitle)}</p><nav>{nav}</nav>",
    ]
    for s in sections:
        parts.append(f'<section id="{s.id}"><h2>{html.escape(s.title)}</h2>')
        parts += [_html_block(b) for b in s.blocks]
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


_MD_SPECIAL = re.compile(r"([\\`*_\[\]|~])")  # emphasis, links, tables, strike-through
_MD_LINE_START = re.compile(r"^([ \t]*)([#+\-=>]|\d+(?=[.)]))", re.MULTILINE)  # headings, lists


def md_escape(text: str, *, table: bool = False) -> str:
    """User text (class names, labels, paths) as literal Markdown: ``<`` and ``&`` escaped
    (no HTML tag or entity can start), as in the HTML report; Markdown's emphasis, link and
    table punctuation and line starts backslash-escaped. `code` spans are kept (the HTML report
    renders them too); their content is literal already, only a ``|`` in a table cell is
    escaped."""
    parts = re.split(r"(`[^`]+`)", text)
    out = []
    for i, p in enumerate(parts):
        if i % 2:
            out.append(p.replace("|", "\\|") if table else p)
        else:
            p = _MD_SPECIAL.sub(r"\\\1", p.replace("&", "&amp;").replace("<", "&lt;"))
            out.append(_MD_LINE_START.sub(_line_start(i == 0), p))
    return "".join(out)


def _line_start(at_start: bool) -> Callable[[re.Match[str]], str]:
    """Escape a heading or list marker; after a code span, the part's start is no line start."""

    def sub(m: re.Match[str]) -> str:
        if m.start() == 0 and not at_start:
            return m.group(0)
        lead, mark = m.group(1), m.group(2)
        return f"{lead}{mark}\\" if mark[0].isdigit() else f"{lead}\\{mark}"

    return sub


def _md_cell(text: str) -> str:
    return md_escape(text, table=True).replace("\n", " ")


def to_markdown(title: str, sections: list[Section], base: Path, subtitle: str = "") -> str:
    """Markdown with images linked relative to ``base`` (the folder the file is written to).
    Every text is escaped (``md_escape``): a class named ``<img onerror=...>`` stays text."""
    sub = " · " + md_escape(subtitle) if subtitle else ""
    out = [f"# {md_escape(title)}", "", f"_medxfer experiment report{sub}_"]
    for s in sections:
        out += ["", f"## {md_escape(s.title)}", ""]
        for b in s.blocks:
            if isinstance(b, Text):
                out += [md_escape(b.text), ""]
            elif isinstance(b, Note):
                out += [f"> **Note:** {md_escape(b.text)}", ""]
            elif isinstance(b, Table):
                if b.caption:
                    out += [f"**{md_escape(b.caption)}**", ""]
                out.append("| " + " | ".join(map(_md_cell, b.header)) + " |")
                out.append("|" + "---|" * len(b.header))
                out += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in b.rows]
                out.append("")
            else:
                rel = Path(os.path.relpath(b.path.resolve(), base.resolve())).as_posix()
                out += [f"![{md_escape(b.caption)}]({quote(rel)})", ""]
    return "\n".join(out).rstrip() + "\n"
