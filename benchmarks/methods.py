"""Same short budget for each fine-grained method on flowers12 (EfficientNet-Lite0, ImageNet weights).

Each method fine-tunes from the same weights with ``fit`` (same recipe, seed and split), then is
tested once on the test split through ``evaluate`` (i.e. ``task.predict``). The budget is tiny
(default 1 epoch on a shared 2-core CPU): it checks that every method trains end to end on real
data and what it costs; it does not rank the methods. Methods that cannot run here are listed
in the results with the reason (TransFG needs a ViT and no ViT weights are available offline;
the strongly supervised part model needs CUB's box and part files, which the shared copies lack).

``--train-per-class N`` trains on the first N training images of each class (a CSV listing the
shared images, written to a temporary folder) to fit a shared CPU's time budget; the test split
is always complete.

Usage: python benchmarks/methods.py --epochs 1 --img-size 96 --train-per-class 20 [--methods fgvc-avg racnn-s2 ...]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from _common import SHARED, print_table, write_results
from finegrain import DataConfig, ModelConfig, RunConfig, TrainConfig, evaluate, fit

WEIGHTS = SHARED / "weights" / "efficientnet_lite0.in1k.safetensors"
DATA = SHARED / "flowers12"
METHODS = {  # name -> (task, the task's options)
    "fgvc-avg": ("fgvc", {}),
    "fgvc-se": ("fgvc", {"attention": "se"}),
    "fgvc-dual": ("fgvc", {"attention": "dual"}),
    "fgvc-compact_bilinear": ("fgvc", {"pooling": "compact_bilinear", "pool_dim": 2048}),
    "fgvc-bilinear-reduce128": ("fgvc", {"pooling": "bilinear", "reduce_dim": 128}),
    "fgvc-netvlad-reduce128": ("fgvc", {"pooling": "netvlad", "reduce_dim": 128}),
    "fgvc-center-triplet": ("fgvc", {"loss": "ce+center:0.01+triplet:1.0"}),
    "wsdan-m8": ("wsdan", {"num_parts": 8}),
    "racnn-s2": ("racnn", {"scales": 2}),
    "parts-weak-k4": ("parts-weak", {"num_parts": 4}),
    "parts-weak-k4-mil": ("parts-weak", {"num_parts": 4, "pool": "mil"}),
}
NOT_RUN = {
    "transfg": "ViT only (timm VisionTransformer with a class token); no ViT ImageNet weights are available offline, "
               "and a randomly initialised ViT at this budget says nothing",
    "parts": "needs CUB's bounding_boxes.txt and parts/part_locs.txt; flowers12 and the shared cub50 copy have neither",
}
COLUMNS = ["method", "top1", "mean_per_class_acc", "train_img_s", "test_img_s", "params_m"]


def _subset_csv(folder: str, per_class: int) -> Path:
    """A ``path,label,split`` CSV: the first ``per_class`` training images of each class and every test image."""
    rows = ["path,label,split"]
    for split in ("train", "test"):
        for cls in sorted(d.name for d in (DATA / split).iterdir() if d.is_dir()):
            files = sorted((DATA / split / cls).iterdir())
            rows += [f"{f},{cls},{split}" for f in (files[:per_class] if split == "train" else files)]
    path = Path(folder) / "flowers12-subset.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-per-class", type=int, default=0, help="train on this many images per class (0: all 60)")
    ap.add_argument("--methods", nargs="*", default=list(METHODS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from finegrain.checkpoint import load_task

    rows = []
    payload = {"budget": vars(args), "backbone": "efficientnet_lite0 (in1k weights)",
               "data": "flowers12 (720 train / 240 test)", "not_run": NOT_RUN, "rows": rows}
    with tempfile.TemporaryDirectory() as tmp:
        data = _subset_csv(tmp, args.train_per_class) if args.train_per_class else DATA
        if args.train_per_class:
            payload["data"] = f"flowers12 ({args.train_per_class * 12} train (first {args.train_per_class} per class) / 240 test)"
        for name in args.methods:
            cfg = RunConfig(
                DataConfig(data=str(data), img_size=args.img_size, batch_size=args.batch_size, workers=1,
                           val_fraction=0.0, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
                ModelConfig(backbone="efficientnet_lite0", pretrained=str(WEIGHTS), task=METHODS[name][0],
                            options=dict(METHODS[name][1])),
                TrainConfig(epochs=args.epochs, device="cpu", out=tmp, name=name, seed=0),  # the default recipe
            )
            t0 = time.perf_counter()
            result = fit(cfg)
            train_s = time.perf_counter() - t0
            epoch_rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
            task, _ = load_task(result.best_checkpoint, "cpu")
            params = sum(p.numel() for p in task.parameters())
            t0 = time.perf_counter()
            metrics = evaluate(result.best_checkpoint, data, split="test", workers=1, device="cpu",
                               out_dir=f"{tmp}/{name}-eval")
            test_s = time.perf_counter() - t0
            rows.append({"method": name, "task": METHODS[name][0], **METHODS[name][1], "top1": metrics["top1"],
                         "mean_per_class_acc": metrics["mean_per_class_acc"],
                         "train_img_s": round(sum(r["images_per_s"] * r["epoch_seconds"] for r in epoch_rows)
                                              / sum(r["epoch_seconds"] for r in epoch_rows), 2),
                         "test_img_s": round(240 / test_s, 2), "params_m": round(params / 1e6, 2),
                         "train_s": round(train_s, 1), "test_s": round(test_s, 1)})
            print(rows[-1], flush=True)
            write_results("methods", payload)
    table = rows + [{"method": n, **{c: "not run" for c in COLUMNS[1:]}} for n in NOT_RUN]
    print_table(table, COLUMNS)
    for n, why in NOT_RUN.items():
        print(f"{n}: not run: {why}")


if __name__ == "__main__":
    main()
