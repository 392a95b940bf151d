"""Image datasets for torch: corrupt-file handling, annotations through the transforms, and collate."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image, ImageFile
from torch.utils.data import Dataset

from finegrain.data.base import ImageList
from finegrain.data.crop import crop_margin_of, crop_rect

ImageFile.LOAD_TRUNCATED_IMAGES = False


def load_rgb(path: str) -> Image.Image:
    """Open an image fully and convert it to RGB (raises on unreadable or truncated files)."""
    with Image.open(path) as im:
        im.load()
        return im.convert("RGB")


ANNOTATION_FILES = {"boxes": "bounding_boxes.txt", "parts": "parts/part_locs.txt"}
"""Annotation kinds a Task may need (``Task.annotations``) and the CUB file that provides each."""

"""``--augment`` presets whose geometric changes (crop, flip) torchvision applies to boxes and points too."""


class ImageDataset(Dataset):
    """Reads ``ImageList`` images; an unreadable image yields ``None`` instead of raising.

    ``collate`` drops those and reports their paths under ``batch["skipped"]``, so a training run
    can count and list them without stopping.

    Args:
        images: the images (and, for ``annotations``, their boxes and part locations).
        transform: a torchvision v2 transform of the PIL image; with ``annotations`` it is called
            as ``transform(image, boxes, keypoints)`` so that crops and flips move them too.
        annotations: any of "boxes", "parts". Items then also hold ``"box"``: float ``[4]``
            ``(x0, y0, x1, y1)`` and/or ``"parts"``: float ``[P, 3]`` ``(x, y, visible)``, both in
            [0, 1] coordinates of the output image (``x = (column + 0.5) / width``, so a
            horizontal flip maps ``x`` to ``1 - x``). Part ``i`` is part id ``i + 1``; a part is
            visible when the annotation says so and it is still inside the output image. A box
            cropped away entirely becomes the whole image. Left/right part names are not swapped
            on a flip (they keep naming the bird's anatomical side).

    A list marked by :func:`finegrain.data.crop.box_crops` is read as the crops of its boxes (before
    ``transform``; boxes and part locations move with the crop); an image without a box is read whole.
    """

    def __init__(self, images: ImageList, transform: Callable, annotations: tuple[str, ...] | list[str] = ()):
        self.images = images
        self.transform = transform
        self.annotations = tuple(annotations)
        self.crop_margin = crop_margin_of(images)
        check_annotations(images, self.annotations)
        self.num_parts = 0
        if "parts" in self.annotations:
            ids = [pid for parts in images.parts for pid, *_ in parts]
            self.num_parts = max(len(images.part_names or []), max(ids, default=0))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        path = self.images.paths[i]
        try:
            img = load_rgb(path)
        except Exception as e:  # noqa: BLE001  (any decoder failure means: skip this file)
            return {"skipped": path, "error": f"{type(e).__name__}: {e}"}
        rect = self._crop_rect(img, i)
        if not self.annotations:
            return {"image": self.transform(img if rect is None else img.crop(rect)), "label": self.images.labels[i], "index": i}
        return {**self._annotated(img, i, rect), "label": self.images.labels[i], "index": i}

    def _crop_rect(self, img, i: int) -> tuple[int, int, int, int] | None:
        """The box crop of image ``i`` (``(left, top, right, bottom)``), None when it is read whole."""
        if self.crop_margin is None:
            return None
        return crop_rect(self.images.boxes[i], self.crop_margin, img.size)

    def _annotated(self, img, i: int, rect: tuple[int, int, int, int] | None = None) -> dict:
        from torchvision import tv_tensors

        w, h = img.size
        extra = []
        if "boxes" in self.annotations:
            box = self.images.boxes[i] or (0.0, 0.0, float(w), float(h))
            extra.append(tv_tensors.BoundingBoxes(torch.tensor([box], dtype=torch.float32), format="XYWH", canvas_size=(h, w)))
        if "parts" in self.annotations:
            xy, vis = torch.zeros(self.num_parts, 2), torch.zeros(self.num_parts)
            for pid, x, y, visible in self.images.parts[i]:
                xy[pid - 1] = torch.tensor([x, y])
                vis[pid - 1] = float(visible)
            extra.append(tv_tensors.KeyPoints(xy, canvas_size=(h, w)))
        if rect is not None:  # the box and the points move with the object crop
            from torchvision.transforms.v2.functional import crop

            left, top, right, bottom = rect
            img, extra = img.crop(rect), [crop(e, top, left, bottom - top, right - left) for e in extra]
        image, *moved = self.transform(img, *extra)
        oh, ow = image.shape[-2:]
        item = {"image": image}
        if "boxes" in self.annotations:
            from torchvision.transforms.v2.functional import convert_bounding_box_format

            b = convert_bounding_box_format(moved.pop(0), new_format=tv_tensors.BoundingBoxFormat.XYXY)
            b = (b.as_subclass(torch.Tensor)[0].float() / torch.tensor([ow, oh, ow, oh])).clamp(0, 1)
            item["box"] = b if (b[2] > b[0] and b[3] > b[1]) else torch.tensor([0.0, 0.0, 1.0, 1.0])
        if "parts" in self.annotations:
            p = (moved.pop(0).as_subclass(torch.Tensor).float() + 0.5) / torch.tensor([ow, oh])
            inside = ((p >= 0) & (p <= 1)).all(1)
            item["parts"] = torch.cat([p, (vis.bool() & inside).float()[:, None]], 1)
        return item


def check_files(images: ImageList, data: str = "", *, fate: str = "", warn: bool = True) -> list[str]:
    """The image files of ``images`` that do not exist (missing, or a broken symbolic link).

    Raises ``FileNotFoundError`` with examples when none exists (a CSV whose paths are all
    wrong), before any work starts; a partial loss is printed (with ``warn``), ending with
    ``fate``, what happens to those files.
    """
    missing = [p for p in images.paths if not os.path.exists(p)]
    if missing and len(missing) == len(images.paths):
        where = f" in {data}" if data else ""
        hint = " Paths in a CSV are relative to the CSV file's folder." if str(data).lower().endswith(".csv") else ""
        raise FileNotFoundError(f"none of the {len(missing)} image files{where} exists (e.g. {', '.join(missing[:3])}).{hint}")
    if missing and warn:
        from finegrain.utils import console

        console.print(f"[yellow]{len(missing)} of {len(images)} image files do not exist (e.g. {missing[0]}); {fate or 'they are skipped'}")
    return missing


def check_annotations(images: ImageList, needed, *, task: str = "", cache: bool = False, mixing: bool = False,
                      augment: str = "basic", pipeline: str = "cpu") -> None:
    """Refuse a training setup that cannot give a task the annotations it needs.

    Args:
        images: the data set.
        needed: annotation kinds ("boxes", "parts"), e.g. ``Task.annotations``.
        task: the task name, for the messages.
        cache, mixing, augment, pipeline: the ``--cache``, ``--cutmix``/``--mixup``, ``--augment``
            and ``--pipeline`` settings, refused when they would drop or scramble the annotations.

    Raises:
        FileNotFoundError: the data set has no such annotation; names the file it would come from.
        ValueError: an unknown kind, or a conflicting option (the message names the flag to drop).
    """
    needed = tuple(needed)
    if not needed:
        return
    who = f"--task {task}" if task else "this task"
    for kind in needed:
        if kind not in ANNOTATION_FILES:
            raise ValueError(f"unknown annotation kind {kind!r}; known: {', '.join(ANNOTATION_FILES)}")
        if (images.boxes if kind == "boxes" else images.parts) is None:
            reader, _, root = images.source.partition(":")
            where = Path(root) / ANNOTATION_FILES[kind] if reader == "cub" and root else ANNOTATION_FILES[kind]
            raise FileNotFoundError(
                f"{who} needs {kind} annotations, but the data set ({images.source or 'unknown source'}) has none: "
                f"missing {ANNOTATION_FILES[kind]} (looked for {where}). Use a CUB-200-2011 folder that has it, or a method without annotations "
                "(e.g. --task parts-weak instead of --task parts)")
    if cache:
        raise ValueError(f"--cache keeps decoded pixels only, not the {' and '.join(needed)} annotations {who} needs: drop --cache")
    if pipeline == "device":
        raise ValueError(f"the device pipeline decodes whole batches without the {' and '.join(needed)} annotations {who} "
                         "needs: drop --pipeline device (or pass --pipeline cpu)")
    if mixing:
        raise ValueError(f"CutMix/MixUp paste or blend images, so the {' and '.join(needed)} annotations {who} "
                         "learns from would no longer match: drop --cutmix and --mixup")
    from finegrain.data.transforms import AUGMENTS

    if not AUGMENTS.info(augment).get("geometry_safe"):
        safe = [a for a in AUGMENTS.names() if AUGMENTS.info(a).get("geometry_safe")]
        raise ValueError(f"--augment {augment} moves pixels in ways the annotations cannot follow: drop --augment "
                         f"or use one of {', '.join(safe)}")


def collate(items: list[dict]) -> dict:
    good = [it for it in items if "image" in it]
    skipped = [(it["skipped"], it["error"]) for it in items if "skipped" in it]
    if not good:
        return {"image": None, "label": None, "index": None, "skipped": skipped}
    batch = {
        "image": torch.stack([it["image"] for it in good]),
        "label": torch.tensor([it["label"] for it in good], dtype=torch.long),
        "index": torch.tensor([it["index"] for it in good], dtype=torch.long),
        "skipped": skipped,
    }
    for key in ("box", "parts"):
        if key in good[0]:
            batch[key] = torch.stack([it[key] for it in good])
    return batch
