"""Readers for generic image collections: class folders and CSV files."""

from __future__ import annotations

import csv
from pathlib import Path

from finegrain.data.base import (
    DATASETS,
    IMAGE_EXTENSIONS,
    ImageList,
    check_split,
)

FOLDER_LAYOUT = "ROOT/<class_name>/*.jpg, or ROOT/train/<class_name>/*.jpg and ROOT/test/<class_name>/*.jpg"
CSV_LAYOUT = "a CSV with a header row 'path,label' (and optionally 'split' with train/test); paths relative to the CSV"


def _list_class_folders(root: Path) -> ImageList:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"no class folders in {root}. Expected layout: {FOLDER_LAYOUT}")
    paths, labels, empty = [], [], []
    for i, c in enumerate(classes):
        files = sorted(
            p for p in (root / c).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and (p.is_file() or p.is_symlink())
        )  # a broken link is kept, so that it is reported as missing instead of vanishing
        if not files:
            empty.append(c)
        paths += [str(p.resolve() if p.exists() else p.absolute()) for p in files]
        labels += [i] * len(files)
    if empty:
        raise ValueError(
            f"class folder(s) with no images in {root}: {', '.join(empty[:10])}. "
            f"Add images (extensions {', '.join(IMAGE_EXTENSIONS)}) or remove the folder."
        )
    return ImageList(paths, labels, classes, source=f"folder:{root}")


@DATASETS.register("folder", priority=100, detect=lambda p: p.is_dir())  # the fallback
def image_folder(root: str | Path, split: str = "train", *, download: bool = False) -> ImageList:
    """A folder of class sub-folders, optionally split into ``train/`` and ``test/``.

    Without ``train/`` and ``test/`` inside, every image belongs to the ``train`` split and
    asking for ``test`` is an error (hold out a test folder, or use a CSV with a split column).
    Class names come from the train folder; a test class missing from train is an error.
    """
    root = Path(root)
    check_split(split)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist. Expected layout: {FOLDER_LAYOUT}")
    if (root / "train").is_dir():
        train = _list_class_folders(root / "train")
        if split == "train":
            return train
        if not (root / "test").is_dir():
            raise FileNotFoundError(f"{root} has train/ but no test/ folder. Expected layout: {FOLDER_LAYOUT}")
        test = _list_class_folders(root / "test")
        unknown = sorted(set(test.classes) - set(train.classes))
        if unknown:
            raise ValueError(f"test classes not present in {root / 'train'}: {unknown[:10]}")
        index = {c: i for i, c in enumerate(train.classes)}
        labels = [index[test.classes[l]] for l in test.labels]
        return ImageList(test.paths, labels, train.classes, source=test.source)
    if split == "test":
        raise ValueError(
            f"{root} has no test/ folder, so there is no test split. Put held-out images under "
            f"{root / 'test'} with the same class folders, or use a CSV with a 'split' column."
        )
    return _list_class_folders(root)


@DATASETS.register("csv", priority=10, detect=lambda p: p.suffix.lower() == ".csv")
def image_csv(root: str | Path, split: str = "train", *, download: bool = False) -> ImageList:
    """A CSV of ``path,label`` rows (header required), with an optional ``split`` column.

    Labels are class names (strings); classes are sorted by name over the whole file so train and
    test agree on the index. Without a ``split`` column every row is in ``train``.
    """
    path = Path(root)
    check_split(split)
    if not path.is_file():
        raise FileNotFoundError(f"CSV file {path} does not exist. Expected: {CSV_LAYOUT}")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        if "path" not in fields or "label" not in fields:
            raise ValueError(f"{path}: header is {fields}, expected columns 'path' and 'label'. Expected: {CSV_LAYOUT}")
        rows = list(reader)
    has_split = "split" in fields
    classes = sorted({r["label"] for r in rows if r["label"]})  # empty or missing labels are reported below
    index = {c: i for i, c in enumerate(classes)}
    paths, labels = [], []
    for lineno, r in enumerate(rows, 2):
        if not r["path"] or not r["label"]:
            raise ValueError(f"{path}:{lineno}: empty path or label. Expected: {CSV_LAYOUT}")
        row_split = (r.get("split") or "train").strip().lower() if has_split else "train"
        if row_split not in ("train", "test"):
            raise ValueError(f"{path}:{lineno}: split must be 'train' or 'test', got {row_split!r}")
        if row_split != split:
            continue
        p = Path(r["path"])
        paths.append(str((p if p.is_absolute() else path.parent / p).resolve()))
        labels.append(index[r["label"]])
    if not paths:
        raise ValueError(f"{path} has no rows for split {split!r}")
    return ImageList(paths, labels, classes, source=f"csv:{path}")
