"""Helpers shared by several test modules (fixtures are in conftest.py): tiny datasets in each reader's
on-disk layout, random-init checkpoints, and the one-train-step-and-round-trip check of a task."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy.io import savemat

from finegrain.checkpoint import CheckpointMeta, load_task, save
from finegrain.config import ModelConfig
from finegrain.data.base import ImageList
from finegrain.models.backbone import create_backbone
from finegrain.tasks import build_task

# ------------------------------------------------------------------- image files and reader layouts


def jpg(path: Path, shade: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (shade % 256, 64, 128)).save(path, "JPEG")
    return path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def cellstr(strings: list[str]) -> np.ndarray:
    """A MATLAB N x 1 cell array of char arrays, as in the Stanford Dogs lists."""
    cell = np.empty((len(strings), 1), dtype=object)
    for k, s in enumerate(strings):
        cell[k, 0] = s
    return cell


def check_split_pair(train: ImageList, test: ImageList, classes: list[str], n_train: int, n_test: int) -> None:
    assert train.classes == classes and test.classes == classes
    assert (len(train), len(test)) == (n_train, n_test)
    assert not set(train.paths) & set(test.paths)
    assert all(Path(p).is_absolute() and Path(p).exists() for p in train.paths + test.paths)


# Class ids 1, 2 and 5 only (a subset, as in cub50): labels must be re-indexed to 0, 1, 2.
CUB_CLASSES = {1: "001.Black_footed_Albatross", 2: "002.Laysan_Albatross", 5: "005.Crested_Auklet"}


def make_cub(root: Path) -> Path:
    base = root / "CUB_200_2011"
    images, labels, split, boxes, locs = [], [], [], [], []
    image_id = 0
    for cid, folder in CUB_CLASSES.items():
        for k in range(4):  # 3 train + 1 test per class
            image_id += 1
            rel = f"{folder}/{folder.split('.')[1]}_{k:04d}.jpg"
            jpg(base / "images" / rel, image_id)
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {cid}")
            split.append(f"{image_id} {int(k < 3)}")
            boxes.append(f"{image_id} {image_id}.0 2.0 5.0 6.0")
            locs += [f"{image_id} 1 3.0 4.0 1", f"{image_id} 2 0.0 0.0 0"]
    all_classes = [f"{i} {n}" for i, n in sorted({**CUB_CLASSES, 3: "003.Sooty_Albatross"}.items())]
    for name, lines in {
        "images.txt": images,
        "image_class_labels.txt": labels,
        "train_test_split.txt": split,
        "classes.txt": all_classes,
        "bounding_boxes.txt": boxes,
        "parts/part_locs.txt": locs,
        "parts/parts.txt": ["1 back", "2 left eye"],
    }.items():
        write(base / name, "\n".join(lines) + "\n")
    return base


NAB_LEAVES = {295: "Forster's Tern", 313: "Common Tern", 817: "Red-tailed Hawk (Adult)"}


def make_nabirds(root: Path) -> Path:
    base = root / "nabirds"
    images, labels, split, boxes, locs = [], [], [], [], []
    n = 0
    for cid in NAB_LEAVES:
        for k in range(3):  # 2 train + 1 test per class
            n += 1
            uuid = f"{n:08x}-21dc-4d0c-bfe1-{cid:012x}"  # NABirds image ids are UUIDs, not numbers
            rel = f"{cid:04d}/{uuid.replace('-', '')}.jpg"
            jpg(base / "images" / rel, n)
            images.append(f"{uuid} {rel}")
            labels.append(f"{uuid} {cid}")
            split.append(f"{uuid} {int(k < 2)}")
            boxes.append(f"{uuid} {n} 1 6 7")
            locs.append(f"{uuid} 0 2 3 1")
    classes = ["0 Birds", "1 Terns", "2 Hawks", "400 Unused leaf"] + [f"{i} {s}" for i, s in NAB_LEAVES.items()]
    for name, lines in {
        "images.txt": images,
        "image_class_labels.txt": labels,
        "train_test_split.txt": split,
        "classes.txt": classes,
        "bounding_boxes.txt": boxes,
        "hierarchy.txt": ["1 0", "2 0", "295 1", "313 1", "817 2", "400 2"],
        "parts/part_locs.txt": locs,
        "parts/parts.txt": ["0 bill", "1 crown"],
    }.items():
        write(base / name, "\n".join(lines) + "\n")
    return base


DOG_FOLDERS = ["n02085620-Chihuahua", "n02085782-Japanese_spaniel", "n02085936-Maltese_dog"]


def make_dogs(root: Path, annotations: bool = True) -> Path:
    lists = {"train": ([], []), "test": ([], [])}
    for label, folder in enumerate(DOG_FOLDERS, 1):
        wnid = folder.split("-")[0]
        for k in range(3):  # 2 train + 1 test per class
            rel = f"{folder}/{wnid}_{k}.jpg"
            jpg(root / "Images" / rel, k)
            files, labels = lists["train" if k < 2 else "test"]
            files.append(rel)
            labels.append(label)
            if annotations and k != 1:  # image 1 of each class has no annotation file
                write(root / "Annotation" / folder / f"{wnid}_{k}", f"""<annotation>
  <filename>{wnid}_{k}</filename><size><width>8</width><height>8</height><depth>3</depth></size>
  <object><name>{folder.split('-', 1)[1]}</name>
    <bndbox><xmin>{label}</xmin><ymin>2</ymin><xmax>6</xmax><ymax>8</ymax></bndbox></object>
  <object><name>second dog</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>2</xmax><ymax>2</ymax></bndbox></object>
</annotation>
""")
    for split, (files, labels) in lists.items():
        savemat(root / f"{split}_list.mat", {
            "file_list": cellstr(files),
            "annotation_list": cellstr([f[:-4] for f in files]),
            "labels": np.array(labels, dtype=np.uint8).reshape(-1, 1),
        })
    return root


CAR_NAMES = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Audi TT RS Coupe 2012"]


def cars_annos(rows: list[tuple[int, int, int, int, int, str]]) -> np.ndarray:
    """A 1 x N MATLAB struct array with the fields of cars_train_annos.mat."""
    names = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")
    rec = np.empty((1, len(rows)), dtype=[(n, object) for n in names])
    for k, row in enumerate(rows):
        rec[0, k] = tuple(np.array([[v]], dtype=np.uint16) for v in row[:5]) + (row[5],)
    return rec


def make_cars(root: Path) -> Path:
    base = root / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    savemat(base / "devkit" / "cars_meta.mat", {"class_names": np.array(CAR_NAMES, dtype=object).reshape(1, -1)})
    n = 0
    for split, per_class in (("train", 2), ("test", 1)):
        rows = []
        for label in (1, 2, 3):
            for _ in range(per_class):
                n += 1
                fname = f"{n:05d}.jpg"
                jpg(base / f"cars_{split}" / fname, n)
                rows.append((label, 2, 6, 8, label, fname))  # 1-based inclusive x1, y1, x2, y2
        mat = base / "devkit" / "cars_train_annos.mat" if split == "train" else base / "cars_test_annos_withlabels.mat"
        savemat(mat, {"annotations": cars_annos(rows)})
    return base


# (image id, variant, family, manufacturer); variant names contain spaces and slashes.
AIRCRAFT = [
    ("0034309", "707-320", "Boeing 707", "Boeing"),
    ("0034958", "727-200", "Boeing 727", "Boeing"),
    ("0037511", "A300B4", "A300", "Airbus"),
    ("0037512", "F/A-18", "F/A-18", "McDonnell Douglas"),
]
AIRCRAFT_SPLIT = {"train": [0, 1, 2, 3], "val": [0, 1, 2, 3], "test": [0, 1, 2, 3]}


def make_aircraft(root: Path) -> Path:
    data = root / "fgvc-aircraft-2013b" / "data"
    levels = {"variant": ("variants.txt", 1), "family": ("families.txt", 2), "manufacturer": ("manufacturers.txt", 3)}
    for level, (names_file, col) in levels.items():
        write(data / names_file, "\n".join(sorted({a[col] for a in AIRCRAFT})) + "\n")
        for split, suffix in (("train", "a"), ("val", "b"), ("test", "c")):
            write(data / f"images_{level}_{split}.txt", "".join(f"{a[0]}{suffix} {a[col]}\n" for a in AIRCRAFT))
        train_val = (data / f"images_{level}_train.txt").read_text() + (data / f"images_{level}_val.txt").read_text()
        write(data / f"images_{level}_trainval.txt", train_val)
    boxes = []
    for a in AIRCRAFT:
        for suffix in "abc":
            jpg(data / "images" / f"{a[0]}{suffix}.jpg")
            boxes.append(f"{a[0]}{suffix} 3 4 7 8")
    write(data / "images_box.txt", "\n".join(boxes) + "\n")
    return root / "fgvc-aircraft-2013b"


def make_flowers(root: Path) -> Path:
    base = root / "flowers-102"
    labels = [1, 2, 77, 1, 2, 77, 1, 2, 77, 2]  # image k+1 has labels[k]; 77 is "passion flower"
    for k in range(len(labels)):
        jpg(base / "jpg" / f"image_{k + 1:05d}.jpg", k)
    savemat(base / "imagelabels.mat", {"labels": np.array([labels], dtype=np.uint8)})
    ids = {"trnid": [1, 2, 3], "valid": [4, 5, 6], "tstid": [7, 8, 9, 10]}
    savemat(base / "setid.mat", {k: np.array([v], dtype=np.uint16) for k, v in ids.items()})
    return base


def make_cub_with_parts(root: Path, *, n_train: int = 4, n_test: int = 2, size: int = 48, boxes: bool = True,
                        parts: bool = True, seed: int = 0) -> Path:
    """A tiny CUB-200-2011 folder (3 coloured "species") with bounding_boxes.txt and the 15 part locations."""
    rng = np.random.default_rng(seed)
    base = root / "CUB_200_2011"
    colours = {1: ("001.Red_Bird", (200, 40, 40)), 2: ("002.Green_Bird", (40, 180, 60)), 3: ("003.Blue_Bird", (50, 60, 210))}
    files = {k: [] for k in ("images", "labels", "split", "boxes", "locs")}
    image_id = 0
    for cid, (folder, rgb) in colours.items():
        for k in range(n_train + n_test):
            image_id += 1
            rel = f"{folder}/{folder.split('.')[1]}_{k:04d}.jpg"
            arr = np.clip(np.array(rgb) + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
            (base / "images" / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(base / "images" / rel, quality=90)
            files["images"].append(f"{image_id} {rel}")
            files["labels"].append(f"{image_id} {cid}")
            files["split"].append(f"{image_id} {int(k < n_train)}")
            x, y = rng.uniform(0, size / 3, 2)
            files["boxes"].append(f"{image_id} {x:.1f} {y:.1f} {size / 2:.1f} {size / 2:.1f}")
            for pid in range(1, 16):
                visible = int(rng.random() > 0.2)
                px, py = (rng.uniform(x, x + size / 2), rng.uniform(y, y + size / 2)) if visible else (0.0, 0.0)
                files["locs"].append(f"{image_id} {pid} {px:.1f} {py:.1f} {visible}")
    from finegrain.tasks.parts import CUB_PARTS

    out = {"images.txt": files["images"], "image_class_labels.txt": files["labels"], "train_test_split.txt": files["split"],
           "classes.txt": [f"{cid} {folder}" for cid, (folder, _) in colours.items()]}
    if boxes:
        out["bounding_boxes.txt"] = files["boxes"]
    if parts:
        out["parts/part_locs.txt"] = files["locs"]
        out["parts/parts.txt"] = [f"{i} {n}" for i, n in enumerate(CUB_PARTS, 1)]
    for name, lines in out.items():
        (base / name).parent.mkdir(parents=True, exist_ok=True)
        (base / name).write_text("\n".join(lines) + "\n")
    return root


def _colour_folder(root: Path, n_classes: int = 6, per_class: int = 5) -> Path:
    rng = np.random.default_rng(0)
    for c in range(n_classes):
        rgb = np.array([(c * 40) % 256, (c * 90 + 30) % 256, 255 - c * 35])
        d = root / f"class{c}"
        d.mkdir(parents=True)
        for i in range(per_class):
            arr = np.clip(rgb + rng.normal(0, 20, (36, 36, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(d / f"{i}.jpg")
    return root


# -------------------------------------------------------------------------------------- checkpoints


CLASSES = ["red", "green", "blue"]
PREP = {"img_size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "crop_pct": 0.875, "interpolation": "bilinear"}


def make_checkpoint(path: Path, backbone: str = "test_resnet", seed: int = 0) -> Path:
    """A random-init tiny checkpoint with full metadata (no training: seconds)."""
    torch.manual_seed(seed)
    model = create_backbone(backbone, num_classes=len(CLASSES), pretrained="none")
    task = build_task("supervised", model, len(CLASSES))
    meta = {"task": "supervised", "task_args": {}, "model": {"backbone": backbone, "pretrained": "none", "task": "supervised",
            "drop_rate": 0.0, "drop_path_rate": 0.0}, "num_classes": len(CLASSES), "classes": CLASSES, "preprocessing": PREP}
    return save(path, task.state_dict(), CheckpointMeta(**meta))


def make_explain_checkpoint(path, backbone: str, *, img_size: int = 64, classes=("blue", "green", "red")):
    """A random-init checkpoint written directly (no training): enough for shape and plumbing tests."""
    from finegrain.checkpoint import CheckpointMeta, save
    from finegrain.models.backbone import create_backbone, data_config
    from finegrain.tasks import build_task

    torch.manual_seed(0)
    model = create_backbone(backbone, num_classes=len(classes))
    task = build_task("supervised", model, len(classes))
    dc = data_config(model)
    meta = {"task": "supervised", "task_args": task.task_args(), "num_classes": len(classes), "classes": list(classes),
            "model": {"backbone": backbone, "pretrained": "none", "task": "supervised", "drop_rate": 0.0, "drop_path_rate": 0.0},
            "preprocessing": {"img_size": img_size, "mean": list(dc["mean"]), "std": list(dc["std"]),
                              "crop_pct": dc["crop_pct"], "interpolation": dc["interpolation"]},
            "config": {}, "epoch": 0, "metrics": {}}
    return save(path, task.state_dict(), CheckpointMeta(**meta))


# ------------------------------------------------ tasks: one train step and a checkpoint round trip


BACKBONES = ["test_resnet", "test_efficientnet"]
NUM_CLASSES = 3


def _batch(size: int = 64):
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 0, 1, 2])
    parts = torch.rand(4, 15, 3, generator=g)
    parts[..., 2] = (parts[..., 2] > 0.3).float()  # about a third of the parts invisible
    box = torch.tensor([[0.1, 0.2, 0.8, 0.9], [0.0, 0.0, 1.0, 1.0], [0.3, 0.1, 0.6, 0.5], [0.2, 0.2, 0.9, 0.7]])
    return {"image": torch.randn(4, 3, size, size, generator=g), "label": labels, "target": labels,
            "box": box, "parts": parts}


def _train_step_and_roundtrip(backbone, task_name, tmp_path, size=64, **kw):
    torch.manual_seed(0)
    model = create_backbone(backbone, num_classes=NUM_CLASSES, pretrained="none")
    task = build_task(task_name, model, NUM_CLASSES, label_smoothing=0.1, **kw)
    task.train()
    out = task(_batch(size))
    assert out["logits"].shape == (4, NUM_CLASSES)
    assert torch.isfinite(out["loss"]) and torch.isfinite(out["logits"]).all()
    out["loss"].backward()
    missing = [n for n, p in task.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in task.parameters() if p.grad is not None)
    with torch.no_grad():  # move off the initial state so the round trip is not trivially equal
        for p in task.parameters():
            p.add_(0.01 * torch.randn_like(p))
    task.eval()
    images = _batch(size)["image"][:2]
    expected = task.predict(images)
    assert expected.shape == (2, NUM_CLASSES) and torch.isfinite(expected).all()
    model_cfg = dataclasses.asdict(ModelConfig(backbone=backbone, pretrained="none", task=task_name))
    path = save(tmp_path / "ckpt.safetensors", task.state_dict(), CheckpointMeta(**{
        "task": task_name, "task_args": task.task_args(), "model": model_cfg, "num_classes": NUM_CLASSES,
        "classes": ["a", "b", "c"], "preprocessing": {"img_size": size, "mean": [0.5] * 3, "std": [0.5] * 3,
                                                      "crop_pct": 1.0, "interpolation": "bilinear"}}))
    rebuilt, _ = load_task(path, "cpu")
    torch.testing.assert_close(rebuilt.predict(images), expected)
    return task, out


# ------------------------------------------------------ a tiny checkpoint of every registered task


def task_checkpoint(path: Path, task_name: str, classes: list[str], *, size: int = 64, teacher: Path | None = None) -> Path:
    """A random-init checkpoint of ``task_name`` (any registered task), described as training would.

    ``transfg`` gets ``test_vit``, every other task ``test_resnet``; ``distill`` needs ``teacher``
    (a classifier checkpoint with the same classes). Few-shot tasks are 3-way 1-shot.
    """
    from finegrain import checkpoint as ckpt
    from finegrain.tasks import TASKS, BuildContext
    from finegrain.tasks.fewshot import build_method

    cls = TASKS.get(task_name)
    backbone = "test_vit" if task_name == "transfg" else "test_resnet"
    prep = {**PREP, "img_size": size}
    options = cls.Options(teacher=str(teacher)) if task_name == "distill" else cls.Options()
    args = cls.build_args(options, BuildContext(preprocessing=prep))
    torch.manual_seed(0)
    model = create_backbone(backbone, num_classes=len(classes), pretrained="none")
    if cls.trainer == "episodic":
        args.pop("label_smoothing", None)
        task = build_method(cls.method, model, n_way=len(classes), k_shot=1, **args)
        classes = [f"way_{i}" for i in range(task.num_classes)]
    else:
        task = ckpt.build_task(task_name, model, len(classes), args)
    with torch.no_grad():  # off the initial state, so that heads and attention are not all zero
        for p in task.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model_cfg = dataclasses.asdict(ModelConfig(backbone=backbone, pretrained="none", task=task_name, options=options))
    meta = ckpt.describe(task, model=model_cfg, classes=classes, preprocessing=prep, epoch=1, metrics={})
    return save(path, task.state_dict(), meta)
