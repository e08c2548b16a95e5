"""The experiment report: its tables match the run files, it is self-contained, it opens in a
headless Chromium with every image decoded; the paper table collects finished experiments."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from experiment_demo import gan_available, run_demo

from medxfer.cli import main
from medxfer.evaluate.metrics import split_shift
from medxfer.report.blocks import with_ci
from medxfer.report.paper import dataset_key, paper_value, table


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.getbasetemp() / "demo-experiment"  # one run for both test files
    return run_demo(base / "runs", base / "cache")


class Tables(HTMLParser):
    """Every <table id=...> as a list of rows of cell texts; every <img src>."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.images: list[str] = []
        self.scripts = 0
        self._table: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "table":
            self._table = a.get("id") or f"table{len(self.tables)}"
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self.tables[self._table].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(a.get("src") or "")
        elif tag == "script":
            self.scripts += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._table:
            self.tables[self._table][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def _parse(path: Path) -> Tables:
    p = Tables()
    p.feed(path.read_text())
    return p


def _marker(demo: Path, stage: str) -> dict:  # type: ignore[type-arg]
    return json.loads((demo / "stages" / f"{stage}.json").read_text())["outputs"]


def test_report_tables_match_metrics(demo: Path) -> None:
    t = _parse(demo / "report.html")
    train = json.loads((Path(_marker(demo, "train")["run_dir"]) / "metrics.json").read_text())
    ticket = Path(_marker(demo, "prune")["selected"]["run_dir"])
    pruned = json.loads((ticket / "metrics.json").read_text())
    rows = t.tables["test-metrics"][1:]
    assert [r[0] for r in rows] == ["fine-tuned", "fine-tuned + pruned"]
    for row, m in zip(rows, (train["test"], pruned["test"]), strict=True):
        ci = m["ci95"]
        assert row[1] == str(m["n"])
        assert row[2] == with_ci(m["accuracy"], ci["accuracy"])
        assert row[3] == with_ci(m["balanced_accuracy"], ci["balanced_accuracy"])
        assert row[4:7] == [
            f"{m['macro_f1']:.3f}",
            f"{m['auroc_macro_ovr']:.3f}",
            f"{m['ece']:.3f}",
        ]
    # validation against test, per class, for both models
    shift = t.tables["val-vs-test"][1:]
    expected = [
        (label, c, m["val"]["per_class_recall"][c], m["test"]["per_class_recall"][c])
        for label, m in (("fine-tuned", train), ("fine-tuned + pruned", pruned))
        for c in m["test"]["class_names"]
    ]
    assert len(shift) == len(expected)
    for row, (label, c, v, te) in zip(shift, expected, strict=True):
        assert row[:4] == [label, c, f"{v:.3f}", f"{te:.3f}"]
        assert row[4] == f"{100 * (te - v):+.1f}"
    # the BatchNorm recalibration of both models, as their metrics.json record it
    md = " ".join((demo / "report.md").read_text().split())
    for label, m in (("fine-tuned", train), ("fine-tuned + pruned", pruned)):
        b = m["bn_recalibration"]
        said = "kept" if b["kept"] else "not kept"
        assert (f"{label}: {b['val_balanced_accuracy_before']:.3f} -> "
                f"{b['val_balanced_accuracy_after']:.3f}, {said}") in md  # fmt: skip
    # test accuracy apart for near copies of training images, as metrics.json records it
    from medxfer.evaluate.metrics import format_near_copies

    for label, m in (("fine-tuned", train), ("fine-tuned + pruned", pruned)):
        said = f"{label}: {format_near_copies(m['test_near_copies'])}"
        assert said in md.replace("\\[", "[").replace("\\]", "]")
    # the paper-style table: our numbers in the synthetic-demo column
    paper = t.tables["paper-table"]
    assert paper[1][:2] == ["efficientnet_lite0", "fine-tuned"]
    assert (
        paper[1][2]
        == f"{train['test']['accuracy']:.3f} ["
        + ", ".join(f"{x:.3f}" for x in train["test"]["ci95"]["accuracy"])
        + "]"
    )
    assert paper[2][2].startswith(f"{pruned['test']['accuracy']:.3f} [")
    # audit counts and the pruning levels
    audit = json.loads(Path(_marker(demo, "audit")["audit"]).read_text())
    found = dict(r for r in t.tables["audit"][1:])
    assert found["images"] == str(audit["summary"]["images"])
    assert found["leaking_train_files"] == str(audit["summary"]["leaking_train_files"])
    said = "The label can be told from image statistics alone" in md
    assert said == audit["shortcuts"]["flagged"]
    lottery = json.loads(Path(_marker(demo, "prune")["lottery"]).read_text())
    assert len(t.tables["pruning"]) - 1 == len(lottery["levels"])
    source = "previous level's final weights (last epoch) under one global threshold"
    assert f"{source}; its ticket restarts from the dense run's starting weights" in md
    trials = t.tables["trials"][1:]
    assert len(trials) >= 2 and {r[1] for r in trials} <= {"COMPLETE", "PRUNED", "FAIL"}


def test_report_names_the_imbalance_handling(demo: Path) -> None:
    from medxfer.report.sections import imbalance_text

    t = _parse(demo / "report.html")
    train = Path(_marker(demo, "train")["run_dir"])
    cfg = yaml.safe_load((train / "config.yaml").read_text())
    overview = [r for table in t.tables.values() for r in table if r and r[0] == "class imbalance"]
    assert overview == [["class imbalance", imbalance_text(cfg)]]
    gan = {"data": {"synthetic": "gan/manifest.csv"}, "train": {"weighted_sampling": False}}
    assert imbalance_text(gan) == "GAN images added to the training split"
    base = {"data": {"synthetic": ""}, "train": {"weighted_sampling": False, "class_weight": False}}
    assert imbalance_text(base) == "none (plain loss, natural class frequencies)"
    both = {"data": {"synthetic": ""}, "train": {"weighted_sampling": True, "class_weight": True}}
    assert imbalance_text(both) == (
        "each class sampled equally often; inverse-frequency class weights in the loss"
    )


def test_report_is_self_contained(demo: Path) -> None:
    t = _parse(demo / "report.html")
    assert t.scripts == 0 and "http://" not in (demo / "report.html").read_text()
    assert t.images and all(src.startswith("data:image/png;base64,") for src in t.images)
    # confusion, ROC, calibration of both models, curves, pruning, Grad-CAM, tuning, balance
    assert len(t.images) >= 10
    text = (demo / "report.html").read_text()
    for title in (
        "Data audit",
        "Class balance",
        "GAN samples",
        "Hyper-parameter tuning",
        "Training curves",
        "confusion matrices",
        "Lottery-ticket",
        "Grad-CAM",
    ):
        assert title in text, title
    if not gan_available():
        assert "The gan stage was switched off" in text
    md = (demo / "report.md").read_text()
    for link in re.findall(r"!\[[^]]*\]\(([^)]+)\)", md):
        assert (demo / link).is_file(), link


CHECK = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images];
  document.body.setAttribute('data-medxfer-check', JSON.stringify({
    images: imgs.length, loaded: imgs.filter(i => i.complete && i.naturalWidth > 0).length,
    tables: document.querySelectorAll('table').length,
    paper: !!document.getElementById('paper-table')}));
});
</script>"""


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.skip("chromium is not installed (apt-get install -y chromium; .ci/run tries it)")


def test_report_opens_in_chromium(demo: Path, tmp_path: Path) -> None:
    probe = tmp_path / "report.html"  # a copy with a checking script; the report has none
    probe.write_text((demo / "report.html").read_text().replace("</body>", CHECK + "</body>"))
    cmd = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=10000",
        "--dump-dom",
        probe.as_uri(),
    ]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as err:
        pytest.skip(f"chromium could not be started: {err}")
    found = re.search(r'data-medxfer-check="([^"]+)"', out.stdout)
    if out.returncode != 0 and not found:
        pytest.skip(f"chromium could not be started: {out.stderr.strip()[-300:]}")
    assert found, out.stdout[-500:]
    check = json.loads(found.group(1).replace("&quot;", '"'))
    n_img = len(_parse(demo / "report.html").images)
    assert check == {"images": n_img, "loaded": n_img, "tables": check["tables"], "paper": True}
    assert check["tables"] >= 8


def test_paper_table_command(demo: Path, tmp_path: Path) -> None:
    out = tmp_path / "paper-table.json"
    assert main(["paper-table", str(demo), "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    keys = {
        "dataset",
        "arch",
        "weights",
        "tuned",
        "pruned",
        "sparsity",
        "test_accuracy",
        "test_balanced_accuracy",
        "test_accuracy_ci95",
        "test_balanced_accuracy_ci95",
        "command",
    }
    assert len(rows) == 2 and all(keys <= set(r) for r in rows)
    assert rows[0]["dataset"] == "synthetic-demo" and rows[0]["command"].startswith("medxfer run")
    for r in rows:  # the classes validation and test disagree on, from the run's metrics
        m = json.loads((Path(r["run_dir"]) / "metrics.json").read_text())
        shifted = [c["class"] for c in split_shift(m["val"], m["test"]) if c["shifted"]]
        assert r["val_test_shifted_classes"] == shifted
    md = out.with_suffix(".md").read_text()
    assert f"{rows[0]['test_accuracy']:.3f}" in md and "efficientnet_lite0" in md


def test_paper_layout_and_references() -> None:
    assert dataset_key("../shared/data/brain-tumor-mri") == "brain-tumor"
    assert (
        dataset_key("/x/chest-xray-pneumonia") == "pneumonia"
        and dataset_key("") == "synthetic-demo"
    )
    assert dataset_key("/tmp/brain/p1/manifest.csv") == "brain-tumor"  # a manifest's folders
    assert dataset_key("/data/knee/manifest.csv") == "knee"
    assert dataset_key("/data/knee.v2") == "knee.v2"  # a folder with a dot is still the folder
    assert paper_value("brain-tumor", "efficientnet", False) == 0.96
    assert paper_value("pneumonia", "googlenet", True) == 0.815
    assert paper_value("pneumonia", "googlenet", False) is None
    row = {
        "test_accuracy": 0.9,
        "test_accuracy_ci95": [0.85, 0.95],
        "test_balanced_accuracy": 0.8,
        "test_balanced_accuracy_ci95": None,
        "sparsity": 0.5,
    }
    rows = [
        row
        | {
            "dataset": "pneumonia",
            "arch": "googlenet",
            "pruned": True,
            "paper_test_accuracy": 0.815,
        },
        row
        | {
            "dataset": "brain-tumor",
            "arch": "googlenet",
            "pruned": False,
            "paper_test_accuracy": None,
        },
    ]
    header, body = table(rows)
    assert header[2].startswith("brain tumor MRI") and header[5].startswith("chest X-ray")
    assert body[0][:3] == ["googlenet", "fine-tuned", "0.900 [0.850, 0.950]"]
    assert body[0][5] == "—" and body[1][5] == "0.900 [0.850, 0.950] (sparsity 50%)"
    assert body[1][7] == "0.815"
    # two studies (cpu-* and paper-* experiments) of one architecture: a study column
    two = [rows[1] | {"experiment": "cpu-brain-tumor"},
           rows[1] | {"experiment": "paper-brain-tumor", "test_accuracy": 0.97}]  # fmt: skip
    header, body = table(two)
    assert header[:3] == ["study", "architecture", "variant"]
    assert [[*b[:2], b[3][:5]] for b in body] == [["cpu", "googlenet", "0.900"],
                                                  ["paper", "googlenet", "0.970"]]  # fmt: skip
    # a second study of one dataset, named by what is not the dataset, keeps its own row
    three = [*two, rows[1] | {"experiment": "cpu-brain-tumor-192", "test_accuracy": 0.95}]
    assert [[b[0], b[3][:5]] for b in table(three)[1]] == [
        ["cpu", "0.900"], ["cpu-192", "0.950"], ["paper", "0.970"]]  # fmt: skip


def test_paper_table_reads_a_moved_experiment(demo: Path, tmp_path: Path) -> None:
    """An experiment folder fetched from another machine: its markers name absolute paths
    that do not exist here; the table reads the same files under the moved folder."""
    moved = tmp_path / "elsewhere" / "demo-copy"
    shutil.copytree(demo, moved)
    marker = moved / "stages" / "evaluate.json"
    m = json.loads(marker.read_text())
    m["outputs"]["evaluation"] = "/nonexistent/x/" + "/".join(
        Path(m["outputs"]["evaluation"]).parts[-2:]
    )
    marker.write_text(json.dumps(m))
    assert main(["paper-table", str(moved)]) == 0  # no --out: into the experiment folder
    rows = json.loads((moved / "paper-table.json").read_text())["rows"]
    assert len(rows) == 2 and {r["experiment"] for r in rows} == {"demo-copy"}


def test_paper_table_bench_keeps_the_committed_table_on_a_name_clash(
    demo: Path, tmp_path: Path
) -> None:
    """studies/paper_table.py --keep-committed refuses to replace a committed experiment's rows
    and leaves both the JSON and its markdown twin as they were."""
    script = Path(__file__).resolve().parents[1] / "studies" / "paper_table.py"
    env = {**os.environ, "MEDXFER_BENCH_RESULTS": str(tmp_path)}

    def bench(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, str(script), str(demo), *args]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)

    assert bench().returncode == 0
    before = {p.name: p.read_text() for p in tmp_path.glob("paper-table/paper-table.*")}
    assert set(before) == {"paper-table.json", "paper-table.md"}
    done = bench("--keep-committed", "--note", "x")
    assert done.returncode != 0 and "already in the committed table" in done.stderr
    assert {p.name: p.read_text() for p in tmp_path.glob("paper-table/paper-table.*")} == before


def test_matrix_overview_and_off_stages(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "m.yaml"
    f.write_text(
        "name: m\nmatrix: {model.arch: [resnet18, googlenet]}\nstages: {audit: false, gan: false,"
        " tune: false, train: false, prune: false, evaluate: true, report: true}\n"
    )
    assert main(["run", str(f), f"out_dir={tmp_path}"]) == 0
    exp = Path(capsys.readouterr().out.strip())
    assert exp == tmp_path / "experiments" / "m"
    for cell in ("resnet18", "googlenet"):
        text = (exp / cell / "report.html").read_text()
        for stage in ("audit", "gan", "tune", "prune"):
            assert f"The {stage} stage was switched off" in text, (cell, stage)
        assert "nothing to evaluate" in text
        log = json.loads((exp / cell / "experiment.json").read_text())
        assert log["stages"]["evaluate"]["status"] == "unavailable"
    overview = _parse(exp / "report.html")
    cells = overview.tables["table0"]
    assert [r[0] for r in cells[1:]] == ["resnet18", "googlenet"]
    assert (
        cells[1][1] == "resnet18/report.html"
        and "No cell has finished" in (exp / "report.html").read_text()
    )


def test_pruning_lineage_in_words() -> None:
    from medxfer.report.stage_sections import lineage

    lr_best = lineage({"rewind": "lr", "weights": "best"})
    assert "best weights (the epoch validation chose)" in lr_best
    assert "learning-rate rewinding" in lr_best
    late = lineage({"rewind": "epoch:2"})  # a folder made before prune.weights existed
    assert "final weights (last epoch)" in late and "weights after 2 epoch(s)" in late


def test_report_names_shifted_classes() -> None:
    from medxfer.report.blocks import Note, Section, Table
    from medxfer.report.sections import _split_shift

    def cls(name: str, shifted: bool) -> dict:
        recall = {"val_recall": 0.98, "test_recall": 0.70, "gap": -0.28}
        share = {"val_share": 0.26, "test_share": 0.38}
        return {"class": name, **recall, **share, "p_value": 1e-9, "shifted": shifted}

    s = Section("results", "Results")
    _split_shift(s, [("fine-tuned", [cls("normal", True), cls("viral", False)])])
    table = next(b for b in s.blocks if isinstance(b, Table))
    assert [r[-1] for r in table.rows] == ["shifted", ""]
    notes = [b.text for b in s.blocks if isinstance(b, Note)]
    assert len(notes) == 1 and "disagree on normal:" in notes[0]
    quiet = Section("results", "Results")
    _split_shift(quiet, [("fine-tuned", [cls("normal", False)])])
    assert not any(isinstance(b, Note) for b in quiet.blocks)
