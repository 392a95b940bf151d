"""Detect, then classify: every object a detector finds, labelled by a fine-grained classifier.

A detector run finds the objects (``bird``, ``car``, or the classes it was trained on), each box
is cropped with a margin of context and the crops of an image go through the classifier's
:class:`~finegrain.predict.Predictor` together, as PIL images, so they get exactly the eval
preprocessing of the classifier checkpoint. ``finegrain detect classify``, the served page's
``POST /detect`` (``finegrain serve CLASSIFIER --detector DETECTOR``) and the Python API are the
same :class:`DetectThenClassify`.

Images are read upright (their EXIF orientation applied, as image viewers and browsers show
them), so boxes are in the pixels a viewer displays.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from finegrain.predict import Predictor, expand_images
from finegrain.tasks import Task, detection_tasks


def crop_box(box: Sequence[float], margin: float, width: int, height: int) -> tuple[int, int, int, int]:
    """The pixels to crop for ``box``: enlarged by ``margin`` of its width and height on each side, clipped to the
    image and rounded outward to whole pixels (at least one pixel a side).

    Args:
        box: ``(x0, y0, x1, y1)`` in image pixels.
        margin: fraction of the box's width (height) added left and right (top and bottom).
        width, height: the image's size.

    Returns:
        ``(x0, y0, x1, y1)`` integers for ``PIL.Image.crop`` (``x1``, ``y1`` exclusive).
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    dx, dy = margin * max(x1 - x0, 0.0), margin * max(y1 - y0, 0.0)
    left = min(max(math.floor(x0 - dx), 0), width - 1)
    top = min(max(math.floor(y0 - dy), 0), height - 1)
    right = max(min(math.ceil(x1 + dx), width), left + 1)
    bottom = max(min(math.ceil(y1 + dy), height), top + 1)
    return left, top, right, bottom


def _upright(image: Image.Image) -> Image.Image:
    from PIL import ImageOps

    return ImageOps.exif_transpose(image).convert("RGB")


def _open(path: str | Path) -> Image.Image:
    with Image.open(path) as im:
        im.load()
        return _upright(im)


def _check_checkpoints(detector: str | Path, classifier: str | Path | Predictor) -> None:
    """Refuse a non-detector as ``detector`` and a non-classifier as ``classifier`` before loading any weights."""
    from finegrain.checkpoint import read_meta
    from finegrain.tasks import TASKS, classifier_tasks

    det = TASKS.get(read_meta(detector).task)
    cls = None if classifier is None or isinstance(classifier, Predictor) else TASKS.get(read_meta(classifier).task)
    swapped = det.outputs == "classes" and cls is not None and cls.outputs == "detections"
    hint = " The two look swapped: give the DETECTOR first, then the CLASSIFIER." if swapped else ""
    if det.outputs != "detections":
        raise ValueError(f"{detector} is a {det.name} checkpoint, not a detector: the first checkpoint must find objects "
                         f"(train one with `finegrain detect train`).{hint} Supported tasks: {', '.join(detection_tasks())}")
    if cls is not None and cls.outputs != "classes":
        raise ValueError(f"{classifier} is a {cls.name} checkpoint, whose predict returns {cls.outputs}, not a classifier: the "
                         f"second checkpoint must predict classes (train one with `finegrain train`). "
                         f"Supported tasks: {', '.join(classifier_tasks())}")


class DetectThenClassify:
    """Detect the objects of each image, crop each with a margin, and classify the crops.

    Args:
        detector: a detection task (see :func:`finegrain.detect.evaluate.load_detector`).
        detector_classes: the detector's class names, in its label order.
        classifier: the classifier's :class:`Predictor` (its calibration, open-set and roll-up answers apply); None
            detects only (objects then have no ``class``/``topk``).
        margin: fraction of each box's width and height added on each side before cropping (clipped to the image).
        score_threshold: detections scoring below it are dropped.
        max_objects: the most objects kept per image, the highest-scoring ones.
        tile: detect window by window (:func:`finegrain.detect.tiling.predict_tiled`) with windows of at most this
            many pixels a side; None detects on the whole image.
        tile_overlap: the least overlap of neighbouring windows, in pixels.

    Example:
        >>> p = DetectThenClassify.from_checkpoints("runs/birds-det", "runs/cub-cls")
        >>> p.predict(["feeder.jpg"], topk=3)[0]["objects"][0]["class"]
        'Cardinal'
    """

    def __init__(self, detector: Task, detector_classes: Sequence[str], classifier: Predictor, *, margin: float = 0.1,
                 score_threshold: float = 0.5, max_objects: int = 100, tile: int | None = None, tile_overlap: int = 128):
        if getattr(detector, "outputs", None) != "detections":
            raise ValueError(f"the detector must be a detection task, got {getattr(detector, 'name', type(detector).__name__)}. "
                             f"Supported tasks: {', '.join(detection_tasks())}")
        if classifier is not None and not isinstance(classifier, Predictor):
            raise TypeError(f"the classifier must be a finegrain Predictor (or None: detect only), got {type(classifier).__name__}: "
                            "use DetectThenClassify.from_checkpoints(detector, classifier)")
        if not (isinstance(margin, (int, float)) and 0 <= margin <= 10):
            raise ValueError(f"--margin is a fraction of the box size added on each side, in [0, 10], got {margin!r}")
        if not 0 <= score_threshold <= 1:
            raise ValueError(f"--score-threshold must be in [0, 1], got {score_threshold}")
        if isinstance(max_objects, bool) or not isinstance(max_objects, int) or max_objects < 1:
            raise ValueError(f"--max-objects must be a positive number, got {max_objects!r}")
        if tile is not None:
            from finegrain.detect.tiling import tile_windows

            tile_windows(1, 1, tile, tile_overlap)  # checks --tile and --tile-overlap with their own messages
        self.detector, self.detector_classes, self.classifier = detector, list(detector_classes), classifier
        self.margin, self.score_threshold, self.max_objects = float(margin), float(score_threshold), max_objects
        self.tile, self.tile_overlap = tile, tile_overlap
        self.device = next(detector.parameters()).device

    @classmethod
    def from_checkpoints(cls, detector: str | Path, classifier: str | Path | Predictor, *, device: str = "auto",
                         margin: float = 0.1, score_threshold: float = 0.5, max_objects: int = 100, tile: int | None = None,
                         tile_overlap: int = 128, batch_size: int | None = None) -> DetectThenClassify:
        """Load a detector checkpoint and a classifier checkpoint (files or run folders).

        Args:
            detector: the detector's checkpoint; a classifier is refused.
            classifier: the classifier's checkpoint (a detector is refused), or an already loaded :class:`Predictor`.
            device: where both run ("auto": CUDA, then MPS, then CPU).
            batch_size: crops per classifier forward pass; None puts all the crops of an image in one batch
                (``max_objects``).
            margin, score_threshold, max_objects, tile, tile_overlap: see :class:`DetectThenClassify`.
        """
        from finegrain.detect.evaluate import load_detector

        _check_checkpoints(detector, classifier)
        task, meta = load_detector(detector, device)
        if classifier is not None and not isinstance(classifier, Predictor):
            classifier = Predictor.from_checkpoint(classifier, device=device, batch_size=batch_size or max_objects)
        return cls(task, meta.classes, classifier, margin=margin, score_threshold=score_threshold, max_objects=max_objects,
                   tile=tile, tile_overlap=tile_overlap)

    @torch.no_grad()
    def detect(self, image: Image.Image) -> dict[str, torch.Tensor]:
        """``boxes`` (xyxy pixels), ``scores`` and ``labels`` of ``image`` on the CPU, above the threshold, by score."""
        if self.tile is not None:
            from finegrain.detect.tiling import predict_tiled

            out = predict_tiled(self.detector.predict, image, tile=self.tile, overlap=self.tile_overlap,
                                score_threshold=self.score_threshold, device=self.device)
        else:
            from torchvision.transforms.functional import to_tensor

            (out,) = self.detector.predict([to_tensor(image).to(self.device)])
        boxes = out["boxes"].detach().reshape(-1, 4).float().cpu()
        scores = out["scores"].detach().reshape(-1).float().cpu()
        labels = out["labels"].detach().reshape(-1).long().cpu()
        keep = (scores >= self.score_threshold).nonzero().flatten()
        keep = keep[scores[keep].argsort(descending=True, stable=True)][: self.max_objects]
        return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}

    def classify(self, image: Image.Image, boxes: Sequence[Sequence[float]], *, topk: int = 5) -> list[dict[str, Any]]:
        """The classifier's answers for the crops of ``boxes`` (with the margin): one ``Predictor.predict`` call,
        one row per box (``topk`` of ``{"class", "index", "score"}``, plus the Predictor's other answers)."""
        crops = [image.crop(crop_box(b, self.margin, *image.size)) for b in boxes]
        return self.classifier.predict(crops, topk=topk) if crops else []

    def predict_image(self, image: Image.Image, *, topk: int = 5) -> dict[str, Any]:
        """``{"width", "height", "objects"}`` of one upright RGB image (see :meth:`predict`)."""
        found = self.detect(image)
        boxes = [[round(v, 2) for v in b] for b in found["boxes"].tolist()]
        if self.classifier is None:  # detection only (finegrain detect predict)
            return {"width": image.width, "height": image.height, "objects": [
                {"box": box, "score": round(score, 6), "detector_label": self._detector_name(label)}
                for box, score, label in zip(boxes, found["scores"].tolist(), found["labels"].tolist())]}
        rows = self.classify(image, boxes, topk=topk)
        objects = []
        for box, score, label, row in zip(boxes, found["scores"].tolist(), found["labels"].tolist(), rows):
            top = [{"class": t["class"], "index": t["index"], "prob": t["score"]} for t in row["topk"]]
            extra = {k: v for k, v in row.items() if k not in ("path", "topk")}  # "unknown", "openset", "rollup" when turned on
            objects.append({"box": box, "crop": list(crop_box(box, self.margin, *image.size)), "score": round(score, 6),
                            "detector_label": self._detector_name(label), "class": top[0]["class"], "prob": top[0]["prob"],
                            "topk": top, **extra})
        return {"width": image.width, "height": image.height, "objects": objects}

    def _detector_name(self, label: int) -> str:
        return self.detector_classes[label] if 0 <= label < len(self.detector_classes) else str(label)

    def predict(self, images: Sequence[str | Path | Image.Image], *, topk: int = 5) -> list[dict[str, Any]]:
        """Every detected object of each image with its box, detector score, fine-grained class and top-k.

        Args:
            images: image files, folders (expanded to the images inside) or PIL images.
            topk: classes per object.

        Returns:
            Per image ``{"image", "width", "height", "objects"}``: ``image`` is the path (the index for a PIL
            image); each object is ``{"box": [x0, y0, x1, y1], "crop", "score", "detector_label", "class",
            "prob", "topk": [{"class", "index", "prob"}, ...]}`` (``crop``: the pixels classified, the box with
            its margin), by detector score; no detection gives ``"objects": []``. An unreadable file gives
            ``{"image", "error"}`` and the rest go on.
        """
        if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
            raise ValueError(f"--topk must be at least 1, got {topk!r}")
        items: list = []
        for im in images:
            items += expand_images([im]) if isinstance(im, (str, Path)) else [im]
        results = []
        for i, item in enumerate(items):
            name: str | int = str(item) if isinstance(item, (str, Path)) else i
            try:
                image = _open(item) if isinstance(item, (str, Path)) else _upright(item)
            except Exception as e:  # noqa: BLE001  (report, keep going)
                results.append({"image": name, "error": f"cannot read image: {type(e).__name__}: {e}"})
                continue
            results.append({"image": name, **self.predict_image(image, topk=topk)})
        return results


# ----------------------------------------------------------------------------- finegrain detect classify


def add_classify_command(dsub) -> None:
    """Register ``classify`` on the ``finegrain detect`` subparsers."""
    c = dsub.add_parser("classify", help="detect objects, then classify each box: box, detector score, fine-grained class and top-k")
    c.add_argument("detector", help="detector checkpoint file or run folder (finegrain detect train)")
    c.add_argument("classifier", help="classifier checkpoint file or run folder (finegrain train)")
    c.add_argument("images", nargs="+", help="image files or folders")
    c.add_argument("--topk", type=int, default=5, help="classes per object")
    c.add_argument("--margin", type=float, default=0.1, help="fraction of the box's width and height added on each side before cropping")
    c.add_argument("--score-threshold", type=float, default=0.5, help="drop detections scoring below it")
    c.add_argument("--max-objects", type=int, default=100, help="the most objects per image (the highest-scoring)")
    c.add_argument("--tile", type=int, default=None, help="detect in windows of at most N pixels a side (large images)")
    c.add_argument("--tile-overlap", type=int, default=128, help="least overlap of neighbouring windows in pixels")
    c.add_argument("--format", choices=("table", "json", "csv"), default="table",
                   help="csv: one row per object (an image without objects gets one row with empty object fields)")
    c.add_argument("--device", default="auto")
    c.set_defaults(func=_cmd_classify)


CSV_COLUMNS = ("image", "width", "height", "object", "x0", "y0", "x1", "y1", "score", "detector_label", "class", "prob", "topk",
               "error")


def _csv_rows(results: list[dict]) -> list[list]:
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["image"], *[""] * 12, r["error"]])
        elif not r["objects"]:
            rows.append([r["image"], r["width"], r["height"], *[""] * 11])
        for k, o in enumerate(r.get("objects", []), 1):
            top = "; ".join(f"{t['class']}={t['prob']}" for t in o["topk"])
            rows.append([r["image"], r["width"], r["height"], k, *o["box"], o["score"], o["detector_label"], o["class"], o["prob"],
                         top, ""])
    return rows


def _print_table(results: list[dict], topk: int, score_threshold: float) -> None:
    import sys

    from rich.console import Console
    from rich.table import Table

    t = Table()
    for col in ("image", "#", "box", "detector", "class", f"top-{topk}"):
        t.add_column(col)
    for r in results:
        if "error" in r:
            t.add_row(str(r["image"]), "", "", "", "", r["error"])
        elif not r["objects"]:
            t.add_row(str(r["image"]), "", "", "", f"no objects detected (score >= {score_threshold:g})", "")
        for k, o in enumerate(r.get("objects", []), 1):
            box = ", ".join(f"{v:.0f}" for v in o["box"])
            t.add_row(str(r["image"]), str(k), box, f"{o['detector_label']} {o['score']:.3f}", f"{o['class']} {o['prob']:.3f}",
                      ", ".join(f"{x['class']} {x['prob']:.3f}" for x in o["topk"]))
    Console(width=None if sys.stdout.isatty() else 400).print(t)  # results to stdout; progress and errors stay on stderr


def _cmd_classify(args) -> int:
    import csv
    import json
    import sys

    _check_checkpoints(args.detector, args.classifier)  # before the images: a swapped pair is the likelier mistake
    images = expand_images(args.images)
    if not images:
        raise FileNotFoundError(f"no images found in {' '.join(args.images)}")
    pipeline = DetectThenClassify.from_checkpoints(args.detector, args.classifier, device=args.device, margin=args.margin,
                                                   score_threshold=args.score_threshold, max_objects=args.max_objects,
                                                   tile=args.tile, tile_overlap=args.tile_overlap)
    results = pipeline.predict(images, topk=args.topk)
    if args.format == "json":
        print(json.dumps(results, indent=1))
    elif args.format == "csv":
        w = csv.writer(sys.stdout)
        w.writerow(CSV_COLUMNS)
        w.writerows(_csv_rows(results))
    else:
        _print_table(results, args.topk, args.score_threshold)
    failed = [r for r in results if "error" in r]
    if failed:
        from finegrain.utils import console

        console.print(f"[yellow]{len(failed)} of {len(results)} images could not be read, e.g. {failed[0]['image']}: "
                      f"{failed[0]['error']}")
    return 2 if len(failed) == len(results) else 0
