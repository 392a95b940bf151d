"""Every dataset reader on a tiny fixture in its own official on-disk layout (CPU, no network)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torchvision.datasets  # noqa: F401  (torch's import costs seconds: pay it at collection, not in a test)
from PIL import Image
from scipy.io import savemat

import finegrain.data.benchmarks  # noqa: F401  (registers the benchmark readers)
from finegrain.data.base import DATASETS, ImageList, open_dataset

CUB50 = Path("/work/shared/data/cub50")


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


# ---------------------------------------------------------------------------------------- folder


def test_folder_without_split(tmp_path):
    for c, n in (("sparrow", 3), ("crow", 2)):
        for k in range(n):
            jpg(tmp_path / c / f"{k}.jpg")
    (tmp_path / "crow" / "notes.txt").write_text("not an image")
    data = DATASETS.get("folder")(tmp_path, "train")
    assert data.classes == ["crow", "sparrow"]
    assert data.class_counts() == [2, 3]
    assert all(data.classes[l] == Path(p).parent.name for p, l in zip(data.paths, data.labels))
    with pytest.raises(ValueError, match="no test/ folder"):
        DATASETS.get("folder")(tmp_path, "test")


def test_folder_with_train_and_test(tmp_path):
    for split, n in (("train", 3), ("test", 1)):
        for c in ("b", "a", "c"):
            for k in range(n):
                jpg(tmp_path / split / c / f"{c}{k}.jpg")
    train = DATASETS.get("folder")(tmp_path, "train")
    test = DATASETS.get("folder")(tmp_path, "test")
    check_split_pair(train, test, ["a", "b", "c"], 9, 3)
    for data in (train, test):
        assert all(data.classes[l] == Path(p).parent.name for p, l in zip(data.paths, data.labels))


def test_folder_test_class_subset_keeps_train_index(tmp_path):
    for c in ("a", "b", "c"):
        jpg(tmp_path / "train" / c / "0.jpg")
    jpg(tmp_path / "test" / "c" / "0.jpg")
    test = DATASETS.get("folder")(tmp_path, "test")
    assert test.classes == ["a", "b", "c"] and test.labels == [2]


def test_folder_empty_class_names_it(tmp_path):
    jpg(tmp_path / "full" / "0.jpg")
    (tmp_path / "hollow").mkdir()
    with pytest.raises(ValueError, match="hollow"):
        DATASETS.get("folder")(tmp_path, "train")


def test_folder_train_without_test_folder(tmp_path):
    jpg(tmp_path / "train" / "a" / "0.jpg")
    assert len(DATASETS.get("folder")(tmp_path, "train")) == 1
    with pytest.raises(FileNotFoundError, match="no test/ folder"):
        DATASETS.get("folder")(tmp_path, "test")


def test_folder_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DATASETS.get("folder")(tmp_path / "nowhere", "train")


# ------------------------------------------------------------------------------------------- csv


def test_csv_with_split_column(tmp_path):
    rows = ["path,label,split"]
    for k in range(6):
        c = ("owl", "hawk")[k % 2]
        jpg(tmp_path / "img" / f"{k}.jpg")
        rows.append(f"img/{k}.jpg,{c},{'test' if k >= 4 else 'train'}")
    csv = write(tmp_path / "list.csv", "\n".join(rows) + "\n")
    train, test = DATASETS.get("csv")(csv, "train"), DATASETS.get("csv")(csv, "test")
    check_split_pair(train, test, ["hawk", "owl"], 4, 2)
    assert [train.classes[l] for l in train.labels] == ["owl", "hawk", "owl", "hawk"]
    assert [test.classes[l] for l in test.labels] == ["owl", "hawk"]


def test_csv_without_split_column(tmp_path):
    jpg(tmp_path / "x.jpg")
    csv = write(tmp_path / "list.csv", f"path,label\nx.jpg,kite\n{tmp_path / 'x.jpg'},ibis\n")
    data = DATASETS.get("csv")(csv, "train")
    assert data.classes == ["ibis", "kite"] and data.labels == [1, 0]
    assert data.paths == [str((tmp_path / "x.jpg").resolve())] * 2
    with pytest.raises(ValueError, match="no rows for split 'test'"):
        DATASETS.get("csv")(csv, "test")


def test_csv_without_header(tmp_path):
    csv = write(tmp_path / "list.csv", "x.jpg,kite\ny.jpg,ibis\n")
    with pytest.raises(ValueError, match="expected columns 'path' and 'label'"):
        DATASETS.get("csv")(csv, "train")


def test_csv_bad_split_value_names_line(tmp_path):
    csv = write(tmp_path / "list.csv", "path,label,split\nx.jpg,kite,train\ny.jpg,ibis,valid\n")
    with pytest.raises(ValueError, match=r"list\.csv:3: split must be"):
        DATASETS.get("csv")(csv, "train")


def test_csv_short_row_names_line(tmp_path):
    csv = write(tmp_path / "list.csv", "path,label\nx.jpg,kite\ny.jpg\n")
    with pytest.raises(ValueError, match=r"list\.csv:3: empty path or label"):
        DATASETS.get("csv")(csv, "train")


# ------------------------------------------------------------------------------------------- CUB

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


def test_cub(tmp_path):
    make_cub(tmp_path)
    train, test = DATASETS.get("cub")(tmp_path, "train"), DATASETS.get("cub")(tmp_path, "test")
    names = ["Black_footed_Albatross", "Laysan_Albatross", "Crested_Auklet"]
    check_split_pair(train, test, names, 9, 3)
    assert train.class_counts() == [3, 3, 3] and test.class_counts() == [1, 1, 1]
    for data in (train, test):
        assert all(data.classes[l] in p for p, l in zip(data.paths, data.labels))
        assert len(data.boxes) == len(data) and len(data.parts) == len(data)
    assert train.boxes[0] == (1.0, 2.0, 5.0, 6.0)
    assert test.boxes[0] == (4.0, 2.0, 5.0, 6.0)  # image 4 is the first test image
    assert train.parts[0] == [(1, 3.0, 4.0, True), (2, 0.0, 0.0, False)]
    assert train.part_names == ["back", "left eye"]


def test_cub_given_inner_folder(tmp_path):
    base = make_cub(tmp_path)
    assert len(DATASETS.get("cub")(base, "train")) == 9


def test_cub_without_optional_annotations(tmp_path):
    base = make_cub(tmp_path)
    (base / "bounding_boxes.txt").unlink()
    (base / "parts" / "part_locs.txt").unlink()
    data = DATASETS.get("cub")(tmp_path, "train")
    assert data.boxes is None and data.parts is None


def test_cub_missing_file_is_named(tmp_path):
    base = make_cub(tmp_path)
    (base / "train_test_split.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"train_test_split\.txt.*Expected layout"):
        DATASETS.get("cub")(tmp_path, "train")


def test_cub_missing_images_txt_is_named(tmp_path):
    (tmp_path / "CUB_200_2011").mkdir()
    with pytest.raises(FileNotFoundError, match=r"images\.txt"):
        DATASETS.get("cub")(tmp_path, "train")


def test_cub_malformed_row_names_file_and_line(tmp_path):
    base = make_cub(tmp_path)
    lines = (base / "image_class_labels.txt").read_text().splitlines()
    lines[2] = "3"
    write(base / "image_class_labels.txt", "\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"image_class_labels\.txt:3: expected 2 fields, got 1"):
        DATASETS.get("cub")(tmp_path, "train")


@pytest.mark.skipif(not CUB50.exists(), reason=f"{CUB50} not present")
def test_real_cub50():
    train, test = open_dataset(CUB50, "train"), open_dataset(CUB50, "test")
    assert len(train.classes) == 50 and train.classes == test.classes
    assert (len(train), len(test)) == (1449, 1500)
    assert not set(train.paths) & set(test.paths)
    assert all(c > 0 for c in train.class_counts()) and all(c > 0 for c in test.class_counts())
    assert Path(train.paths[0]).exists() and Path(test.paths[-1]).exists()


# --------------------------------------------------------------------------------------- NABirds

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


def test_nabirds(tmp_path):
    make_nabirds(tmp_path)
    read = DATASETS.get("nabirds")
    train, test = read(tmp_path, "train"), read(tmp_path, "test")
    check_split_pair(train, test, list(NAB_LEAVES.values()), 6, 3)
    assert train.class_counts() == [2, 2, 2] and test.class_counts() == [1, 1, 1]
    ids = {name: cid for cid, name in NAB_LEAVES.items()}
    for data in (train, test):
        assert all(Path(p).parent.name == f"{ids[data.classes[l]]:04d}" for p, l in zip(data.paths, data.labels))
        assert all(b is not None and b[2:] == (6.0, 7.0) for b in data.boxes)
    assert train.boxes[0] == (1.0, 1.0, 6.0, 7.0) and test.boxes[0] == (3.0, 1.0, 6.0, 7.0)
    assert train.parts[0] == [(0, 2.0, 3.0, True)] and train.part_names == ["bill", "crown"]
    assert train.extras["class_ids"] == [295, 313, 817]
    assert train.extras["parents"][817] == 2 and train.extras["names_by_id"][2] == "Hawks"


def test_nabirds_missing_and_no_download(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"images\.txt.*no public download.*allaboutbirds"):
        DATASETS.get("nabirds")(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="download=True cannot fetch NABirds"):
        DATASETS.get("nabirds")(tmp_path, "train", download=True)


def test_nabirds_unknown_class_and_missing_label(tmp_path):
    base = make_nabirds(tmp_path)
    write(base / "classes.txt", "0 Birds\n295 Forster's Tern\n")
    with pytest.raises(ValueError, match=r"class ids \[313, 817\] are not in .*classes\.txt"):
        DATASETS.get("nabirds")(base, "train")
    make_nabirds(tmp_path)
    lines = (base / "image_class_labels.txt").read_text().splitlines()
    write(base / "image_class_labels.txt", "\n".join(lines[1:]) + "\n")
    with pytest.raises(ValueError, match="have no label or split entry"):
        DATASETS.get("nabirds")(base, "train")


def test_nabirds_malformed_row(tmp_path):
    base = make_nabirds(tmp_path)
    with open(base / "bounding_boxes.txt", "a") as f:
        f.write("deadbeef 1 2 3\n")
    with pytest.raises(ValueError, match=r"bounding_boxes\.txt:10: expected 5 fields"):
        DATASETS.get("nabirds")(tmp_path, "train")


# --------------------------------------------------------------------------------- Stanford Dogs

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


def test_dogs(tmp_path):
    make_dogs(tmp_path)
    train, test = DATASETS.get("dogs")(tmp_path, "train"), DATASETS.get("dogs")(tmp_path, "test")
    check_split_pair(train, test, ["Chihuahua", "Japanese_spaniel", "Maltese_dog"], 6, 3)
    for data in (train, test):
        assert all(Path(p).parent.name.endswith("-" + data.classes[l]) for p, l in zip(data.paths, data.labels))
    assert train.extras["wnids"] == ["n02085620", "n02085782", "n02085936"]
    # 1-based inclusive VOC corners (label, 2, 6, 8) -> 0-based (x, y, w, h); first object only.
    assert train.boxes[0] == (0.0, 1.0, 6.0, 7.0) and train.boxes[1] is None
    assert test.boxes[2] == (2.0, 1.0, 4.0, 7.0)


def test_dogs_download_extracts_verified_archives(tmp_path, monkeypatch):
    import tarfile

    import finegrain.data.benchmarks as bm

    make_dogs(tmp_path / "src")
    members = {
        "images.tar": ["Images"],
        "lists.tar": ["train_list.mat", "test_list.mat"],
        "annotation.tar": ["Annotation"],
    }
    calls = []

    def fake_download(url, dest, sha256=None, md5=None):
        calls.append((url, sha256))
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(dest, "w") as tar:
            for m in members[Path(dest).name]:
                tar.add(tmp_path / "src" / m, arcname=m)
        return Path(dest)

    monkeypatch.setattr(bm, "download_and_verify", fake_download)
    data = DATASETS.get("dogs")(tmp_path / "dl", "test", download=True)
    assert len(data) == 3 and data.boxes is not None
    assert [u.rsplit("/", 1)[1] for u, _ in calls] == list(members) and all(len(h) == 64 for _, h in calls)
    DATASETS.get("dogs")(tmp_path / "dl", "train", download=True)  # present: nothing fetched again
    assert len(calls) == 3


def test_dogs_without_annotation_folder(tmp_path):
    make_dogs(tmp_path, annotations=False)
    assert DATASETS.get("dogs")(tmp_path, "test").boxes is None


def test_dogs_missing_list_and_images(tmp_path):
    make_dogs(tmp_path)
    (tmp_path / "test_list.mat").unlink()
    with pytest.raises(FileNotFoundError, match=r"test_list\.mat.*Expected layout"):
        DATASETS.get("dogs")(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match=r"Images.*download=True"):
        DATASETS.get("dogs")(tmp_path / "empty", "train")


def test_dogs_malformed_mat(tmp_path):
    make_dogs(tmp_path)
    savemat(tmp_path / "train_list.mat", {"files": cellstr(["a.jpg"])})
    with pytest.raises(ValueError, match=r"train_list\.mat has no \['file_list', 'labels'\]"):
        DATASETS.get("dogs")(tmp_path, "train")
    (tmp_path / "train_list.mat").write_text("not a mat file")
    with pytest.raises(ValueError, match=r"train_list\.mat is not a readable \.mat file"):
        DATASETS.get("dogs")(tmp_path, "train")


# --------------------------------------------------------------------------------- Stanford Cars

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


def test_cars(tmp_path):
    make_cars(tmp_path)
    train, test = DATASETS.get("cars")(tmp_path, "train"), DATASETS.get("cars")(tmp_path, "test")
    check_split_pair(train, test, CAR_NAMES, 6, 3)
    assert train.labels == [0, 0, 1, 1, 2, 2] and test.labels == [0, 1, 2]
    assert [Path(p).parent.name for p in test.paths] == ["cars_test"] * 3
    assert train.boxes[0] == (0.0, 1.0, 6.0, 7.0) and test.boxes[2] == (2.0, 1.0, 4.0, 7.0)


def test_cars_given_inner_folder(tmp_path):
    base = make_cars(tmp_path)
    assert len(DATASETS.get("cars")(base, "test")) == 3


def test_cars_missing_file_names_it(tmp_path):
    base = make_cars(tmp_path)
    (base / "cars_test_annos_withlabels.mat").unlink()
    assert len(DATASETS.get("cars")(tmp_path, "train")) == 6
    with pytest.raises(FileNotFoundError, match=r"cars_test_annos_withlabels\.mat.*stanford_cars/\{devkit"):
        DATASETS.get("cars")(tmp_path, "test")
    (base / "devkit" / "cars_meta.mat").unlink()
    with pytest.raises(FileNotFoundError, match=r"cars_meta\.mat"):
        DATASETS.get("cars")(tmp_path, "train")


def test_cars_malformed_mat(tmp_path):
    base = make_cars(tmp_path)
    savemat(base / "devkit" / "cars_train_annos.mat", {"annos": np.zeros(3)})
    with pytest.raises(ValueError, match=r"cars_train_annos\.mat"):
        DATASETS.get("cars")(tmp_path, "train")


def test_cars_download_says_url_is_gone(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"official Stanford Cars URL .* is gone.*kaggle"):
        DATASETS.get("cars")(tmp_path, "train", download=True)


# --------------------------------------------------------------------------------- FGVC-Aircraft

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


@pytest.mark.parametrize("level, col", [("variant", 1), ("family", 2), ("manufacturer", 3)])
def test_aircraft_levels(tmp_path, level, col):
    make_aircraft(tmp_path)
    train = DATASETS.get("aircraft")(tmp_path, "train", level=level)
    test = DATASETS.get("aircraft")(tmp_path, "test", level=level)
    names = sorted({a[col] for a in AIRCRAFT})
    check_split_pair(train, test, names, 8, 4)  # train = official trainval = train + val
    truth = {a[0]: a[col] for a in AIRCRAFT}
    for data in (train, test):
        assert all(data.classes[l] == truth[Path(p).stem[:-1]] for p, l in zip(data.paths, data.labels))
        assert data.boxes == [(2.0, 3.0, 5.0, 5.0)] * len(data)
        assert data.extras["level"] == level
    assert {Path(p).stem[-1] for p in train.paths} == {"a", "b"} and {Path(p).stem[-1] for p in test.paths} == {"c"}


def test_aircraft_annotation_level_alias_and_inner_root(tmp_path):
    inner = make_aircraft(tmp_path)
    data = DATASETS.get("aircraft")(inner, "test", annotation_level="manufacturer")
    assert data.classes == ["Airbus", "Boeing", "McDonnell Douglas"]
    assert open_dataset(tmp_path, "test", dataset="aircraft", level="family").classes == [
        "A300", "Boeing 707", "Boeing 727", "F/A-18"]  # fmt: skip
    with pytest.raises(ValueError, match="level must be one of"):
        DATASETS.get("aircraft")(tmp_path, "test", level="model")
    with pytest.raises(ValueError, match="disagree"):
        DATASETS.get("aircraft")(tmp_path, "test", level="family", annotation_level="manufacturer")


def test_aircraft_missing_and_malformed(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"fgvc-aircraft-2013b.*download=True"):
        DATASETS.get("aircraft")(tmp_path, "train")
    inner = make_aircraft(tmp_path)
    (inner / "data" / "images_family_test.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"images_family_test\.txt"):
        DATASETS.get("aircraft")(tmp_path, "test", level="family")
    write(inner / "data" / "images_variant_test.txt", "0034309c 747-400\n")
    with pytest.raises(ValueError, match=r"images_variant_test\.txt names class '747-400'.*variants\.txt"):
        DATASETS.get("aircraft")(tmp_path, "test")


# ------------------------------------------------------------------------------------ Flowers-102


def make_flowers(root: Path) -> Path:
    base = root / "flowers-102"
    labels = [1, 2, 77, 1, 2, 77, 1, 2, 77, 2]  # image k+1 has labels[k]; 77 is "passion flower"
    for k in range(len(labels)):
        jpg(base / "jpg" / f"image_{k + 1:05d}.jpg", k)
    savemat(base / "imagelabels.mat", {"labels": np.array([labels], dtype=np.uint8)})
    ids = {"trnid": [1, 2, 3], "valid": [4, 5, 6], "tstid": [7, 8, 9, 10]}
    savemat(base / "setid.mat", {k: np.array([v], dtype=np.uint16) for k, v in ids.items()})
    return base


def test_flowers102(tmp_path):
    make_flowers(tmp_path)
    train, test = DATASETS.get("flowers102")(tmp_path, "train"), DATASETS.get("flowers102")(tmp_path, "test")
    assert len(train.classes) == 102 and train.classes[0] == "pink primrose"
    check_split_pair(train, test, train.classes, 6, 4)  # train = official train + val
    assert [Path(p).name for p in train.paths] == [f"image_{k:05d}.jpg" for k in range(1, 7)]
    first = ["pink primrose", "hard-leaved pocket orchid", "passion flower"]
    assert [train.classes[l] for l in train.labels[:3]] == first
    assert test.labels == [0, 1, 76, 1]


def test_flowers102_missing_and_malformed(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"flowers-102.*jpg.*download=True"):
        DATASETS.get("flowers102")(tmp_path, "train")
    base = make_flowers(tmp_path)
    (base / "setid.mat").unlink()
    with pytest.raises(FileNotFoundError, match=r"setid\.mat"):
        DATASETS.get("flowers102")(base, "test")
    savemat(base / "setid.mat", {"trnid": np.array([[1]]), "valid": np.array([[2]]), "tstid": np.array([[11]])})
    with pytest.raises(ValueError, match=r"image ids \[11\]"):
        DATASETS.get("flowers102")(tmp_path, "test")
    savemat(base / "setid.mat", {"trnid": np.array([[1]])})
    with pytest.raises(ValueError, match=r"setid\.mat has no \['valid'\]"):
        DATASETS.get("flowers102")(tmp_path, "train")


# ---------------------------------------------------------------------------- registry and open


def test_every_reader_registered():
    assert {"folder", "csv", "cub", "nabirds", "dogs", "cars", "aircraft", "flowers102"} <= set(DATASETS.names())


@pytest.mark.parametrize("name", ["folder", "cub", "nabirds", "dogs", "cars", "aircraft", "flowers102"])
def test_bad_split_rejected(tmp_path, name):
    with pytest.raises(ValueError, match="split must be one of"):
        DATASETS.get(name)(tmp_path, "validation")


def test_unknown_dataset_suggests_close_name(tmp_path):
    with pytest.raises(ValueError, match=r"unknown dataset 'cubb'.*Did you mean 'cub'"):
        open_dataset(tmp_path, dataset="cubb")


def test_open_dataset_autodetects(tmp_path):
    make_cub(tmp_path / "cub")
    assert open_dataset(tmp_path / "cub", "test").source.startswith("cub:")
    jpg(tmp_path / "flat" / "a" / "0.jpg")
    assert open_dataset(tmp_path / "flat").source.startswith("folder:")
    csv = write(tmp_path / "flat" / "list.csv", "path,label\na/0.jpg,a\n")
    assert open_dataset(csv).source.startswith("csv:")
    make_dogs(tmp_path / "dogs")
    assert open_dataset(tmp_path / "dogs", "test", dataset="dogs").classes[0] == "Chihuahua"


@pytest.mark.parametrize("name,make", [("cub", make_cub), ("nabirds", make_nabirds), ("dogs", make_dogs), ("cars", make_cars),
                                       ("aircraft", make_aircraft), ("flowers102", make_flowers)])
def test_each_benchmark_layout_is_recognised_by_its_own_reader(tmp_path, name, make):
    """The guess is a loop over the readers' own ``detect``: each benchmark as written by its maker, and its outer folder."""
    from finegrain.data.base import guess_reader

    base = make(tmp_path / name)
    for root in {base, tmp_path / name}:
        assert guess_reader(root) == name, root
    assert len(open_dataset(tmp_path / name, "train")) > 0


def test_unrecognised_path_says_so(tmp_path):
    from finegrain.data.base import guess_reader

    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="no reader recognises.*--dataset"):
        guess_reader(tmp_path / "notes.txt")
