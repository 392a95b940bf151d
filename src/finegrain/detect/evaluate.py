"""``evaluate_detection``: COCO box (and mask) AP of a detector checkpoint on a split, with plots.

Writes ``results.json`` (mAP@[.5:.95], AP50, AP75, AP small/medium/large, AR@1/10/100, per-class
AP, mask AP for Mask R-CNN, precision-recall curves at IoU 0.5), ``pr_curves.png`` and
``examples.png`` (predicted boxes in colour, true boxes in white) into the output folder.
``finegrain eval`` calls it for a detector checkpoint.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from finegrain import checkpoint as ckpt
from finegrain.detect.dataset import DetectionDataset
from finegrain.utils import console, progress_bar, resolve_device


def load_detector(checkpoint: str | Path, device: str = "auto"):
    """``(task, meta)`` of a detector checkpoint; a classifier checkpoint is refused naming what to do."""
    from finegrain.tasks import detection_tasks

    meta = ckpt.read_meta(checkpoint)
    if meta.task not in detection_tasks():
        raise ValueError(f"{checkpoint} is a {meta.task} checkpoint, not a detector; train one with `finegrain detect train` "
                         f"(Supported tasks: {', '.join(detection_tasks())})")
    return ckpt.load_task(checkpoint, resolve_device(device))


def evaluate_detection(checkpoint: str | Path, data: str | Path, *, split: str = "test", fmt: str = "auto", images: str | None = None,
                       dataset: str | None = None, out_dir: str | Path | None = None, batch_size: int = 4, workers: int = 2,
                       device: str = "auto", examples: int = 8) -> dict:
    """Box (and mask) AP of ``checkpoint`` on ``split`` of ``data``, read with the labels the detector was trained on.

    Class names of the data must be among the checkpoint's; the data's boxes are sanitised as in
    training (the fixes are counted in the results).
    """
    from finegrain.detect.metrics import DetectionMetrics, plot_pr_curves
    from finegrain.detect.readers import open_detection
    from finegrain.detect.train import predict_dataset

    path = ckpt.resolve_checkpoint(checkpoint)
    task, meta = load_detector(path, device)
    info = meta.detection or {}
    labels = info.get("labels", "species")
    test = open_detection(data, split, fmt=fmt, labels=labels, dataset=dataset, images=images).with_classes(meta.classes)
    masks = bool(info.get("masks")) and test.masks is not None
    max_side = (meta.config or {}).get("detect", {}).get("max_side")
    ds = DetectionDataset(test, masks=masks, max_side=max_side)
    dev = next(task.parameters()).device
    t0 = time.perf_counter()
    with progress_bar(f"detect eval {split}", total=len(ds)) as bar:
        preds, targets, skipped = predict_dataset(task, ds, device=dev, workers=workers, batch_size=batch_size, on_batch=bar.advance)
    seconds = time.perf_counter() - t0
    metrics = DetectionMetrics(meta.classes, masks=masks)
    metrics.update(preds, targets)
    result = metrics.compute()
    curves = metrics.pr_curves()
    result.update({"checkpoint": str(path), "data": str(data), "split": split, "labels": labels, "images": len(preds),
                   "objects": int(sum(len(t["boxes"]) for t in targets)), "boxes_clipped": test.fixes.clipped,
                   "boxes_dropped": len(test.fixes.dropped), "skipped": [p for p, _ in skipped], "seconds": seconds,
                   "images_per_s": len(preds) / max(seconds, 1e-9), "pr_curves": curves})
    out = Path(out_dir) if out_dir else path.parent / f"eval-{split}"
    out.mkdir(parents=True, exist_ok=True)
    ckpt.write_text_atomic(out / "results.json", json.dumps(result, indent=1))
    plot_pr_curves(curves, out / "pr_curves.png")
    if examples:
        save_examples(ds, preds, meta.classes, out / "examples.png", n=examples)
    test.fixes.write(out)
    result["out_dir"] = str(out)
    return result


def draw_detections(image: torch.Tensor, pred: dict, classes: list[str], *, target: dict | None = None, score: float = 0.3,
                    width: int = 2) -> torch.Tensor:
    """``image`` (float [3, H, W] in [0, 1]) as uint8 with the predicted boxes above ``score`` (and masks) and, given
    ``target``, the true boxes in white."""
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    canvas = (image.clamp(0, 1) * 255).to(torch.uint8)
    keep = pred["scores"] >= score
    if "masks" in pred and keep.any():
        canvas = draw_segmentation_masks(canvas, pred["masks"][keep].reshape(-1, *canvas.shape[1:]) > 0.5, alpha=0.4)
    if target is not None and len(target["boxes"]):
        canvas = draw_bounding_boxes(canvas, target["boxes"], colors="white", width=width)
    if keep.any():
        names = [f"{classes[int(l)]} {float(s):.2f}" for l, s in zip(pred["labels"][keep], pred["scores"][keep])]
        colors = [PALETTE[int(l) % len(PALETTE)] for l in pred["labels"][keep]]
        canvas = draw_bounding_boxes(canvas, pred["boxes"][keep], labels=names, colors=colors, width=width)
    return canvas


PALETTE = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45", "#fabed4", "#469990")
"""One colour per class (modulo), readable on photos."""


def save_examples(ds: DetectionDataset, preds: list[dict], classes: list[str], path: Path, *, n: int = 8) -> None:
    """A grid of the first ``n`` images with predicted and true boxes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(n, len(preds))
    if n == 0:
        return
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        item = ds[i]
        if "skipped" in item:
            continue
        drawn = draw_detections(item["image"], preds[i], classes, target=item["target"])
        axes.flat[i].imshow(drawn.permute(1, 2, 0).numpy())
        axes.flat[i].set_title(Path(ds.data.paths[i]).name, fontsize=8)
    fig.suptitle("predicted (colour, score >= 0.3) and true (white) boxes")
    fig.tight_layout()
    ckpt.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=80))
    plt.close(fig)


def print_detection_summary(m: dict) -> None:
    """The headline numbers of :func:`evaluate_detection` as one table."""
    from rich.table import Table

    t = Table(title=f"detection, {m['split']} ({m['images']} images, {m['objects']} objects)")
    for col in ("metric", "box", "mask"):
        t.add_column(col, justify="right" if col != "metric" else "left")
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for key, name in (("map", "mAP@[.5:.95]"), ("map_50", "AP50"), ("map_75", "AP75"), ("map_small", "AP small"),
                      ("map_medium", "AP medium"), ("map_large", "AP large"), ("mar_100", "AR@100")):
        t.add_row(name, fmt(m.get(key)), fmt(m.get(f"mask_{key}")) if "mask_map" in m else "")
    console.print(t)
