"""Evaluation speed against training speed, per image, in one run (issue 17: eval >= 3x the training rate).

    python benchmarks/eval_speed.py                  # cub50 test (1,500 images, 227 px), Lite0 at 224 px

- training rate: one epoch of ``finegrain.fit`` (default recipe, 1 loader worker) on every 4th (363) of cub50's
  training images; the images/s of its epoch line (the optimizer steps only, not validation);
- evaluation rate: ``finegrain.evaluate`` on cub50's 1,500 test images, timed end to end (checkpoint
  load, decode, preprocessing, forward, metrics, files), in fp32 and in the default precision (bf16 on
  CPUs with native bf16, as training), with 1 and 2 loader workers; top-1 of each shows what bf16 costs.

Before the change (the same script, the code of 2026-12-02 before it): eval 32.7 img/s end to end
with 1 worker, 34.5 with 2, against training at 24.6 img/s (1.33x and 1.40x).
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

from _common import SHARED, print_table, write_results
from finegrain import DataConfig, ModelConfig, RunConfig, TrainConfig, evaluate, fit, open_dataset
from finegrain.train.logger import read_rows

WEIGHTS = SHARED / "weights" / "efficientnet_lite0.in1k.safetensors"
CUB = SHARED / "cub50"


def training_rate(tmp: Path, workers: int, n: int = 320) -> tuple[float, Path]:
    train = open_dataset(CUB, "train")
    pick = range(0, len(train), max(1, len(train) // n))
    data = tmp / "train.csv"
    with open(data, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows((train.paths[i], train.classes[train.labels[i]]) for i in pick)  # every class, about n images
    cfg = RunConfig(DataConfig(data=str(data), img_size=224, batch_size=32, workers=workers, val_fraction=0.0),
                    ModelConfig(backbone="efficientnet_lite0", pretrained=str(WEIGHTS)),
                    TrainConfig(epochs=1, out=str(tmp / "runs"), name="speed", calibrate=False))
    run = fit(cfg)
    row = read_rows(run.run_dir / "metrics.jsonl")[-1]
    return float(row["images_per_s"]), run.best_checkpoint


def eval_rate(checkpoint: Path, workers: int, out: Path, precision: str) -> dict:
    t0 = time.perf_counter()
    m = evaluate(checkpoint, str(CUB), split="test", workers=workers, out_dir=out, precision=precision)
    return {"end-to-end img/s": m["n"] / (time.perf_counter() - t0), "loop img/s": m["images_per_s"], "precision": m["precision"],
            "top1": m["top1"]}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--name", default="eval-speed")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train_rate, ckpt = training_rate(tmp, workers=1)
        rows = []
        for w, precision in [(1, "fp32"), *((w, "auto") for w in args.workers)]:
            r = eval_rate(ckpt, w, tmp / f"eval-{w}-{precision}", precision)
            rows.append({"eval workers": w, **r, "training img/s": train_rate, "eval / training": r["end-to-end img/s"] / train_rate})
    print_table(rows, list(rows[0]))
    out = write_results(args.name, {"data": "cub50 test (1,500 images, 227 px)", "backbone": "efficientnet_lite0", "img_size": 224,
                                    "training": "1 epoch of fit on every 4th cub50 train image (363), batch 32, 1 worker",
                                    "cpu": cpu_name(), "results": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
