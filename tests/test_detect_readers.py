"""Detection readers: COCO, Pascal VOC and CSV on tiny generated files, the format guess, and the real shared sets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finegrain.detect.readers import FORMATS, open_detection, read_coco, read_csv, read_voc

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def jpeg(path: Path, w: int, h: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), (90, 120, 150)).save(path, "JPEG")
    return path


# ----------------------------------------------------------------------------------------- COCO

POLYGON = [[10.0, 20.0, 40.0, 20.0, 40.0, 60.0]]
RLE = {"size": [50, 60], "counts": "0a1b2"}


def coco_dict() -> dict:
    """3 images (c.jpg without annotations); categories listed out of id order; one crowd, one clipped, one empty box."""
    return {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 80},
                   {"id": 2, "file_name": "b.jpg", "width": 60, "height": 50},
                   {"id": 5, "file_name": "c.jpg", "width": 40, "height": 30}],
        "categories": [{"id": 7, "name": "wing"}, {"id": 3, "name": "beak"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 20, 30, 40], "segmentation": POLYGON, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 3, "bbox": [90, 70, 20, 20], "segmentation": POLYGON, "iscrowd": 0},
            {"id": 3, "image_id": 2, "category_id": 3, "bbox": [5, 5, 0, 10], "segmentation": POLYGON, "iscrowd": 0},
            {"id": 4, "image_id": 2, "category_id": 7, "bbox": [0, 0, 60, 50], "segmentation": RLE, "iscrowd": 1},
            {"id": 5, "image_id": 2, "category_id": 3, "bbox": [1, 2, 3, 4], "segmentation": RLE, "iscrowd": 0},
        ],
    }


def make_coco(root: Path, data: dict | None = None, split: str = "train") -> Path:
    """``root/annotations/instances_{split}.json`` with the images in ``root/images/``."""
    for name, (w, h) in {"a.jpg": (100, 80), "b.jpg": (60, 50), "c.jpg": (40, 30)}.items():
        jpeg(root / "images" / name, w, h)
    file = root / "annotations" / f"instances_{split}.json"
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(data or coco_dict()))
    return file


def test_coco_boxes_masks_crowd_and_fixes(tmp_path):
    file = make_coco(tmp_path)
    d = read_coco(file)
    images = tmp_path / "images"
    assert d.paths == [str(images / n) for n in ("a.jpg", "b.jpg", "c.jpg")]
    assert d.classes == ["beak", "wing"]  # category-id order: 3, 7
    np.testing.assert_allclose(d.boxes[0], [[10, 20, 40, 60], [90, 70, 100, 80]])  # the second clipped to 100 x 80
    assert d.labels[0].tolist() == [1, 0]
    np.testing.assert_allclose(d.boxes[1], [[1, 2, 4, 6]])  # zero-area box dropped, crowd left out
    assert d.labels[1].tolist() == [0]
    assert d.boxes[2].shape == (0, 4) and d.labels[2].shape == (0,)  # the negative stays
    assert d.masks == [[POLYGON, POLYGON], [RLE], []]
    assert d.sizes == [(80, 100), (50, 60), (30, 40)]
    assert d.fixes.clipped == 1
    assert d.fixes.dropped == [(str(images / "b.jpg"), (5.0, 5.0, 5.0, 15.0), "zero area")]
    assert "1 crowd" in d.source and str(file) in d.source


def test_coco_without_segmentation_has_no_masks(tmp_path):
    data = coco_dict()
    for a in data["annotations"]:
        a.pop("segmentation")
    d = read_coco(make_coco(tmp_path, data))
    assert d.masks is None and d.num_objects == 3


def test_coco_sizes_come_from_the_json(tmp_path):
    data = coco_dict()
    data["images"][0].update(width=50, height=40)  # the file is 100 x 80; the JSON wins
    d = read_coco(make_coco(tmp_path, data))
    assert d.sizes[0] == (40, 50)
    np.testing.assert_allclose(d.boxes[0], [[10, 20, 40, 40]])  # [90, 70, ...] lies outside 50 x 40: dropped
    assert d.fixes.clipped == 1 and len(d.fixes.dropped) == 2


def test_coco_object_labels(tmp_path):
    d = read_coco(make_coco(tmp_path), labels="object")
    assert d.classes == ["object"]
    assert [l.tolist() for l in d.labels] == [[0, 0], [0], []]
    with pytest.raises(ValueError, match="--labels"):
        read_coco(make_coco(tmp_path), labels="genus")


def test_coco_unknown_category_names_it(tmp_path):
    data = coco_dict()
    data["annotations"].append({"id": 9, "image_id": 1, "category_id": 42, "bbox": [1, 1, 2, 2], "iscrowd": 0})
    file = make_coco(tmp_path, data)
    with pytest.raises(ValueError) as e:
        read_coco(file)
    msg = str(e.value)
    assert str(file) in msg and "annotation 9" in msg and "42" in msg and "3, 7" in msg


def test_coco_unknown_image_and_bad_files(tmp_path):
    data = coco_dict()
    data["annotations"].append({"id": 11, "image_id": 99, "category_id": 3, "bbox": [1, 1, 2, 2]})
    with pytest.raises(ValueError, match="annotation 11 refers to image_id 99"):
        read_coco(make_coco(tmp_path, data))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="is not JSON"):
        read_coco(bad)
    bad.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(ValueError, match="lacks the list.*categories"):
        read_coco(bad)
    bad.write_text(json.dumps({"images": [{"id": 1}], "annotations": [], "categories": []}))
    with pytest.raises(ValueError, match="every entry of 'images' needs id and file_name"):
        read_coco(bad)
    with pytest.raises(FileNotFoundError, match="missing COCO annotation file"):
        read_coco(tmp_path / "nope.json")
    data = coco_dict()
    data["annotations"][0]["bbox"] = [1, 2, 3]
    with pytest.raises(ValueError, match=r"annotation 1 has bbox \[1, 2, 3\]"):
        read_coco(make_coco(tmp_path, data))


def test_coco_image_root(tmp_path, capsys):
    file = make_coco(tmp_path / "a")
    elsewhere = tmp_path / "pictures"
    (tmp_path / "a" / "images").rename(elsewhere)
    with pytest.raises(FileNotFoundError) as e:
        read_coco(file)
    msg = str(e.value)
    assert "none of the 3 images" in msg and str(file.parent) in msg and "--images" in msg and "a.jpg" in msg
    assert read_coco(file, elsewhere).paths[0] == str(elsewhere / "a.jpg")
    flat = tmp_path / "flat"  # the JSON beside its images, no annotations/ folder
    flat.mkdir()
    (flat / "train.json").write_text(json.dumps(coco_dict()))
    for name in ("a.jpg", "b.jpg"):  # c.jpg missing: a warning, not an error
        jpeg(flat / name, 10, 10)
    d = read_coco(flat / "train.json")
    assert d.paths[0] == str(flat / "a.jpg") and len(d) == 3
    assert "1 of 3 image files" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ VOC

def voc_xml(filename: str, w: int, h: int, objects: list[tuple[str, int, int, int, int]]) -> str:
    objs = "".join(f"<object><name>{n}</name><difficult>0</difficult><bndbox><xmin>{a}</xmin><ymin>{b}</ymin>"
                   f"<xmax>{c}</xmax><ymax>{d}</ymax></bndbox></object>" for n, a, b, c, d in objects)
    return f"<annotation><filename>{filename}</filename><size><width>{w}</width><height>{h}</height><depth>3</depth></size>{objs}</annotation>"


def make_voc(root: Path, splits: bool = True) -> Path:
    items = {"000001": (100, 80, [("dog", 11, 21, 50, 60), ("cat", 1, 1, 100, 80)]),  # the second: the whole image
             "000002": (60, 50, []),
             "000003": (40, 30, [("bird", 2, 3, 10, 12)])}
    for i, (w, h, objs) in items.items():
        jpeg(root / "JPEGImages" / f"{i}.jpg", w, h)
        (root / "Annotations").mkdir(parents=True, exist_ok=True)
        (root / "Annotations" / f"{i}.xml").write_text(voc_xml(f"{i}.jpg", w, h, objs))
    if splits:
        (root / "ImageSets" / "Main").mkdir(parents=True)
        (root / "ImageSets" / "Main" / "train.txt").write_text("000001\n000002\n")
        (root / "ImageSets" / "Main" / "test.txt").write_text("000003\n")
    return root


def test_voc_one_based_coordinates(tmp_path):
    root = make_voc(tmp_path / "voc")
    d = read_voc(root, "train")
    assert d.paths == [str(root / "JPEGImages" / "000001.jpg"), str(root / "JPEGImages" / "000002.jpg")]
    assert d.classes == ["cat", "dog"]  # sorted, over the train split only (no "bird")
    # xmin=11 is the 11th column, index 10; xmax=50 is the last column, so the right edge is 50
    np.testing.assert_allclose(d.boxes[0], [[10, 20, 50, 60], [0, 0, 100, 80]])
    assert d.labels[0].tolist() == [1, 0]
    assert d.boxes[1].shape == (0, 4)
    assert d.sizes == [(80, 100), (50, 60)]
    assert d.fixes.clipped == 0 and not d.fixes.dropped  # a whole-image VOC box fits exactly
    test = read_voc(root, "test", labels="object")
    assert test.classes == ["object"] and test.labels[0].tolist() == [0]
    np.testing.assert_allclose(test.boxes[0], [[1, 2, 10, 12]])


def test_voc_split_files_and_bad_xml(tmp_path):
    root = make_voc(tmp_path / "voc", splits=False)
    assert len(read_voc(root, "train")) == 3  # no split file: every annotation
    with pytest.raises(FileNotFoundError, match=r"ImageSets/Main/val\.txt"):
        read_voc(root, "val")
    (root / "Annotations" / "000002.xml").write_text("<annotation><size>")
    with pytest.raises(ValueError, match=r"000002\.xml is not readable XML"):
        read_voc(root)
    (root / "Annotations" / "000002.xml").write_text(voc_xml("000002.jpg", 60, 50, [("dog", 1, 1, "wide", 5)]))
    with pytest.raises(ValueError, match=r"000002\.xml: <xmax> is 'wide'"):
        read_voc(root)
    with pytest.raises(FileNotFoundError, match="Annotations"):
        read_voc(tmp_path / "empty")


# ------------------------------------------------------------------------------------------ CSV

def make_csv(root: Path, rows: list[str], name: str = "boxes.csv") -> Path:
    jpeg(root / "a.jpg", 100, 80)
    jpeg(root / "b.jpg", 60, 50)
    jpeg(root / "sub" / "c.jpg", 40, 30)
    file = root / name
    file.write_text("path,xmin,ymin,xmax,ymax,label\n" + "\n".join(rows) + "\n")
    return file


CSV_ROWS = ["a.jpg,10,20,40,60,wing", "b.jpg,,,,,", "a.jpg,0,0,5,5,beak", "sub/c.jpg,1.5,2,120,9,wing"]


def test_csv_rows_images_and_classes(tmp_path):
    d = read_csv(make_csv(tmp_path, CSV_ROWS))
    assert d.paths == [str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg"), str(tmp_path / "sub" / "c.jpg")]
    assert d.classes == ["beak", "wing"]
    np.testing.assert_allclose(d.boxes[0], [[10, 20, 40, 60], [0, 0, 5, 5]])
    assert d.labels[0].tolist() == [1, 0]
    assert d.boxes[1].shape == (0, 4)  # the empty row: an image without objects
    np.testing.assert_allclose(d.boxes[2], [[1.5, 2, 40, 9]])  # clipped to the 40 px wide file (size read from it)
    assert d.sizes[2] == (30, 40) and d.fixes.clipped == 1
    obj = read_csv(make_csv(tmp_path, CSV_ROWS), labels="object")
    assert obj.classes == ["object"] and [l.tolist() for l in obj.labels] == [[0, 0], [], [0]]


def test_csv_errors(tmp_path):
    with pytest.raises(ValueError, match=r"boxes\.csv:3: xmin='x' is not a number"):
        read_csv(make_csv(tmp_path, ["a.jpg,1,1,5,5,wing", "b.jpg,x,1,5,5,wing"]))
    with pytest.raises(ValueError, match=r"boxes\.csv:2: a box without a label"):
        read_csv(make_csv(tmp_path, ["a.jpg,1,1,5,5,"]))
    with pytest.raises(ValueError, match=r"boxes\.csv:2: .*all four"):
        read_csv(make_csv(tmp_path, ["a.jpg,1,1,,5,wing"]))
    bad = tmp_path / "cols.csv"
    bad.write_text("path,x,y,w,h,label\na.jpg,1,1,5,5,wing\n")
    with pytest.raises(ValueError, match="missing column.*xmin, ymin, xmax, ymax.*path,xmin,ymin,xmax,ymax,label"):
        read_csv(bad)
    lost = tmp_path / "lost" / "lost.csv"
    lost.parent.mkdir()
    lost.write_text("path,xmin,ymin,xmax,ymax,label\nnowhere.jpg,1,1,5,5,wing\n")
    with pytest.raises(FileNotFoundError, match="none of the 1 images.*relative to the CSV"):
        read_csv(lost)


# ----------------------------------------------------------------------------------- dispatcher

def test_open_detection_guesses_the_format(tmp_path):
    from tests.helpers import make_cub_with_parts

    coco = make_coco(tmp_path / "coco", split="test")
    assert open_detection(coco).source.startswith("coco:")
    by_folder = open_detection(tmp_path / "coco", "test")
    assert by_folder.source.startswith("coco:") and by_folder.paths[0] == str(tmp_path / "coco" / "images" / "a.jpg")
    assert open_detection(make_voc(tmp_path / "voc"), "test").source.startswith("voc:")
    csv_file = make_csv(tmp_path / "csv", CSV_ROWS, name="train.csv")
    assert open_detection(csv_file).source.startswith("csv:")
    assert open_detection(tmp_path / "csv").source == open_detection(csv_file, fmt="csv").source
    cub = make_cub_with_parts(tmp_path / "cub", n_train=2, n_test=1, parts=False)
    d = open_detection(cub)
    assert d.source.startswith("cub:") and len(d) == 6 and d.num_objects == 6 and len(d.classes) == 3
    first = (cub / "CUB_200_2011" / "bounding_boxes.txt").read_text().split()[1:5]
    x, y, w, h = map(float, first)
    np.testing.assert_allclose(d.boxes[0], [[x, y, x + w, y + h]], atol=1e-4)
    assert FORMATS == ("auto", "coco", "voc", "csv", "benchmark")


def test_open_detection_refuses_bad_options(tmp_path):
    coco = make_coco(tmp_path / "coco")
    moved = tmp_path / "pics"
    (tmp_path / "coco" / "images").rename(moved)
    assert len(open_detection(coco, images=moved)) == 3
    with pytest.raises(ValueError, match="Did you mean 'coco'"):
        open_detection(coco, fmt="cocoo")
    with pytest.raises(ValueError, match="--images sets the image folder of COCO"):
        open_detection(make_voc(tmp_path / "voc"), images=moved)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_detection(tmp_path / "missing")
    with pytest.raises(ValueError, match="COCO .json or a .csv"):
        open_detection(moved / "a.jpg")


# ------------------------------------------------------------------------------ real shared data

def _coco_expectations(file: Path):
    raw = json.loads(file.read_text())
    per_image = {im["id"]: 0 for im in raw["images"]}
    for a in raw["annotations"]:
        per_image[a["image_id"]] += not a.get("iscrowd")
    names = [c["name"] for c in sorted(raw["categories"], key=lambda c: c["id"])]
    return raw, [per_image[im["id"]] for im in raw["images"]], names


@pytest.mark.parametrize("name, n_train, n_classes", [("carparts", 400, 18), ("pets37", 259, 37)])
def test_real_coco_sets(name, n_train, n_classes):
    root = SHARED / name
    if not root.is_dir():
        pytest.skip(f"{root} is not here")
    file = root / "annotations" / "instances_train.json"
    raw, counts, names = _coco_expectations(file)
    d = open_detection(root, "train")
    assert len(d) == len(raw["images"]) == n_train and d.classes == names and len(names) == n_classes
    assert [len(b) + sum(p == path for p, _, _ in d.fixes.dropped) for b, path in zip(d.boxes, d.paths)] == counts
    assert d.masks is not None and all(len(m) == len(b) for m, b in zip(d.masks, d.boxes))
    assert all(Path(p).is_file() for p in d.paths)
    ids = {c["id"]: i for i, c in enumerate(sorted(raw["categories"], key=lambda c: c["id"]))}
    first = next(a for a in raw["annotations"] if a["image_id"] == raw["images"][0]["id"])
    x, y, w, h = first["bbox"]
    im = raw["images"][0]
    expected = np.clip([x, y, x + w, y + h], 0, [im["width"], im["height"]] * 2)
    np.testing.assert_allclose(d.boxes[0][0], expected, rtol=1e-5)
    assert d.labels[0][0] == ids[first["category_id"]] and d.masks[0][0] == first["segmentation"]
    obj = open_detection(root, "train", labels="object")
    assert obj.classes == ["object"] and obj.num_objects == d.num_objects


def test_real_cub27_boxes():
    root = SHARED / "cub27"
    if not root.is_dir():
        pytest.skip(f"{root} is not here")
    base = root / "CUB_200_2011"
    files = dict(line.split() for line in (base / "images.txt").read_text().splitlines() if line.strip())
    boxes = {i: list(map(float, rest)) for i, *rest in (line.split() for line in (base / "bounding_boxes.txt").read_text().splitlines())}
    by_path = {str(base / "images" / rel): boxes[i] for i, rel in files.items()}
    d = open_detection(root, "train", labels="species")
    assert len(d) == 810 and len(d.classes) == 27 and [len(b) for b in d.boxes] == [1] * 810
    for path, box, size in zip(d.paths, d.boxes, d.sizes):
        with Image.open(path) as im:
            W, H = im.size
        assert size == (H, W)
        x, y, w, h = by_path[str(Path(path))]
        np.testing.assert_allclose(box[0], np.clip([x, y, x + w, y + h], 0, [W, H, W, H]), rtol=1e-5, atol=1e-3)
    obj = open_detection(root, "train", labels="object")
    assert obj.classes == ["object"] and len(obj) == 810 and all(l.tolist() == [0] for l in obj.labels)
    np.testing.assert_allclose(np.concatenate(obj.boxes), np.concatenate(d.boxes))
