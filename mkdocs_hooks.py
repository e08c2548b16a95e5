"""MkDocs hook: the committed benchmark and study results, scripts and configs become files of
the site, so a page links them as `/bench/results/<name>/<variant>.json` (the same link works
on the repository's web view) and `mkdocs build --strict` fails on a link to a missing one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

REPO = Path(__file__).resolve().parent
PATTERNS = ("bench/results/**/*.json", "bench/results/**/*.png", "bench/*.py",
            "studies/results/**/*.json", "studies/results/**/*.png", "studies/results/**/*.log",
            "studies/*.py", "configs/*.yaml")  # fmt: skip


def on_files(files: Files, config: Any) -> Files:
    for pattern in PATTERNS:
        for path in sorted(REPO.glob(pattern)):
            rel = path.relative_to(REPO).as_posix()
            files.append(File(rel, str(REPO), config["site_dir"], config["use_directory_urls"]))
    return files
