"""How well explanation maps fall on the annotated object.

Two scores against a ground-truth bounding box:
  * pointing game: is the map's peak inside the box? ("Top-down Neural Attention by Excitation
    Backprop", Zhang et al., arXiv:1608.00507);
  * energy in box: the fraction of the map's mass inside the box (the energy-based pointing game
    of "Score-CAM", Wang et al., arXiv:1910.01279).

Boxes are ``(x, y, width, height)`` in original image pixels (CUB's ``bounding_boxes.txt``); maps
live on the eval crop, so boxes are mapped through the eval transform's resize + center crop.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np


def crop_geometry(image_size: tuple[int, int], preprocessing: dict) -> tuple[float, float, int, int, int]:
    """``(scale_x, scale_y, left, top, crop)`` of the eval transform for an image of ``(width, height)``.

    Mirrors torchvision: the short side is resized to ``floor(img_size / crop_pct)`` (the long side
    truncated), then a centered ``img_size`` square is cut with ``round((size - crop) / 2)`` offsets.
    """
    w0, h0 = image_size
    crop = int(preprocessing["img_size"])
    short = int(math.floor(crop / preprocessing["crop_pct"]))
    if w0 <= h0:
        w1, h1 = short, int(short * h0 / w0)
    else:
        w1, h1 = int(short * w0 / h0), short
    left, top = int(round((w1 - crop) / 2.0)), int(round((h1 - crop) / 2.0))
    return w1 / w0, h1 / h0, left, top, crop


def map_box(box: tuple[float, float, float, float], image_size: tuple[int, int], preprocessing: dict) -> tuple[float, float, float, float]:
    """Map ``(x, y, w, h)`` in original pixels to ``(x0, y0, x1, y1)`` on the eval crop, clipped to it.

    A box entirely outside the crop comes back empty (``x1 <= x0`` or ``y1 <= y0``).
    """
    sx, sy, left, top, crop = crop_geometry(image_size, preprocessing)
    x, y, w, h = box
    x0, y0 = x * sx - left, y * sy - top
    x1, y1 = (x + w) * sx - left, (y + h) * sy - top
    clip = lambda v: min(max(v, 0.0), float(crop))  # noqa: E731
    return clip(x0), clip(y0), clip(x1), clip(y1)


def _box_mask(shape: tuple[int, int], box_xyxy: tuple[float, float, float, float]) -> np.ndarray:
    """Pixels whose centres lie inside the box."""
    h, w = shape
    x0, y0, x1, y1 = box_xyxy
    ys, xs = np.arange(h)[:, None] + 0.5, np.arange(w)[None, :] + 0.5
    return (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)


def pointing_game(heatmap: np.ndarray, box_xyxy: tuple[float, float, float, float], *, tolerance: float = 0.0) -> bool:
    """True when the map's maximum lies inside the box grown by ``tolerance`` pixels.

    Ties count as a hit if any maximal pixel is inside; an all-zero map (no evidence at all) is a
    miss. Zhang et al. use a 15 px tolerance at 224 px; the default here is strict.
    """
    if not heatmap.max() > 0:
        return False
    x0, y0, x1, y1 = box_xyxy
    grown = (x0 - tolerance, y0 - tolerance, x1 + tolerance, y1 + tolerance)
    peak = heatmap >= heatmap.max()
    return bool((peak & _box_mask(heatmap.shape, grown)).any())


def energy_in_box(heatmap: np.ndarray, box_xyxy: tuple[float, float, float, float]) -> float:
    """Fraction of the map's total mass inside the box (0 for an all-zero map)."""
    total = float(heatmap.sum())
    if total <= 0:
        return 0.0
    return float(heatmap[_box_mask(heatmap.shape, box_xyxy)].sum()) / total


def localization_scores(predictor, images, *, method: str | None = None, use_label: bool = True,
                        tolerance: float = 0.0, limit: int | None = None) -> dict:
    """Pointing game and energy-in-box of ``predictor``'s explanations over an :class:`ImageList`.

    Args:
        predictor: a :class:`~finegrain.predict.Predictor`.
        images: an ImageList with ``boxes`` (e.g. CUB with ``bounding_boxes.txt``).
        method: explanation method; None picks from the backbone.
        use_label: explain the true class (the usual protocol) rather than the predicted one.
        tolerance: pointing-game tolerance in crop pixels.
        limit: score only the first ``limit`` images with boxes.

    Returns:
        ``{"method", "n", "pointing_acc", "mean_energy", "per_class": {name: {"n", "pointing_acc",
        "mean_energy"}}, "skipped": [...]}``; accuracies in percent.

    Raises:
        ValueError: the list has no boxes.
    """
    from finegrain.data.dataset import load_rgb
    from finegrain.explain.cam import default_method, explain

    if not images.boxes or not any(b is not None for b in images.boxes):
        raise ValueError(f"{images.source or 'the data'} has no bounding boxes; the CUB reader loads them from "
                         "bounding_boxes.txt next to images.txt")
    method = method or default_method(predictor.task.model)
    prep = predictor.meta["preprocessing"]
    hits: dict[str, list[float]] = defaultdict(list)
    energy: dict[str, list[float]] = defaultdict(list)
    skipped: list[dict] = []
    done = 0
    for path, label, box in zip(images.paths, images.labels, images.boxes):
        if box is None:
            continue
        if limit is not None and done >= limit:
            break
        try:
            img = load_rgb(path)
        except Exception as e:  # noqa: BLE001  (report, keep going)
            skipped.append({"path": path, "error": f"{type(e).__name__}: {e}"})
            continue
        (heat, _), = explain(predictor, [img], method=method, target=label if use_label else None)
        xyxy = map_box(box, img.size, prep)
        if xyxy[2] <= xyxy[0] or xyxy[3] <= xyxy[1]:
            skipped.append({"path": path, "error": "box lies outside the eval crop"})
            continue
        name = images.classes[label]
        hits[name].append(float(pointing_game(heat, xyxy, tolerance=tolerance)))
        energy[name].append(energy_in_box(heat, xyxy))
        done += 1
    all_hits = [v for vs in hits.values() for v in vs]
    all_energy = [v for vs in energy.values() for v in vs]
    return {
        "method": method,
        "n": len(all_hits),
        "pointing_acc": 100.0 * float(np.mean(all_hits)) if all_hits else float("nan"),
        "mean_energy": float(np.mean(all_energy)) if all_energy else float("nan"),
        "per_class": {c: {"n": len(hits[c]), "pointing_acc": 100.0 * float(np.mean(hits[c])),
                          "mean_energy": float(np.mean(energy[c]))} for c in sorted(hits)},
        "skipped": skipped,
    }
