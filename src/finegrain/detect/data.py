"""Detection data: images with boxes (and instance masks), and the fixes applied to bad boxes.

A :class:`DetectionList` is one split of a detection data set in one form whatever the file
format was (COCO JSON, Pascal VOC XML, CSV, a fine-grained benchmark's boxes: see
:mod:`finegrain.detect.readers`): per image, boxes as ``(x0, y0, x1, y1)`` in pixels and labels
in ``range(len(classes))``; torchvision's background class 0 is added only inside the models.

Boxes are sanitised once, when a list is made (:func:`sanitize`): a box that reaches outside
its image is clipped to it (counted), a box of zero area or with ``x1 < x0`` is dropped (listed,
with the reason, in the run folder's ``dropped_boxes.txt``). An image without annotations stays
in the list as a negative example.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from finegrain.data.base import ImageList


@dataclass
class BoxFixes:
    """What :func:`sanitize` changed: ``clipped`` boxes (a count) and ``dropped`` ones ``(path, box, reason)``."""

    clipped: int = 0
    dropped: list[tuple[str, tuple[float, float, float, float], str]] = field(default_factory=list)

    def merge(self, other: BoxFixes) -> BoxFixes:
        return BoxFixes(self.clipped + other.clipped, self.dropped + other.dropped)

    def summary(self) -> str:
        """One line for the console ("" when nothing was changed)."""
        parts = []
        if self.clipped:
            parts.append(f"{self.clipped} boxes reached outside their image and were clipped to it")
        if self.dropped:
            parts.append(f"{len(self.dropped)} boxes with zero area or inverted corners were dropped (e.g. "
                         f"{self.dropped[0][0]}: {self.dropped[0][2]})")
        return "; ".join(parts)

    def write(self, run_dir: str | Path) -> Path | None:
        """List the dropped boxes in ``run_dir/dropped_boxes.txt`` (tab-separated); None when there are none."""
        if not self.dropped:
            return None
        from finegrain.checkpoint import write_text_atomic

        lines = ["path\tx0\ty0\tx1\ty1\treason"] + [f"{p}\t" + "\t".join(f"{v:g}" for v in box) + f"\t{why}"
                                                    for p, box, why in self.dropped]
        out = Path(run_dir) / "dropped_boxes.txt"
        write_text_atomic(out, "\n".join(lines) + "\n")
        return out


@dataclass
class DetectionList:
    """Images and their objects for one split.

    Attributes:
        paths: image paths.
        boxes: per image a float32 ``[N, 4]`` array of ``(x0, y0, x1, y1)`` pixel boxes (``N`` may be 0).
        labels: per image an int64 ``[N]`` array in ``range(len(classes))``.
        classes: class names.
        masks: per image a list of ``N`` COCO segmentations (a polygon list or an RLE dict), or None
            when the data set has no masks.
        sizes: per image ``(height, width)`` when known (COCO, VOC), else None.
        source: where the list came from (reader and file).
        fixes: what sanitising changed.
    """

    paths: list[str]
    boxes: list[np.ndarray]
    labels: list[np.ndarray]
    classes: list[str]
    masks: list[list[Any]] | None = None
    sizes: list[tuple[int, int] | None] | None = None
    source: str = ""
    fixes: BoxFixes = field(default_factory=BoxFixes)

    def __post_init__(self) -> None:
        if not len(self.paths) == len(self.boxes) == len(self.labels):
            raise ValueError(f"{len(self.paths)} paths, {len(self.boxes)} box arrays and {len(self.labels)} label arrays")
        for i, (b, l) in enumerate(zip(self.boxes, self.labels)):
            if b.ndim != 2 or b.shape[1] != 4 or len(b) != len(l):
                raise ValueError(f"{self.paths[i]}: boxes must be [N, 4] with N labels, got {b.shape} and {l.shape}")
            if len(l) and not (0 <= l.min() and l.max() < len(self.classes)):
                raise ValueError(f"{self.paths[i]}: labels out of range [0, {len(self.classes)}): {l.tolist()}")
        if self.masks is not None and any(len(m) != len(b) for m, b in zip(self.masks, self.boxes)):
            raise ValueError("each image needs one mask per box")

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_objects(self) -> int:
        return int(sum(len(b) for b in self.boxes))

    def subset(self, indices: list[int]) -> DetectionList:
        """The images at ``indices`` with their objects (the fixes stay those of the whole list)."""
        pick = lambda xs: None if xs is None else [xs[i] for i in indices]  # noqa: E731
        return dataclasses.replace(self, paths=pick(self.paths), boxes=pick(self.boxes), labels=pick(self.labels),
                                   masks=pick(self.masks), sizes=pick(self.sizes))

    def with_classes(self, classes: list[str]) -> DetectionList:
        """The same objects with labels indexing ``classes`` (a model's list); unknown class names are an error."""
        index = {c: i for i, c in enumerate(classes)}
        unknown = sorted(set(self.classes) - set(index))
        if unknown:
            raise ValueError(f"{len(unknown)} classes of the data are not among the model's {len(classes)}: {unknown[:5]}")
        remap = np.array([index[c] for c in self.classes], dtype=np.int64)
        return dataclasses.replace(self, labels=[remap[l] if len(l) else l for l in self.labels], classes=list(classes))

    def class_counts(self) -> list[int]:
        counts = np.zeros(len(self.classes), dtype=np.int64)
        for l in self.labels:
            np.add.at(counts, l, 1)
        return counts.tolist()


def image_size(path: str) -> tuple[int, int] | None:
    """``(height, width)`` from the image file's header (no decoding), or None when it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size  # as stored: the loader (load_rgb) does not apply an EXIF rotation either
    except Exception:  # noqa: BLE001  (missing or unreadable: the dataset skips and lists it later)
        return None
    return h, w


def sanitize(path: str, boxes: np.ndarray, labels: np.ndarray, size: tuple[int, int] | None,
             masks: list | None = None) -> tuple[np.ndarray, np.ndarray, list | None, BoxFixes]:
    """Clip ``boxes`` (``[N, 4]`` xyxy pixels) to an image of ``size = (height, width)`` and drop empty ones.

    Returns ``(boxes, labels, masks, fixes)``; without a size, boxes are only checked for zero area
    and inverted corners (and clipped at 0).
    """
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    fixes = BoxFixes()
    if not len(boxes):
        return boxes, labels, masks, fixes
    finite = np.isfinite(boxes).all(1)
    inverted = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    hi = np.array([size[1], size[0], size[1], size[0]], dtype=np.float32) if size else np.full(4, np.inf, np.float32)
    clipped = np.clip(np.nan_to_num(boxes), 0, hi)
    changed = finite & ~inverted & (clipped != boxes).any(1)
    empty = (clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1])
    keep = finite & ~inverted & ~empty
    for i in np.flatnonzero(~keep):
        why = ("not a number" if not finite[i] else "inverted corners (x1 < x0 or y1 < y0)" if inverted[i]
               else "zero area" + (" after clipping to the image" if changed[i] else ""))
        fixes.dropped.append((path, tuple(float(v) for v in boxes[i]), why))
    fixes.clipped = int((changed & keep).sum())
    kept_masks = None if masks is None else [m for m, k in zip(masks, keep) if k]
    return clipped[keep], labels[keep], kept_masks, fixes


def make_list(paths: list[str], boxes: list, labels: list, classes: list[str], *, masks: list | None = None,
              sizes: list | None = None, source: str = "", read_sizes: bool = True) -> DetectionList:
    """A sanitised :class:`DetectionList` (image sizes read from the files' headers where not given)."""
    sizes = list(sizes) if sizes is not None else [None] * len(paths)
    if read_sizes:
        sizes = [s if s is not None else image_size(p) for p, s in zip(paths, sizes)]
    out_b, out_l, out_m, fixes = [], [], [] if masks is not None else None, BoxFixes()
    for i, path in enumerate(paths):
        b, l, m, f = sanitize(path, boxes[i], labels[i], sizes[i], None if masks is None else masks[i])
        out_b.append(b)
        out_l.append(l)
        if out_m is not None:
            out_m.append(m)
        fixes = fixes.merge(f)
    return DetectionList(list(paths), out_b, out_l, list(classes), masks=out_m, sizes=sizes, source=source, fixes=fixes)


LABEL_MODES = ("species", "object")
"""``--labels``: keep the data set's classes ("species"), or one class "object" for every box."""


def from_image_list(images: ImageList, labels: str = "species") -> DetectionList:
    """A fine-grained benchmark's boxes (``ImageList.boxes``, ``(x, y, w, h)``) as detection data.

    With ``labels="species"`` each box is labelled with its image's class; with ``"object"`` every
    box is one class, "object" (a detector of the kind of thing, for detect-then-classify). An
    image without a box stays in the list without objects.
    """
    if labels not in LABEL_MODES:
        raise ValueError(f"--labels must be one of {', '.join(LABEL_MODES)}, got {labels!r}")
    if images.boxes is None:
        raise FileNotFoundError(f"{images.source or 'this data set'} has no bounding boxes (for CUB: bounding_boxes.txt); "
                                "detection needs boxes: use a data set that has them, or COCO / VOC / CSV annotations")
    boxes, lab = [], []
    for box, label in zip(images.boxes, images.labels):
        if box is None:
            boxes.append(np.zeros((0, 4), np.float32))
            lab.append(np.zeros(0, np.int64))
            continue
        x, y, w, h = box
        boxes.append(np.array([[x, y, x + w, y + h]], np.float32))
        lab.append(np.array([label if labels == "species" else 0], np.int64))
    classes = list(images.classes) if labels == "species" else ["object"]
    return make_list(images.paths, boxes, lab, classes, source=images.source)
