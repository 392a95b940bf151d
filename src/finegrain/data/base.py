"""The common form every data source is read into, and the dataset registry.

Every reader, whatever its on-disk format, returns an :class:`ImageList`: the image paths, their
integer labels and the class names, plus optional annotations (bounding boxes, part locations)
that later methods can use. Readers are registered in :data:`DATASETS` under a short name and
are called as ``reader(root, split, download=False, **options)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finegrain.registry import Registry

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")


@dataclass
class ImageList:
    """Images and labels of one split of a data set.

    Attributes:
        paths: absolute image paths.
        labels: integer class index of each path, in ``range(len(classes))``.
        classes: class names; index ``i`` names label ``i``.
        boxes: optional bounding box per image as ``(x, y, width, height)`` in pixels, or None.
        parts: optional part locations per image: a list of ``(part_id, x, y, visible)``.
        part_names: names of the part ids, when ``parts`` is given.
        source: a short description of where the list came from (reader name and root).
    """

    paths: list[str]
    labels: list[int]
    classes: list[str]
    boxes: list[tuple[float, float, float, float] | None] | None = None
    parts: list[list[tuple[int, float, float, bool]]] | None = None
    part_names: list[str] | None = None
    source: str = ""
    extras: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.paths) != len(self.labels):
            raise ValueError(f"{len(self.paths)} paths but {len(self.labels)} labels")
        bad = [l for l in self.labels if not 0 <= l < len(self.classes)]
        if bad:
            raise ValueError(f"labels out of range [0, {len(self.classes)}): e.g. {bad[:5]}")

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices: list[int]) -> ImageList:
        """Return the images at ``indices`` with the same class list and annotations."""
        pick = lambda xs: None if xs is None else [xs[i] for i in indices]  # noqa: E731
        return ImageList(
            paths=[self.paths[i] for i in indices],
            labels=[self.labels[i] for i in indices],
            classes=list(self.classes),
            boxes=pick(self.boxes),
            parts=pick(self.parts),
            part_names=self.part_names,
            source=self.source,
            extras=dict(self.extras),
        )

    def relabel(self, classes: list[str]) -> ImageList:
        """The same images with labels indexing ``classes``, a superset of this list's classes (a
        model's class list, for a test set that holds only some of them).

        Raises ``ValueError`` naming classes that ``classes`` lacks."""
        index = {c: i for i, c in enumerate(classes)}
        unknown = [c for c in self.classes if c not in index]
        if unknown:
            raise ValueError(f"{len(unknown)} classes of the data are not among the {len(classes)} given: {unknown[:5]}")
        return dataclasses.replace(self, labels=[index[self.classes[l]] for l in self.labels], classes=list(classes),
                                   extras=dict(self.extras))

    def class_counts(self) -> list[int]:
        counts = [0] * len(self.classes)
        for l in self.labels:
            counts[l] += 1
        return counts


Reader = Callable[..., ImageList]
DATASETS: Registry[Reader] = Registry("dataset")


def require_file(path: Path, layout: str) -> Path:
    """Return ``path`` if it exists, else raise ``FileNotFoundError`` naming the expected layout."""
    if not path.exists():
        raise FileNotFoundError(f"missing {path}. Expected layout: {layout}")
    return path


def read_table(path: Path, ncols: int, layout: str, sep: str | None = None) -> list[list[str]]:
    """Read a whitespace (or ``sep``) separated text file whose rows have at least ``ncols`` fields.

    Raises ``ValueError`` naming the file, the line and the expected layout on a malformed row.
    """
    require_file(path, layout)
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.rstrip("\n").split(sep) if sep else line.split()
            if len(parts) < ncols:
                raise ValueError(
                    f"{path}:{lineno}: expected {ncols} fields, got {len(parts)}: {line.strip()!r}. "
                    f"Expected layout: {layout}"
                )
            rows.append(parts)
    return rows


def check_split(split: str, valid: tuple[str, ...] = ("train", "test")) -> str:
    if split not in valid:
        raise ValueError(f"split must be one of {valid}, got {split!r}")
    return split


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def download_and_verify(url: str, dest: Path, sha256: str | None = None, md5: str | None = None) -> Path:
    """Download ``url`` to ``dest`` (skipped when a verified copy exists) and check its checksum.

    A file whose checksum does not match is kept under ``dest`` with a ``.bad`` suffix and a
    ``ValueError`` says so; nothing is extracted from it.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)

    def ok(p: Path) -> bool:
        if sha256:
            return sha256_file(p) == sha256
        if md5:
            h = hashlib.md5()
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            return h.hexdigest() == md5
        return True

    if dest.exists() and ok(dest):
        return dest
    tmp = dest.with_suffix(dest.suffix + ".part")
    try:
        with urllib.request.urlopen(url) as r, open(tmp, "wb") as f:  # noqa: S310 (user-requested download)
            while block := r.read(1 << 20):
                f.write(block)
    except OSError as e:
        raise OSError(f"could not download {url}: {e}. Download it by hand to {dest}") from e
    if not ok(tmp):
        bad = dest.with_suffix(dest.suffix + ".bad")
        os.replace(tmp, bad)
        raise ValueError(f"checksum mismatch for {url}; the file was kept at {bad}. Try again or download by hand.")
    os.replace(tmp, dest)
    return dest


def open_dataset(data: str | Path, split: str = "train", *, dataset: str | None = None, download: bool = False, **options) -> ImageList:
    """Read ``split`` of the data at ``data``.

    Args:
        data: a folder or CSV file.
        split: "train" or "test".
        dataset: a registered reader name (``finegrain.DATASETS.names()``); by default the first
            reader whose ``detect`` recognises the layout, in ``priority`` order (class folders last).
        download: download the benchmark into ``data`` if the reader supports it and it is missing.
        options: passed to the reader (e.g. ``level="family"`` for FGVC-Aircraft).
    """
    path = Path(data)
    return DATASETS.get(dataset or guess_reader(path))(path, split, download=download, **options)


def guess_reader(path: Path) -> str:
    """The name of the reader whose layout ``path`` has (see ``DATASETS.register(..., detect=, priority=)``)."""
    if not path.exists():
        raise FileNotFoundError(f"data {path} does not exist: give an image folder, a CSV file or a benchmark root")
    ranked = sorted(DATASETS.names(), key=lambda n: DATASETS.info(n).get("priority", 50))
    for name in ranked:
        detect = DATASETS.info(name).get("detect")
        if detect is not None and detect(path):
            return name
    raise FileNotFoundError(f"{path}: no reader recognises this data; pass --dataset ({', '.join(DATASETS.names())})")
