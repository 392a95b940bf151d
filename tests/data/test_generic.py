"""The folder and CSV readers on tiny fixtures (CPU, no network)."""

from __future__ import annotations

from pathlib import Path

import pytest

from finegrain.data.base import DATASETS

from ..helpers import check_split_pair, jpg, write

# ------------------------------------------------------------------------------------------- folder


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


# ---------------------------------------------------------------------------------------------- csv


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
