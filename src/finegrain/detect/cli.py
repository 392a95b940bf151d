"""``finegrain detect train|eval|predict``: thin shells over :mod:`finegrain.detect`."""

from __future__ import annotations

import argparse
import dataclasses


def add_commands(sub) -> None:
    from finegrain.cli import add_config_flags, add_option_flags
    from finegrain.detect.train import DetectConfig

    p = sub.add_parser("detect", help="object detection and instance segmentation: train, eval, predict, classify (detect, then classify)")
    dsub = p.add_subparsers(dest="detect_command", required=True)

    t = dsub.add_parser("train", help="train a detector (Faster R-CNN, RetinaNet, FCOS, Mask R-CNN) on any timm backbone")
    add_config_flags(t, DetectConfig, "detect")
    add_option_flags(t, trainer="detection")
    t.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    t.set_defaults(func=_cmd_train)

    e = dsub.add_parser("eval", help="COCO box (and mask) AP of a detector on a split; same as `finegrain eval` on a detector")
    e.add_argument("checkpoint", help="detector checkpoint file or run folder")
    _data_flags(e)
    e.add_argument("--out", default=None, help="output folder (default: eval-SPLIT beside the checkpoint)")
    e.add_argument("--examples", type=int, default=8, help="images drawn with predicted and true boxes in examples.png")
    e.add_argument("--batch-size", type=int, default=4)
    e.add_argument("--workers", type=int, default=2)
    e.add_argument("--device", default="auto")
    e.set_defaults(func=_cmd_eval)

    pr = dsub.add_parser("predict", help="the objects of images: box, score and label (--tile for large images)")
    pr.add_argument("checkpoint", help="detector checkpoint file or run folder")
    pr.add_argument("images", nargs="+", help="image files or folders")
    pr.add_argument("--score-threshold", type=float, default=0.5, help="drop detections scoring below it")
    pr.add_argument("--max-objects", type=int, default=100, help="the most objects per image (the highest-scoring)")
    pr.add_argument("--tile", type=int, default=None, help="detect in windows of at most N pixels a side (large images)")
    pr.add_argument("--tile-overlap", type=int, default=128, help="least overlap of neighbouring windows in pixels")
    pr.add_argument("--format", choices=("table", "json", "csv"), default="table")
    pr.add_argument("--draw", default=None, metavar="DIR", help="also write each image with its boxes drawn into DIR")
    pr.add_argument("--device", default="auto")
    pr.set_defaults(func=_cmd_predict)

    from finegrain.detect.pipeline import add_classify_command

    add_classify_command(dsub)


def _data_flags(p: argparse.ArgumentParser) -> None:
    from finegrain.detect.readers import FORMATS

    p.add_argument("--data", required=True, help="COCO JSON, VOC folder, CSV or benchmark root with boxes")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--format", default="auto", choices=FORMATS, help="annotation format (default: guessed from --data)")
    p.add_argument("--images", default=None, help="image folder of a COCO file")
    p.add_argument("--dataset", default=None, help="benchmark reader name (cub, nabirds, dogs, cars, aircraft)")


def _cmd_train(args) -> int:
    import json

    from finegrain.cli import given_options
    from finegrain.config import options_from_flags
    from finegrain.detect.train import DetectConfig, fit_detection

    values = {k.split(".", 1)[1]: v for k, v in vars(args).items() if k.startswith("detect.")}
    cfg = dataclasses.replace(DetectConfig(), **values)
    r = fit_detection(cfg, options_from_flags("detection", given_options(args)), resume=args.resume)
    print(json.dumps({k: r[k] for k in ("run_dir", "best_checkpoint", "best_val_map", "epochs", "interrupted")}, indent=1))
    return 130 if r["interrupted"] else 0


def _cmd_eval(args) -> int:
    from finegrain.detect.evaluate import evaluate_detection, print_detection_summary

    m = evaluate_detection(args.checkpoint, args.data, split=args.split, fmt=args.format, images=args.images, dataset=args.dataset,
                           out_dir=args.out, batch_size=args.batch_size, workers=args.workers, device=args.device,
                           examples=args.examples)
    print_detection_summary(m)
    print(f"results written to {m['out_dir']}")
    return 0


def _cmd_predict(args) -> int:
    import csv
    import json
    import sys

    from finegrain.detect.pipeline import DetectThenClassify
    from finegrain.predict import expand_images

    images = expand_images(args.images)
    if not images:
        raise FileNotFoundError(f"no images found in {' '.join(args.images)}")
    detector = DetectThenClassify.from_checkpoints(args.checkpoint, None, device=args.device, score_threshold=args.score_threshold,
                                                   max_objects=args.max_objects, tile=args.tile, tile_overlap=args.tile_overlap)
    results = detector.predict(images)
    if args.format == "json":
        print(json.dumps(results, indent=1))
    else:
        rows = [[r["image"], k, *o["box"], o["score"], o["detector_label"]] for r in results for k, o in enumerate(r.get("objects", []), 1)]
        if args.format == "csv":
            w = csv.writer(sys.stdout)
            w.writerow(["image", "object", "x0", "y0", "x1", "y1", "score", "label"])
            w.writerows(rows)
        else:
            for r in results:
                found = r.get("objects", [])
                print(f"{r['image']}: " + (r["error"] if "error" in r else f"{len(found)} objects" + "".join(
                    f"\n  {o['detector_label']} {o['score']:.3f} at {', '.join(f'{v:.0f}' for v in o['box'])}" for o in found)))
    if args.draw:
        _draw_all(results, args.draw)
    failed = [r for r in results if "error" in r]
    return 2 if len(failed) == len(results) else 0


def _draw_all(results: list[dict], out: str) -> None:
    """Each readable image with its boxes and labels, as PNG in ``out``."""
    from pathlib import Path

    import torch
    from PIL import Image, ImageOps
    from torchvision.transforms.functional import to_pil_image, to_tensor

    from finegrain.checkpoint import atomic_write
    from finegrain.detect.evaluate import draw_detections

    Path(out).mkdir(parents=True, exist_ok=True)
    for r in results:
        if "error" in r:
            continue
        with Image.open(r["image"]) as im:
            image = to_tensor(ImageOps.exif_transpose(im).convert("RGB"))
        objs = r["objects"]
        names = sorted({o["detector_label"] for o in objs})
        pred = {"boxes": torch.tensor([o["box"] for o in objs]).reshape(-1, 4), "scores": torch.tensor([o["score"] for o in objs]),
                "labels": torch.tensor([names.index(o["detector_label"]) for o in objs], dtype=torch.long)}
        drawn = to_pil_image(draw_detections(image, pred, names, score=0.0))
        atomic_write(Path(out) / f"{Path(r['image']).stem}.png", lambda tmp, d=drawn: d.save(tmp, format="PNG"))
