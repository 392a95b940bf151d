"""Detection, detect-then-classify and instance segmentation on real data (issue 14).

Three parts, each with EfficientNet-Lite0 ImageNet weights from ../shared/data (the only offline
backbone weights with a feature pyramid's worth of strides):

- ``boxes``: a bird detector (``--labels object``) and a species detector (``--labels species``,
  27 classes) trained on cub27's train split (810 full photos, one box each), box mAP on its
  test split (744); training time, training and eval images/s.
- ``payoff``: species top-1 on cub27 test at 448 px, one classification recipe (finegrain's
  default) trained on whole photos and on ground-truth box crops, each tested on the whole
  photo, the ground-truth crop and the crop of the bird detector's top box.
- ``masks``: Mask R-CNN on carparts (18 part types, 400 train / 100 test) and pets37 (37 breeds,
  259 / 111): box and mask AP with per-class AP; example overlays are in each eval folder.

On the CPU the budget is reduced (short side ``--img-size``, ``--epochs``); the results name it.

Usage: python benchmarks/detection.py                      (the reduced CPU budget: RetinaNet, 256 px, 4 epochs; Mask R-CNN 2)
       python benchmarks/detection.py --img-size 512 --epochs 12 --mask-epochs 12 --cls-epochs 10   (a GPU)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _common import SHARED, print_table, write_results
from finegrain import DataConfig, ModelConfig, RunConfig, TrainConfig, evaluate, fit
from finegrain.detect.evaluate import evaluate_detection
from finegrain.detect.train import DetectConfig, fit_detection

WEIGHTS = SHARED / "weights" / "efficientnet_lite0.in1k.safetensors"
CUB27 = SHARED / "cub27"
OUT = Path("runs/bench-detection")


def train_detector(name: str, data: Path, *, labels: str, detector: str, epochs: int, img_size: int, workers: int, **kw) -> dict:
    """Train one detector and test it; the row of the results table."""
    cfg = DetectConfig(data=str(data), labels=labels, backbone="efficientnet_lite0", pretrained=str(WEIGHTS), img_size=img_size,
                       epochs=epochs, batch_size=4, workers=workers, out=str(OUT / f"{name}-{int(time.time())}"), **kw)
    t0 = time.perf_counter()
    r = fit_detection(cfg, {"detector": detector})
    train_s = time.perf_counter() - t0
    m = evaluate_detection(r["best_checkpoint"], str(data), split="test", workers=workers, examples=8)
    keep = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_100", "mask_map", "mask_map_50", "mask_map_75")
    return {"name": name, "detector": detector, "labels": labels, "epochs": epochs, "img_size": img_size,
            "train_seconds": round(train_s, 1), "train_images_per_s": round(sum(h["images_per_s"] for h in r["history"]) / len(r["history"]), 2),
            "eval_images_per_s": round(m["images_per_s"], 2), "test_images": m["images"], "best_epoch_val_map": r["best_val_map"],
            **{k: m.get(k) for k in keep}, "per_class_ap": m["per_class_ap"], "mask_per_class_ap": m.get("mask_per_class_ap"),
            "checkpoint": r["best_checkpoint"], "eval_dir": m["out_dir"]}


def part_boxes(args) -> list[dict]:
    return [train_detector(f"cub27-{labels}", CUB27, labels=labels, detector=args.detector, epochs=args.epochs, img_size=args.img_size,
                           workers=args.workers) for labels in ("object", "species")]


def part_payoff(args, bird_detector: str | None) -> list[dict]:
    """Top-1 from the whole photo, the true box crop and the detected box crop, for classifiers trained whole and on crops."""
    if bird_detector is None:  # the boxes part was not run in this call: train the bird detector here
        bird_detector = train_detector("cub27-object", CUB27, labels="object", detector=args.detector, epochs=args.epochs,
                                       img_size=args.img_size, workers=args.workers)["checkpoint"]
    rows = []
    for trained_on in ("none", "box"):
        cfg = RunConfig(DataConfig(data=str(CUB27), img_size=448, batch_size=16, workers=args.workers, crop=trained_on),
                        ModelConfig(backbone="efficientnet_lite0", pretrained=str(WEIGHTS)),
                        TrainConfig(epochs=args.cls_epochs, out=str(OUT), name=f"cls-{trained_on}-{int(time.time())}"))
        t0 = time.perf_counter()
        run = fit(cfg)
        train_s = time.perf_counter() - t0
        row = {"trained_on": "whole photo" if trained_on == "none" else "true box crop", "epochs": args.cls_epochs, "img_size": 448,
               "train_seconds": round(train_s, 1)}
        for crop in ("none", "gt", "detected"):
            m = evaluate(run.best_checkpoint, str(CUB27), split="test", workers=args.workers, crop=crop,
                         detector=bird_detector if crop == "detected" else None)
            row[f"top1_{crop}"] = m["top1"]
            if crop == "detected":
                row["no_detection"] = m.get("no_detection")
        rows.append(row)
    return rows


def part_masks(args) -> list[dict]:
    return [train_detector(name, SHARED / name, labels="species", detector="mask_rcnn", epochs=args.mask_epochs,
                           img_size=args.img_size, workers=args.workers) for name in args.mask_sets]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="+", default=["boxes", "payoff", "masks"], choices=("boxes", "payoff", "masks"))
    p.add_argument("--detector", default="retinanet", help="detector of the boxes and payoff parts")
    p.add_argument("--epochs", type=int, default=4, help="detector epochs (the CPU budget; 12+ on a GPU)")
    p.add_argument("--mask-epochs", type=int, default=2, help="Mask R-CNN epochs")
    p.add_argument("--mask-sets", nargs="+", default=["carparts", "pets37"], choices=("carparts", "pets37"))
    p.add_argument("--cls-epochs", type=int, default=2, help="classifier epochs of the payoff part")
    p.add_argument("--img-size", type=int, default=256, help="detector short side")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--name", default="detection")
    args = p.parse_args()
    results: dict = {"budget": {k: getattr(args, k) for k in ("parts", "detector", "epochs", "mask_epochs", "cls_epochs", "img_size")},
                     "backbone": "efficientnet_lite0 (ImageNet, ../shared/data/weights)"}
    bird = None
    if "boxes" in args.parts:
        results["boxes"] = part_boxes(args)
        bird = results["boxes"][0]["checkpoint"]
        print_table(results["boxes"], ["name", "map", "map_50", "map_75", "mar_100", "train_seconds", "train_images_per_s", "eval_images_per_s"])
        write_results(args.name, results)
    if "payoff" in args.parts:
        results["payoff"] = part_payoff(args, bird)
        print_table(results["payoff"], ["trained_on", "top1_none", "top1_gt", "top1_detected", "train_seconds"])
        write_results(args.name, results)
    if "masks" in args.parts:
        results["masks"] = part_masks(args)
        print_table(results["masks"], ["name", "map", "map_50", "mask_map", "mask_map_50", "train_seconds", "train_images_per_s"])
    print(f"results written to {write_results(args.name, results)}")


if __name__ == "__main__":
    main()
