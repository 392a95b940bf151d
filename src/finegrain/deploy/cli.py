"""``finegrain export``."""

from __future__ import annotations

import json
from pathlib import Path


def add_commands(sub) -> None:
    p = sub.add_parser("export", help="export a checkpoint to ONNX or TorchScript (optionally INT8), verified against eager outputs; "
                                      "a detector exports to ONNX (one image of any size in, its detections out)")
    p.add_argument("checkpoint", help="checkpoint file or run folder")
    p.add_argument("--format", choices=["onnx", "torchscript"], default="onnx", help="output format")
    p.add_argument("--out", default=None, help="output file (default: beside the checkpoint, .onnx or .pt)")
    p.add_argument("--int8", action="store_true", help="also write <stem>.int8.onnx (ONNX Runtime static QDQ, per-channel)")
    p.add_argument("--calib-data", default=None, help="folder of real images for INT8 calibration")
    p.add_argument("--calib-images", type=int, default=64, help="number of calibration images")
    p.add_argument("--verify-data", default=None, help="folder of real images to compare with eager outputs (default: --calib-data); "
                                                     "for a detector, its data set (COCO, VOC, CSV, benchmark) or a folder of images")
    p.add_argument("--verify-images", type=int, default=32, help="number of images to verify on")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset version")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("quantize", help="INT8 ONNX model of a checkpoint: static PTQ, or --qat to fine-tune with fake "
                                        "quantization first when PTQ loses too much accuracy")
    p.add_argument("checkpoint", help="checkpoint file or run folder")
    p.add_argument("--data", required=True, help="the training data (class folders train/ [test/]): calibration, "
                                                 "QAT fine-tuning and verification images")
    p.add_argument("--qat", action="store_true", help="quantization-aware fine-tuning before quantizing")
    p.add_argument("--out", default=None, help="INT8 .onnx file (default: beside the checkpoint, <stem>.int8.onnx or "
                                               "<stem>.qat.int8.onnx)")
    p.add_argument("--epochs", type=int, default=1, help="QAT epochs")
    p.add_argument("--lr", type=float, default=5e-5, help="QAT peak learning rate (AdamW, cosine)")
    p.add_argument("--max-train-images", type=int, default=None, help="QAT on a seeded subset of this many images")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--calib-images", type=int, default=64, help="images that set the initial (PTQ: final) ranges")
    p.add_argument("--verify-images", type=int, default=32, help="test images to compare with the eager model")
    p.add_argument("--device", default="auto", help="QAT training device")
    p.add_argument("--resume", action="store_true", help="continue an interrupted QAT fine-tune (same arguments)")
    p.set_defaults(func=_cmd_quantize)


def _cmd_export(args) -> int:
    from finegrain.checkpoint import read_meta, resolve_checkpoint
    from finegrain.deploy.onnx import export_checkpoint
    from finegrain.tasks import TASKS

    ckpt = resolve_checkpoint(args.checkpoint)
    meta = read_meta(ckpt)
    if TASKS.get(meta.task).outputs == "detections":
        return _export_detector(args, ckpt, meta)
    out = args.out
    if out is None:
        out = ckpt.with_suffix(".onnx" if args.format == "onnx" else ".pt")
    s = export_checkpoint(args.checkpoint, Path(out), format=args.format, int8=args.int8, calib_data=args.calib_data,
                          calib_images=args.calib_images, verify_data=args.verify_data, verify_images=args.verify_images,
                          opset=args.opset)
    print(f"exported {s['path']} ({s['format']}, {s['export_seconds']} s); verified on {s['verify_inputs']}")
    print(f"{'model':<6} {'max abs diff':>14} {'top-1 agreement':>16}")
    for name, v in s["verify"].items():
        print(f"{name:<6} {v['max_abs_diff']:>14.3g} {100 * v['top1_agreement']:>15.1f}%")
    if "int8_path" in s:
        print(f"int8 model: {s['int8_path']} ({s['calibration_images']} calibration images, {s['quantize_seconds']} s)")
    print(json.dumps(s))
    return 0


def _export_detector(args, ckpt: Path, meta) -> int:
    """``finegrain export`` of a detector: ONNX of one image of any size, verified on images of --verify-data."""
    from finegrain.detect.export import detection_images, export_detector_onnx

    if args.format != "onnx":
        raise ValueError(f"--format {args.format} exports classifiers; a {meta.task} checkpoint exports with --format onnx")
    if args.int8:
        raise ValueError("--int8 quantizes classifiers; export the detector without it (float ONNX, verified against eager)")
    if args.verify_images < 1:
        raise ValueError(f"--verify-images must be at least 1, got {args.verify_images}")
    data = args.verify_data if args.verify_data is not None else args.calib_data
    labels = (meta.detection or {}).get("labels", "species")
    files = detection_images(data, args.verify_images, labels=labels) if data is not None else None
    out = Path(args.out) if args.out else ckpt.with_suffix(".onnx")
    s = export_detector_onnx(ckpt, out, verify_images=files, opset=args.opset)
    v = s["verify"]
    print(f"exported {s['path']} (onnx, {s['detector']}, {s['export_seconds']} s); verified on {s['verify_inputs']}"
          + ("" if files else " (pass --verify-data for real images)"))
    masks = f", min mask IoU {v['min_mask_iou']:.4f}" if "min_mask_iou" in v else ""
    print(f"{v['detections']} detections above {v['score_threshold']} matched, max box diff {v['max_box_diff']:.3g} px, "
          f"max score diff {v['max_score_diff']:.3g}{masks}")
    if "warning" in s:
        print(f"warning: {s['warning']}")
    print(json.dumps(s))
    return 0


def _cmd_quantize(args) -> int:
    from finegrain.checkpoint import resolve_checkpoint

    ckpt = resolve_checkpoint(args.checkpoint)
    data = Path(args.data)
    if not data.is_dir():
        raise FileNotFoundError(f"--data {data} is not a folder")
    if args.qat:
        from finegrain.compress.qat import qat_checkpoint

        out = Path(args.out) if args.out else ckpt.with_name(ckpt.stem + ".qat.int8.onnx")
        s = qat_checkpoint(ckpt, out, data, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                           workers=args.workers, calib_images=args.calib_images, verify_images=args.verify_images,
                           max_train_images=args.max_train_images, device=args.device, resume=args.resume)
        s.pop("history")
        print(f"QAT int8 model: {s['int8_path']} ({s['qat_scaled_tensors']}/{s['quantized_tensors']} activation "
              f"tensors with QAT scales); fine-tuned checkpoint: {s['qat_checkpoint']}")
    else:
        from finegrain.deploy.onnx import export_checkpoint

        out = Path(args.out) if args.out else ckpt.with_name(ckpt.stem + ".int8.onnx")
        stem = out.name[: -len(".onnx")].removesuffix(".int8") if out.suffix == ".onnx" else out.stem
        s = export_checkpoint(ckpt, out.with_name(stem + ".onnx"), int8=True, calib_data=data, calib_images=args.calib_images,
                              verify_data=data, verify_images=args.verify_images)
        print(f"PTQ int8 model: {s['int8_path']} ({s['calibration_images']} calibration images)")
    for name, v in s["verify"].items():
        print(f"{name:<20} max abs diff {v['max_abs_diff']:.3g}  top-1 agreement {100 * v['top1_agreement']:.1f}%")
    print(json.dumps(s))
    return 0
