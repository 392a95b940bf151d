"""The leak-safe validation split: stratified, seeded, carved from train and saved with the run."""

from __future__ import annotations

import json
import random
from pathlib import Path

from finegrain.data.base import ImageList, open_dataset


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
    from finegrain.checkpoint import write_text_atomic

    write_text_atomic(path, json.dumps(data, indent=1))


def load_split(path: Path, images: ImageList) -> tuple[list[int], list[int]]:
    """Re-create the saved split on ``images``; refuses if the files changed since."""
    data = json.loads(Path(path).read_text())
    pos = {p: i for i, p in enumerate(images.paths)}
    missing = [p for p in data["train"] + data["val"] if p not in pos]
    if missing:
        raise ValueError(f"{path} names {len(missing)} images no longer in the data (e.g. {missing[0]}); start a new run")
    return [pos[p] for p in data["train"]], [pos[p] for p in data["val"]]


def load_run_split(run_dir: str | Path, data, dataset: str | None = None, *,
                   otherwise: str = "use --split test") -> tuple[ImageList, list[int], list[int]]:
    """``(training images of data, train indices, val indices)`` of the run in ``run_dir`` (its ``split.json``).

    ``otherwise`` ends the error when the run has no split file: what the caller can do instead.
    """
    split_file = Path(run_dir) / "split.json"
    if not split_file.is_file():
        raise FileNotFoundError(f"--split val needs {split_file} (written by finegrain train); {otherwise}")
    images = open_dataset(data, "train", dataset=dataset)
    train_idx, val_idx = load_split(split_file, images)
    return images, train_idx, val_idx


def open_run_split(run_dir: str | Path, data, split: str, dataset: str | None = None) -> ImageList:
    """The images of ``split`` of ``data``; ``"val"``: the run's own validation images (``run_dir/split.json``).

    Choosing a recipe or a test-time option on ``"val"`` keeps the test split held out.
    """
    if split != "val":
        return open_dataset(data, split, dataset=dataset)
    images, _, val_idx = load_run_split(run_dir, data, dataset)
    if not val_idx:
        raise ValueError(f"the run {run_dir} has no validation split (--val-fraction 0); use --split test")
    return images.subset(val_idx)
