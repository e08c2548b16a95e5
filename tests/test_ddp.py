"""Two CPU processes under torchrun (gloo) train one model and agree on it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch


@pytest.mark.parametrize("ema", ["0", "0.9"])
def test_torchrun_two_cpu_processes(synth_root: Path, tmp_path: Path, ema: str) -> None:
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "medxfer", "train", "--data", str(synth_root), "--run-dir", str(run),
           "model.arch=resnet18", "model.weights=none", "data.image_size=48", "train.epochs=2",
           "train.batch_size=8", "train.threads=1", "eval.n_bootstrap=20",
           "train.steps_per_epoch=4", f"train.ema={ema}"]  # fmt: skip
    # its own process group: on a timeout (or pytest's) the workers go with torchrun
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        _, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, stderr[-3000:]
    ddp = json.loads((run / "ddp.json").read_text())
    assert ddp["world_size"] == 2
    assert len(set(ddp["state_checksums"])) == 1  # both ranks hold identical weights
    from medxfer.models import create_model
    from medxfer.train.loop import state_checksum

    model = create_model("resnet18", weights="none", num_classes=4).model
    model.load_state_dict(torch.load(run / "last.pt", weights_only=True)["model"])
    assert state_checksum(model) == ddp["state_checksums"][0]  # the saved file is that model
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["compute"]["world_size"] == 2
    assert metrics["test"]["n"] == sum(metrics["data"]["counts"]["test"].values())
