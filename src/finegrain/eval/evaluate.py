"""``evaluate``: metrics of a checkpoint on a data split, written as JSON, CSV and PNG."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from finegrain.checkpoint import resolve_checkpoint, write_bytes_atomic, write_text_atomic
from finegrain.data.base import ImageList
from finegrain.data.dataset import check_files
from finegrain.data.device import eval_batches
from finegrain.data.split import open_run_split
from finegrain.eval.metrics import (
    classification_metrics,
    save_confusion_matrix_png,
    write_confusion_csv,
    write_per_class_csv,
)
from finegrain.eval.openworld import open_world_metrics
from finegrain.predict import Predictor, logits_and_features
from finegrain.train.loop import predict_loader
from finegrain.utils import console, progress_bar


def eval_images(images: ImageList, classes: list[str], data) -> tuple[ImageList, list[str]]:
    """``images`` labelled by the model's ``classes``, and the model's classes the data lacks.

    A test set may hold a subset of the classes: it is evaluated on those (the model still
    chooses among all of its classes; per-class means count the classes present) and a line says
    so. Files that do not exist are reported here; none existing is an error.
    """
    unknown = sorted(set(images.classes) - set(classes))
    if unknown:
        raise ValueError(f"{len(unknown)} classes of {data} are unknown to the model (e.g. {unknown[:5]}); the model has "
                         f"{len(classes)} classes. Evaluate on the data set the model was trained on.")
    present = {images.classes[label] for label in images.labels}
    absent = [c for c in classes if c not in present]
    if absent:
        console.print(f"[yellow]{data} holds {len(classes) - len(absent)} of the model's {len(classes)} classes; "
                      f"evaluating on those (absent: {', '.join(absent[:5])}{', ...' if len(absent) > 5 else ''})")
    check_files(images, str(data), fate="they are skipped and listed in results.json")
    return images.relabel(classes), absent


def evaluate(
    checkpoint: str | Path,
    data: str | Path,
    *,
    split: str = "test",
    dataset: str | None = None,
    tta_flip: bool = False,
    out_dir: str | Path | None = None,
    batch_size: int = 64,
    workers: int = 2,
    device: str = "auto",
    pipeline: str = "cpu",
    unknown: str | Path | None = None,
    rollup: float | None = None,
    precision: str = "auto",
    crop: str | None = None,
    crop_margin: float | None = None,
    detector: str | Path | None = None,
) -> dict:
    """Evaluate ``checkpoint`` on ``split`` of ``data`` and write the results.

    Writes ``results.json`` (all metrics, the checkpoint, data and TTA used), ``per_class.csv``,
    ``confusion.csv`` and ``confusion.png`` into ``out_dir`` (default: ``eval-<split>`` beside the
    checkpoint). Class names of the data must match the checkpoint's.

    A calibrated checkpoint adds ``calibration`` (ECE and NLL before/after its temperature, and
    reliability bins); one with a taxonomy adds ``hierarchy`` (accuracy per level, mistake
    severity; with ``rollup``, the roll-up answers). ``unknown``, a folder of images of classes
    the model does not know, adds ``openset`` (AUROC, FPR at 95% TPR per score, and known-class
    accuracy at the stored thresholds); see :mod:`finegrain.eval.openworld`.

    ``precision``: ``auto`` runs the forward pass in bf16 where training does (CUDA, CPUs with
    native bf16), else fp32; ``fp32`` and ``bf16`` force one. The model runs channels_last. The
    precision used is recorded in the results (``finegrain predict`` and exports stay fp32).

    ``crop`` says what is classified: ``none`` the whole image, ``gt`` the data set's box crop,
    ``detected`` the crop of the highest-scoring box of the ``detector`` checkpoint (an image where
    it finds nothing is classified whole; ``no_detection`` counts them). The default is the
    checkpoint's training crop (``gt`` after ``--crop box``, else ``none``; with ``detector``:
    ``detected``), and ``crop_margin`` defaults to the checkpoint's margin (else 0.1). The results
    record ``crop``, ``crop_margin``, ``detector`` and ``no_detection``.

    A detector checkpoint gets its COCO box (and mask) AP instead (see
    :func:`finegrain.detect.evaluate.evaluate_detection`).

    Returns:
        The metrics dict (see :func:`finegrain.eval.metrics.classification_metrics`).
    """
    path = resolve_checkpoint(checkpoint)
    if _is_detector(path):  # box and mask AP instead of classification metrics
        from finegrain.detect.evaluate import evaluate_detection

        return evaluate_detection(path, data, split=split, dataset=dataset, out_dir=out_dir, workers=workers, device=device)
    predictor = Predictor.from_checkpoint(path, device=device, tta_flip=tta_flip)
    images, absent = eval_images(open_run_split(path.parent, data, split, dataset), predictor.classes, data)
    images, crop_info = eval_crops(images, predictor.meta["preprocessing"], crop=crop, margin=crop_margin, detector=detector,
                                   device=predictor.device, pipeline=pipeline)
    loader = eval_batches(images, predictor.meta["preprocessing"], predictor.device, pipeline=pipeline,
                          transform=predictor.transform, batch_size=batch_size, workers=workers)
    t0 = time.perf_counter()
    with_feats = unknown is not None and predictor.bank is not None  # the kNN score needs the test images' features
    fn = (lambda x: torch.cat(logits_and_features(predictor.task)(x), 1)) if with_feats else predictor.task.predict
    bf16 = _use_bf16(precision, predictor.device)
    with progress_bar(f"eval {split}", total=len(images)) as bar:
        out_all, labels, skipped = predict_loader(fn, loader, device=predictor.device, tta_flip=tta_flip, amp=bf16,
                                                  cpu_amp=bf16, channels_last=True, on_batch=bar.advance)
    seconds = time.perf_counter() - t0
    c = len(predictor.classes)
    logits, feats = out_all[:, :c], (out_all[:, c:] if with_feats else None)
    metrics = classification_metrics(logits, labels, images.classes)
    metrics.update({
        "checkpoint": str(path), "data": str(data), "split": split, "tta": "hflip" if tta_flip else "none", "pipeline": pipeline,
        "precision": "bf16" if bf16 else "fp32", **crop_info,
        "classes_absent": absent, "skipped": [p for p, _ in skipped], "seconds": seconds, "images_per_s": len(labels) / max(seconds, 1e-9),
    })
    if crop_info["no_detection"]:  # unreadable files have no box either; they are counted as skipped, not here
        gone = {p for p, _ in skipped}
        metrics["no_detection"] = sum(b is None and p not in gone for p, b in zip(images.paths, images.boxes))
    metrics.update(open_world_metrics(predictor, logits, feats, labels, unknown=unknown, rollup=rollup, batch_size=batch_size,
                                      workers=workers))
    out = Path(out_dir) if out_dir else path.parent / f"eval-{split}"
    _write_results(metrics, images.classes, logits, predictor.temperature, out)
    metrics["out_dir"] = str(out)
    return metrics


def _write_results(metrics: dict, classes: list[str], logits: torch.Tensor, temperature: float, out: Path) -> None:
    """``results.json``, the per-class and confusion tables and plots (and the reliability plots when calibrated)."""
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "results.json", json.dumps(metrics, indent=1))
    write_per_class_csv(metrics, out / "per_class.csv")
    write_confusion_csv(metrics["confusion_matrix"], classes, out / "confusion.csv")
    save_confusion_matrix_png(metrics["confusion_matrix"], classes, out / "confusion.png")
    if "calibration" in metrics:
        _save_reliability(metrics["calibration"], logits, temperature, out)


def eval_crops(images: ImageList, prep: dict, *, crop: str | None = None, margin: float | None = None,
               detector: str | Path | None = None, device: str | torch.device = "auto",
               pipeline: str = "cpu") -> tuple[ImageList, dict]:
    """``images`` marked to be read as the crops ``crop`` asks for (see :func:`evaluate`), and what was used for the results.

    ``prep`` is the checkpoint's preprocessing (its ``crop``/``crop_margin`` give the defaults).
    Detected boxes come from one pass of the detector over the images before classification.
    """
    from finegrain.data.crop import box_crops, detected_boxes

    trained = prep.get("crop", "none")
    crop = crop or ("detected" if detector else "gt" if trained == "box" else "none")
    if crop not in ("none", "gt", "detected"):
        raise ValueError(f"--crop must be none, gt or detected, got {crop!r}")
    if (crop == "detected") != (detector is not None):
        raise ValueError("--crop detected needs --detector DETECTOR_CKPT (a `finegrain detect train` checkpoint)" if detector is None
                         else f"--detector applies to --crop detected, not --crop {crop}: drop --detector or pass --crop detected")
    margin = float(prep.get("crop_margin", 0.1) if margin is None else margin)
    info = {"crop": crop, "crop_margin": None if crop == "none" else margin, "detector": None if detector is None else str(detector),
            "no_detection": None}
    if crop == "none":
        return images, info
    if pipeline == "device":
        raise ValueError(f"the device pipeline decodes whole images and cannot crop them: drop --pipeline device (or pass "
                         f"--pipeline cpu) with --crop {crop}")
    if crop == "gt":
        return box_crops(images, margin), info
    boxes = detected_boxes(detector, images.paths, device)
    info["no_detection"] = sum(b is None for b in boxes)
    if info["no_detection"]:
        console.print(f"[yellow]the detector found nothing in {info['no_detection']} of {len(images)} images; they are classified whole")
    return box_crops(images, margin, boxes=boxes, warn=False), info


def _is_detector(path: Path) -> bool:
    from finegrain.checkpoint import read_meta
    from finegrain.tasks import TASKS

    return TASKS.get(read_meta(path).task).outputs == "detections"


def _use_bf16(precision: str, device: torch.device) -> bool:
    """Whether eval's forward pass runs in bf16 (``auto``: on CUDA and on CPUs with native bf16, like training)."""
    from finegrain.train.loop import cpu_has_native_bf16

    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"--precision must be auto, fp32 or bf16, got {precision!r}")
    if precision == "auto":
        return device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
    return precision == "bf16"


def _save_reliability(calibration: dict, logits: torch.Tensor, temperature: float, out: Path) -> None:
    """``reliability_before.png`` and ``reliability_after.png``: the diagrams without and with the temperature."""
    from finegrain.report import plots

    for when, t in (("before", 1.0), ("after", temperature)):
        conf = (logits / t).softmax(1).max(1).values.numpy()
        png = plots.reliability_diagram(calibration[f"reliability_{when}"], calibration[f"ece_{when}"], conf)
        write_bytes_atomic(out / f"reliability_{when}.png", png)


def print_summary(metrics: dict, n_pairs: int = 5) -> None:
    """A short table of the headline metrics and the most confused pairs."""
    from rich.table import Table

    t = Table(title=f"{metrics['split']} ({metrics['n']} images, TTA {metrics['tta']}, {metrics.get('precision', 'fp32')})")
    for col in ("top-1", "top-5", "mean per-class", "macro P", "macro R", "macro F1"):
        t.add_column(col, justify="right")
    t.add_row(*(f"{metrics[k]:.2f}" for k in ("top1", "top5", "mean_per_class_acc", "macro_precision", "macro_recall", "macro_f1")))
    console.print(t)
    if metrics.get("crop") not in (None, "none"):
        lost = f"; nothing detected in {metrics['no_detection']} images, classified whole" if metrics.get("no_detection") else ""
        console.print(f"classified the {metrics['crop']} box crops (margin {metrics['crop_margin']:g}){lost}")
    if metrics["most_confused"]:
        console.print("most confused (true -> predicted):")
        for p in metrics["most_confused"][:n_pairs]:
            console.print(f"  {p['true']} -> {p['predicted']}: {p['count']} ({p['rate']:.1f}%)")
    if metrics.get("skipped"):
        console.print(f"[yellow]{len(metrics['skipped'])} unreadable images skipped")
    _print_open_world(metrics)


def _print_open_world(metrics: dict) -> None:
    if "calibration" in metrics:
        c = metrics["calibration"]
        console.print(f"calibration: temperature {c['temperature']:.3f}, ECE {100 * c['ece_before']:.2f}% -> "
                      f"{100 * c['ece_after']:.2f}%, NLL {c['nll_before']:.3f} -> {c['nll_after']:.3f}")
    if "hierarchy" in metrics:
        h = metrics["hierarchy"]
        levels = ", ".join(f"{name} {acc:.2f}" for name, acc in h["level_accuracy"].items())
        console.print(f"hierarchy: top-1 per level {levels}; mean mistake severity {h['mistake_severity']:.2f}")
    if "openset" in metrics:
        o = metrics["openset"]
        console.print(f"open set ({o['n_known']} known, {o['n_unknown']} unknown images):")
        for name, r in o["scores"].items():
            fpr = next(v for k, v in r.items() if k.startswith("fpr_at"))
            extra = (f", at threshold {r['threshold']:.3g}: known accuracy {100 * r['known_accuracy_at_threshold']:.1f}%, "
                     f"unknown rejected {100 * r['unknown_rejected']:.1f}%") if "threshold" in r else ""
            console.print(f"  {name}: AUROC {100 * r['auroc']:.1f}, FPR@{round(100 * o['tpr'])} {100 * fpr:.1f}%{extra}")
