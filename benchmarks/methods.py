"""Rank the fine-grained methods against the plain fine-tune (EfficientNet-Lite0, ImageNet weights).

Every method, and ``plain`` (the ``supervised`` task: the backbone and a linear head), fine-tunes
from the same weights with ``fit`` and the default recipe, on the same images, budget and seeds,
and is tested once on the whole test split through ``evaluate`` (``task.predict``), in fp32. The
last epoch is tested (no validation split is carved: every training image trains).

A method's gain is paired by seed: ``top1(method, seed) - top1(plain, seed)``, then averaged. The
verdict is "beats plain" or "loses to plain" only when every seed's difference has that sign
(and there are at least two seeds), "within seed noise" otherwise. The table is sorted by mean
top-1. Results are written after every run; ``--resume`` skips the (method, seed) pairs that the
results file already holds for the same budget, so a long run can stop and go on.

Methods that cannot run are listed with the reason (TransFG needs a ViT and no ViT weights are
available offline). The strongly supervised part model (``parts-cub4``) needs CUB's box and part
files: it runs on ``cub27`` (full photos, where 448 px is meaningful), and on data without them
it is left out of the default set and refused when named.

``--train-per-class N`` trains on the first N training images of each class to fit a small
budget; the test split is always complete. ``--val-fraction F`` holds out F of each training
class and records the last epoch's val top-1 beside test top-1, so that a setting (e.g. the head's
learning rate, ``plain-head3x`` / ``-head10x`` / ``-head30x``) is chosen on val, never on test.

Usage: python benchmarks/methods.py --data cub50 --epochs 1 --seeds 0 1 [--methods plain fgvc-se ...] [--resume] [--name NAME]
       python benchmarks/methods.py --data cub27 --img-size 448 --batch-size 16 --epochs 2 --methods plain parts-cub4
       python benchmarks/methods.py --data cub27 --img-size 448 --batch-size 16 --epochs 2 --seeds 0 --val-fraction 0.2 \
           --methods plain plain-head3x plain-head10x --name methods-cub27-448-val
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from _common import RESULTS, SHARED, machine_name, print_table, write_results
from finegrain import DataConfig, ModelConfig, RunConfig, TrainConfig, evaluate, fit, open_dataset
from finegrain.train.logger import read_rows

WEIGHTS = SHARED / "weights" / "efficientnet_lite0.in1k.safetensors"
DATASETS = {
    "cub50": (SHARED / "cub50", "cub50 (50 CUB-200-2011 species, 1449 train / 1500 test, 227 px copies)"),
    "flowers12": (SHARED / "flowers12", "flowers12 (12 Oxford flower species, 720 train / 240 test)"),
    "cub27": (SHARED / "cub27", "cub27 (27 other CUB-200-2011 species, full photos up to 500 px, 810 train / 744 test, "
                                "one box and 15 part locations per image)"),
}
COMPACT_BILINEAR = {"pooling": "compact_bilinear", "pool_dim": 2048}
# Compact bilinear features are L2-normalised (norm 1; Lite0's average-pooled ones have norm ~12 on
# cub50), so the head needs larger weights for the same logits. The authors first train the
# classifier alone at a large learning rate (Lin et al. 2015, B-CNN; Gao et al. 2016). head_rate(k)
# keeps the backbone's learning rate and gives the head k times the default; the -head3x/-head10x/
# -head30x/-head100x variants choose k on val (--val-fraction; results in methods-cub27-448-val)


def head_rate(k: float) -> dict:
    """Recipe changes that give the new layers ``k`` times the default learning rate and keep the backbone's."""
    return {"lr": k * TrainConfig.lr, "backbone_lr_mult": TrainConfig.backbone_lr_mult / k}


HEAD_10X = head_rate(10)
# the authors' two steps as LP-FT (Kumar et al. 2022): the first epoch trains the new layers alone
# (backbone frozen), the rest all layers, each with its own warmup and cosine
HEAD_FIRST = {"head_epochs": 1}
METHODS = {  # name -> (task, the task's options[, changes to the default recipe])
    "plain": ("supervised", {}),
    "fgvc-avg": ("fgvc", {}),
    "fgvc-se": ("fgvc", {"attention": "se"}),
    "fgvc-dual": ("fgvc", {"attention": "dual"}),
    "fgvc-compact_bilinear": ("fgvc", COMPACT_BILINEAR),
    "fgvc-compact_bilinear-head10x": ("fgvc", COMPACT_BILINEAR, HEAD_10X),
    "fgvc-compact_bilinear-head1": ("fgvc", COMPACT_BILINEAR, HEAD_FIRST),
    "fgvc-compact_bilinear-head1-head10x": ("fgvc", COMPACT_BILINEAR, {**HEAD_FIRST, **HEAD_10X}),
    "plain-head1": ("supervised", {}, HEAD_FIRST),
    "plain-head10x": ("supervised", {}, HEAD_10X),  # separates the head's rate from the pooling's effect
    "plain-head3x": ("supervised", {}, head_rate(3)),
    "plain-head30x": ("supervised", {}, head_rate(30)),
    "fgvc-compact_bilinear-head3x": ("fgvc", COMPACT_BILINEAR, head_rate(3)),
    "fgvc-compact_bilinear-head30x": ("fgvc", COMPACT_BILINEAR, head_rate(30)),
    "fgvc-compact_bilinear-head100x": ("fgvc", COMPACT_BILINEAR, head_rate(100)),
    "fgvc-bilinear-reduce128": ("fgvc", {"pooling": "bilinear", "reduce_dim": 128}),
    "fgvc-netvlad-reduce128": ("fgvc", {"pooling": "netvlad", "reduce_dim": 128}),
    "fgvc-center-triplet": ("fgvc", {"loss": "ce+center:0.01+triplet:1.0"}),
    "wsdan-m8": ("wsdan", {"num_parts": 8}),
    "racnn-s2": ("racnn", {"scales": 2}),
    "parts-cub4": ("parts", {"groups": "cub4"}),
    "parts-weak-k4": ("parts-weak", {"num_parts": 4}),
    "parts-weak-k4-mil": ("parts-weak", {"num_parts": 4, "pool": "mil"}),
}
NOT_RUN = {
    "transfg": "ViT only (timm VisionTransformer with a class token); no ViT ImageNet weights are available offline, "
               "and a randomly initialised ViT at this budget says nothing",
}
NEEDS_PARTS = {name for name, (task, *_) in METHODS.items() if task == "parts"}
"""Methods that train on the object box and part locations (CUB's bounding_boxes.txt, parts/part_locs.txt):
the strongly supervised part task; ``parts-weak`` finds its parts itself."""
COLUMNS = ["rank", "method", "top1", "gain vs plain", "per-seed gain", "verdict", "train img/s", "test img/s", "params M"]


def subset_csv(data: Path, per_class: int, folder: str) -> Path:
    """A ``path,label,split`` CSV: the first ``per_class`` training images of each class and every test image."""
    rows = ["path,label,split"]
    for split in ("train", "test"):
        images = open_dataset(data, split)
        taken: dict[int, int] = {}
        for path, label in zip(images.paths, images.labels):
            if split == "train" and taken.get(label, 0) >= per_class:
                continue
            taken[label] = taken.get(label, 0) + 1
            rows.append(f"{path},{images.classes[label]},{split}")
    out = Path(folder) / f"{data.name}-subset.csv"
    out.write_text("\n".join(rows) + "\n")
    return out


def run_one(name: str, seed: int, data: Path, args, tmp: str) -> dict:
    """Fine-tune method ``name`` with ``seed`` and test it; the run's numbers."""
    from finegrain.checkpoint import load_task

    task, options, *recipe = METHODS[name]
    recipe = recipe[0] if recipe else {}
    cfg = RunConfig(
        DataConfig(data=str(data), img_size=args.img_size, batch_size=args.batch_size, workers=1,
                   val_fraction=args.val_fraction, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
        ModelConfig(backbone="efficientnet_lite0", pretrained=str(WEIGHTS), task=task, options=dict(options)),
        TrainConfig(epochs=args.epochs, device="cpu", out=tmp, name=f"{name}-seed{seed}", seed=seed, select="last",
                    **recipe),
    )
    t0 = time.perf_counter()
    result = fit(cfg)
    train_s = time.perf_counter() - t0
    if result.interrupted:  # Ctrl-C or SIGTERM: the finished runs are already in the results file
        raise SystemExit(f"{name} seed {seed} interrupted; the runs before it are kept (rerun with --resume)")
    epochs = read_rows(result.run_dir / "metrics.jsonl")
    model, _ = load_task(result.best_checkpoint, "cpu")
    params = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    m = evaluate(result.best_checkpoint, data, split="test", workers=1, device="cpu", precision="fp32",
                 out_dir=f"{tmp}/{name}-seed{seed}-eval")
    test_s = time.perf_counter() - t0
    seconds = sum(r["epoch_seconds"] for r in epochs)
    val = {"val_top1": epochs[-1]["val_top1"], "val_images": epochs[-1]["val_images"]} if args.val_fraction else {}
    return {"method": name, "seed": seed, "task": task, "options": options, "recipe_changes": recipe, "top1": m["top1"], **val,
            "mean_per_class_acc": m["mean_per_class_acc"], "images": m["n"],
            "train_img_s": round(sum(r["images_per_s"] * r["epoch_seconds"] for r in epochs) / seconds, 2),
            "test_img_s": round(m["n"] / test_s, 2), "params_m": round(params / 1e6, 2),
            "train_s": round(train_s, 1), "test_s": round(test_s, 1)}


def rank(runs: list[dict]) -> list[dict]:
    """One row per method: mean +- std top-1 over seeds, and the gain over ``plain`` paired by seed."""
    plain = {r["seed"]: r["top1"] for r in runs if r["method"] == "plain"}
    rows = []
    for name in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == name]
        top1 = [r["top1"] for r in mine]
        gains = [r["top1"] - plain[r["seed"]] for r in mine if r["seed"] in plain]
        row = {"method": name, "seeds": [r["seed"] for r in mine], "top1_mean": statistics.mean(top1),
               "top1_std": statistics.stdev(top1) if len(top1) > 1 else 0.0,
               "gains": gains, "gain_mean": statistics.mean(gains) if gains else None,
               "train_img_s": statistics.mean(r["train_img_s"] for r in mine),
               "test_img_s": statistics.mean(r["test_img_s"] for r in mine), "params_m": mine[0]["params_m"]}
        if all("val_top1" in r for r in mine):  # runs with --val-fraction: the number to choose settings on
            row["val_top1_mean"] = statistics.mean(r["val_top1"] for r in mine)
        row["verdict"] = verdict(name, gains)
        rows.append(row)
    rows.sort(key=lambda r: -r["top1_mean"])
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    return rows


def verdict(name: str, gains: list[float]) -> str:
    if name == "plain":
        return "the reference"
    if len(gains) < 2:
        return "one seed: no verdict"
    if all(g > 0 for g in gains):
        return "beats plain"
    if all(g < 0 for g in gains):
        return "loses to plain"
    return "within seed noise"


def _table_row(r: dict) -> dict:
    gain = "" if r["method"] == "plain" or r["gain_mean"] is None else f"{r['gain_mean']:+.2f}"
    return {"rank": r["rank"], "method": r["method"], "top1": f"{r['top1_mean']:.2f} ± {r['top1_std']:.2f}",
            "val top1": f"{r['val_top1_mean']:.2f}" if "val_top1_mean" in r else "-",
            "gain vs plain": gain, "per-seed gain": " ".join(f"{g:+.1f}" for g in r["gains"]) if r["method"] != "plain" else "",
            "verdict": r["verdict"], "train img/s": r["train_img_s"], "test img/s": r["test_img_s"], "params M": r["params_m"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="cub50", choices=tuple(DATASETS))
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-per-class", type=int, default=0, help="train on this many images per class (0: all)")
    ap.add_argument("--val-fraction", type=float, default=0.0,
                    help="hold out this fraction of each training class and record the last epoch's val top-1, for "
                         "choosing a method's settings on val (0: train on every training image)")
    ap.add_argument("--methods", nargs="+", default=None, choices=tuple(METHODS),
                    help="default: every method the data can train (parts-cub4 only where it has boxes and parts)")
    ap.add_argument("--resume", action="store_true", help="keep the runs of an earlier results file with the same budget")
    ap.add_argument("--name", default=None, help="results file name (default: methods-DATA)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data, described = DATASETS[args.data]
    args.methods = _methods_for(args.methods, data, args.train_per_class)
    budget = {k: getattr(args, k) for k in ("data", "epochs", "img_size", "batch_size", "train_per_class")}
    if args.val_fraction:  # recorded only when used, so the earlier results files keep their budget
        budget["val_fraction"] = args.val_fraction
    name = args.name or f"methods-{args.data}"
    runs = _earlier_runs(name, budget) if args.resume else []
    seeds = sorted({*args.seeds, *(r["seed"] for r in runs)})  # a resumed file keeps its earlier seeds
    payload = {"budget": {**budget, "seeds": seeds, "threads": args.threads,
                          "recipe": "finegrain's default (AdamW, backbone lr x0.1, warmup + cosine, label smoothing 0.1), "
                                    "last epoch tested, fp32 test"},
               "backbone": "efficientnet_lite0 (in1k weights), mean = std = 0.5", "data": described,
               "verdict_rule": "beats/loses to plain only when every seed's paired difference has that sign (>= 2 seeds)",
               "not_run": NOT_RUN, "runs": runs}
    with tempfile.TemporaryDirectory() as tmp:
        if args.train_per_class:
            payload["data"] += f"; trained on the first {args.train_per_class} training images per class"
            data = subset_csv(data, args.train_per_class, tmp)
        for seed in args.seeds:
            for method in args.methods:
                if any(r["method"] == method and r["seed"] == seed for r in runs):
                    continue
                runs.append(run_one(method, seed, data, args, tmp))
                print(f"{method} seed {seed}: top-1 {runs[-1]['top1']:.2f} ({runs[-1]['train_s']:.0f} s training)", flush=True)
                payload["ranking"] = rank(runs)
                write_results(name, payload)
    ranking = rank(runs)
    print_table([_table_row(r) for r in ranking], COLUMNS if not args.val_fraction else ["rank", "method", "val top1", *COLUMNS[2:]])
    for n, why in NOT_RUN.items():
        print(f"{n}: not run: {why}")


def _methods_for(named: list[str] | None, data: Path, per_class: int) -> list[str]:
    """``named`` (default: every method), ``plain`` first; a part method on data without parts is refused when
    named and left out of the default."""
    has_parts = not per_class and open_dataset(data, "train").parts is not None  # the per-class CSV keeps no parts
    if named is None:
        named = [m for m in METHODS if has_parts or m not in NEEDS_PARTS]
    missing = [m for m in named if m in NEEDS_PARTS and not has_parts]
    if missing:
        raise SystemExit(f"--methods {' '.join(missing)}: needs CUB's boxes and part locations, which {data} "
                         f"{'lacks' if not per_class else 'loses under --train-per-class'}; use --data cub27 "
                         "without --train-per-class, or leave them out of --methods")
    return named if "plain" in named else ["plain", *named]  # every gain is measured against plain


def _earlier_runs(name: str, budget: dict) -> list[dict]:
    path = RESULTS / f"{name}-{machine_name()}.json"
    if not path.is_file():
        return []
    prev = json.loads(path.read_text())
    have = {"val_fraction": 0.0, **prev["budget"]}  # files without the key held out no val split
    same = all(have.get(k) == v for k, v in {"val_fraction": 0.0, **budget}.items())
    if not same:
        raise SystemExit(f"{path} has another budget ({prev['budget']}); move it away or drop --resume")
    return prev["runs"]


if __name__ == "__main__":
    main()
