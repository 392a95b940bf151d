"""Detection data readers: COCO instances JSON, Pascal VOC XML, CSV and fine-grained benchmarks' boxes.

Each reader returns a :class:`~finegrain.detect.data.DetectionList` made with
:func:`~finegrain.detect.data.make_list`, so boxes are ``(x0, y0, x1, y1)`` pixels, 0-based,
clipped to their image (counted) or dropped when empty (listed in ``fixes``), whatever the
file format wrote. :func:`open_detection` picks the reader from the layout on disk.
"""

from __future__ import annotations

import csv
import json
import os
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

from finegrain.detect.data import LABEL_MODES, DetectionList, from_image_list, make_list

FORMATS = ("auto", "coco", "voc", "csv", "benchmark")
"""``--format``: how detection data is stored ("auto" guesses it from the layout, see :func:`open_detection`)."""

CSV_COLUMNS = ("path", "xmin", "ymin", "xmax", "ymax", "label")
COCO_KEYS = ("images", "annotations", "categories")
VOC_LAYOUT = "ROOT/Annotations/*.xml, ROOT/JPEGImages/*.jpg, ROOT/ImageSets/Main/{split}.txt (one image id a line)"


def _check_labels(labels: str) -> None:
    if labels not in LABEL_MODES:
        raise ValueError(f"--labels must be one of {', '.join(LABEL_MODES)}, got {labels!r}")


def _ids(ids) -> str:
    """A short, readable list of ids for an error message."""
    ids = sorted(ids, key=str)
    return ", ".join(map(str, ids[:20])) + (f", ... ({len(ids)} in all)" if len(ids) > 20 else "")


def _check_images(paths: list[str], root: Path, source: Path, hint: str) -> None:
    """Raise when no image file exists (naming ``root`` and ``hint``), warn when only some are missing."""
    if not paths:
        raise ValueError(f"{source} lists no images")
    missing = [p for p in paths if not os.path.exists(p)]
    if len(missing) == len(paths):
        raise FileNotFoundError(f"none of the {len(paths)} images of {source} exists under {root} "
                                f"(e.g. {', '.join(missing[:3])}). {hint}")
    if missing:
        from finegrain.utils import console

        console.print(f"[yellow]{len(missing)} of {len(paths)} image files of {source} do not exist (e.g. {missing[0]}); they are skipped")


def _empty(n: int) -> tuple[list[list], list[list]]:
    return [[] for _ in range(n)], [[] for _ in range(n)]


# ----------------------------------------------------------------------------------------- COCO

def _load_coco(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"missing COCO annotation file {path}: give the instances JSON (e.g. annotations/instances_train.json)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not JSON ({e}); expected a COCO instances file with {', '.join(COCO_KEYS)}") from None
    missing = [k for k in COCO_KEYS if not isinstance(data, dict) or not isinstance(data.get(k), list)]
    if missing:
        raise ValueError(f"{path} is not a COCO instances file: it lacks the list(s) {', '.join(missing)} "
                         f"(a COCO file has {', '.join(COCO_KEYS)}); for Pascal VOC or CSV data pass --format voc or csv")
    for key, fields in (("images", ("id", "file_name")), ("categories", ("id", "name"))):
        bad = next((e for e in data[key] if not isinstance(e, dict) or any(f not in e for f in fields)), None)
        if bad is not None:
            raise ValueError(f"{path}: every entry of '{key}' needs {' and '.join(fields)}, got {str(bad)[:120]}")
    return data


def _coco_box(path: Path, ann: dict) -> list[float]:
    """``[x, y, w, h]`` as ``[x0, y0, x1, y1]``."""
    box = ann.get("bbox")
    try:
        x, y, w, h = (float(v) for v in box)
    except (TypeError, ValueError):
        raise ValueError(f"{path}: annotation {ann.get('id')} has bbox {box!r}; COCO boxes are [x, y, width, height] in pixels") from None
    return [x, y, x + w, y + h]


def _coco_targets(path: Path, data: dict, labels: str):
    """Per image boxes, labels and segmentations (crowd annotations left out), the classes and the crowd count."""
    cats = sorted(data["categories"], key=lambda c: c["id"])
    index = {c["id"]: i for i, c in enumerate(cats)}
    where = {im["id"]: i for i, im in enumerate(data["images"])}
    boxes, labs = _empty(len(where))
    segs, crowd = [[] for _ in where], 0
    for ann in data["annotations"]:
        cid, iid = ann.get("category_id"), ann.get("image_id")
        if cid not in index:
            raise ValueError(f"{path}: annotation {ann.get('id')} has category_id {cid!r}, which is not among the categories "
                             f"(ids {_ids(index)}); fix the annotation or add the category to 'categories'")
        if iid not in where:
            raise ValueError(f"{path}: annotation {ann.get('id')} refers to image_id {iid!r}, which is not among the "
                             f"{len(where)} images; fix the annotation or add the image to 'images'")
        if ann.get("iscrowd"):
            crowd += 1
            continue
        i = where[iid]
        boxes[i].append(_coco_box(path, ann))
        labs[i].append(index[cid] if labels == "species" else 0)
        segs[i].append(ann.get("segmentation") or None)
    classes = [str(c["name"]) for c in cats] if labels == "species" else ["object"]
    masks = segs if any(s is not None for per in segs for s in per) else None
    return boxes, labs, masks, classes, crowd


def _coco_root(path: Path) -> Path:
    """``images/`` beside the ``annotations/`` folder holding the JSON when there is one, else the JSON's folder."""
    beside = path.parent.parent / "images"
    return beside if path.parent.name == "annotations" and beside.is_dir() else path.parent


def read_coco(annotation_file: str | Path, image_root: str | Path | None = None, *, labels: str = "species") -> DetectionList:
    """Read a COCO instances JSON (``images``, ``annotations`` with ``bbox = [x, y, w, h]``, ``categories``).

    Classes are the category names in category-id order, sizes come from the images' ``width``
    and ``height``. Annotations marked ``iscrowd=1`` (one region over a crowd of objects) are left
    out of the targets; their count is noted in the list's ``source``. Images without annotations
    stay, as negatives. When any annotation has a ``segmentation`` (polygons or RLE), ``masks``
    holds each kept annotation's segmentation as it is in the file (None for one without), else
    ``masks`` is None.

    Args:
        annotation_file: the JSON file.
        image_root: the folder ``file_name`` is relative to; by default ``images/`` next to the
            ``annotations/`` folder holding the JSON if it exists, else the JSON's folder.
        labels: "species" keeps the categories, "object" makes every box one class "object".

    Raises:
        FileNotFoundError: no such JSON, or none of its images exists under the image root.
        ValueError: not a COCO JSON, a bad ``bbox``, an unknown ``category_id`` or ``image_id``.
    """
    _check_labels(labels)
    path = Path(annotation_file)
    data = _load_coco(path)
    boxes, labs, masks, classes, crowd = _coco_targets(path, data, labels)
    root = Path(image_root) if image_root is not None else _coco_root(path)
    paths = [str(root / im["file_name"]) for im in data["images"]]
    _check_images(paths, root, path, "Pass the image folder that file_name is relative to (--images DIR, image_root= in Python).")
    sizes = [(int(im["height"]), int(im["width"])) if im.get("height") and im.get("width") else None for im in data["images"]]
    source = f"coco:{path}" + (f"; {crowd} crowd annotations left out" if crowd else "")
    return make_list(paths, boxes, labs, classes, masks=masks, sizes=sizes, source=source)


# ------------------------------------------------------------------------------------------ VOC

def _voc_float(xml: Path, node: ET.Element, tag: str) -> float:
    text = node.findtext(tag)
    try:
        return float(text)
    except (TypeError, ValueError):
        raise ValueError(f"{xml}: <{tag}> is {text!r}, expected a number (Pascal VOC pixel coordinates)") from None


def _parse_voc(xml: Path) -> tuple[str, tuple[int, int] | None, list[tuple[str, list[float]]]]:
    """An annotation file's image file name, ``(height, width)`` and ``(name, [x0, y0, x1, y1])`` objects."""
    try:
        tree = ET.parse(xml).getroot()
    except FileNotFoundError:
        raise FileNotFoundError(f"missing {xml}, listed in the split file. Expected layout: {VOC_LAYOUT}") from None
    except ET.ParseError as e:
        raise ValueError(f"{xml} is not readable XML ({e}); fix or remove the file (and its line in the split file)") from None
    size = tree.find("size")
    has_size = size is not None and size.find("width") is not None and size.find("height") is not None
    w, h = (_voc_float(xml, size, "width"), _voc_float(xml, size, "height")) if has_size else (0, 0)
    objects = []
    for obj in tree.iter("object"):
        name, bb = (obj.findtext("name") or "").strip(), obj.find("bndbox")
        if not name or bb is None:
            raise ValueError(f"{xml}: every <object> needs a <name> and a <bndbox> with xmin, ymin, xmax, ymax")
        x0, y0, x1, y1 = (_voc_float(xml, bb, t) for t in ("xmin", "ymin", "xmax", "ymax"))
        objects.append((name, [x0 - 1, y0 - 1, x1, y1]))  # 1-based inclusive pixels -> 0-based edges
    return (tree.findtext("filename") or "").strip(), ((int(h), int(w)) if w > 0 and h > 0 else None), objects


def _voc_ids(root: Path, split: str) -> list[str]:
    split_file = root / "ImageSets" / "Main" / f"{split}.txt"
    if split_file.is_file():
        return [line.split()[0] for line in split_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if split == "train":  # a VOC-style export without split files: every annotation is training data
        return sorted(p.stem for p in (root / "Annotations").glob("*.xml"))
    raise FileNotFoundError(f"missing {split_file} (the image ids of split {split!r}). Expected layout: {VOC_LAYOUT}")


def read_voc(root: str | Path, split: str = "train", *, labels: str = "species") -> DetectionList:
    """Read a Pascal VOC folder: ``Annotations/*.xml``, ``JPEGImages/``, ``ImageSets/Main/{split}.txt``.

    Without the split file, ``split="train"`` takes every XML file. VOC pixel coordinates are
    1-based and inclusive (``xmax`` is the last column of the object), so a box becomes
    ``x0 = xmin - 1, y0 = ymin - 1, x1 = xmax, y1 = ymax`` in 0-based edge coordinates. Objects
    marked ``difficult`` are kept as ordinary objects. Classes are the sorted object names of
    the split (``["object"]`` with ``labels="object"``).

    Raises:
        FileNotFoundError: no ``Annotations/`` folder, a missing split file or XML file, or no image.
        ValueError: unreadable XML, or an object without a name or numeric box.
    """
    _check_labels(labels)
    root = Path(root)
    if not (root / "Annotations").is_dir():
        raise FileNotFoundError(f"missing {root / 'Annotations'}. Expected layout: {VOC_LAYOUT}")
    ids = _voc_ids(root, split)
    parsed = [_parse_voc(root / "Annotations" / f"{i}.xml") for i in ids]
    names = sorted({name for _, _, objs in parsed for name, _ in objs})
    classes = names if labels == "species" else ["object"]
    index = {n: i for i, n in enumerate(names)} if labels == "species" else {n: 0 for n in names}
    images = root / "JPEGImages"
    # <filename> names the image; exports that leave it out or get it wrong still follow JPEGImages/{id}.jpg
    paths = [str(images / fname) if fname and (images / fname).is_file() else str(images / f"{i}.jpg") for i, (fname, _, _) in zip(ids, parsed)]
    _check_images(paths, images, root, f"Expected layout: {VOC_LAYOUT}")
    boxes = [[b for _, b in objs] for _, _, objs in parsed]
    labs = [[index[n] for n, _ in objs] for _, _, objs in parsed]
    return make_list(paths, boxes, labs, classes, sizes=[s for _, s, _ in parsed], source=f"voc:{root}")


# ------------------------------------------------------------------------------------------ CSV

def _csv_box(path: Path, line: int, row: dict) -> list[float] | None:
    """The row's ``[xmin, ymin, xmax, ymax]``, or None when all four are empty (an image without objects)."""
    fields = [(row.get(c) or "").strip() for c in CSV_COLUMNS[1:5]]
    if not any(fields):
        return None
    try:
        return [float(v) for v in fields]
    except ValueError:
        bad = next(f"{c}={v!r}" for c, v in zip(CSV_COLUMNS[1:5], fields) if not _is_number(v))
        raise ValueError(f"{path}:{line}: {bad} is not a number; xmin, ymin, xmax, ymax are pixels (all four, "
                         "or all four empty for an image without objects)") from None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _csv_rows(path: Path) -> dict[str, list[tuple[list[float], str]]]:
    """Per image path (absolute, in first-seen order), its ``(box, label)`` rows."""
    images: dict[str, list[tuple[list[float], str]]] = {}
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        reader.fieldnames = [(n or "").strip().lower() for n in reader.fieldnames or []]
        missing = [c for c in CSV_COLUMNS if c not in reader.fieldnames]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; the header must name {','.join(CSV_COLUMNS)} "
                             f"(got {','.join(reader.fieldnames) or 'an empty file'})")
        for row in reader:
            name = (row.get("path") or "").strip()
            if not name:
                raise ValueError(f"{path}:{reader.line_num}: empty path")
            rows = images.setdefault(os.path.abspath(path.parent / name), [])
            box = _csv_box(path, reader.line_num, row)
            if box is not None:
                label = (row.get("label") or "").strip()
                if not label:
                    raise ValueError(f"{path}:{reader.line_num}: a box without a label; give its class in the label column")
                rows.append((box, label))
    return images


def read_csv(path: str | Path, *, labels: str = "species") -> DetectionList:
    """Read a CSV of boxes with the header ``path,xmin,ymin,xmax,ymax,label``.

    One row per object, in 0-based pixel ``(x0, y0, x1, y1)`` corners; an image has as many rows
    as objects, and a row whose four box fields are empty is an image without objects. Relative
    paths are relative to the CSV file's folder. Classes are the sorted labels (``["object"]``
    with ``labels="object"``).

    Raises:
        FileNotFoundError: no such CSV, or none of its images exists.
        ValueError: a missing column, an empty path or label, a non-numeric box field (with its line).
    """
    _check_labels(labels)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing CSV {path}; expected a file with the header {','.join(CSV_COLUMNS)}")
    images = _csv_rows(path)
    _check_images(list(images), path.parent, path, "Paths in the CSV are relative to the CSV file's folder (or absolute).")
    names = sorted({label for rows in images.values() for _, label in rows})
    index = {n: i for i, n in enumerate(names)}
    classes = names if labels == "species" else ["object"]
    boxes = [[b for b, _ in rows] for rows in images.values()]
    labs = [[index[n] if labels == "species" else 0 for _, n in rows] for rows in images.values()]
    return make_list(list(images), boxes, labs, classes, source=f"csv:{path}")


# ----------------------------------------------------------------------------------- dispatcher

def _guess_format(path: Path, split: str) -> str:
    if not path.exists():
        raise FileNotFoundError(f"detection data {path} does not exist: give a COCO JSON, a CSV, a Pascal VOC folder or a benchmark root")
    if path.is_file():
        fmt = {".json": "coco", ".csv": "csv"}.get(path.suffix.lower())
        if fmt is None:
            raise ValueError(f"{path}: a detection data file is a COCO .json or a .csv; for another layout pass --format")
        return fmt
    if (path / "annotations" / f"instances_{split}.json").is_file():
        return "coco"
    if (path / "Annotations").is_dir():
        return "voc"
    if (path / f"{split}.csv").is_file():
        return "csv"
    return "benchmark"


def _open_coco(path: Path, split: str, labels: str, images: str | Path | None, dataset: str | None) -> DetectionList:
    file = path if path.is_file() else path / "annotations" / f"instances_{split}.json"
    return read_coco(file, images, labels=labels)


def _open_benchmark(path: Path, split: str, labels: str, images: str | Path | None, dataset: str | None) -> DetectionList:
    from finegrain.data.base import open_dataset

    return from_image_list(open_dataset(path, split, dataset=dataset), labels)


def _open_voc(path: Path, split: str, labels: str, images: str | Path | None, dataset: str | None) -> DetectionList:
    return read_voc(path, split, labels=labels)


def _open_csv(path: Path, split: str, labels: str, images: str | Path | None, dataset: str | None) -> DetectionList:
    return read_csv(path if path.is_file() else path / f"{split}.csv", labels=labels)


_OPENERS: dict[str, Callable[..., DetectionList]] = {"coco": _open_coco, "voc": _open_voc, "csv": _open_csv, "benchmark": _open_benchmark}
"""How each :data:`FORMATS` entry but "auto" is read: ``opener(path, split, labels, images, dataset)``."""


def open_detection(data: str | Path, split: str = "train", *, fmt: str | None = None, labels: str = "species",
                   dataset: str | None = None, images: str | Path | None = None) -> DetectionList:
    """Read ``split`` of the detection data at ``data``.

    With ``fmt`` None or "auto" the layout decides: a ``.json`` file is COCO and a ``.csv`` file
    CSV; a folder with ``annotations/instances_{split}.json`` is COCO (images in ``images/``), one
    with ``Annotations/`` Pascal VOC, one with ``{split}.csv`` CSV; any other folder is a
    fine-grained benchmark (CUB, NABirds, Stanford Dogs/Cars, FGVC-Aircraft, read by
    :func:`finegrain.data.base.open_dataset`) whose per-image boxes become the objects.

    Args:
        data: a file or folder.
        split: "train", "test", ... (the COCO JSON, VOC split file or CSV name it selects).
        fmt: one of :data:`FORMATS`.
        labels: "species" keeps the data set's classes, "object" makes every box one class "object".
        dataset: the benchmark reader name (``--dataset``), for ``fmt="benchmark"``.
        images: the COCO image folder (``--images``), when it is not ``images/`` beside ``annotations/``.
    """
    _check_labels(labels)
    path = Path(data)
    if fmt not in (None, *FORMATS):
        from finegrain.registry import close_matches

        hint = close_matches(str(fmt), list(FORMATS))
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}" + (f". Did you mean {hint[0]!r}?" if hint else ""))
    if fmt in (None, "auto"):
        fmt = "benchmark" if dataset is not None else _guess_format(path, split)
    if images is not None and fmt != "coco":
        raise ValueError(f"--images sets the image folder of COCO data, but {path} is read as {fmt}: drop --images")
    if dataset is not None and fmt != "benchmark":
        raise ValueError(f"--dataset names a benchmark reader, but {path} is read as {fmt}: drop --dataset or pass --format benchmark")
    return _OPENERS[fmt](path, split, labels, images, dataset)
