"""Every benchmark reader on a tiny fixture in its own official on-disk layout (CPU, no network)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torchvision.datasets  # noqa: F401  (torch's import costs seconds: pay it at collection, not in a test)
from scipy.io import savemat

import finegrain.data.benchmarks  # noqa: F401  (registers the benchmark readers)
from finegrain.data.base import DATASETS, open_dataset

from ..helpers import (
    AIRCRAFT,
    CAR_NAMES,
    NAB_LEAVES,
    cellstr,
    check_split_pair,
    make_aircraft,
    make_cars,
    make_cub,
    make_dogs,
    make_flowers,
    make_nabirds,
    write,
)

CUB50 = Path("/work/shared/data/cub50")


# ---------------------------------------------------------------------------------------------- CUB


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


# ------------------------------------------------------------------------------------------ NABirds


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


# ------------------------------------------------------------------------------------ Stanford Dogs


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


# ------------------------------------------------------------------------------------ Stanford Cars


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


# ------------------------------------------------------------------------------------ FGVC-Aircraft


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


# -------------------------------------------------------------------------------------- Flowers-102


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
