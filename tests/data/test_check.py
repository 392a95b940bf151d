"""``check_data``: planted duplicates, leaks, corrupt and odd-sized files; user files untouched."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finegrain.data.check import check_data, dhash, hamming_matrix, phash


def _textured(seed: int, size=(96, 96)) -> Image.Image:
    """A smooth random image (blurred noise) so that resizing keeps its structure, like a photo."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.BICUBIC)


def _tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() + str(p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def planted(tmp_path) -> Path:
    root = tmp_path / "data"
    for split, classes in (("train", {"a": range(0, 5), "b": range(10, 13)}), ("test", {"a": range(20, 22), "b": range(30, 32)})):
        for c, seeds in classes.items():
            d = root / split / c
            d.mkdir(parents=True)
            for s in seeds:
                _textured(s).save(d / f"img{s}.jpg", quality=92)
    # exact duplicate inside train
    (root / "train" / "a" / "copy_of_0.jpg").write_bytes((root / "train" / "a" / "img0.jpg").read_bytes())
    # near duplicate: resized + recompressed copy inside train
    _textured(1).resize((70, 70), Image.BILINEAR).save(root / "train" / "a" / "near_1.jpg", quality=60)
    # leak: a train image reappears (recompressed) in test
    Image.open(root / "train" / "b" / "img10.jpg").save(root / "test" / "b" / "leak_10.jpg", quality=75)
    # corrupt, tiny and extreme-aspect files
    (root / "train" / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    _textured(40, (40, 40)).save(root / "train" / "b" / "tiny.jpg")
    _textured(41, (400, 80)).save(root / "train" / "a" / "wide.jpg")
    return root


def test_perceptual_hashes_are_robust_to_resize_and_recompression():
    a = _textured(1)
    b = _textured(1).resize((70, 70), Image.BILINEAR)
    other = _textured(2)
    for h in (dhash, phash):
        d = hamming_matrix(np.stack([h(a)]), np.stack([h(b), h(other)]))[0]
        assert d[0] <= 4 < d[1], h.__name__
    assert hamming_matrix(np.ones((1, 64), bool), np.zeros((1, 64), bool))[0, 0] == 64


def test_check_finds_planted_problems(planted, tmp_path):
    before = _tree_hashes(planted)
    out = tmp_path / "report"
    clean = tmp_path / "clean.csv"
    r = check_data(planted, out_dir=out, clean_split=clean)
    assert _tree_hashes(planted) == before  # read-only: nothing changed, added or removed

    names = lambda rows: {Path(x["path"]).name for x in rows}  # noqa: E731
    assert names(r["unreadable"]) == {"broken.jpg"}
    assert [names(g) for g in r["exact_duplicates"]] == [{"img0.jpg", "copy_of_0.jpg"}]
    near = {frozenset((Path(p["a"]["path"]).name, Path(p["b"]["path"]).name)) for p in r["near_duplicates"]}
    assert frozenset(("img1.jpg", "near_1.jpg")) in near
    assert frozenset(("img10.jpg", "leak_10.jpg")) in near
    assert [names(g) for g in r["leaks"]] == [{"img10.jpg", "leak_10.jpg"}]
    assert names(r["tiny"]) == {"tiny.jpg"} and names(r["extreme_aspect"]) == {"wide.jpg"}
    assert r["class_counts"]["train"] == {"a": 8, "b": 5} and r["imbalance"]["train"] == pytest.approx(8 / 5)
    assert r["summary"]["label_conflict_groups"] == 0

    report = json.loads((out / "report.json").read_text())
    assert report["summary"] == r["summary"]
    md = (out / "report.md").read_text()
    assert "broken.jpg" in md and "Train/test leaks" in md and "leak_10.jpg" in md

    with open(clean, newline="") as f:
        rows = list(csv.DictReader(f))
    kept = {Path(row["path"]).name for row in rows}
    for gone in ("broken.jpg", "tiny.jpg", "wide.jpg", "leak_10.jpg"):
        assert gone not in kept
    assert "img10.jpg" in kept  # of a leak, the train copy stays
    assert len(kept & {"img0.jpg", "copy_of_0.jpg"}) == 1 and len(kept & {"img1.jpg", "near_1.jpg"}) == 1
    assert len(rows) == r["summary"]["images"] - r["summary"]["flagged_for_removal"]

    # the clean split reads back through the csv reader with the same classes
    from finegrain.data.base import open_dataset

    test = open_dataset(clean, "test")
    assert test.classes == ["a", "b"] and len(test) == 4


def test_data_check_cli(planted, tmp_path):
    from finegrain.cli import main

    before = _tree_hashes(planted)
    out = tmp_path / "cli-report"
    assert main(["data", "check", "--data", str(planted), "--out", str(out), "--write-clean-split", str(tmp_path / "c.csv")]) == 0
    assert (out / "report.md").is_file() and (tmp_path / "c.csv").is_file()
    assert _tree_hashes(planted) == before
    assert main(["data", "check", "--data", str(tmp_path / "missing"), "--out", str(out)]) == 2


def test_folder_without_test_split_and_no_problems(tmp_path):
    root = tmp_path / "only_train"
    for c, s in (("x", 1), ("y", 2)):
        (root / c).mkdir(parents=True)
        _textured(s).save(root / c / "a.png")
        _textured(s + 100).save(root / c / "b.png")
    r = check_data(root)
    s = r["summary"]
    assert s["splits"] == {"train": 4} and s["leak_groups"] == 0 and s["unreadable"] == 0
    assert s["exact_duplicate_groups"] == 0 and s["near_duplicate_pairs"] == 0 and s["flagged_for_removal"] == 0
