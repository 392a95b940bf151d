"""Deployment options on this CPU: eager, ONNX fp32, INT8 (PTQ and QAT), pruned, distilled.

    .venv/bin/python benchmarks/deploy.py --checkpoint /tmp/demo-runs/<run>/best.safetensors \
        --data ../shared/data/flowers12

From one trained checkpoint (the teacher / base model) it builds, with small stated budgets:

* ONNX fp32 and ONNX Runtime static INT8 (PTQ, ``--calib-images`` training images);
* INT8 after quantization-aware fine-tuning (``finegrain quantize --qat``: ``--qat-epochs`` over
  ``--qat-images`` training images);
* a pruned model (``finegrain prune``: ``--prune-ratio`` of the channels, ``--prune-epochs`` of
  fine-tuning), exported to ONNX fp32 and INT8;
* a distilled student (``finegrain distill``: ``--student`` from ``--student-weights``, taught by
  the checkpoint for ``--distill-epochs``), exported to ONNX fp32 and INT8.

Each row: batch-1 latency p50/p95 over ``--latency-iters`` test images (after ``--warmup``), and
throughput plus top-1 over the whole test split at ``--batch-size``, all with ``--threads``
intra-op threads; parameters and file size. Training stages use ``--train-threads``. Artifacts go
to ``--work-dir`` and are reused by a later run with ``--reuse``.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _common import SHARED, print_table, write_results
from finegrain.data.base import open_dataset
from finegrain.deploy.onnx import OnnxModel, export_checkpoint, load_batch
from finegrain.predict import Predictor


def _bench(run, images: torch.Tensor, labels: np.ndarray, *, batch_size: int, warmup: int, iters: int) -> dict:
    for i in range(warmup):
        run(images[i : i + 1])
    lat = []
    for i in range(iters):
        x = images[i % len(images)].unsqueeze(0)
        t = time.perf_counter()
        run(x)
        lat.append(1000 * (time.perf_counter() - t))
    preds, t = [], time.perf_counter()
    for i in range(0, len(images), batch_size):
        preds.append(np.asarray(run(images[i : i + batch_size])).argmax(1))
    seconds = time.perf_counter() - t
    return {"p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)),
            "throughput_img_s": len(images) / seconds, "top1": float(100 * (np.concatenate(preds) == labels).mean())}


def _test_set(pred: Predictor, data: str, cache: dict) -> tuple[torch.Tensor, np.ndarray]:
    """Test images preprocessed as ``pred`` expects (cached per preprocessing) and labels in its class order."""
    key = json.dumps(pred.meta["preprocessing"], sort_keys=True)
    test = open_dataset(data, split="test")
    missing = set(test.classes) - set(pred.classes)
    if missing:
        raise ValueError(f"test classes {sorted(missing)} are not in the checkpoint's classes")
    if key not in cache:
        cache[key] = load_batch(pred, test.paths)
        if len(cache[key]) != len(test.paths):
            raise ValueError(f"{len(test.paths) - len(cache[key])} test images could not be read")
    index = {c: i for i, c in enumerate(pred.classes)}
    return cache[key], np.array([index[test.classes[y]] for y in test.labels])


def _mb(path) -> float:
    return Path(path).stat().st_size / 2**20


def _timm_mobilenetv2_weights(src: Path, dst: Path) -> Path:
    """torchvision-keyed MobileNetV2 features weights -> timm ``mobilenetv2_100`` keys (same layers, same order)."""
    import timm
    import torchvision
    from safetensors.torch import load_file, save_file

    tv = torchvision.models.mobilenet_v2()
    tv.load_state_dict(load_file(str(src)), strict=False)  # the file has no classifier
    ours = [k for k in timm.create_model("mobilenetv2_100").state_dict() if not k.startswith("classifier")]
    theirs = [(k, v) for k, v in tv.state_dict().items() if not k.startswith("classifier")]
    shapes = timm.create_model("mobilenetv2_100").state_dict()
    if len(ours) != len(theirs) or any(shapes[a].shape != v.shape for a, (_, v) in zip(ours, theirs)):
        raise ValueError(f"{src} does not line up with timm mobilenetv2_100")
    save_file({a: v.contiguous() for a, (_, v) in zip(ours, theirs)}, str(dst))
    return dst


def _stage(name: str, fn, timings: dict):
    t = time.perf_counter()
    out = fn()
    timings[name] = round(time.perf_counter() - t, 1)
    print(f"[{name}] {timings[name]} s", flush=True)
    return out


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="trained base / teacher checkpoint")
    ap.add_argument("--data", default=str(SHARED / "flowers12"))
    ap.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime intra-op threads when measuring")
    ap.add_argument("--train-threads", type=int, default=1, help="torch threads for the fine-tuning stages")
    ap.add_argument("--batch-size", type=int, default=16, help="batch size of the throughput / accuracy pass")
    ap.add_argument("--latency-iters", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--calib-images", type=int, default=64)
    ap.add_argument("--qat-epochs", type=int, default=1)
    ap.add_argument("--qat-images", type=int, default=160, help="training images for QAT (seeded subset)")
    ap.add_argument("--qat-lr", type=float, default=5e-5)
    ap.add_argument("--prune-ratio", type=float, default=0.5)
    ap.add_argument("--prune-epochs", type=int, default=6)
    ap.add_argument("--prune-lr", type=float, default=1e-3)
    ap.add_argument("--student", default="mobilenetv2_100")
    ap.add_argument("--student-weights", default=str(SHARED / "weights" / "mobilenet_v2_features.in1k.safetensors"),
                    help="torchvision-keyed MobileNetV2 weights (converted to timm keys), or a timm-keyed file")
    ap.add_argument("--distill-epochs", type=int, default=2)
    ap.add_argument("--distill-lr", type=float, default=1e-3)
    ap.add_argument("--work-dir", default=None, help="where models are written (default: a temporary folder)")
    ap.add_argument("--reuse", action="store_true", help="reuse trained models found in --work-dir")
    ap.add_argument("--name", default="deploy")
    return ap


def _build(args, work: Path, timings: dict) -> dict[str, dict]:
    """Every deployable model of the table: the base export, QAT, pruned and distilled (each with its exports)."""
    from finegrain.compress.prune import prune_checkpoint
    from finegrain.compress.qat import qat_checkpoint

    data = Path(args.data)
    torch.set_num_threads(args.train_threads)
    export_kw = dict(int8=True, calib_data=data / "train", calib_images=args.calib_images, verify_data=data / "test",
                     verify_images=32)
    base = _stage("export base", lambda: export_checkpoint(args.checkpoint, work / "base.onnx", **export_kw), timings)
    qat_out = work / "qat.int8.onnx"
    if args.reuse and qat_out.is_file():
        qat = json.loads((work / "qat.json").read_text())
    else:
        qat = _stage("qat", lambda: qat_checkpoint(args.checkpoint, qat_out, data, epochs=args.qat_epochs, lr=args.qat_lr,
                                                   batch_size=16, workers=1, calib_images=args.calib_images,
                                                   max_train_images=args.qat_images, device="cpu"), timings)
        (work / "qat.json").write_text(json.dumps(qat))
    pruned_ckpt = work / "pruned.safetensors"
    if not (args.reuse and pruned_ckpt.is_file()):
        _stage("prune", lambda: prune_checkpoint(args.checkpoint, pruned_ckpt, ratio=args.prune_ratio, data=str(data),
                                                 epochs=args.prune_epochs, lr=args.prune_lr, batch_size=16, workers=1,
                                                 device="cpu"), timings)
    pruned = _stage("export pruned", lambda: export_checkpoint(pruned_ckpt, work / "pruned.onnx", **export_kw), timings)
    student_ckpt = _distill(args, work, timings)
    student = _stage("export student", lambda: export_checkpoint(student_ckpt, work / "student.onnx", **export_kw), timings)
    return {"base": {**base, "checkpoint": args.checkpoint}, "qat": qat, "pruned": {**pruned, "checkpoint": pruned_ckpt},
            "student": {**student, "checkpoint": student_ckpt}}


def _distill(args, work: Path, timings: dict) -> Path:
    """The distilled student's checkpoint (``finegrain distill``), trained unless ``--reuse`` finds it."""
    from finegrain.cli import main as cli

    student_ckpt = work / "student" / "best.safetensors"
    if args.reuse and student_ckpt.is_file():
        return student_ckpt
    weights = Path(args.student_weights)
    if args.student == "mobilenetv2_100" and "mobilenet_v2_features" in weights.name:
        weights = _timm_mobilenetv2_weights(weights, work / "mobilenetv2_100.timm.safetensors")
    rc = _stage("distill", lambda: cli(["distill", "--teacher", str(args.checkpoint), "--student", args.student,
                                         "--pretrained", str(weights), "--data", str(args.data), "--img-size", "224",
                                         "--epochs", str(args.distill_epochs), "--lr", str(args.distill_lr),
                                         "--batch-size", "16", "--workers", "1", "--device", "cpu",
                                         "--out", str(work), "--name", "student"]), timings)
    if rc != 0:
        raise RuntimeError(f"finegrain distill exited with {rc}")
    return student_ckpt


def _measure(args, models: dict[str, dict], preds: dict[str, Predictor], timings: dict, cache: dict) -> list[dict]:
    """One row per model: latency, throughput and top-1 on the test split, with speed-ups against eager fp32."""
    torch.set_num_threads(args.threads)
    kw = dict(batch_size=args.batch_size, warmup=args.warmup, iters=args.latency_iters)
    teacher, pruned, student = preds["base"], preds["pruned"], preds["student"]
    base, qat = models["base"], models["qat"]
    table = [  # name, what, predictor (preprocessing, classes, parameters), ONNX file or None for eager
        ("eager fp32", "PyTorch eager, the checkpoint", teacher, None),
        ("onnx fp32", "ONNX Runtime", teacher, base["path"]),
        ("onnx int8 ptq", "static INT8, min/max calibration", teacher, base["int8_path"]),
        ("onnx int8 qat", "INT8 with QAT scales", teacher, qat["int8_path"]),
        ("pruned onnx fp32", f"{args.prune_ratio:.0%} channels pruned", pruned, models["pruned"]["path"]),
        ("pruned onnx int8", "pruned, static INT8", pruned, models["pruned"]["int8_path"]),
        ("student onnx fp32", f"{args.student} distilled", student, models["student"]["path"]),
        ("student onnx int8", "student, static INT8", student, models["student"]["int8_path"]),
    ]
    rows = []
    for name, what, pred, onnx_path in table:
        run = (lambda x: teacher.logits(x).numpy()) if onnx_path is None else OnnxModel(onnx_path, threads=args.threads).logits
        images, labels = _test_set(pred, args.data, cache)
        r = _stage(f"bench {name}", functools.partial(_bench, run, images, labels, **kw), timings)
        params = sum(p.numel() for p in pred.task.parameters())
        rows.append({"model": name, "what": what, **r, "params_m": params / 1e6,
                     "size_mb": _mb(args.checkpoint if onnx_path is None else onnx_path)})
    ref = rows[0]
    for r in rows:
        r["speedup_p50"] = ref["p50_ms"] / r["p50_ms"]
        r["speedup_throughput"] = r["throughput_img_s"] / ref["throughput_img_s"]
        r["top1_delta"] = r["top1"] - ref["top1"]
    return rows


def _targets(rows: list[dict]) -> dict[str, dict[str, bool]]:
    """The INT8 rows against the target: at least 2x faster than eager fp32, top-1 within 1 point."""
    by = {r["model"]: r for r in rows}
    return {name: {"at_least_2x_faster_p50": by[name]["speedup_p50"] >= 2,
                   "at_least_2x_throughput": by[name]["speedup_throughput"] >= 2,
                   "top1_drop_at_most_1_point": by[name]["top1_delta"] >= -1,
                   "top1_within_1_point_either_way": abs(by[name]["top1_delta"]) <= 1}
            for name in ("onnx int8 ptq", "onnx int8 qat")}


def _budget(args, student_meta: dict, timings: dict, total: float) -> dict:
    """Every setting that decides the table, with the seconds each stage took."""
    return {"threads": args.threads, "train_threads": args.train_threads, "batch_size": args.batch_size,
            "latency_iters": args.latency_iters, "warmup": args.warmup, "calib_images": args.calib_images,
            "qat": {"epochs": args.qat_epochs, "train_images": args.qat_images, "lr": args.qat_lr, "batch_size": 16},
            "prune": {"ratio": args.prune_ratio, "epochs": args.prune_epochs, "lr": args.prune_lr,
                      "train_images": "all (train split)", "batch_size": 16},
            "distill": {"student": args.student, "student_init": str(args.student_weights),
                        "epochs": args.distill_epochs, "lr": args.distill_lr, "batch_size": 16,
                        "img_size": student_meta["preprocessing"]["img_size"],
                        "val_fraction": student_meta.get("config", {}).get("data", {}).get("val_fraction")},
            "stage_seconds": timings, "total_wall_seconds": total}


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    wall = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        timings: dict[str, float] = {}
        cache: dict = {}
        models = _build(args, work, timings)
        preds = {k: Predictor.from_checkpoint(models[k]["checkpoint"], device="cpu") for k in ("base", "pruned", "student")}
        rows = _measure(args, models, preds, timings, cache)
        print_table(rows, ["model", "p50_ms", "p95_ms", "throughput_img_s", "top1", "top1_delta", "speedup_p50",
                           "params_m", "size_mb"])
        target = _targets(rows)
        print(f"target (INT8 >= 2x faster than eager fp32, top-1 within 1 point): {json.dumps(target)}")
        total = round(time.perf_counter() - wall, 1)
        print(f"total wall time {total} s")
        teacher, qat = preds["base"], models["qat"]
        path = write_results(args.name, {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "checkpoint": str(args.checkpoint), "data": args.data,
            "test_images": len(_test_set(teacher, args.data, cache)[1]),
            "img_size": teacher.meta["preprocessing"]["img_size"], "backbone": teacher.meta["model"]["backbone"],
            "budget": _budget(args, preds["student"].meta, timings, total),
            "verify": {k: models[k]["verify"] for k in ("base", "qat", "pruned", "student")},
            "qat": {k: qat[k] for k in ("quantized_tensors", "qat_scaled_tensors", "calibrated_tensors", "train_seconds",
                                        "history")},
            "rows": rows, "target": target,
            "note": "CPU shared with other engineers' jobs while measuring; timings are noisy. Speedups and top-1 deltas "
                    "are against eager fp32 of the base checkpoint. The pruned and distilled models are trained here "
                    "with the budgets above; INT8 rows of pruned/student are PTQ.",
        })
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
