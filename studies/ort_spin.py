"""What onnxruntime's spin-waiting threads do to the eager PyTorch call timed right after them.

    python studies/ort_spin.py [--size 160] [--threads 2] [--blocks 5] [--repeats 20]

EfficientNet-Lite0 with random weights (latency does not depend on the values), batch 1. In each
block: PyTorch alone; then onnxruntime and PyTorch called alternately, once with a session whose
intra-op threads spin after each run (onnxruntime's default) and once without
(``prune.export.ort_options``, what medxfer's timings use). Median ms per call in each block;
the JSON keeps every block. Writes studies/results/ort-spin/result.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # _common, pruning

from _common import STUDY_RESULTS, save


def main() -> None:
    import onnxruntime as ort
    import torch

    from medxfer.models import create_model
    from medxfer.prune.export import export_onnx, ort_options

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=160)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--blocks", type=int, default=5)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = create_model("efficientnet_lite0", weights="none", num_classes=4).model.eval()
    x = torch.randn(1, 3, args.size, args.size)
    feed = {"image": x.numpy()}

    def ms(call: Any) -> float:
        t0 = time.perf_counter()
        call()
        return (time.perf_counter() - t0) * 1000

    blocks: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        path = str(export_onnx(model, args.size, Path(tmp) / "m.onnx"))
        sessions = {spin: ort.InferenceSession(path, sess_options=ort_options(args.threads, spin),
                                               providers=["CPUExecutionProvider"])
                    for spin in (True, False)}  # fmt: skip
        for _ in range(args.blocks):
            block: dict[str, list[float]] = {"torch_alone": []}
            for i in range(2 + args.repeats):  # 2 warm-up calls
                t = ms(lambda: model(x))
                if i >= 2:
                    block["torch_alone"].append(t)
            for spin, s in sessions.items():
                tag = "spinning" if spin else "no_spin"
                block[f"ort_{tag}"], block[f"torch_after_ort_{tag}"] = [], []
                for i in range(2 + args.repeats):
                    t_ort = ms(lambda s=s: s.run(None, feed))
                    t_torch = ms(lambda: model(x))
                    if i >= 2:
                        block[f"ort_{tag}"].append(t_ort)
                        block[f"torch_after_ort_{tag}"].append(t_torch)
            blocks.append({k: statistics.median(v) for k, v in block.items()})
            print({k: round(v, 2) for k, v in blocks[-1].items()}, flush=True)
    summary = {k: statistics.median(b[k] for b in blocks) for k in blocks[0]}
    print("median over blocks (ms):", {k: round(v, 2) for k, v in summary.items()})
    save("ort-spin/result", root=STUDY_RESULTS, payload={
                      "arch": "efficientnet_lite0 (random weights)", "image_size": args.size,
                      "batch": 1, "threads": args.threads, "blocks_ms": blocks,
                      "median_ms": summary,
                      "statistic": "median over blocks of each block's median ms"})  # fmt: skip


if __name__ == "__main__":
    main()
