"""Same short budget for each fine-grained method on flowers12 (EfficientNet-Lite0, ImageNet weights).

Each method fine-tunes from the same weights with ``fit`` (same recipe, seed and split), then is
tested once on the test split through ``evaluate`` (i.e. ``task.predict``). The budget is tiny
(default 1 epoch at 224 px on a shared 2-core CPU): it checks that every method trains end to
end on real data and what it costs; it does not rank the methods.

Usage: python benchmarks/methods.py --epochs 1 [--methods fgvc-avg wsdan ...]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from _common import SHARED, print_table, write_results
from finegrain import DataConfig, ModelConfig, RunConfig, TrainConfig, evaluate, fit

WEIGHTS = SHARED / "weights" / "efficientnet_lite0.in1k.safetensors"
DATA = SHARED / "flowers12"
METHODS = {  # name -> ModelConfig fields
    "fgvc-avg": dict(task="fgvc"),
    "fgvc-se": dict(task="fgvc", attention="se"),
    "fgvc-dual": dict(task="fgvc", attention="dual"),
    "fgvc-compact_bilinear": dict(task="fgvc", pooling="compact_bilinear", pool_dim=2048),
    "fgvc-bilinear-reduce128": dict(task="fgvc", pooling="bilinear", reduce_dim=128),
    "fgvc-center-triplet": dict(task="fgvc", loss="ce+center:0.01+triplet:1.0"),
    "wsdan-m8": dict(task="wsdan", wsdan_parts=8),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", nargs="*", default=list(METHODS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.methods:
            cfg = RunConfig(
                DataConfig(data=str(DATA), img_size=args.img_size, batch_size=args.batch_size, workers=1,
                           val_fraction=0.0, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
                ModelConfig(backbone="efficientnet_lite0", pretrained=str(WEIGHTS), **METHODS[name]),
                TrainConfig(epochs=args.epochs, lr=1e-3, warmup_epochs=0.2, device="cpu", out=tmp, name=name, seed=0),
            )
            t0 = time.perf_counter()
            result = fit(cfg)
            train_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            metrics = evaluate(result.best_checkpoint, DATA, split="test", workers=1, device="cpu",
                               out_dir=f"{tmp}/{name}-eval")
            rows.append({"method": name, **METHODS[name], "top1": metrics["top1"],
                         "mean_per_class_acc": metrics["mean_per_class_acc"], "train_s": round(train_s, 1),
                         "test_s": round(time.perf_counter() - t0, 1)})
            print(rows[-1], flush=True)
            write_results("methods", {"budget": vars(args), "backbone": "efficientnet_lite0 (in1k weights)",
                                      "data": "flowers12 (720 train / 240 test)", "rows": rows})
    print_table(rows, ["method", "top1", "mean_per_class_acc", "train_s", "test_s"])


if __name__ == "__main__":
    main()
