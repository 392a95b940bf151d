"""Classify the object, not the scene: crop each image to its bounding box before the transforms.

An :class:`~finegrain.data.base.ImageList` marked by :func:`box_crops` is read by
:class:`~finegrain.data.dataset.ImageDataset` as the crops of its ``boxes`` (enlarged by a margin,
clipped to the image); an image without a box is read whole. The boxes are the data set's own
(``--crop box`` in training, ``finegrain eval --crop gt``) or a detector's best box per image
(:func:`detected_boxes`, ``finegrain eval --crop detected``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from finegrain.data.base import ImageList

Box = tuple[float, float, float, float]

CROP_KEY = "crop_margin"
"""``ImageList.extras`` key of a list read as box crops: the margin, a fraction of the box size per side."""

BOX_FILES = {"cub": "bounding_boxes.txt", "nabirds": "bounding_boxes.txt", "dogs": "Annotation/", "aircraft": "images_box.txt",
             "cars": "devkit/cars_train_annos.mat"}
"""Where each benchmark reader finds its boxes (relative to the root in ``ImageList.source``)."""


def crop_rect(box_xywh: Box | None, margin: float, size: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """The pixel rectangle ``(left, top, right, bottom)`` of ``box_xywh`` enlarged by ``margin`` x its width
    (height) on each side, widened to whole pixels and clipped to an image of ``size`` ``(width, height)``.

    None when there is nothing to crop: no box, a box without area, or one outside the image.
    """
    if box_xywh is None:
        return None
    x, y, w, h = box_xywh
    if w <= 0 or h <= 0:
        return None
    width, height = size
    left, top = max(0, math.floor(x - margin * w)), max(0, math.floor(y - margin * h))
    right, bottom = min(width, math.ceil(x + w + margin * w)), min(height, math.ceil(y + h + margin * h))
    return (left, top, right, bottom) if right > left and bottom > top else None


def crop_to_box(img: Image.Image, box_xywh: Box | None, margin: float = 0.1) -> Image.Image:
    """``img`` cropped to ``box_xywh`` (pixels) enlarged by ``margin`` of the box size per side (see
    :func:`crop_rect`); the whole image when there is no usable box."""
    rect = crop_rect(box_xywh, margin, img.size)
    return img if rect is None else img.crop(rect)


def box_crops(images: ImageList, margin: float = 0.1, *, boxes: Sequence[Box | None] | None = None, warn: bool = True) -> ImageList:
    """``images`` marked to be read as the crops of their boxes (or of ``boxes``, one per image).

    Images without a box are read whole; with ``warn`` a line says how many.

    Raises:
        FileNotFoundError: the data set has no boxes; names the file its reader reads them from.
        ValueError: a negative ``margin``, or ``boxes`` of another length than ``images``.
    """
    if margin < 0:
        raise ValueError(f"--crop-margin is a fraction of the box size per side and must be >= 0, got {margin}")
    if boxes is None:
        _require_boxes(images)
        boxes = images.boxes
    if len(boxes) != len(images):
        raise ValueError(f"{len(boxes)} boxes for {len(images)} images")
    missing = sum(b is None for b in boxes)
    if missing and warn:
        from finegrain.utils import console

        console.print(f"[yellow]{missing} of {len(images)} images have no box; they are used whole")
    return dataclasses.replace(images, boxes=list(boxes), extras={**images.extras, CROP_KEY: float(margin)})


def crop_margin_of(images: ImageList) -> float | None:
    """The margin of a list marked by :func:`box_crops`, None for one read whole."""
    margin = images.extras.get(CROP_KEY)
    return None if margin is None else float(margin)


def _require_boxes(images: ImageList) -> None:
    if images.boxes is not None:
        return
    reader, _, root = images.source.partition(":")
    if reader in BOX_FILES:
        where = Path(root) / BOX_FILES[reader] if root else BOX_FILES[reader]
        hint = f"its reader reads them from {where}"
    else:
        hint = f"the {reader or 'given'} reader reads no boxes (those with boxes: {', '.join(sorted(BOX_FILES))})"
    raise FileNotFoundError(f"box crops need bounding boxes, but the data set ({images.source or 'unknown source'}) has none: "
                            f"{hint}. Add the box file, or drop --crop (--crop none)")


def detected_boxes(detector_ckpt: str | Path, paths: Sequence[str], device: str | torch.device = "auto", *,
                   batch_size: int = 4, detector=None) -> list[Box | None]:
    """The highest-scoring box of a detector in each image, as ``(x, y, width, height)`` pixels.

    Args:
        detector_ckpt: a detector checkpoint (``finegrain detect train``).
        paths: image files; an unreadable one, or one where the detector finds nothing, gets None.
        device: where the detector runs.
        batch_size: images per forward pass.
        detector: an already loaded detector task (then ``detector_ckpt`` is not read).
    """
    from finegrain.data.dataset import load_rgb
    from finegrain.utils import progress_bar

    if detector is None:
        from finegrain.detect.evaluate import load_detector

        detector, _ = load_detector(detector_ckpt, str(device))
    dev = next(detector.parameters()).device
    detector.eval()
    boxes: list[Box | None] = []
    with progress_bar("detecting boxes", total=len(paths)) as bar:
        for start in range(0, len(paths), batch_size):
            chunk = [_read_float(p, load_rgb) for p in paths[start:start + batch_size]]
            ready = [t.to(dev) for t in chunk if t is not None]
            found = iter(detector.predict(ready) if ready else [])
            boxes += [None if t is None else _top_box(next(found)) for t in chunk]
            bar.advance(len(chunk))
    return boxes


def _read_float(path: str, load_rgb) -> torch.Tensor | None:
    """``[3, H, W]`` floats in [0, 1], or None for a file that cannot be read (evaluation skips and lists it)."""
    from torchvision.transforms.v2.functional import pil_to_tensor

    try:
        return pil_to_tensor(load_rgb(path)).float() / 255
    except Exception:  # noqa: BLE001  (any decoder failure: no box; the classification pass reports the file)
        return None


def _top_box(found: dict) -> Box | None:
    if not len(found["scores"]):
        return None
    x0, y0, x1, y1 = found["boxes"][found["scores"].argmax()].float().tolist()
    return (x0, y0, x1 - x0, y1 - y0)


__all__ = ["BOX_FILES", "CROP_KEY", "box_crops", "crop_margin_of", "crop_rect", "crop_to_box", "detected_boxes"]
