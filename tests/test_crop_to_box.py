"""Box crops: the crop itself (pixels, margin, borders), training on crops (``--crop box``) and
evaluating on ground-truth or detected crops (``finegrain eval --crop gt|detected|none``)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

import finegrain.data.dataset as dataset_mod
from finegrain.checkpoint import read_meta
from finegrain.config import DataConfig
from finegrain.data.base import ImageList, open_dataset
from finegrain.data.crop import box_crops, crop_rect, crop_to_box, detected_boxes
from finegrain.data.dataset import ImageDataset

from .helpers import make_cub_with_parts, task_checkpoint

GRID = np.arange(200, dtype=np.uint8).reshape(10, 20)  # height 10, width 20: every pixel its own value


def _grid() -> Image.Image:
    return Image.fromarray(GRID).convert("RGB")


def _crop(box, margin) -> np.ndarray:
    return np.asarray(crop_to_box(_grid(), box, margin))[..., 0]


# ------------------------------------------------------------------------------------ the crop


def test_crop_to_box_is_the_box_enlarged_by_the_margin():
    # box x 4..10, y 2..6; margin 0.5 of (6, 4) per side: x 1..13, y 0..8
    np.testing.assert_array_equal(_crop((4, 2, 6, 4), 0.5), GRID[0:8, 1:13])
    np.testing.assert_array_equal(_crop((4, 2, 6, 4), 0.0), GRID[2:6, 4:10])
    # fractional edges widen to whole pixels: x 2.5..5.5 -> 2..6, y 1.2..4.2 -> 1..5
    np.testing.assert_array_equal(_crop((2.5, 1.2, 3, 3), 0.0), GRID[1:5, 2:6])


def test_the_margin_is_clipped_at_the_image_borders():
    # right/bottom: x 12.5..22.5 -> 12..20, y 4..12 -> 4..10
    np.testing.assert_array_equal(_crop((15, 6, 5, 4), 0.5), GRID[4:10, 12:20])
    # left/top: x -4..8 -> 0..8, y -4..8 -> 0..8
    np.testing.assert_array_equal(_crop((0, 0, 4, 4), 1.0), GRID[0:8, 0:8])
    assert crop_rect((-30, -30, 5, 5), 0.0, (20, 10)) is None  # wholly outside: nothing to crop


@pytest.mark.parametrize("box", [None, (3, 3, 0, 5), (3, 3, 5, -1)])
def test_no_usable_box_keeps_the_whole_image(box):
    np.testing.assert_array_equal(_crop(box, 0.1), GRID)


def _framed(tmp_path) -> ImageList:
    """A black 40 x 40 image whose box (10, 10, 20, 20) is white, and a grey one without a box."""
    arr = np.zeros((40, 40, 3), np.uint8)
    arr[10:30, 10:30] = 255
    Image.fromarray(arr).save(tmp_path / "a.png")
    Image.new("RGB", (16, 12), (90, 90, 90)).save(tmp_path / "b.png")
    return ImageList([str(tmp_path / "a.png"), str(tmp_path / "b.png")], [0, 1], ["a", "b"], boxes=[(10, 10, 20, 20), None])


def test_the_dataset_reads_the_box_crop_before_the_transform(tmp_path, capsys):
    images = _framed(tmp_path)
    t = v2.Compose([v2.ToImage()])
    whole = ImageDataset(images, t)[0]["image"]
    marked = box_crops(images, 0.0)
    assert "1 of 2 images have no box" in capsys.readouterr().err
    crop = ImageDataset(marked, t)[0]["image"]
    assert whole.shape == (3, 40, 40) and crop.shape == (3, 20, 20) and bool((crop == 255).all())
    assert ImageDataset(marked, t)[1]["image"].shape == (3, 12, 16)  # no box: whole
    assert ImageDataset(marked.subset([0]), t)[0]["image"].shape == (3, 20, 20)  # the mark survives subset / relabel
    assert ImageDataset(marked.relabel(["b", "a", "c"]), t)[0]["image"].shape == (3, 20, 20)


def test_box_annotations_move_with_the_crop(tmp_path):
    # margin 0.5 of 20 px: crop 0..40 (clipped) around box 10..30; margin 0.25: crop 5..35, box 5..25 of 30
    images = _framed(tmp_path)
    t = v2.Compose([v2.ToImage()])
    item = ImageDataset(box_crops(images, 0.25), t, annotations=("boxes",))[0]
    assert item["image"].shape == (3, 30, 30)
    torch.testing.assert_close(item["box"], torch.tensor([5 / 30, 5 / 30, 25 / 30, 25 / 30]))


def test_data_without_boxes_is_refused_naming_the_box_file(tmp_path):
    make_cub_with_parts(tmp_path / "cub", boxes=False)
    images = open_dataset(tmp_path / "cub", "train")
    with pytest.raises(FileNotFoundError, match="bounding_boxes.txt"):
        box_crops(images)
    with pytest.raises(FileNotFoundError, match="reads no boxes"):
        box_crops(ImageList(["a.jpg"], [0], ["a"], source="folder:/x"))
    with pytest.raises(ValueError, match="--crop-margin"):
        box_crops(_framed(tmp_path), -0.1)


@pytest.mark.parametrize(("kw", "flag"), [({"cache": True}, "drop --cache"), ({"pipeline": "device"}, "drop --pipeline device"),
                                          ({"crop": "boxes"}, "--crop must be"), ({"crop_margin": -1.0}, "--crop-margin")])
def test_conflicting_options_are_refused(kw, flag):
    with pytest.raises(ValueError, match=flag):
        DataConfig(data="x", **{"crop": "box", **kw}).check()
    DataConfig(data="x", crop="none", cache=True).check()  # no crop, nothing refused


# ----------------------------------------------------------------------------- training on crops


def _spy_crops(monkeypatch) -> list:
    """Record ``(box, margin, image size, rect)`` of every crop the datasets compute."""
    calls, real = [], dataset_mod.crop_rect

    def spy(box, margin, size):
        rect = real(box, margin, size)
        calls.append((box, margin, size, rect))
        return rect

    monkeypatch.setattr(dataset_mod, "crop_rect", spy)
    return calls


def _train(data, out, *extra) -> int:
    from finegrain.cli import main

    return main(["train", "--data", str(data), "--backbone", "test_resnet", "--pretrained", "none", "--img-size", "64",
                 "--epochs", "1", "--workers", "0", "--device", "cpu", "--batch-size", "4", "--out", str(out), "--name", "run",
                 *extra])


@pytest.fixture(scope="module")
def box_run(tmp_path_factory):
    """A 1-epoch run with ``--crop box --crop-margin 0.2`` on a tiny CUB set (one training image without a box), and the spy's calls."""
    tmp = tmp_path_factory.mktemp("crop")
    data = make_cub_with_parts(tmp / "cub", n_train=4, n_test=2, size=48)
    boxes_file = data / "CUB_200_2011" / "bounding_boxes.txt"
    boxes_file.write_text("".join(line + "\n" for line in boxes_file.read_text().splitlines()[1:]))  # image 1 (train) has none
    mp = pytest.MonkeyPatch()
    calls = _spy_crops(mp)
    try:
        rc = _train(data, tmp / "runs", "--crop", "box", "--crop-margin", "0.2")
    finally:
        mp.undo()
    assert rc == 0
    return tmp / "runs" / "run", data, calls


def test_training_with_crop_box_feeds_the_box_crops(box_run):
    run, data, calls = box_run
    train = open_dataset(data, "train")
    assert calls and {margin for _, margin, _, _ in calls} == {0.2}
    assert {box for box, *_ in calls} == set(train.boxes)  # every training image, through its own box (or none)
    for box, _, size, rect in calls:
        assert size == (48, 48)
        if box is None:
            assert rect is None
        else:
            x, y, w, h = box
            assert rect == (max(0, math.floor(x - 0.2 * w)), max(0, math.floor(y - 0.2 * h)),
                            min(48, math.ceil(x + 1.2 * w)), min(48, math.ceil(y + 1.2 * h)))


def test_the_checkpoint_records_the_crop(box_run):
    run, _, _ = box_run
    meta = read_meta(run / "best.safetensors")
    assert meta.preprocessing["crop"] == "box" and meta.preprocessing["crop_margin"] == pytest.approx(0.2)
    assert meta.config["data"]["crop"] == "box"


def test_crop_box_on_data_without_boxes_is_refused_by_the_cli(tmp_path, capsys):
    data = make_cub_with_parts(tmp_path / "cub", boxes=False)
    assert _train(data, tmp_path / "runs", "--crop", "box") == 2
    assert "bounding_boxes.txt" in capsys.readouterr().err
    assert not list((tmp_path / "runs").rglob("*.safetensors"))


def test_crop_box_with_cache_is_refused_by_the_cli(tmp_path, capsys):
    data = make_cub_with_parts(tmp_path / "cub")
    assert _train(data, tmp_path / "runs", "--crop", "box", "--cache") == 2
    assert "drop --cache" in capsys.readouterr().err


# --------------------------------------------------------------------------- evaluation on crops


def _eval_inputs(monkeypatch):
    """Record the image batches evaluation classifies."""
    import finegrain.eval.evaluate as ev

    seen, real = [], ev.predict_loader

    def spy(fn, loader, **kw):
        batches = list(loader)
        seen.append(torch.cat([b["image"] for b in batches]))
        return real(fn, batches, **kw)

    monkeypatch.setattr(ev, "predict_loader", spy)
    return seen


def test_eval_defaults_to_the_training_crop_and_gt_differs_from_none(box_run, tmp_path, monkeypatch):
    from finegrain.eval.evaluate import evaluate

    run, data, _ = box_run
    seen, calls = _eval_inputs(monkeypatch), _spy_crops(monkeypatch)
    results = {}
    for crop in (None, "none", "gt"):
        evaluate(run, data, crop=crop, out_dir=tmp_path / str(crop), workers=0, device="cpu", precision="fp32")
        results[crop] = json.loads((tmp_path / str(crop) / "results.json").read_text())
    assert results[None]["crop"] == "gt" and results[None]["crop_margin"] == pytest.approx(0.2)  # the checkpoint's
    assert results["none"]["crop"] == "none" and results["none"]["crop_margin"] is None
    assert results["gt"]["detector"] is None and results["gt"]["no_detection"] is None
    torch.testing.assert_close(seen[0], seen[2])
    assert not torch.allclose(seen[1], seen[2])
    test_boxes = set(open_dataset(data, "test").boxes)
    assert {box for box, *_ in calls} == test_boxes and len(calls) == 2 * len(seen[0])  # none cropped nothing


def test_eval_crop_detected_uses_the_detectors_top_box(box_run, tmp_path, monkeypatch):
    import finegrain.detect.evaluate as det_eval
    from finegrain.eval.evaluate import evaluate

    run, data, _ = box_run
    test = open_dataset(data, "test")
    found = {p: (3.0 + k, 5.0, 30.0, 33.0 + k) for k, p in enumerate(test.paths)}  # xyxy
    empty = test.paths[1]

    class FakeDetector(torch.nn.Module):
        """Two boxes per image (the second scores higher), none in ``empty``; images come in ``test.paths`` order."""

        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))
            self.sizes = []

        def predict(self, images):
            out = []
            for im in images:
                assert im.dtype == torch.float32 and 0 <= im.min() and im.max() <= 1
                p = test.paths[len(self.sizes)]
                self.sizes.append(tuple(im.shape))
                box = torch.tensor([[0, 0, 10, 10], list(found[p])]) if p != empty else torch.zeros(0, 4)
                out.append({"boxes": box, "scores": torch.tensor([0.1, 0.9])[: len(box)], "labels": torch.zeros(len(box))})
            return out

    fake = FakeDetector()
    monkeypatch.setattr(det_eval, "load_detector", lambda ckpt, device: (fake, None))
    calls = _spy_crops(monkeypatch)
    evaluate(run, data, detector="det.safetensors", out_dir=tmp_path, workers=0, device="cpu", precision="fp32")
    r = json.loads((tmp_path / "results.json").read_text())
    assert (r["crop"], r["detector"], r["no_detection"]) == ("detected", "det.safetensors", 1)
    assert len(fake.sizes) == len(test) and all(s == (3, 48, 48) for s in fake.sizes)
    want = {(x0, y0, x1 - x0, y1 - y0) for p, (x0, y0, x1, y1) in found.items() if p != empty} | {None}
    assert {box for box, *_ in calls} == want  # the top-scoring box, as xywh; nothing found: whole


def test_detected_boxes_of_a_tiny_detection_checkpoint(tmp_path):
    from finegrain.detect.evaluate import load_detector

    data = make_cub_with_parts(tmp_path / "cub", n_train=1, n_test=1, size=48)
    test = open_dataset(data, "test")
    ckpt = task_checkpoint(tmp_path / "det.safetensors", "detection", test.classes)
    task, _ = load_detector(ckpt, "cpu")
    task.model.roi_heads.score_thresh = 0.0  # random weights: keep every box so that there is one to pick
    boxes = detected_boxes(ckpt, test.paths, "cpu", detector=task)
    assert len(boxes) == len(test) and all(b is not None for b in boxes)
    img = torch.from_numpy(np.array(Image.open(test.paths[0]).convert("RGB"))).permute(2, 0, 1).float() / 255
    out = task.predict([img])[0]
    x0, y0, x1, y1 = out["boxes"][out["scores"].argmax()].tolist()
    assert boxes[0] == pytest.approx((x0, y0, x1 - x0, y1 - y0), abs=1e-4)
    assert 0 <= boxes[0][0] and boxes[0][0] + boxes[0][2] <= 48 + 1e-4


def test_eval_crop_options_are_checked(box_run, tmp_path):
    from finegrain.eval.evaluate import evaluate

    run, data, _ = box_run
    kw = {"out_dir": tmp_path, "workers": 0, "device": "cpu"}
    with pytest.raises(ValueError, match="needs --detector"):
        evaluate(run, data, crop="detected", **kw)
    with pytest.raises(ValueError, match="drop --detector"):
        evaluate(run, data, crop="gt", detector="d.safetensors", **kw)
    with pytest.raises(ValueError, match="drop --pipeline device"):
        evaluate(run, data, crop="gt", pipeline="device", **kw)
    plain = make_cub_with_parts(tmp_path / "plain", boxes=False)
    with pytest.raises(FileNotFoundError, match="bounding_boxes.txt"):
        evaluate(run, plain, **kw)  # trained on crops: gt by default, and this copy has no boxes


def test_finegrain_eval_cli_takes_the_crop_flags(box_run, tmp_path, capsys):
    from finegrain.cli import main

    run, data, _ = box_run
    assert main(["eval", str(run), "--data", str(data), "--crop", "gt", "--crop-margin", "0", "--out", str(tmp_path),
                 "--workers", "0", "--device", "cpu"]) == 0
    r = json.loads((tmp_path / "results.json").read_text())
    assert (r["crop"], r["crop_margin"]) == ("gt", 0.0)
