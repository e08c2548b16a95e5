"""The experiment report: ``report.html`` (self-contained) and ``report.md`` per experiment.

blocks     sections of text, notes, tables and images (what both writers render)
sections   one builder per topic, reading the files the stages wrote
figures    class balance and real-vs-GAN images (the other figures come from the runs)
gradcam    Grad-CAM heatmaps over correct and wrong test images (evaluate stage)
paper      the paper's results table beside ours; rows for studies/paper_table.py
render     HTML (inline CSS, base64 images, no script) and Markdown
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medxfer.train.checkpoint import atomic_write_text


def write_report(r: dict[str, Any], folder: Path) -> tuple[Path, Path]:
    """Write ``folder/report.html`` and ``folder/report.md`` for one experiment cell."""
    from medxfer.report.render import to_html, to_markdown
    from medxfer.report.sections import build

    sections = build(r, folder / "report_figures")
    title = f"medxfer: {r['title']}"
    sub = "SYNTHETIC demo data" if not r["config"]["data"]["root"] else r["config"]["data"]["root"]
    html_path, md_path = folder / "report.html", folder / "report.md"
    atomic_write_text(to_markdown(title, sections, folder, sub), md_path)
    atomic_write_text(to_html(title, sections, sub), html_path)
    return html_path, md_path


def write_overview(
    name: str, cells: list[dict[str, Any]], folder: Path, command: str
) -> tuple[Path, Path]:
    """The report of a matrix: the paper-style table over all cells, links to each cell."""
    from medxfer.report import paper
    from medxfer.report.blocks import Note, Section, Table, Text, load
    from medxfer.report.render import to_html, to_markdown

    rows: list[dict[str, Any]] = []
    for c in cells:
        if "evaluate" in c["outputs"]:
            rows += load(c["outputs"]["evaluate"]["evaluation"])["rows"]
    res = Section("results", "Results beside the paper")
    if rows:
        header, body = paper.table(rows)
        res.add(
            Table(header, body, caption="Test accuracy (95% CI) of every cell", id="paper-table")
        )
    else:
        res.add(Note("No cell has finished its evaluate stage."))
    cell_sec = Section("cells", "Cells")
    cell_sec.add(Text(f"Command: `{command}`. Each cell has its own report.html in its folder."))
    stages = sorted({k for c in cells for k in c["status"]}, key=list(cells[0]["status"]).index)
    cell_sec.add(
        Table(
            ["cell", "folder", *stages],
            [
                [
                    c["cell"],
                    f"{Path(c['dir']).name}/report.html",
                    *[c["status"].get(s, "") for s in stages],
                ]
                for c in cells
            ],
            caption="Stage status per cell",
        )
    )
    title = f"medxfer: {name} (overview of {len(cells)} cells)"
    html_path, md_path = folder / "report.html", folder / "report.md"
    atomic_write_text(to_markdown(title, [res, cell_sec], folder), md_path)
    atomic_write_text(to_html(title, [res, cell_sec]), html_path)
    return html_path, md_path
