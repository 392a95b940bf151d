"""Readers for generic image collections (class folders, CSV files) and CUB-200-2011.

The other benchmarks live in :mod:`finegrain.data.benchmarks`. ``open_dataset`` picks a reader
from a registered name or, for a plain path, from what the folder contains.
"""

from __future__ import annotations

import csv
from pathlib import Path

from finegrain.data.base import (
    DATASETS,
    IMAGE_EXTENSIONS,
    ImageList,
    check_split,
    download_and_verify,
    read_table,
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
            p for p in (root / c).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        )
        if not files:
            empty.append(c)
        paths += [str(p.resolve()) for p in files]
        labels += [i] * len(files)
    if empty:
        raise ValueError(
            f"class folder(s) with no images in {root}: {', '.join(empty[:10])}. "
            f"Add images (extensions {', '.join(IMAGE_EXTENSIONS)}) or remove the folder."
        )
    return ImageList(paths, labels, classes, source=f"folder:{root}")


@DATASETS.register("folder")
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


@DATASETS.register("csv")
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


CUB_URL = "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz"
CUB_MD5 = "97eceeb196236b17998738112f37df78"
CUB_LAYOUT = (
    "CUB_200_2011/{images.txt, image_class_labels.txt, train_test_split.txt, classes.txt, images/NNN.Name/*.jpg}"
    " and optionally bounding_boxes.txt, parts/parts.txt, parts/part_locs.txt"
)


def _find_cub_root(root: Path) -> Path:
    for cand in (root, root / "CUB_200_2011"):
        if (cand / "images.txt").exists():
            return cand
    raise FileNotFoundError(
        f"no images.txt under {root} or {root / 'CUB_200_2011'}. Expected layout: {CUB_LAYOUT}. "
        f"Use --download to fetch CUB-200-2011."
    )


@DATASETS.register("cub")
def cub200(root: str | Path, split: str = "train", *, download: bool = False) -> ImageList:
    """Caltech-UCSD Birds-200-2011 in its official layout, with the official train/test split.

    Bounding boxes (``bounding_boxes.txt``) and the 15 part locations (``parts/part_locs.txt``)
    are attached when present. Any subset of the 200 classes works (class ids are re-indexed
    in ``classes.txt`` order, keeping only classes that have images).
    """
    root = Path(root)
    check_split(split)
    if download and not any((c / "images.txt").exists() for c in (root, root / "CUB_200_2011")):
        import tarfile

        archive = download_and_verify(CUB_URL, root / "CUB_200_2011.tgz", md5=CUB_MD5)
        with tarfile.open(archive) as tar:
            tar.extractall(root, filter="data")
    base = _find_cub_root(root)
    images = {int(i): p for i, p in read_table(base / "images.txt", 2, CUB_LAYOUT)}
    labels = {int(i): int(c) for i, c in read_table(base / "image_class_labels.txt", 2, CUB_LAYOUT)}
    is_train = {int(i): s == "1" for i, s in read_table(base / "train_test_split.txt", 2, CUB_LAYOUT)}
    class_rows = read_table(base / "classes.txt", 2, CUB_LAYOUT)
    class_name = {int(i): n for i, n in class_rows}
    missing = sorted(set(images) - set(labels))[:5] or sorted(set(images) - set(is_train))[:5]
    if missing:
        raise ValueError(f"image ids {missing} of {base / 'images.txt'} have no label or split entry")
    used = sorted({labels[i] for i in images})
    unknown = [c for c in used if c not in class_name]
    if unknown:
        raise ValueError(f"class ids {unknown[:5]} are not in {base / 'classes.txt'}")
    index = {c: k for k, c in enumerate(used)}
    classes = [class_name[c].split(".", 1)[-1] for c in used]
    boxes_file = base / "bounding_boxes.txt"
    boxes = {int(r[0]): tuple(map(float, r[1:5])) for r in read_table(boxes_file, 5, CUB_LAYOUT)} if boxes_file.exists() else None
    locs_file, names_file = base / "parts" / "part_locs.txt", base / "parts" / "parts.txt"
    parts: dict[int, list] | None = None
    part_names = None
    if locs_file.exists():
        parts = {}
        for r in read_table(locs_file, 5, CUB_LAYOUT):
            parts.setdefault(int(r[0]), []).append((int(r[1]), float(r[2]), float(r[3]), r[4] == "1"))
        if names_file.exists():
            part_names = [" ".join(r[1:]) for r in read_table(names_file, 2, CUB_LAYOUT)]
    ids = [i for i in sorted(images) if is_train[i] == (split == "train")]
    return ImageList(
        paths=[str((base / "images" / images[i]).resolve()) for i in ids],
        labels=[index[labels[i]] for i in ids],
        classes=classes,
        boxes=None if boxes is None else [boxes.get(i) for i in ids],
        parts=None if parts is None else [parts.get(i, []) for i in ids],
        part_names=part_names,
        source=f"cub:{base}",
    )


def open_dataset(data: str | Path, split: str = "train", *, dataset: str | None = None, download: bool = False, **options) -> ImageList:
    """Read ``split`` of the data at ``data``.

    Args:
        data: a folder or CSV file.
        split: "train" or "test".
        dataset: a registered reader name (``finegrain.data.DATASETS.names()``); by default it is
            guessed: a ``.csv`` file is a CSV, a folder with ``images.txt`` is CUB, else class folders.
        download: download the benchmark into ``data`` if the reader supports it and it is missing.
        options: passed to the reader (e.g. ``level="family"`` for FGVC-Aircraft).
    """
    import finegrain.data.benchmarks  # noqa: F401  (registers the other benchmark readers)

    path = Path(data)
    if dataset is None:
        if path.suffix.lower() == ".csv":
            dataset = "csv"
        elif (path / "hierarchy.txt").exists() or (path / "nabirds" / "images.txt").exists():
            dataset = "nabirds"
        elif (path / "images.txt").exists() or (path / "CUB_200_2011" / "images.txt").exists():
            dataset = "cub"
        else:
            dataset = "folder"
    return DATASETS.get(dataset)(path, split, download=download, **options)
