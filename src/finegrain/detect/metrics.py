"""COCO detection metrics: box (and mask) AP/AR in percent, per-class AP and precision-recall curves.

The numbers are COCO's own: torchmetrics' ``MeanAveragePrecision`` on the pycocotools backend,
with COCO's IoU and recall thresholds passed as float64 (torchmetrics' float32 defaults put 0.55
and 0.6 just above COCO's: an IoU of exactly 0.55 or a recall of exactly 0.6 would miss them). Per-class AP and the curves come from the accumulated
``precision`` array ``[T IoU thresholds, R recall points, K classes, A areas, M max-dets]``,
which is what ``COCOeval.summarize`` averages, so no second evaluation per class is run.

COCO marks an undefined value with -1 (a class with no ground truth, or nothing evaluated at
all); here it is None, in the summary as in the curves.

With masks, an object's size (small/medium/large) is its mask's area for box AP as for mask AP,
as in COCO's own annotations; without masks it is the box's ``w * h``.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

# COCO's thresholds exactly as COCOeval's Params builds them.
IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10).tolist()
RECALL_POINTS = np.linspace(0.0, 1.0, 101).tolist()
MAX_DETS = [1, 10, 100]
_SUMMARY = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_1", "mar_10", "mar_100")


def _pct(value: Any) -> float | None:
    """A COCO fraction as a JSON-ready percent; COCO's -1 (undefined) and NaN become None."""
    v = float(value)
    return None if v < 0 or math.isnan(v) else round(100.0 * v, 4)


class DetectionMetrics:
    """Accumulate detections over a split, then COCO AP/AR in percent.

    Args:
        classes: class names; labels index them (``0..C-1``, no background class).
        masks: also evaluate instance masks (the ``mask_`` keys); every prediction and target
            then needs ``masks``.

    Example:
        >>> m = DetectionMetrics(["cat", "dog"])
        >>> m.update(preds, targets)  # doctest: +SKIP
        >>> m.compute()["map_50"]  # doctest: +SKIP
    """

    def __init__(self, classes: Sequence[str], *, masks: bool = False) -> None:
        try:
            from torchmetrics.detection import MeanAveragePrecision
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("detection metrics need torchmetrics and pycocotools: pip install 'finegrain[detect]'") from e
        if not len(classes):
            raise ValueError("DetectionMetrics needs at least one class name")
        self.classes = [str(c) for c in classes]
        self.masks = bool(masks)
        self._map = MeanAveragePrecision(box_format="xyxy", iou_type=("bbox", "segm") if masks else "bbox",
                                         iou_thresholds=IOU_THRESHOLDS, rec_thresholds=RECALL_POINTS, max_detection_thresholds=MAX_DETS,
                                         class_metrics=False, extended_summary=True, backend="pycocotools")
        self._map.warn_on_many_detections = False  # only the 100 best per image count, as in COCO
        self._raw: dict[str, Any] | None = None
        self.num_images = 0

    def reset(self) -> None:
        """Forget everything accumulated."""
        self._map.reset()
        self._raw = None
        self.num_images = 0

    def update(self, preds: Sequence[dict[str, Any]], targets: Sequence[dict[str, Any]]) -> None:
        """Add a batch of images.

        Args:
            preds: per image ``{"boxes": [N, 4] xyxy pixels, "scores": [N], "labels": [N]}`` and, with
                masks, ``"masks"``: ``[N, H, W]`` bool/uint8 or a torchvision detector's ``[N, 1, H, W]``
                float probabilities (thresholded at 0.5).
            targets: per image ``{"boxes", "labels"}`` (and ``"masks"`` ``[N, H, W]``; ``"iscrowd"`` optional).
        """
        if len(preds) != len(targets):
            raise ValueError(f"{len(preds)} predictions for {len(targets)} targets: give one of each per image")
        p = [self._item(d, i, "prediction", scores=True) for i, d in enumerate(preds)]
        t = [self._item(d, i, "target", scores=False) for i, d in enumerate(targets)]
        if self.masks:
            for i, (a, b) in enumerate(zip(p, t)):
                if len(a["masks"]) and len(b["masks"]) and a["masks"].shape[-2:] != b["masks"].shape[-2:]:
                    raise ValueError(f"image {i}: predicted masks are {tuple(a['masks'].shape[-2:])} but target masks are "
                                     f"{tuple(b['masks'].shape[-2:])}; resize the predictions to the target's size")
        self._map.update(p, t)
        self._raw = None
        self.num_images += len(p)

    def _item(self, d: dict[str, Any], i: int, what: str, *, scores: bool) -> dict[str, torch.Tensor]:
        if not isinstance(d, dict) or "boxes" not in d or "labels" not in d or (scores and "scores" not in d):
            need = "boxes, scores and labels" if scores else "boxes and labels"
            raise ValueError(f"{what} {i} must be a dict with {need}, got {type(d).__name__} "
                             f"{sorted(d) if isinstance(d, dict) else ''}")
        boxes = torch.as_tensor(d["boxes"]).detach().cpu().float().reshape(-1, 4)
        labels = torch.as_tensor(d["labels"]).detach().cpu().long().reshape(-1)
        if len(labels) != len(boxes):
            raise ValueError(f"{what} {i}: {len(boxes)} boxes but {len(labels)} labels")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(self.classes)):
            raise ValueError(f"{what} {i}: labels must be in [0, {len(self.classes)}) (no background class), got "
                             f"{sorted(set(labels.tolist()))[:10]}")
        out = {"boxes": boxes, "labels": labels}
        if scores:
            out["scores"] = torch.as_tensor(d["scores"]).detach().cpu().float().reshape(-1)
            if len(out["scores"]) != len(boxes):
                raise ValueError(f"{what} {i}: {len(boxes)} boxes but {len(out['scores'])} scores")
        if "iscrowd" in d:
            out["iscrowd"] = torch.as_tensor(d["iscrowd"]).detach().cpu().long().reshape(-1)
        if self.masks:
            out["masks"] = self._masks(d.get("masks"), len(boxes), i, what)
        return out

    @staticmethod
    def _masks(m: Any, n: int, i: int, what: str) -> torch.Tensor:
        if m is None:
            if n == 0:
                return torch.zeros((0, 1, 1), dtype=torch.uint8)
            raise ValueError(f"{what} {i} has {n} boxes but no masks; DetectionMetrics(masks=True) needs them "
                             "(or use masks=False for box AP only)")
        m = torch.as_tensor(m).detach().cpu()
        if m.ndim == 4 and m.shape[1] == 1:  # torchvision Mask R-CNN: [N, 1, H, W]
            m = m[:, 0]
        if m.ndim != 3 or len(m) != n:
            raise ValueError(f"{what} {i}: masks must be [N, H, W] or [N, 1, H, W] with N = {n} boxes, got {tuple(m.shape)}")
        if m.is_floating_point():
            m = m > 0.5
        return (m != 0).to(torch.uint8)  # pycocotools encodes uint8 only

    def _compute_raw(self) -> dict[str, Any]:
        if self._raw is None:
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*called before the ``update``")  # empty: all None, said by the keys
                self._raw = self._map.compute()
        return self._raw

    def _observed(self, raw: dict[str, Any]) -> list[int]:
        return [int(c) for c in torch.as_tensor(raw.get("classes", [])).reshape(-1).tolist()]

    def compute(self) -> dict[str, Any]:
        """COCO AP/AR in percent (None where COCO has no value).

        Returns:
            ``map`` (AP at IoU 0.50:0.95), ``map_50``, ``map_75``, ``map_small``, ``map_medium``,
            ``map_large``, ``mar_1``, ``mar_10``, ``mar_100`` and ``per_class_ap`` (class name -> AP
            at 0.50:0.95, None for a class without ground truth); with masks the same keys again for
            masks, prefixed ``mask_``.
        """
        raw = self._compute_raw()
        out: dict[str, Any] = {}
        for kind, prefix in self._kinds():
            src = f"{kind}_" if self.masks else ""
            for key in _SUMMARY:
                out[prefix + key] = _pct(raw[src + key])
            out[prefix + "per_class_ap"] = self._per_class_ap(raw.get(src + "precision"), self._observed(raw))
        return out

    def _kinds(self) -> list[tuple[str, str]]:
        return [("bbox", ""), ("segm", "mask_")] if self.masks else [("bbox", "")]

    def _per_class_ap(self, precision: Any, observed: list[int]) -> dict[str, float | None]:
        ap: dict[str, float | None] = dict.fromkeys(self.classes)
        if precision is None:
            return ap
        p = np.asarray(precision, dtype=np.float64)[:, :, :, 0, -1]  # area "all", maxDets 100
        for k, label in enumerate(observed):
            s = p[:, :, k]
            s = s[s > -1]
            ap[self.classes[label]] = _pct(s.mean()) if s.size else None
        return ap

    def pr_curves(self, *, masks: bool = False, iou: float = 0.5) -> dict[str, Any]:
        """Per-class precision-recall curves at one IoU threshold (area all, 100 detections per image).

        Args:
            masks: the curves of mask AP instead of box AP (needs ``masks=True``).
            iou: one of COCO's thresholds 0.50, 0.55, ..., 0.95.

        Returns:
            See :func:`pr_curves`.
        """
        if masks and not self.masks:
            raise ValueError("mask curves need DetectionMetrics(classes, masks=True)")
        raw = self._compute_raw()
        key = (("segm_" if masks else "bbox_") + "precision") if self.masks else "precision"
        return pr_curves(raw.get(key), self._observed(raw), self.classes, iou=iou)


def pr_curves(precision: Any, observed: Sequence[int], classes: Sequence[str], *, iou: float = 0.5) -> dict[str, Any]:
    """Precision-recall curves from COCOeval's accumulated ``precision`` array.

    Args:
        precision: ``[T, R, K, A, M]`` (``eval["precision"]``: COCO's 10 IoU thresholds, 101 recall
            points, K evaluated classes, areas all/small/medium/large, max-dets 1/10/100), or None
            when nothing was evaluated.
        observed: the label of each of the K classes, in order (COCO evaluates only the classes
            seen in the ground truth or the predictions).
        classes: all class names, indexed by label.
        iou: the IoU threshold of the curves.

    Returns:
        ``{"iou", "recall": 101 points, "per_class": {name: 101 precisions or None}, "mean": the
        mean over the classes with a curve, or None}``, JSON-ready. A curve is COCO's interpolated
        precision (non-increasing; 0 past the class's highest recall); None marks a class without
        ground truth.
    """
    t = int(np.argmin(np.abs(np.asarray(IOU_THRESHOLDS) - iou)))
    if abs(IOU_THRESHOLDS[t] - iou) > 1e-6:
        raise ValueError(f"iou must be one of COCO's thresholds {[round(x, 2) for x in IOU_THRESHOLDS]}, got {iou}")
    out: dict[str, Any] = {"iou": round(IOU_THRESHOLDS[t], 2), "recall": [round(r, 2) for r in RECALL_POINTS],
                           "per_class": dict.fromkeys(classes), "mean": None}
    if precision is None:
        return out
    p = np.asarray(precision, dtype=np.float64)
    if p.ndim != 5 or p.shape[0] != len(IOU_THRESHOLDS) or p.shape[1] != len(RECALL_POINTS) or p.shape[2] != len(observed):
        raise ValueError(f"precision must be [{len(IOU_THRESHOLDS)}, {len(RECALL_POINTS)}, {len(observed)}, A, M], got {p.shape}")
    curves = p[t, :, :, 0, -1].T  # [K, R]
    defined = []
    for label, curve in zip(observed, curves):
        if (curve > -1).all():
            out["per_class"][classes[label]] = [round(float(v), 6) for v in curve]
            defined.append(curve)
    if defined:
        out["mean"] = [round(float(v), 6) for v in np.mean(defined, axis=0)]
    return out


def plot_pr_curves(curves: dict[str, Any], path: str | os.PathLike, *, top: int = 10, title: str | None = None) -> Path:
    """Draw :func:`pr_curves` as a PNG: the mean curve in black, the classes around it.

    With more classes than ``top``, the ``top`` with the lowest AP at the curves' IoU (the ones
    worth a look) get a colour and a legend entry with their AP; the rest are thin grey lines.

    Args:
        curves: what :func:`pr_curves` or :meth:`DetectionMetrics.pr_curves` returned.
        path: where to write the PNG (atomically; parent folders are created).
        top: how many classes are named in the legend.
        title: the figure's title (default: the IoU threshold).

    Returns:
        The path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from finegrain.checkpoint import atomic_write

    recall = np.asarray(curves["recall"], dtype=np.float64)
    per_class = {name: np.asarray(c, dtype=np.float64) for name, c in curves["per_class"].items() if c is not None}
    ap = {name: 100.0 * float(c.mean()) for name, c in per_class.items()}
    named = sorted(per_class, key=lambda n: (ap[n], n))[:max(int(top), 0)]

    fig = Figure(figsize=(7.0, 5.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name in sorted(set(per_class) - set(named)):
        ax.plot(recall, per_class[name], color="0.8", linewidth=0.7, zorder=1)
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(named) <= 10 else "tab20"]
    for j, name in enumerate(named):
        ax.plot(recall, per_class[name], color=cmap(j % cmap.N), linewidth=1.2, label=f"{name} ({ap[name]:.1f})", zorder=2)
    if curves.get("mean") is not None:
        mean = np.asarray(curves["mean"], dtype=np.float64)
        ax.plot(recall, mean, color="black", linewidth=2.4, label=f"mean ({100.0 * mean.mean():.1f})", zorder=3)
    else:
        ax.text(0.5, 0.5, "no class with ground truth", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision (COCO-interpolated)")
    iou = curves.get("iou", 0.5)
    rest = len(per_class) - len(named)
    ax.set_title(title or f"precision-recall at IoU {iou:g}" + (f" ({len(named)} lowest-AP classes named, {rest} in grey)" if rest else ""),
                 fontsize=10)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower left", fontsize=8, title=f"AP{round(100 * iou)}", title_fontsize=8)

    out = Path(path)
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png"))
    return out
