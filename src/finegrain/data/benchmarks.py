"""Readers for the fine-grained benchmarks: CUB-200-2011, NABirds, Stanford Dogs, Stanford Cars,
FGVC-Aircraft and Oxford Flowers-102.

Each reads the benchmark in its own official on-disk layout with its official train/test split and
returns an :class:`~finegrain.data.base.ImageList`. Cars, Aircraft and Flowers follow the layouts
of the matching ``torchvision.datasets`` classes, so a copy prepared for torchvision works as is.
"""

from __future__ import annotations

import tarfile
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from finegrain.data.base import (
    DATASETS,
    ImageList,
    check_split,
    download_and_verify,
    read_table,
    require_file,
)

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


@DATASETS.register("cub", priority=30, detect=lambda p: any((c / "images.txt").is_file() for c in (p, p / "CUB_200_2011")))
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
    used, index = _used_classes(images, labels, is_train, class_name, base, base / "classes.txt")
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


Box = tuple[float, float, float, float]


def _used_classes(images: dict, labels: dict, is_train: dict, names: dict, base: Path, classes_file: Path):
    """``(class ids with images, {class id: label index})`` of a CUB-style table set; every image needs a label and a split."""
    missing = sorted(set(images) - set(labels))[:5] or sorted(set(images) - set(is_train))[:5]
    if missing:
        raise ValueError(f"image ids {missing} of {base / 'images.txt'} have no label or split entry")
    used = sorted({labels[i] for i in images})
    unknown = [c for c in used if c not in names]
    if unknown:
        raise ValueError(f"class ids {unknown[:5]} are not in {classes_file}")
    return used, {c: k for k, c in enumerate(used)}


def _corner_box(x1: float, y1: float, x2: float, y2: float) -> Box:
    """Convert a 1-based inclusive corner box (MATLAB / PASCAL VOC style) to 0-based (x, y, w, h)."""
    return (max(x1 - 1.0, 0.0), max(y1 - 1.0, 0.0), x2 - x1 + 1.0, y2 - y1 + 1.0)


def _parse(fn: Callable[[str], Any], value: str, path: Path, layout: str) -> Any:
    try:
        return fn(value)
    except ValueError:
        raise ValueError(f"{path}: cannot read {value!r} as a number. Expected layout: {layout}") from None


def _load_mat(path: Path, keys: tuple[str, ...], layout: str, **kwargs) -> dict[str, Any]:
    """Load a MATLAB file that must hold ``keys``; errors name the file and the expected layout."""
    from scipy.io import loadmat

    require_file(path, layout)
    try:
        mat = loadmat(str(path), **kwargs)
    except Exception as e:  # scipy raises several types (ValueError, TypeError, MatReadError) on bad files
        raise ValueError(f"{path} is not a readable .mat file ({e}). Expected layout: {layout}") from e
    missing = [k for k in keys if k not in mat]
    if missing:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise ValueError(f"{path} has no {missing} (found {found}). Expected layout: {layout}")
    return mat


def _mat_strings(arr: Any) -> list[str]:
    """Flatten a MATLAB cell array of strings (any nesting that loadmat produces) to a list."""
    out = []
    for x in np.asarray(arr, dtype=object).ravel():
        while isinstance(x, np.ndarray):
            x = x.item() if x.size == 1 else x.ravel()[0]
        out.append(str(x))
    return out


def _read_parts(base: Path, layout: str) -> tuple[dict[str, list] | None, list[str] | None]:
    """Read ``parts/part_locs.txt`` (and ``parts/parts.txt``) keyed by image id, if present."""
    locs_file, names_file = base / "parts" / "part_locs.txt", base / "parts" / "parts.txt"
    if not locs_file.exists():
        return None, None
    parts: dict[str, list] = {}
    for r in read_table(locs_file, 5, layout):
        loc = (_parse(int, r[1], locs_file, layout), _parse(float, r[2], locs_file, layout),
               _parse(float, r[3], locs_file, layout), r[4] == "1")  # fmt: skip
        parts.setdefault(r[0], []).append(loc)
    names = [" ".join(r[1:]) for r in read_table(names_file, 2, layout)] if names_file.exists() else None
    return parts, names


# --------------------------------------------------------------------------------------- NABirds

NABIRDS_LAYOUT = (
    "ROOT[/nabirds]/{images.txt, image_class_labels.txt, train_test_split.txt, classes.txt, "
    "images/<class_dir>/*.jpg} and optionally bounding_boxes.txt, hierarchy.txt, parts/parts.txt, "
    "parts/part_locs.txt"
)
NABIRDS_URL = "https://dl.allaboutbirds.org/nabirds"


@DATASETS.register("nabirds", priority=20,  # before CUB: the same tables, plus hierarchy.txt
                   detect=lambda p: (p / "hierarchy.txt").is_file() or (p / "nabirds" / "images.txt").is_file())
def nabirds(root: str | Path, split: str = "train", *, download: bool = False) -> ImageList:
    """NABirds (Cornell Lab of Ornithology) with its official train/test split.

    Class ids in ``classes.txt`` are sparse and include the inner nodes of the taxonomy; only
    classes that have images become labels (in id order). Bounding boxes and part locations are
    attached when present; ``extras`` holds the original class ids (``class_ids``), the taxonomy
    (``parents``: child id -> parent id) and every class name by id (``names_by_id``).

    NABirds has no public download: request it at https://dl.allaboutbirds.org/nabirds.
    """
    root = Path(root)
    check_split(split)
    base = next((c for c in (root, root / "nabirds") if (c / "images.txt").exists()), None)
    if base is None:
        why = "download=True cannot fetch NABirds" if download else "NABirds not found"
        raise FileNotFoundError(
            f"{why}: no images.txt under {root} or {root / 'nabirds'}. NABirds has no public download; "
            f"request it at {NABIRDS_URL}, extract nabirds.tar.gz into {root}. Expected layout: {NABIRDS_LAYOUT}"
        )
    lay = NABIRDS_LAYOUT
    images = {i: p for i, p, *_ in read_table(base / "images.txt", 2, lay)}
    labels_file = base / "image_class_labels.txt"
    labels = {i: _parse(int, c, labels_file, lay) for i, c, *_ in read_table(labels_file, 2, lay)}
    is_train = {i: s == "1" for i, s, *_ in read_table(base / "train_test_split.txt", 2, lay)}
    classes_file = base / "classes.txt"
    names = {_parse(int, r[0], classes_file, lay): " ".join(r[1:]) for r in read_table(classes_file, 2, lay)}
    used, index = _used_classes(images, labels, is_train, names, base, classes_file)

    boxes = None
    boxes_file = base / "bounding_boxes.txt"
    if boxes_file.exists():
        boxes = {r[0]: tuple(_parse(float, v, boxes_file, lay) for v in r[1:5]) for r in read_table(boxes_file, 5, lay)}
    parents: dict[int, int] = {}
    hierarchy_file = base / "hierarchy.txt"
    if hierarchy_file.exists():
        parents = {_parse(int, c, hierarchy_file, lay): _parse(int, p, hierarchy_file, lay)
                   for c, p, *_ in read_table(hierarchy_file, 2, lay)}  # fmt: skip
    parts, part_names = _read_parts(base, lay)

    ids = [i for i in images if is_train[i] == (split == "train")]  # file order: images.txt order
    return ImageList(
        paths=[str((base / "images" / images[i]).resolve()) for i in ids],
        labels=[index[labels[i]] for i in ids],
        classes=[names[c] for c in used],
        boxes=None if boxes is None else [boxes.get(i) for i in ids],
        parts=None if parts is None else [parts.get(i, []) for i in ids],
        part_names=part_names,
        source=f"nabirds:{base}",
        extras={"class_ids": used, "parents": parents, "names_by_id": names,
                "hierarchy": {"parents": {names[c]: names[p] for c, p in parents.items() if c in names and p in names}}
                if parents else None},
    )


# --------------------------------------------------------------------------------- Stanford Dogs

DOGS_LAYOUT = (
    "ROOT/{Images/<wnid>-<Breed>/*.jpg, train_list.mat, test_list.mat} (from images.tar and lists.tar) "
    "and optionally Annotation/<wnid>-<Breed>/<image> (from annotation.tar)"
)
DOGS_BASE_URL = "http://vision.stanford.edu/aditya86/ImageNetDogs/"
# SHA-256 of the official archives, as recorded by tensorflow_datasets (url_checksums/stanford_dogs.txt).
DOGS_FILES = {
    "images.tar": "a443fc2f9a851aa1a7b8e4fa4af94b8459fce2c9f5a2f4dd4669cf9673a4ec58",
    "lists.tar": "34b47cacd9a98b5d150e084f24d29391c084c55272295ec65c85651bc35f4d6c",
    "annotation.tar": "662ed36f707be6b195c2fda392d8e153e83af28cedc8e2134a649f198def30fd",
}


def _dogs_list(path: Path) -> tuple[list[str], list[int]]:
    mat = _load_mat(path, ("file_list", "labels"), DOGS_LAYOUT)
    files = _mat_strings(mat["file_list"])
    labels = [int(v) for v in np.asarray(mat["labels"]).ravel()]
    if len(files) != len(labels):
        raise ValueError(f"{path}: {len(files)} files but {len(labels)} labels. Expected layout: {DOGS_LAYOUT}")
    return files, labels


def _voc_box(path: Path) -> Box | None:
    """First object's box of a PASCAL VOC xml file, or None when absent or unreadable."""
    try:
        box = ET.parse(path).getroot().find("object/bndbox")
        if box is None:
            return None
        return _corner_box(*(float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")))
    except (ET.ParseError, OSError, TypeError, ValueError):
        return None


@DATASETS.register("dogs", priority=40, detect=lambda p: (p / "Images").is_dir() and (p / "train_list.mat").is_file())
def stanford_dogs(root: str | Path, split: str = "train", *, download: bool = False) -> ImageList:
    """Stanford Dogs (120 breeds from ImageNet) with the official ``train_list.mat`` / ``test_list.mat``.

    Labels in the lists are 1-based; classes are re-indexed over the labels used by either list and
    named after their folder (``n02085620-Chihuahua`` -> ``Chihuahua``). When ``Annotation/`` is
    present, the first object's box of each image is attached (images with several dogs have more).
    ``download=True`` fetches images.tar, lists.tar and annotation.tar (about 800 MB).
    """
    root = Path(root)
    check_split(split)
    present = lambda: (root / "Images").is_dir() and (root / f"{split}_list.mat").exists()  # noqa: E731
    if download and not present():
        for name, sha in DOGS_FILES.items():
            archive = download_and_verify(DOGS_BASE_URL + name, root / name, sha256=sha)
            with tarfile.open(archive) as tar:
                tar.extractall(root, filter="data")
    require_file(root / "Images", DOGS_LAYOUT + ". Use download=True to fetch Stanford Dogs.")
    lists = {s: _dogs_list(root / f"{s}_list.mat") for s in ("train", "test")}
    folder_of: dict[int, str] = {}
    for s, (files, labels) in lists.items():
        for f, l in zip(files, labels):
            folder = f.replace("\\", "/").split("/")[0]
            if folder_of.setdefault(l, folder) != folder:
                raise ValueError(
                    f"{root / f'{s}_list.mat'}: label {l} is used for both {folder_of[l]!r} and {folder!r}"
                )
    used = sorted(folder_of)
    index = {l: k for k, l in enumerate(used)}
    files, labels = lists[split]
    boxes = None
    if (root / "Annotation").is_dir():
        boxes = [_voc_box(root / "Annotation" / Path(f).with_suffix("")) for f in files]
    return ImageList(
        paths=[str((root / "Images" / f).resolve()) for f in files],
        labels=[index[l] for l in labels],
        classes=[folder_of[l].split("-", 1)[-1] for l in used],
        boxes=boxes,
        source=f"dogs:{root}",
        extras={"wnids": [folder_of[l].split("-", 1)[0] for l in used]},
    )


# --------------------------------------------------------------------------------- Stanford Cars

CARS_LAYOUT = (
    "ROOT/stanford_cars/{devkit/cars_meta.mat, devkit/cars_train_annos.mat, cars_train/*.jpg, "
    "cars_test/*.jpg, cars_test_annos_withlabels.mat} (torchvision.datasets.StanfordCars layout)"
)
CARS_HELP = (
    "The official Stanford Cars URL (https://ai.stanford.edu/~jkrause/cars/car_dataset.html) is gone, "
    "so it cannot be downloaded automatically. Get a torchvision-compatible copy, e.g. the Kaggle mirror "
    "https://www.kaggle.com/datasets/rickyyyyyyy/torchvision-stanford-cars (kaggle datasets download "
    "rickyyyyyyy/torchvision-stanford-cars), and extract it so that you have "
)


def _cars_boxes(path: Path) -> dict[str, Box]:
    """Map image file name -> box from a cars annos .mat; empty when the file has no box fields."""
    ann = np.atleast_1d(_load_mat(path, ("annotations",), CARS_LAYOUT, squeeze_me=True)["annotations"])
    fields = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2")
    if ann.dtype.names is None or not {"fname", *fields} <= set(ann.dtype.names):
        return {}
    return {str(a["fname"]): _corner_box(*(float(a[k]) for k in fields)) for a in ann}


@DATASETS.register("cars", priority=40, detect=lambda p: any((c / "devkit" / "cars_meta.mat").is_file() for c in (p, p / "stanford_cars")))
def stanford_cars(root: str | Path, split: str = "train", *, download: bool = False) -> ImageList:
    """Stanford Cars (196 models) with the official train/test split, read by ``torchvision``.

    ``root`` holds ``stanford_cars/`` (or is it). Boxes from the annotation .mat files are attached.
    The data can no longer be downloaded from its source; ``download=True`` on a missing copy
    raises an error that says where to get it.
    """
    from torchvision.datasets import StanfordCars

    root = Path(root)
    check_split(split)
    if root.name == "stanford_cars" and (root / "devkit").is_dir():
        root = root.parent
    base = root / "stanford_cars"
    annos = base / "devkit" / "cars_train_annos.mat" if split == "train" else base / "cars_test_annos_withlabels.mat"
    images = base / ("cars_train" if split == "train" else "cars_test")
    if download and not (annos.exists() and images.is_dir() and (base / "devkit" / "cars_meta.mat").exists()):
        raise FileNotFoundError(f"download=True: {CARS_HELP}{CARS_LAYOUT}.")
    for p in (base / "devkit" / "cars_meta.mat", annos, images):
        if not p.exists():
            raise FileNotFoundError(f"missing {p}. {CARS_HELP}{CARS_LAYOUT}.")
    try:
        ds = StanfordCars(str(root), split=split)
    except RuntimeError as e:  # torchvision's "Dataset not found."
        raise FileNotFoundError(
            f"torchvision could not find Stanford Cars under {base} ({e}). Expected layout: {CARS_LAYOUT}"
        ) from e
    except FileNotFoundError as e:
        raise FileNotFoundError(f"missing {e.filename or e}. Expected layout: {CARS_LAYOUT}") from e
    except (KeyError, ValueError, TypeError, IndexError) as e:
        raise ValueError(
            f"could not read the Stanford Cars annotations ({annos}, {base / 'devkit' / 'cars_meta.mat'}): {e!r}. "
            f"Expected layout: {CARS_LAYOUT}"
        ) from e
    classes = [ds.classes] if isinstance(ds.classes, str) else [str(c) for c in ds.classes]
    boxes = _cars_boxes(annos)
    paths = [str(Path(p).resolve()) for p, _ in ds._samples]
    return ImageList(
        paths=paths,
        labels=[int(t) for _, t in ds._samples],
        classes=classes,
        boxes=[boxes.get(Path(p).name) for p in paths] if boxes else None,
        source=f"cars:{base}",
    )


# --------------------------------------------------------------------------------- FGVC-Aircraft

AIRCRAFT_LAYOUT = (
    "ROOT/fgvc-aircraft-2013b/data/{images/<id>.jpg, variants.txt, families.txt, manufacturers.txt, "
    "images_<level>_{trainval,test}.txt} and optionally images_box.txt (torchvision.datasets.FGVCAircraft layout)"
)
AIRCRAFT_LEVELS = ("variant", "family", "manufacturer")
_AIRCRAFT_NAMES = {"variant": "variants.txt", "family": "families.txt", "manufacturer": "manufacturers.txt"}


@DATASETS.register("aircraft", priority=40,
                   detect=lambda p: any((c / "data" / "variants.txt").is_file() for c in (p, p / "fgvc-aircraft-2013b")))
def fgvc_aircraft(
    root: str | Path,
    split: str = "train",
    *,
    download: bool = False,
    level: str = "variant",
    annotation_level: str | None = None,
) -> ImageList:
    """FGVC-Aircraft 2013b with the official split, read by ``torchvision``.

    ``train`` is the official ``trainval`` set (train + val, 6,667 images) and ``test`` the official
    test set (3,333 images), the usual protocol. Boxes from ``images_box.txt`` are attached.

    Args:
        root: folder holding ``fgvc-aircraft-2013b/`` (or that folder itself).
        split: "train" or "test".
        download: fetch the archive (2.7 GB) with torchvision when it is missing.
        level: label granularity: "variant" (100 classes), "family" (70) or "manufacturer" (30).
        annotation_level: torchvision's name for ``level``; either may be given.
    """
    from torchvision.datasets import FGVCAircraft

    root = Path(root)
    check_split(split)
    if annotation_level is not None:
        if level != "variant" and level != annotation_level:
            raise ValueError(f"level={level!r} and annotation_level={annotation_level!r} disagree; give one")
        level = annotation_level
    if level not in AIRCRAFT_LEVELS:
        raise ValueError(f"level must be one of {AIRCRAFT_LEVELS}, got {level!r}")
    if root.name == "fgvc-aircraft-2013b" and (root / "data").is_dir():
        root = root.parent
    data = root / "fgvc-aircraft-2013b" / "data"
    tv_split = "trainval" if split == "train" else "test"
    if download and not data.is_dir():
        FGVCAircraft(str(root), split=tv_split, annotation_level=level, download=True)
    hint = "" if download else " Use download=True to fetch FGVC-Aircraft."
    for p in (data / "images", data / _AIRCRAFT_NAMES[level], data / f"images_{level}_{tv_split}.txt"):
        require_file(p, AIRCRAFT_LAYOUT + "." + hint)
    try:
        ds = FGVCAircraft(str(root), split=tv_split, annotation_level=level)
    except RuntimeError as e:
        raise FileNotFoundError(
            f"torchvision could not find FGVC-Aircraft under {root} ({e}). Expected layout: {AIRCRAFT_LAYOUT}"
        ) from e
    except KeyError as e:
        raise ValueError(
            f"{data / f'images_{level}_{tv_split}.txt'} names class {e} that is not in {data / _AIRCRAFT_NAMES[level]}"
        ) from e
    except ValueError as e:  # a line without "<id> <class>"
        raise ValueError(
            f"{data / f'images_{level}_{tv_split}.txt'}: malformed line ({e}); expected '<image id> <class name>'"
        ) from e
    boxes = None
    box_file = data / "images_box.txt"
    if box_file.exists():
        table = {r[0]: _corner_box(*(_parse(float, v, box_file, AIRCRAFT_LAYOUT) for v in r[1:5]))
                 for r in read_table(box_file, 5, AIRCRAFT_LAYOUT)}  # fmt: skip
        boxes = [table.get(Path(p).stem) for p in ds._image_files]
    return ImageList(
        paths=[str(Path(p).resolve()) for p in ds._image_files],
        labels=list(ds._labels),
        classes=list(ds.classes),
        boxes=boxes,
        source=f"aircraft:{root / 'fgvc-aircraft-2013b'}",
        extras={"level": level, "hierarchy": _aircraft_taxonomy(data, tv_split, level)},
    )


def _aircraft_taxonomy(data: Path, tv_split: str, level: str) -> dict | None:
    """variant -> family -> manufacturer (the levels above ``level``), read from the per-level image lists."""
    above = AIRCRAFT_LEVELS[AIRCRAFT_LEVELS.index(level):]
    if len(above) < 2:
        return None
    label_of: dict[str, dict[str, str]] = {}
    for lv in above:
        f = data / f"images_{lv}_{tv_split}.txt"
        if not f.is_file():
            return None
        label_of[lv] = dict(line.strip().split(" ", 1) for line in f.read_text().splitlines() if " " in line.strip())
    seen: set[str] = set(label_of[above[0]].values())
    node = {above[0]: lambda n: n}  # a family named like a variant ("A380") becomes "A380 (family)": names are keys
    for lv in above[1:]:
        names = set(label_of[lv].values())
        node[lv] = (lambda n, lv=lv, clash=names & seen: f"{n} ({lv})" if n in clash else n)
        seen |= names
    parents = {}
    for child, parent in zip(above, above[1:]):
        for image, name in label_of[child].items():
            if image in label_of[parent]:
                parents[node[child](name)] = node[parent](label_of[parent][image])
    return {"parents": parents, "level_names": list(above[1:])}


# ------------------------------------------------------------------------------------ Flowers-102

FLOWERS_LAYOUT = (
    "ROOT/flowers-102/{jpg/image_NNNNN.jpg, imagelabels.mat, setid.mat} (torchvision.datasets.Flowers102 layout)"
)


def _flower_names(n: int) -> list[str]:
    from torchvision.datasets import Flowers102

    names = list(getattr(Flowers102, "classes", []))
    return names if n <= len(names) else [f"class_{k:03d}" for k in range(1, n + 1)]


@DATASETS.register("flowers102", priority=40, detect=lambda p: any((c / "imagelabels.mat").is_file() for c in (p, p / "flowers-102")))
def flowers102(root: str | Path, split: str = "train", *, download: bool = False) -> ImageList:
    """Oxford Flowers-102 with the official splits.

    ``train`` is the official train and validation sets combined (10 + 10 images per class); the
    official train set alone has only 10 images per class, and train+val is the usual fine-grained
    protocol. ``test`` is the official test set (6,149 images). The files are read the way
    ``torchvision.datasets.Flowers102`` reads them, without its md5 check of the .mat files, so
    that edited or re-saved copies also load; ``download=True`` uses torchvision's download,
    which does verify the md5 sums.
    """
    root = Path(root)
    check_split(split)
    if root.name == "flowers-102" and (root / "jpg").is_dir():
        root = root.parent
    base = root / "flowers-102"
    complete = all(p.exists() for p in (base / "jpg", base / "imagelabels.mat", base / "setid.mat"))
    if download and not complete:
        from torchvision.datasets import Flowers102

        Flowers102(str(root), split="test", download=True)
    layout = FLOWERS_LAYOUT + ("." if download else ". Use download=True to fetch Flowers-102.")
    require_file(base / "jpg", layout)
    keys = ("trnid", "valid") if split == "train" else ("tstid",)
    setid = _load_mat(base / "setid.mat", keys, layout)
    labels_mat = _load_mat(base / "imagelabels.mat", ("labels",), layout)
    all_labels = [int(v) for v in np.asarray(labels_mat["labels"]).ravel()]
    if any(l < 1 for l in all_labels):
        raise ValueError(f"{base / 'imagelabels.mat'}: labels must be 1-based class numbers, found {min(all_labels)}")
    ids = [int(v) for k in keys for v in np.asarray(setid[k]).ravel()]
    bad = [i for i in ids if not 1 <= i <= len(all_labels)]
    if bad:
        raise ValueError(
            f"{base / 'setid.mat'} names image ids {bad[:5]} that have no label in {base / 'imagelabels.mat'}"
        )
    classes = _flower_names(max(all_labels, default=0))
    return ImageList(
        paths=[str((base / "jpg" / f"image_{i:05d}.jpg").resolve()) for i in ids],
        labels=[all_labels[i - 1] - 1 for i in ids],
        classes=classes,
        source=f"flowers102:{base}",
    )
