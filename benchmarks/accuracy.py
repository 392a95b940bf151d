"""Accuracy of finegrain's default recipe against a plain fine-tuning baseline on cub50.

Both fine-tune EfficientNet-Lite0 (ImageNet weights from ../shared/data) at 224 px for the same
number of epochs and are tested once on the official test split.

- finegrain: ``fit`` with the default recipe (AdamW, backbone lr x0.1, warmup + cosine, label
  smoothing, RandomResizedCrop scale >= 0.25, near-zero new head), best epoch chosen on a 10%
  validation split carved from train.
- baseline: a timm model and an ImageFolder-style loader, AdamW lr 1e-3 on all weights,
  label smoothing 0.1, RandomResizedCrop + flip, one-cycle schedule (warmup 10% of the steps, then
  cosine annealing, torch's OneCycleLR), the last epoch is tested: the strongest plain recipe a
  timm user writes by hand (issue 17), not a constant learning rate.

Usage: python benchmarks/accuracy.py --epochs 30 --seeds 0 1 2   (the issue's budget; use the GPU)
       python benchmarks/accuracy.py --epochs 3 --seeds 0 1 2    (the reduced CPU budget)
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from _common import SHARED, print_table, write_results
from finegrain import DataConfig, ModelConfig, RunConfig, TrainConfig, evaluate, fit, open_dataset
from finegrain.data.dataset import ImageDataset, collate
from finegrain.eval.metrics import classification_metrics
from finegrain.models.backbone import read_state_dict
from finegrain.train.loop import predict_loader
from finegrain.utils import resolve_device

WEIGHTS = SHARED / "weights" / "efficientnet_lite0.in1k.safetensors"
DATA = SHARED / "cub50"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def run_finegrain(seed: int, epochs: int, workers: int, out: str, **train) -> dict:
    cfg = RunConfig(
        DataConfig(data=str(DATA), img_size=224, batch_size=32, workers=workers),
        ModelConfig(backbone="efficientnet_lite0", pretrained=str(WEIGHTS)),
        TrainConfig(epochs=epochs, seed=seed, out=out, name=f"finegrain-seed{seed}-{int(time.time())}", **train),
    )
    t0 = time.perf_counter()
    result = fit(cfg)
    m = evaluate(result.best_checkpoint, str(DATA), split="test", workers=workers, precision="fp32")  # the baseline tests in fp32
    return {"top1": m["top1"], "mean_per_class_acc": m["mean_per_class_acc"], "seconds": time.perf_counter() - t0,
            "best_epoch": result.best_epoch}


def run_baseline(seed: int, epochs: int, workers: int) -> dict:
    torch.manual_seed(seed)
    device = resolve_device("auto")
    train, test = open_dataset(DATA, "train"), open_dataset(DATA, "test")
    model = timm.create_model("efficientnet_lite0", num_classes=len(train.classes))
    sd = {k: v for k, v in read_state_dict(WEIGHTS).items() if not k.startswith("classifier.")}
    model.load_state_dict(sd, strict=False)
    model.to(device)
    t_train = v2.Compose([v2.ToImage(), v2.RandomResizedCrop(224, antialias=True), v2.RandomHorizontalFlip(),
                          v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])
    t_test = v2.Compose([v2.ToImage(), v2.Resize(256, antialias=True), v2.CenterCrop(224),
                         v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])
    loader = DataLoader(ImageDataset(train, t_train), batch_size=32, shuffle=True, num_workers=workers,
                        collate_fn=collate, drop_last=True, generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=epochs * len(loader), pct_start=0.1)
    t0 = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for batch in loader:
            x, y = batch["image"].to(device), batch["label"].to(device)
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    logits, labels, _ = predict_loader(model, DataLoader(ImageDataset(test, t_test), batch_size=64, num_workers=workers,
                                                         collate_fn=collate), device=device)
    m = classification_metrics(logits, labels, test.classes)
    return {"top1": m["top1"], "mean_per_class_acc": m["mean_per_class_acc"], "seconds": time.perf_counter() - t0}


def summarise(name: str, runs: list[dict]) -> dict:
    out = {"recipe": name, "runs": runs}
    for k in ("top1", "mean_per_class_acc", "seconds"):
        vals = [r[k] for r in runs]
        out[f"{k}_mean"] = statistics.mean(vals)
        out[f"{k}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default="/tmp/finegrain-bench-runs")
    ap.add_argument("--name", default="accuracy", help="results file name (benchmarks/results/NAME-<machine>.json)")
    ap.add_argument("--recipes", nargs="+", default=["finegrain", "baseline"], choices=("finegrain", "baseline"),
                    help="which recipes to run (e.g. only finegrain, to check that a change keeps its numbers)")
    ap.add_argument("--reuse-baseline", default=None,
                    help="take the baseline runs from an earlier results JSON of this script (same epochs and seeds) instead of re-running them")
    args = ap.parse_args()
    if not DATA.is_dir() or not WEIGHTS.is_file():
        raise SystemExit(f"needs {DATA} and {WEIGHTS} (set FINEGRAIN_SHARED_DATA)")
    results = []
    reused = None
    if args.reuse_baseline:
        import json

        prev = json.loads(open(args.reuse_baseline).read())
        if prev["epochs"] != args.epochs or prev["seeds"] != args.seeds:
            raise SystemExit(f"{args.reuse_baseline} has epochs {prev['epochs']} seeds {prev['seeds']}; rerun the baseline")
        reused = next(r for r in prev["results"] if r["recipe"] == "baseline")
    for name, fn in (("finegrain", lambda s: run_finegrain(s, args.epochs, args.workers, args.out)),
                     ("baseline", lambda s: run_baseline(s, args.epochs, args.workers))):
        if name not in args.recipes:
            continue
        if name == "baseline" and reused is not None:
            results.append({**reused, "source": f"reused from {args.reuse_baseline} (same script, epochs and seeds)"})
            continue
        runs = []
        for seed in args.seeds:
            r = fn(seed)
            print(f"{name} seed {seed}: top-1 {r['top1']:.2f} mean per-class {r['mean_per_class_acc']:.2f} ({r['seconds']:.0f} s)", flush=True)
            runs.append({"seed": seed, **r})
        results.append(summarise(name, runs))
    rows = [{"recipe": r["recipe"], "top-1": f"{r['top1_mean']:.2f} ± {r['top1_std']:.2f}",
             "mean per-class": f"{r['mean_per_class_acc_mean']:.2f} ± {r['mean_per_class_acc_std']:.2f}",
             "wall s/run": r["seconds_mean"]} for r in results]
    print_table(rows, ["recipe", "top-1", "mean per-class", "wall s/run"])
    gain = results[0]["top1_mean"] - results[1]["top1_mean"] if len(results) == 2 else None
    if gain is not None:
        print(f"finegrain - baseline: {gain:+.2f} top-1 points")
    path = write_results(args.name, {"data": "cub50 (50 CUB-200-2011 species, 1449 train / 1500 test, 227 px copies)",
                                      "backbone": "efficientnet_lite0 (ImageNet-1k weights)", "img_size": 224,
                                      "epochs": args.epochs, "seeds": args.seeds,
                                      "budget": "full (issue: 30 epochs)" if args.epochs >= 30 else f"reduced: {args.epochs} epochs",
                                      "results": results, "top1_gain": gain})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
