"""``finegrain detect train|eval|predict``: thin shells over :mod:`finegrain.detect`."""

from __future__ import annotations

import argparse
import dataclasses


def add_commands(sub) -> None:
    from finegrain.cli import add_config_flags, add_option_flags
    from finegrain.detect.train import DetectConfig

    p = sub.add_parser("detect", help="object detection and instance segmentation: train, eval, predict")
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
