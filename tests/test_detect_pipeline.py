"""Detect, then classify: crops are the boxes with their margin, each object's answer is the classifier's on its
crop, the CLI's JSON/CSV/table, the served ``POST /detect``, and the refusals."""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finegrain.detect.pipeline import DetectThenClassify, add_classify_command, crop_box
from finegrain.predict import Predictor

from .helpers import task_checkpoint

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DETECTOR_CLASSES = ["bird", "car"]
CLASSES = ["red", "green", "blue", "grey"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dtc")
    det = task_checkpoint(tmp / "det.safetensors", "detection", DETECTOR_CLASSES)
    cls = task_checkpoint(tmp / "cls.safetensors", "supervised", CLASSES, size=32)
    return det, cls


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """Two CUB photos from the shared cub27 set when it is there, else two noisy synthetic PNGs (alone in a folder)."""
    import shutil

    folder = tmp_path_factory.mktemp("imgs")
    root = SHARED / "cub27" / "CUB_200_2011" / "images"
    found = sorted(root.rglob("*.jpg"))[:2] if root.is_dir() else []
    if len(found) == 2:
        return [Path(shutil.copy(f, folder / f.name)) for f in found]
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate(((160, 120), (97, 131))):
        arr = rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)
        p = folder / f"img{i}.png"
        Image.fromarray(arr).resize((w, h), Image.BICUBIC).save(p)
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def reference(ckpts):
    """A classifier loaded on its own, to compare each object's answer against."""
    return Predictor.from_checkpoint(ckpts[1], device="cpu")


def hand_crop(image: Image.Image, box, margin: float) -> Image.Image:
    """The box enlarged by ``margin`` of its size on each side, clipped to the image, rounded outward (numpy slicing)."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    left, top = max(0, math.floor(x0 - margin * w)), max(0, math.floor(y0 - margin * h))
    right, bottom = min(image.width, math.ceil(x1 + margin * w)), min(image.height, math.ceil(y1 + margin * h))
    return Image.fromarray(np.asarray(image)[top:bottom, left:right])


def test_crop_box_by_hand():
    assert crop_box([10, 20, 30, 60], 0.1, 100, 100) == (8, 16, 32, 64)
    assert crop_box([10.5, 3.2, 20.1, 8.9], 0.2, 100, 100) == (8, 2, 23, 11)  # 10.5 - 1.92, 20.1 + 1.92; 3.2 - 1.14, 8.9 + 1.14
    assert crop_box([0, 0, 50, 50], 0.5, 60, 40) == (0, 0, 60, 40)  # clipped to the image
    assert crop_box([10, 10, 20, 20], 0.0, 100, 100) == (10, 10, 20, 20)
    assert crop_box([5, 5, 5, 5], 0.3, 100, 100) == (5, 5, 6, 6)  # an empty box still gives a pixel
    assert crop_box([100, 100, 100, 100], 0.1, 100, 100) == (99, 99, 100, 100)


@pytest.mark.parametrize("margin", [0.0, 0.25])
def test_crops_are_the_boxes_with_margin_and_answers_are_the_classifiers(ckpts, images, reference, margin, tmp_path):
    from torchvision.transforms.functional import to_tensor

    from finegrain.detect.evaluate import load_detector

    p = DetectThenClassify.from_checkpoints(*ckpts, device="cpu", margin=margin, score_threshold=0.0, max_objects=4)
    seen: list[list[Image.Image]] = []
    predict = p.classifier.predict
    p.classifier.predict = lambda crops, topk: seen.append(list(crops)) or predict(crops, topk=topk)
    results = p.predict(images, topk=3)
    assert len(seen) == len(images)  # one classifier call per image, all its crops together

    task, _ = load_detector(ckpts[0], "cpu")
    for path, result, crops in zip(images, results, seen):
        image = Image.open(path).convert("RGB")
        assert result["image"] == str(path) and (result["width"], result["height"]) == image.size
        # the detector's own top 4 boxes, run independently
        (out,) = task.predict([to_tensor(image)])
        order = out["scores"].argsort(descending=True)[:4]
        assert len(result["objects"]) == len(crops) == len(order) == 4
        for obj, crop, j in zip(result["objects"], crops, order.tolist()):
            assert obj["box"] == pytest.approx(out["boxes"][j].tolist(), abs=0.006)
            assert obj["score"] == pytest.approx(float(out["scores"][j]), abs=1e-6)
            assert obj["detector_label"] == DETECTOR_CLASSES[int(out["labels"][j])]
            expected = hand_crop(image, obj["box"], margin)
            assert np.array_equal(np.asarray(crop), np.asarray(expected)), (crop.size, expected.size, obj["box"])
            assert list(obj["crop"]) == [*crop_box(obj["box"], margin, *image.size)]
            saved = tmp_path / "crop.png"  # lossless: the file's pixels are the crop's
            expected.save(saved)
            for ref in (reference.predict([expected], topk=3)[0], reference.predict([saved], topk=3)[0]):
                assert [t["class"] for t in obj["topk"]] == [t["class"] for t in ref["topk"]]
                assert [t["prob"] for t in obj["topk"]] == pytest.approx([t["score"] for t in ref["topk"]], abs=1e-5)
            assert (obj["class"], obj["prob"]) == (obj["topk"][0]["class"], obj["topk"][0]["prob"])
        scores = [o["score"] for o in result["objects"]]
        assert scores == sorted(scores, reverse=True)


def test_threshold_max_objects_pil_input_and_exif_orientation(ckpts, images):
    p = DetectThenClassify.from_checkpoints(*ckpts, device="cpu", score_threshold=0.0, max_objects=100)
    image = Image.open(images[0]).convert("RGB")
    (everything,) = p.predict([image], topk=2)
    assert everything["image"] == 0 and len(everything["objects"]) > 3
    scores = sorted(o["score"] for o in everything["objects"])
    # halfway between two scores well apart, so that the 6-digit rounding of the answers cannot decide
    k = next(i for i in range(len(scores) // 2, len(scores) - 1) if scores[i + 1] - scores[i] > 1e-4)
    middle = (scores[k] + scores[k + 1]) / 2
    p.score_threshold = middle
    (kept,) = p.predict([image], topk=2)
    assert kept["objects"] and all(o["score"] >= middle for o in kept["objects"])
    assert len(kept["objects"]) == sum(o["score"] >= middle for o in everything["objects"])
    p.score_threshold, p.max_objects = 0.0, 2
    assert len(p.predict([image], topk=2)[0]["objects"]) == 2

    small = image.resize((60, 40))
    exif = small.getexif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    buf = io.BytesIO()
    small.save(buf, "JPEG", exif=exif.tobytes())
    (r,) = p.predict([Image.open(io.BytesIO(buf.getvalue()))], topk=1)
    assert (r["width"], r["height"]) == (40, 60)
    assert all(o["box"][2] <= 40 and o["box"][3] <= 60 for o in r["objects"])


def test_tiled_detection_is_predict_tiled(ckpts, images):
    from finegrain.detect.evaluate import load_detector
    from finegrain.detect.tiling import predict_tiled

    image = Image.open(images[0]).convert("RGB")
    tile = max(image.size) // 2 + 16  # two windows along the longer side
    p = DetectThenClassify.from_checkpoints(*ckpts, device="cpu", score_threshold=0.3, max_objects=5, tile=tile, tile_overlap=16)
    (r,) = p.predict([images[0]], topk=1)
    task, _ = load_detector(ckpts[0], "cpu")
    ref = predict_tiled(task.predict, image, tile=tile, overlap=16, score_threshold=0.3)
    assert ref["tiles"] > 1
    assert len(r["objects"]) == min(5, len(ref["boxes"])) > 0
    for obj, box, score in zip(r["objects"], ref["boxes"], ref["scores"]):
        assert obj["box"] == pytest.approx(box.tolist(), abs=0.006) and obj["score"] == pytest.approx(float(score), abs=1e-6)
    whole = DetectThenClassify.from_checkpoints(*ckpts, device="cpu", score_threshold=0.3, max_objects=5).predict([image], topk=1)
    assert [o["box"] for o in whole[0]["objects"]] != [o["box"] for o in r["objects"]]  # tiling did change the detection


def test_no_detection_gives_an_empty_list_and_the_classifier_is_not_called(ckpts, images):
    p = DetectThenClassify.from_checkpoints(*ckpts, device="cpu", score_threshold=1.0)
    p.classifier.predict = lambda *a, **k: pytest.fail("nothing to classify")
    results = p.predict(images, topk=2)
    assert [r["objects"] for r in results] == [[], []]
    assert [(r["width"], r["height"]) for r in results] == [Image.open(i).size for i in images]


def test_refusals_name_what_is_supported(ckpts, tmp_path):
    det, cls = ckpts
    with pytest.raises(ValueError, match="not a detector") as e:
        DetectThenClassify.from_checkpoints(cls, det, device="cpu")
    assert "Supported tasks: detection" in str(e.value) and "swapped" in str(e.value)
    with pytest.raises(ValueError, match="not a classifier") as e:
        DetectThenClassify.from_checkpoints(det, det, device="cpu")
    assert "Supported tasks:" in str(e.value) and "supervised" in str(e.value)
    fewshot = task_checkpoint(tmp_path / "proto.safetensors", "protonet", CLASSES)
    with pytest.raises(ValueError, match="not a classifier.*Supported tasks:"):
        DetectThenClassify.from_checkpoints(det, fewshot, device="cpu")
    p = DetectThenClassify.from_checkpoints(det, cls, device="cpu")
    with pytest.raises(ValueError, match="Supported tasks: detection"):
        DetectThenClassify(p.classifier.task, DETECTOR_CLASSES, p.classifier)
    with pytest.raises(TypeError, match="Predictor"):
        DetectThenClassify(p.detector, DETECTOR_CLASSES, cls)
    for bad, words in (({"margin": -0.1}, "--margin"), ({"score_threshold": 1.5}, "--score-threshold"),
                       ({"max_objects": 0}, "--max-objects"), ({"tile": 64, "tile_overlap": 64}, "--tile-overlap")):
        with pytest.raises(ValueError, match=words):
            DetectThenClassify(p.detector, DETECTOR_CLASSES, p.classifier, **bad)
    with pytest.raises(ValueError, match="--topk"):
        p.predict([Image.new("RGB", (8, 8))], topk=0)
    (r,) = p.predict([tmp_path / "missing.jpg"], topk=1)
    assert "error" in r and r["image"] == str(tmp_path / "missing.jpg")


# ----------------------------------------------------------------------------- the CLI


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    parser = argparse.ArgumentParser(prog="finegrain detect")
    add_classify_command(parser.add_subparsers(dest="detect_command", required=True))
    args = parser.parse_args(argv)
    code = args.func(args)
    return code, capsys.readouterr().out


def test_cli_json_csv_and_table_agree_with_the_api(ckpts, images, capsys):
    det, cls = ckpts
    folder = str(images[0].parent)  # a folder is expanded to its images
    flags = ["--score-threshold", "0.0", "--margin", "0.2", "--topk", "2", "--max-objects", "5", "--device", "cpu"]
    expected = DetectThenClassify.from_checkpoints(det, cls, device="cpu", margin=0.2, score_threshold=0.0, max_objects=5).predict(
        [str(p) for p in images], topk=2)

    code, out = run_cli(["classify", str(det), str(cls), *map(str, images), *flags, "--format", "json"], capsys)
    assert code == 0 and json.loads(out) == expected
    code, out = run_cli(["classify", str(det), str(cls), folder, *flags, "--format", "json"], capsys)
    by_path = {r["image"]: r for r in json.loads(out)}
    assert all(by_path[str(p)] == e for p, e in zip(images, expected))

    code, out = run_cli(["classify", str(det), str(cls), *map(str, images), *flags, "--format", "csv"], capsys)
    rows = list(csv.DictReader(io.StringIO(out)))
    objects = [(r, o) for r in expected for o in r["objects"]]
    assert code == 0 and len(rows) == len(objects) > 0  # one row per object
    for row, (r, o) in zip(rows, objects):
        assert row["image"] == r["image"] and int(row["width"]) == r["width"]
        assert [float(row[k]) for k in ("x0", "y0", "x1", "y1")] == pytest.approx(o["box"])
        assert float(row["score"]) == pytest.approx(o["score"]) and row["detector_label"] == o["detector_label"]
        assert row["class"] == o["class"] and float(row["prob"]) == pytest.approx(o["prob"])
        assert row["topk"] == "; ".join(f"{t['class']}={t['prob']}" for t in o["topk"])

    code, out = run_cli(["classify", str(det), str(cls), str(images[0]), *flags, "--format", "table"], capsys)
    first = expected[0]["objects"][0]
    assert code == 0 and images[0].name in out and f"{first['class']} {first['prob']:.3f}" in out
    assert f"{first['detector_label']} {first['score']:.3f}" in out


def test_cli_without_detections_says_so(ckpts, images, capsys):
    det, cls = ckpts
    base = ["classify", str(det), str(cls), str(images[0]), "--score-threshold", "1.0", "--device", "cpu"]
    code, out = run_cli([*base, "--format", "table"], capsys)
    assert code == 0 and "no objects detected (score >= 1)" in out
    code, out = run_cli([*base, "--format", "json"], capsys)
    assert json.loads(out)[0]["objects"] == []
    code, out = run_cli([*base, "--format", "csv"], capsys)
    (row,) = list(csv.DictReader(io.StringIO(out)))
    assert row["image"] == str(images[0]) and row["object"] == "" and row["class"] == ""


def test_cli_refuses_swapped_checkpoints_and_missing_images(ckpts, tmp_path, capsys):
    det, cls = ckpts
    with pytest.raises(ValueError, match="swapped"):
        run_cli(["classify", str(cls), str(det), str(tmp_path), "--device", "cpu"], capsys)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        run_cli(["classify", str(det), str(cls), str(tmp_path / "empty"), "--device", "cpu"], capsys)


def test_finegrain_main_runs_detect_classify_once_wired(ckpts, images, capsys):
    from finegrain.cli import build_parser, main

    detect = next(a for a in build_parser()._subparsers._group_actions[0].choices["detect"]._actions
                  if isinstance(a, argparse._SubParsersAction))
    if "classify" not in detect.choices:
        pytest.skip("`finegrain detect classify` is not wired into finegrain.detect.cli yet (add_classify_command)")
    det, cls = ckpts
    assert main(["detect", "classify", str(det), str(cls), str(images[0]), "--format", "json", "--device", "cpu"]) == 0
    assert "objects" in json.loads(capsys.readouterr().out)[0]


# ----------------------------------------------------------------------------- the served page


@pytest.fixture(scope="module")
def client(ckpts):
    pytest.importorskip("fastapi")
    pytest.importorskip("multipart")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from finegrain.serve import create_app

    app = create_app(Predictor.from_checkpoint(ckpts[1], device="cpu"), topk=3, detector=ckpts[0], device="cpu",
                     detect_options={"score_threshold": 0.0, "max_objects": 3, "margin": 0.15})
    with TestClient(app) as c:
        yield c


def test_detect_route_answers_what_the_api_answers(client, ckpts, images):
    data = images[0].read_bytes()
    r = client.post("/detect", files={"file": (images[0].name, data, "image/jpeg")})
    assert r.status_code == 200, r.text
    j = r.json()
    ref = DetectThenClassify.from_checkpoints(*ckpts, device="cpu", score_threshold=0.0, max_objects=3, margin=0.15)
    (expected,) = ref.predict([Image.open(io.BytesIO(data))], topk=3)
    assert (j["width"], j["height"]) == (expected["width"], expected["height"]) == Image.open(images[0]).size
    assert len(j["objects"]) == 3
    for got, want in zip(j["objects"], expected["objects"]):
        assert got["box"] == pytest.approx(want["box"]) and got["detector_label"] == want["detector_label"]
        assert [t["class"] for t in got["topk"]] == [t["class"] for t in want["topk"]]
        assert [t["prob"] for t in got["topk"]] == pytest.approx([t["prob"] for t in want["topk"]], abs=1e-5)
    raw = client.post("/detect?topk=1", content=data, headers={"content-type": "image/jpeg"}).json()
    assert [len(o["topk"]) for o in raw["objects"]] == [1, 1, 1]
    assert client.post("/detect?topk=9", content=data, headers={"content-type": "image/jpeg"}).status_code == 422
    bad = client.post("/detect", files={"file": ("a.jpg", b"nope", "image/jpeg")})
    assert bad.status_code == 422 and "not a readable image" in bad.json()["detail"]
    assert client.post("/predict", files={"file": ("a.jpg", data, "image/jpeg")}).status_code == 200  # the classifier routes stay


def test_health_and_page_show_the_detector(client):
    h = client.get("/health").json()
    assert h["detector"] == {"classes": DETECTOR_CLASSES, "score_threshold": 0.0, "margin": 0.15, "max_objects": 3, "tile": None}
    page = client.get("/").text
    assert 'post("detect"' in page and 'id="boxes"' in page and "drawBoxes" in page and 'post("predict"' in page


def test_without_a_detector_there_is_no_detect_route(ckpts):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from finegrain.serve import create_app

    with TestClient(create_app(ckpts[1], device="cpu")) as c:
        assert c.get("/health").json()["detector"] is None
        assert c.post("/detect", content=b"x", headers={"content-type": "image/jpeg"}).status_code in (404, 405)
    with pytest.raises(ValueError, match="not a detector"):
        create_app(ckpts[1], device="cpu", detector=ckpts[1])


def test_serve_cli_passes_the_detector_flags(ckpts, monkeypatch):
    pytest.importorskip("fastapi")
    import uvicorn
    from fastapi.testclient import TestClient

    from finegrain.cli import main

    calls = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.update(app=app, **kw))
    det, cls = ckpts
    assert main(["serve", str(cls), "--detector", str(det), "--score-threshold", "0.2", "--margin", "0.3", "--max-objects", "7",
                 "--tile", "256", "--tile-overlap", "32", "--device", "cpu"]) == 0
    with TestClient(calls["app"]) as c:
        assert c.get("/health").json()["detector"] == {"classes": DETECTOR_CLASSES, "score_threshold": 0.2, "margin": 0.3,
                                                       "max_objects": 7, "tile": 256}
