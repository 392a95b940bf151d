"""Image datasets with corrupt-file handling, the leak-safe validation split, and loaders."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

import torch
from PIL import Image, ImageFile
from torch.utils.data import Dataset

from finegrain.data.base import ImageList

ImageFile.LOAD_TRUNCATED_IMAGES = False


def load_rgb(path: str) -> Image.Image:
    """Open an image fully and convert it to RGB (raises on unreadable or truncated files)."""
    with Image.open(path) as im:
        im.load()
        return im.convert("RGB")


class ImageDataset(Dataset):
    """Reads ``ImageList`` images; an unreadable image yields ``None`` instead of raising.

    ``collate`` drops those and reports their paths under ``batch["skipped"]``, so a training run
    can count and list them without stopping.
    """

    def __init__(self, images: ImageList, transform: Callable):
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        path = self.images.paths[i]
        try:
            img = load_rgb(path)
        except Exception as e:  # noqa: BLE001  (any decoder failure means: skip this file)
            return {"skipped": path, "error": f"{type(e).__name__}: {e}"}
        return {"image": self.transform(img), "label": self.images.labels[i], "index": i}


def collate(items: list[dict]) -> dict:
    good = [it for it in items if "image" in it]
    skipped = [(it["skipped"], it["error"]) for it in items if "skipped" in it]
    if not good:
        return {"image": None, "label": None, "index": None, "skipped": skipped}
    return {
        "image": torch.stack([it["image"] for it in good]),
        "label": torch.tensor([it["label"] for it in good], dtype=torch.long),
        "index": torch.tensor([it["index"] for it in good], dtype=torch.long),
        "skipped": skipped,
    }


def stratified_split(labels: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split indices into (train, val) with ``fraction`` of every class in val.

    Each class with at least two images gives ``max(1, round(fraction * n))`` images to val (and
    keeps at least one for training); a class with one image stays in train. Deterministic for a
    given seed and label list.
    """
    if fraction <= 0:
        return list(range(len(labels))), []
    by_class: dict[int, list[int]] = {}
    for i, l in enumerate(labels):
        by_class.setdefault(l, []).append(i)
    rng = random.Random(seed)
    train, val = [], []
    for c in sorted(by_class):
        idx = by_class[c][:]
        rng.shuffle(idx)
        n_val = 0 if len(idx) < 2 else min(len(idx) - 1, max(1, round(fraction * len(idx))))
        val += idx[:n_val]
        train += idx[n_val:]
    return sorted(train), sorted(val)


def save_split(path: Path, images: ImageList, train_idx: list[int], val_idx: list[int], *, fraction: float, seed: int) -> None:
    data = {
        "fraction": fraction,
        "seed": seed,
        "classes": images.classes,
        "train": [images.paths[i] for i in train_idx],
        "val": [images.paths[i] for i in val_idx],
    }
    Path(path).write_text(json.dumps(data, indent=1))


def load_split(path: Path, images: ImageList) -> tuple[list[int], list[int]]:
    """Re-create the saved split on ``images``; refuses if the files changed since."""
    data = json.loads(Path(path).read_text())
    pos = {p: i for i, p in enumerate(images.paths)}
    missing = [p for p in data["train"] + data["val"] if p not in pos]
    if missing:
        raise ValueError(f"{path} names {len(missing)} images no longer in the data (e.g. {missing[0]}); start a new run")
    return [pos[p] for p in data["train"]], [pos[p] for p in data["val"]]
