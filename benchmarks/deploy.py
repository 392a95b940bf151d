"""Eager fp32 vs ONNX Runtime fp32 vs ONNX Runtime INT8 on this CPU: latency, throughput, top-1.

    .venv/bin/python benchmarks/deploy.py --checkpoint /tmp/demo-runs/<run>/best.safetensors \
        --data ../shared/data/flowers12

Exports the checkpoint (``finegrain.deploy.export_checkpoint``, INT8 calibrated on ``--calib-images``
training images), then for each backend: batch-1 latency (p50/p95 over ``--latency-iters`` real
test images after ``--warmup`` calls) and throughput plus top-1 over the whole test split at
``--batch-size``. All backends get the same thread count (``--threads``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _common import SHARED, print_table, write_results
from finegrain.data.datasets import open_dataset
from finegrain.deploy.onnx import OnnxModel, export_checkpoint, load_batch
from finegrain.predict import Predictor


def _bench(name: str, run, images: torch.Tensor, labels: np.ndarray, *, batch_size: int, warmup: int, iters: int) -> dict:
    for i in range(warmup):
        run(images[i : i + 1])
    lat = []
    for i in range(iters):
        x = images[i % len(images)].unsqueeze(0)
        t = time.perf_counter()
        run(x)
        lat.append(1000 * (time.perf_counter() - t))
    preds, t = [], time.perf_counter()
    for i in range(0, len(images), batch_size):
        preds.append(np.asarray(run(images[i : i + batch_size])).argmax(1))
    seconds = time.perf_counter() - t
    top1 = float(100 * (np.concatenate(preds) == labels).mean())
    return {"backend": name, "p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)),
            "throughput_img_s": len(images) / seconds, "top1": top1}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data", default=str(SHARED / "flowers12"))
    ap.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime intra-op threads")
    ap.add_argument("--batch-size", type=int, default=16, help="batch size of the throughput / accuracy pass")
    ap.add_argument("--latency-iters", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--calib-images", type=int, default=64)
    ap.add_argument("--name", default="deploy")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    pred = Predictor.from_checkpoint(args.checkpoint, device="cpu")
    test = open_dataset(args.data, split="test")
    missing = set(test.classes) - set(pred.classes)
    if missing:
        raise ValueError(f"test classes {sorted(missing)} are not in the checkpoint's classes")
    index = {c: i for i, c in enumerate(pred.classes)}
    labels = np.array([index[test.classes[y]] for y in test.labels])
    images = load_batch(pred, test.paths)
    if len(images) != len(labels):
        raise ValueError(f"{len(labels) - len(images)} test images could not be read")

    with tempfile.TemporaryDirectory() as tmp:
        summary = export_checkpoint(args.checkpoint, Path(tmp) / "model.onnx", int8=True, calib_data=Path(args.data) / "train",
                                    calib_images=args.calib_images, verify_data=Path(args.data) / "test", verify_images=32)
        fp32 = OnnxModel(summary["path"], threads=args.threads)
        int8 = OnnxModel(summary["int8_path"], threads=args.threads)
        sizes = {"onnx_fp32_mb": Path(summary["path"]).stat().st_size / 2**20,
                 "onnx_int8_mb": Path(summary["int8_path"]).stat().st_size / 2**20}
        kw = dict(batch_size=args.batch_size, warmup=args.warmup, iters=args.latency_iters)
        rows = [
            _bench("eager fp32", lambda x: pred.logits(x).numpy(), images, labels, **kw),
            _bench("onnx fp32", fp32.logits, images, labels, **kw),
            _bench("onnx int8", int8.logits, images, labels, **kw),
        ]
    base = rows[0]
    for r in rows:
        r["speedup_p50"] = base["p50_ms"] / r["p50_ms"]
        r["speedup_throughput"] = r["throughput_img_s"] / base["throughput_img_s"]
        r["top1_delta"] = r["top1"] - base["top1"]
    print_table(rows, ["backend", "p50_ms", "p95_ms", "throughput_img_s", "top1", "speedup_p50", "speedup_throughput", "top1_delta"])
    int8_row = rows[2]
    target = {"int8_at_least_2x_faster_than_eager_p50": int8_row["speedup_p50"] >= 2,
              "int8_at_least_2x_faster_than_eager_throughput": int8_row["speedup_throughput"] >= 2,
              "int8_top1_within_1_point": abs(int8_row["top1_delta"]) <= 1}
    print(f"verify (32 test images vs eager): {summary['verify']}")
    print(f"target: {target}")
    path = write_results(args.name, {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "checkpoint": str(args.checkpoint), "data": args.data, "test_images": len(images),
        "img_size": pred.meta["preprocessing"]["img_size"], "backbone": pred.meta["model"]["backbone"],
        "budget": {"threads": args.threads, "batch_size": args.batch_size, "latency_iters": args.latency_iters,
                   "warmup": args.warmup, "calib_images": summary["calibration_images"]},
        "export": {k: summary[k] for k in ("export_seconds", "quantize_seconds", "verify")}, "sizes": sizes,
        "rows": rows, "target": target,
        "note": "CPU shared with other engineers' jobs while measuring; timings are noisy",
    })
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
