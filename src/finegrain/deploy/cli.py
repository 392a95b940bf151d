"""``finegrain export``."""

from __future__ import annotations

import json
from pathlib import Path


def add_commands(sub) -> None:
    p = sub.add_parser("export", help="export a checkpoint to ONNX or TorchScript (optionally INT8), verified against eager outputs")
    p.add_argument("checkpoint", help="checkpoint file or run folder")
    p.add_argument("--format", choices=["onnx", "torchscript"], default="onnx", help="output format")
    p.add_argument("--out", default=None, help="output file (default: beside the checkpoint, .onnx or .pt)")
    p.add_argument("--int8", action="store_true", help="also write <stem>.int8.onnx (ONNX Runtime static QDQ, per-channel)")
    p.add_argument("--calib-data", default=None, help="folder of real images for INT8 calibration")
    p.add_argument("--calib-images", type=int, default=64, help="number of calibration images")
    p.add_argument("--verify-data", default=None, help="folder of real images to compare with eager outputs (default: --calib-data)")
    p.add_argument("--verify-images", type=int, default=32, help="number of images to verify on")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset version")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args) -> int:
    from finegrain.deploy.onnx import export_checkpoint
    from finegrain.train.checkpoint import resolve_checkpoint

    out = args.out
    if out is None:
        ckpt = resolve_checkpoint(args.checkpoint)
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
