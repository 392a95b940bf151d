"""Accuracy of finegrain's default recipe against a plain fine-tuning baseline on cub50.

Both fine-tune EfficientNet-Lite0 (ImageNet weights from ../shared/data) at 224 px for the same
number of epochs and are tested once on the official test split.

- finegrain: ``fit`` with the default recipe (AdamW, backbone lr x0.1, warmup + cosine, label
  smoothing, RandomResizedCrop scale >= 0.25, near-zero new head), the epoch kept chosen (``--select``, default 1se) on a 10%
  validation split carved from train.
- baseline: a timm model and an ImageFolder-style loader, AdamW lr 1e-3 on all weights,
  label smoothing 0.1, RandomResizedCrop + flip, one-cycle schedule (warmup 10% of the steps, then
  cosine annealing, torch's OneCycleLR), the last epoch is tested: the strongest plain recipe a
  timm user writes by hand (issue 17), not a constant learning rate.

Usage: python benchmarks/accuracy.py --epochs 30 --seeds 0 1 2   (the issue's budget; use the GPU)
       python benchmarks/accuracy.py --epochs 3 --seeds 0 1 2    (the reduced CPU budget)
       python benchmarks/accuracy.py --merge A.json B.json --name accuracy-3ep   (one table of the seeds of
           earlier runs of this script with the same epochs, e.g. seeds run in two sessions)
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

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
from finegrain.train.loop import autocast, cpu_has_native_bf16, predict_loader
from finegrain.utils import resolve_device

WEIGHTS = SHARED / "weights" / "efficientnet_lite0.in1k.safetensors"
DATA = SHARED / "cub50"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def run_finegrain(seed: int, epochs: int, workers: int, out: str, overrides: dict | None = None,
                  keep_epochs: bool = False) -> dict:
    """The default recipe, with ``overrides`` (``{"train.ema": True, "data.random_erase": 0.25}``) of its config fields;
    ``keep_epochs``: copy every epoch's ``last.safetensors`` to ``epochs/epoch-NN.safetensors`` in the run folder, so
    checkpoint-selection rules can be compared afterwards on the validation split (``benchmarks/selection.py``)."""
    name = f"finegrain-seed{seed}-{int(time.time())}"
    cfg = RunConfig(
        DataConfig(data=str(DATA), img_size=224, batch_size=32, workers=workers),
        ModelConfig(backbone="efficientnet_lite0", pretrained=str(WEIGHTS)),
        TrainConfig(epochs=epochs, seed=seed, out=out, name=name),
    )
    for key, value in (overrides or {}).items():
        section, field = key.split(".", 1)
        setattr(getattr(cfg, section), field, value)
    t0 = time.perf_counter()
    result = fit(cfg, on_epoch=_keep_epoch(Path(out) / name) if keep_epochs else None)
    m = evaluate(result.best_checkpoint, str(DATA), split="test", workers=workers, precision="fp32")  # the baseline tests in fp32
    return {"top1": m["top1"], "mean_per_class_acc": m["mean_per_class_acc"], "seconds": time.perf_counter() - t0,
            "best_epoch": result.best_epoch, "val_top1": result.best_val_top1}  # choose recipes on val_top1, never on top1


def _keep_epoch(run_dir: Path):
    def keep(row: dict) -> None:  # called once the epoch's last.safetensors is saved
        (run_dir / "epochs").mkdir(exist_ok=True)
        shutil.copyfile(run_dir / "last.safetensors", run_dir / "epochs" / f"epoch-{row['epoch']:02d}.safetensors")
    return keep


def run_baseline(seed: int, epochs: int, workers: int, amp: bool = False) -> dict:
    """The plain loop; ``amp``: bf16 autocast + channels_last for the training steps, as timm's ``train.py --amp
    --channels-last`` (on the CPU only where it has native bf16); the test pass stays fp32 either way."""
    torch.manual_seed(seed)
    device = resolve_device("auto")
    train, test = open_dataset(DATA, "train"), open_dataset(DATA, "test")
    model = timm.create_model("efficientnet_lite0", num_classes=len(train.classes))
    sd = {k: v for k, v in read_state_dict(WEIGHTS).items() if not k.startswith("classifier.")}
    model.load_state_dict(sd, strict=False)
    model.to(device)
    if amp:
        model.to(memory_format=torch.channels_last)
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
            if amp:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, amp, cpu=True):
                loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    logits, labels, _ = predict_loader(model, DataLoader(ImageDataset(test, t_test), batch_size=64, num_workers=workers,
                                                         collate_fn=collate), device=device)
    m = classification_metrics(logits, labels, test.classes)
    return {"top1": m["top1"], "mean_per_class_acc": m["mean_per_class_acc"], "seconds": time.perf_counter() - t0,
            "train_precision": "bf16 autocast + channels_last" if amp and _bf16(device) else "fp32"}


def _bf16(device: torch.device) -> bool:
    return device.type == "cuda" or cpu_has_native_bf16()


def summarise(name: str, runs: list[dict]) -> dict:
    out = {"recipe": name, "runs": runs}
    for k in ("top1", "mean_per_class_acc", "seconds", "val_top1"):
        vals = [r[k] for r in runs if r.get(k) is not None]
        if not vals:
            continue
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
    ap.add_argument("--set", nargs="+", default=[], metavar="SECTION.FIELD=VALUE",
                    help="change the finegrain recipe, e.g. train.ema=true data.random_erase=0.25 model.drop_path_rate=0.2 "
                         "(the values are read as YAML); the results name the changes")
    ap.add_argument("--baseline-amp", action="store_true",
                    help="train the plain loop with bf16 autocast + channels_last (timm's --amp --channels-last), as finegrain "
                         "trains; off: fp32, as the earlier results files")
    ap.add_argument("--keep-epochs", action="store_true",
                    help="keep every epoch's weights of the finegrain runs (RUN/epochs/), for benchmarks/selection.py")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="train nothing: put together the runs of earlier results files of this script (same epochs, other seeds)")
    args = ap.parse_args()
    if args.merge:
        return report(args, *merge_results(args.merge))
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
    overrides = parse_overrides(args.set)
    for name, fn in (("finegrain", lambda s: run_finegrain(s, args.epochs, args.workers, args.out, overrides,
                                                                 args.keep_epochs)),
                     ("baseline", lambda s: run_baseline(s, args.epochs, args.workers, args.baseline_amp))):
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
        results.append({**summarise(name, runs), **({"overrides": overrides} if name == "finegrain" and overrides else {})})
    report(args, results, args.epochs, args.seeds)


def parse_overrides(items: list[str]) -> dict:
    """``["train.ema=true"]`` -> ``{"train.ema": True}``; refuses a field the recipe's configs do not have."""
    import dataclasses

    import yaml

    sections = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        section, _, field = key.partition(".")
        if not sep or section not in sections or field not in {f.name for f in dataclasses.fields(sections[section])}:
            raise SystemExit(f"--set {item!r}: expected data.FIELD=VALUE, model.FIELD=VALUE or train.FIELD=VALUE with a field "
                             "of DataConfig/ModelConfig/TrainConfig")
        out[key] = yaml.safe_load(value)
    return out


def merge_results(paths: list[str]) -> tuple[list[dict], int, list[int]]:
    """The runs of each recipe in ``paths`` (results files of this script), summarised again; refuses mixed budgets or a seed twice."""
    import json

    files = [json.loads(open(p).read()) for p in paths]
    epochs = {f["epochs"] for f in files}
    if len(epochs) != 1:
        raise SystemExit(f"the files have different epochs {sorted(epochs)}; merge only runs of one budget")
    by_recipe: dict[str, list[dict]] = {}
    for path, f in zip(paths, files):
        for r in f["results"]:
            runs = by_recipe.setdefault(r["recipe"], [])
            if {x["seed"] for x in runs} & {x["seed"] for x in r["runs"]}:
                raise SystemExit(f"{path} repeats a seed of {r['recipe']} that another file holds")
            runs += [{**x, "source": path} for x in r["runs"]]
    results = [summarise(name, sorted(runs, key=lambda x: x["seed"])) for name, runs in by_recipe.items()]
    seeds = sorted({x["seed"] for runs in by_recipe.values() for x in runs})
    return results, epochs.pop(), seeds


def report(args, results: list[dict], epochs: int, seeds: list[int]) -> None:
    """Print the table and the gain, and write the results file."""
    rows = [{"recipe": r["recipe"], "top-1": f"{r['top1_mean']:.2f} ± {r['top1_std']:.2f}",
             "mean per-class": f"{r['mean_per_class_acc_mean']:.2f} ± {r['mean_per_class_acc_std']:.2f}",
             "val top-1": f"{r['val_top1_mean']:.2f}" if "val_top1_mean" in r else "-",
             "wall s/run": r["seconds_mean"]} for r in results]
    print_table(rows, ["recipe", "top-1", "mean per-class", "val top-1", "wall s/run"])
    gain = results[0]["top1_mean"] - results[1]["top1_mean"] if len(results) == 2 else None  # finegrain - baseline
    if gain is not None:
        print(f"finegrain - baseline: {gain:+.2f} top-1 points")
    path = write_results(args.name, {"data": "cub50 (50 CUB-200-2011 species, 1449 train / 1500 test, 227 px copies)",
                                      "backbone": "efficientnet_lite0 (ImageNet-1k weights)", "img_size": 224,
                                      "epochs": epochs, "seeds": seeds,
                                      "budget": "full (issue: 30 epochs)" if epochs >= 30 else f"reduced: {epochs} epochs",
                                      "results": results, "top1_gain": gain})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
