"""The detection task over every detector and backbone family, and its training through the one trainer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from finegrain.models.backbone import create_backbone
from finegrain.tasks import TASKS, build_task
from finegrain.tasks.base import BuildContext
from finegrain.tasks.detection import DETECTORS

CONV_FAMILIES = ["test_resnet", "test_efficientnet", "test_convnext", "test_byobnet", "test_nfnet", "test_mambaout"]
FIXED_SIZE = [n for n in timm.list_models("test_*") if n not in CONV_FAMILIES and not n.startswith(("test_efficientnet", "test_convnext"))]


def _batch(masks: bool = False):
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 100, 150, generator=g), torch.rand(3, 130, 90, generator=g)]
    targets = [{"boxes": torch.tensor([[5.0, 10, 60, 80], [70, 20, 140, 90]]), "labels": torch.tensor([0, 2])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    if masks:
        for im, t in zip(images, targets):
            m = torch.zeros(len(t["boxes"]), *im.shape[1:], dtype=torch.uint8)
            for k, (x0, y0, x1, y1) in enumerate(t["boxes"].int().tolist()):
                m[k, y0:y1, x0:x1] = 1
            t["masks"] = m
    return images, targets


# The pyramid is what depends on the backbone, the heads on the detector: every family under the
# two-stage and a one-stage detector, and every detector on one family.
CASES = sorted({*((b, d) for b in CONV_FAMILIES for d in ("faster_rcnn", "fcos")), *(("test_resnet", d) for d in DETECTORS)})


@pytest.mark.parametrize(("backbone", "detector"), CASES)
def test_every_detector_on_every_family_trains_and_predicts(detector, backbone):
    torch.manual_seed(0)
    task = build_task("detection", create_backbone(backbone, num_classes=3), 3, detector=detector, img_size=64)
    images, targets = _batch(masks=detector == "mask_rcnn")
    task.train()
    out = task({"image": images, "targets": targets})
    assert torch.isfinite(out["loss"]) and out["loss"] > 0
    torch.testing.assert_close(out["loss"], sum(v for k, v in out.items() if k != "loss"))
    out["loss"].backward()
    frozen = {n for n, p in task.named_parameters() if not p.requires_grad}
    missing = [n for n, p in task.named_parameters() if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())]
    assert not missing, f"parameters without a gradient: {missing[:5]}"
    assert not any("fpn" in n or "head" in n for n in frozen)
    task.eval()
    for o, im in zip(task.predict(images), images):
        h, w = im.shape[1:]
        assert o["boxes"].shape[1] == 4 and len(o["boxes"]) == len(o["scores"]) == len(o["labels"])
        assert (o["labels"] >= 0).all() and (o["labels"] < 3).all()  # background removed: 0..C-1
        assert (o["boxes"][:, 2] <= w + 1e-3).all() and (o["boxes"][:, 3] <= h + 1e-3).all()  # the input image's pixels
        if detector == "mask_rcnn":
            assert o["masks"].shape[-2:] == (h, w)


@pytest.mark.parametrize("backbone", FIXED_SIZE)
def test_fixed_size_backbones_are_refused_naming_the_fix(backbone):
    with pytest.raises(ValueError, match="convolutional"):
        build_task("detection", create_backbone(backbone, num_classes=2), 2)


@pytest.mark.parametrize("detector", DETECTORS)
def test_labels_reach_torchvision_shifted_past_the_background(monkeypatch, detector):
    """finegrain label k is R-CNN class k + 1 (0 is their background) and RetinaNet/FCOS class k; predictions come back as k."""
    task = build_task("detection", create_backbone("test_resnet", num_classes=3), 3, detector=detector, img_size=96)
    shift = 1 if detector in ("faster_rcnn", "mask_rcnn") else 0
    images, targets = _batch(masks=detector == "mask_rcnn")
    seen = {}

    def fake(imgs, tgts=None):
        if tgts is not None:
            seen["labels"] = [t["labels"].tolist() for t in tgts]
            return {"loss_a": torch.tensor(1.0, requires_grad=True)}
        return [{"boxes": torch.tensor([[1.0, 2, 3, 4]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([2 + shift])}
                for _ in imgs]

    monkeypatch.setattr(task.model, "forward", fake)
    task({"image": images, "targets": targets})
    assert seen["labels"] == [[0 + shift, 2 + shift], []]
    assert task.predict(images)[0]["labels"].tolist() == [2]
    assert targets[0]["labels"].tolist() == [0, 2]  # the caller's targets are not changed


def test_backbone_gets_the_lower_learning_rate_group():
    task = build_task("detection", create_backbone("test_resnet", num_classes=2), 2, img_size=96)
    new = task.new_parameter_names()
    names = {n for n, _ in task.named_parameters()}
    assert {n for n in names if n.startswith("model.backbone.body.")}.isdisjoint(new)
    assert {n for n in names if ".fpn." in n or "roi_heads" in n or "rpn" in n} <= new


def test_mask_rcnn_refuses_data_without_masks():
    task = build_task("detection", create_backbone("test_resnet", num_classes=3), 3, detector="mask_rcnn", img_size=96)
    images, targets = _batch()
    with pytest.raises(ValueError, match="masks"):
        task({"image": images, "targets": targets})


def test_options_are_checked_naming_the_flag():
    opts = TASKS.get("detection").Options
    with pytest.raises(ValueError, match="--detector"):
        opts(detector="yolo").check()
    with pytest.raises(ValueError, match="--scale-jitter"):
        opts(scale_jitter=1.5).check()


# ------------------------------------------------------------------ training through the trainer


def make_squares(root: Path, n: int = 8, size: tuple[int, int] = (72, 96), seed: int = 0) -> Path:
    """A COCO data set of dark images with 1-2 bright squares ("red" or "blue") each, with polygon masks, and one
    box outside its image and one of zero area."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    images, anns = [], []
    for i in range(n):
        img = np.full((*size, 3), 20, np.uint8)
        for _ in range(1 + i % 2):
            s = int(rng.integers(18, 30))
            x, y = int(rng.integers(0, size[1] - s)), int(rng.integers(0, size[0] - s))
            cat = int(rng.integers(1, 3))
            img[y:y + s, x:x + s] = (230, 40, 40) if cat == 1 else (40, 40, 230)
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cat, "bbox": [x, y, s, s], "area": s * s, "iscrowd": 0,
                         "segmentation": [[x, y, x + s, y, x + s, y + s, x, y + s]]})
        Image.fromarray(img).save(root / "images" / f"{i}.jpg", quality=95)
        images.append({"id": i + 1, "file_name": f"{i}.jpg", "height": size[0], "width": size[1]})
    anns[0]["bbox"] = [anns[0]["bbox"][0], anns[0]["bbox"][1], 500, anns[0]["bbox"][3]]  # reaches outside: clipped
    anns.append({"id": len(anns) + 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 0, 5], "area": 0, "iscrowd": 0,
                 "segmentation": [[10, 10, 10, 10, 10, 15]]})  # zero area: dropped and listed
    (root / "annotations").mkdir()
    coco = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "red"}, {"id": 2, "name": "blue"}]}
    for split in ("train", "test"):
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
    return root


@pytest.fixture(scope="module")
def squares(tmp_path_factory):
    return make_squares(tmp_path_factory.mktemp("squares"))


def _cfg(data, out, **kw):
    from finegrain.detect.train import DetectConfig

    base = dict(data=str(data), backbone="test_resnet", pretrained="none", img_size=64, epochs=2, batch_size=2, val_fraction=0.2,
                workers=0, device="cpu", out=str(out), amp=False)
    return DetectConfig(**{**base, **kw})


def test_fit_detection_writes_self_describing_checkpoints_and_lists_dropped_boxes(squares, tmp_path):
    from finegrain.checkpoint import load_task
    from finegrain.detect.train import fit_detection

    r = fit_detection(_cfg(squares, tmp_path / "run", epochs=1), {"detector": "fcos"})
    run = Path(r["run_dir"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and "val_map" in rows[0] and rows[0]["train_acc"] is None
    dropped = (run / "dropped_boxes.txt").read_text().splitlines()
    assert len(dropped) == 2 and "zero area" in dropped[1]
    task, meta = load_task(r["best_checkpoint"])
    assert meta.task == "detection" and meta.classes == ["red", "blue"] and meta.task_args["detector"] == "fcos"
    assert meta.detection["labels"] == "species" and meta.detection["train_images"] + meta.detection["val_images"] == 8
    assert 1 <= meta.detection["val_images"] <= 3
    x = [torch.rand(3, 96, 128)]
    assert len(task.predict(x)[0]["boxes"]) >= 0  # rebuilt from the metadata alone


def test_ctrl_c_mid_epoch_then_resume_matches_an_uninterrupted_detection_run(squares, tmp_path, monkeypatch):
    """Ctrl-C after the first step of epoch 2 saves a resumable state; the resumed run (EMA on) equals an uninterrupted one bit
    for bit."""
    from safetensors.torch import load_file

    from finegrain.detect.train import fit_detection

    from .train.test_trainer import interrupt_after

    opts = {"detector": "retinanet"}
    straight = fit_detection(_cfg(squares, tmp_path / "a", ema=True, ema_decay=0.9), opts)
    interrupt_after(monkeypatch, epoch_call=2, steps=1)
    first = fit_detection(_cfg(squares, tmp_path / "b", ema=True, ema_decay=0.9), opts)
    assert first["interrupted"] and first["epochs"] == 1
    monkeypatch.undo()
    resumed = fit_detection(_cfg(squares, tmp_path / "b", ema=True, ema_decay=0.9), opts, resume=True)
    assert not resumed["interrupted"] and resumed["epochs"] == 2
    for name in ("last.safetensors", "best.safetensors"):
        a, b = load_file(Path(straight["run_dir"]) / name), load_file(Path(resumed["run_dir"]) / name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}: {k} differs after resume"
    with pytest.raises(ValueError, match="other arguments"):  # a resume must keep the arguments that decide the batches
        fit_detection(_cfg(squares, tmp_path / "b", batch_size=3), opts, resume=True)


@pytest.mark.slow  # Mask R-CNN pastes 100 full-size masks per image on the CPU: about a minute
def test_mask_rcnn_trains_on_coco_polygons_and_reports_mask_ap(squares, tmp_path):
    from finegrain.detect.evaluate import evaluate_detection
    from finegrain.detect.train import fit_detection

    r = fit_detection(_cfg(squares, tmp_path / "m", epochs=1), {"detector": "mask_rcnn"})
    m = evaluate_detection(r["run_dir"], squares, split="test", workers=0, device="cpu", examples=2)
    assert "mask_map" in m and "mask_per_class_ap" in m and set(m["per_class_ap"]) == {"red", "blue"}
    out = Path(m["out_dir"])
    assert json.loads((out / "results.json").read_text())["objects"] == 12
    assert (out / "pr_curves.png").stat().st_size > 0 and (out / "examples.png").stat().st_size > 0


def test_finegrain_eval_on_a_detector_writes_map(squares, tmp_path, capsys):
    from finegrain.cli import main
    from finegrain.detect.train import fit_detection

    r = fit_detection(_cfg(squares, tmp_path / "e", epochs=1), {"detector": "retinanet"})
    assert main(["eval", r["run_dir"], "--data", str(squares), "--workers", "0", "--device", "cpu", "--out", str(tmp_path / "ev")]) == 0
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert {"map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_100", "per_class_ap", "pr_curves"} <= set(res)
    out = capsys.readouterr()
    assert "mAP" in out.out + out.err


def test_detect_train_cli_refuses_bad_flags_clearly(squares, tmp_path, capsys):
    from finegrain.cli import main

    base = ["detect", "train", "--data", str(squares), "--backbone", "test_resnet", "--pretrained", "none", "--out", str(tmp_path / "x")]
    assert main([*base, "--detector", "yolo"]) == 2
    assert "--detector must be one of" in "".join(capsys.readouterr())
    assert main([*base, "--labels", "genus"]) == 2
    assert "--labels must be one of" in "".join(capsys.readouterr())
    assert main([*base, "--backbone", "test_vit"]) == 2
    assert "convolutional" in "".join(capsys.readouterr())


def test_detect_predict_cli_matches_the_task_and_tiles(squares, tmp_path, capsys):
    """`finegrain detect predict` returns the task's own detections (json, csv), draws them, and tiles large images."""
    from torchvision.transforms.functional import to_tensor

    from finegrain.checkpoint import load_task
    from finegrain.cli import main
    from finegrain.detect.train import fit_detection

    r = fit_detection(_cfg(squares, tmp_path / "p", epochs=1, val_fraction=0), {"detector": "fcos"})
    image = squares / "images" / "1.jpg"
    argv = ["detect", "predict", r["run_dir"], str(image), "--score-threshold", "0", "--max-objects", "5", "--device", "cpu"]
    assert main([*argv, "--format", "json", "--draw", str(tmp_path / "drawn")]) == 0
    out = json.loads(capsys.readouterr().out)
    task, _ = load_task(r["best_checkpoint"])
    with Image.open(image) as im:
        (expected,) = task.predict([to_tensor(im.convert("RGB"))])
    top = expected["scores"].argsort(descending=True)[:5]
    got = out[0]["objects"]
    assert 1 <= len(got) == len(top) and [o["detector_label"] for o in got] == [["red", "blue"][int(l)] for l in expected["labels"][top]]
    np.testing.assert_allclose([o["box"] for o in got], expected["boxes"][top].numpy(), atol=0.01)
    assert (tmp_path / "drawn" / "1.png").is_file()
    assert main([*argv, "--format", "csv"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1 + len(got)  # header + one row per object
    assert main([*argv, "--format", "json", "--tile", "48", "--tile-overlap", "16"]) == 0
    assert 1 <= len(json.loads(capsys.readouterr().out)[0]["objects"]) <= 5
    assert main([*argv, "--tile", "16", "--tile-overlap", "16"]) == 2
    assert "--tile-overlap" in "".join(capsys.readouterr())


def test_torchrun_two_gloo_processes_train_a_detector_like_one(squares, tmp_path):
    """2 CPU ranks x batch 2 == 1 process x batch 4 on 8 images (RetinaNet averages its loss per image; BatchNorm frozen)."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from finegrain.detect.train import fit_detection

    common = ["--data", str(squares), "--backbone", "test_resnet", "--pretrained", "none", "--img-size", "64", "--epochs", "2",
              "--workers", "0", "--val-fraction", "0", "--device", "cpu", "--no-amp", "--detector", "retinanet", "--scale-jitter", "0",
              "--optimizer", "sgd", "--lr", "0.01"]  # SGD: AdamW's g / sqrt(v) turns summation-order noise into lr-sized steps
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "finegrain",
                          "detect", "train", *common, "--batch-size", "2", "--out", str(tmp_path / "ddp")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = fit_detection(_cfg(squares, tmp_path / "single", batch_size=4, optimizer="sgd", lr=0.01, val_fraction=0),
                           {"detector": "retinanet", "scale_jitter": 0.0})
    a, b = load_file(Path(single["run_dir"]) / "last.safetensors"), load_file(tmp_path / "ddp" / "last.safetensors")
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst < 1e-5, worst
    rows = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["train_loss"] != rows[1]["train_loss"]  # rank 0 alone logs; it trained


def test_report_of_a_detector_shows_ap_curves_and_examples(squares, tmp_path, capsys):
    from finegrain.cli import main
    from finegrain.detect.train import fit_detection

    r = fit_detection(_cfg(squares, tmp_path / "r", epochs=1), {"detector": "fcos"})
    assert main(["report", r["run_dir"], "--workers", "0", "--device", "cpu", "--examples", "2"]) == 0  # data: the run's own
    html = (Path(r["run_dir"]) / "report-test.html").read_text()
    results = json.loads((Path(r["run_dir"]) / "eval-test" / "results.json").read_text())
    for text in ("mAP@[.5:.95]", "Precision-recall", "Per-class AP", "red", "blue", "val mAP", "predicted and true boxes"):
        assert text in html, text
    assert f"{results['objects']} objects" in html and html.count("data:image/png;base64") >= 3


@pytest.mark.parametrize("name", ["fasterrcnn_mobilenet_v3_large_320_fpn", "retinanet_resnet50_fpn", "fcos_resnet50_fpn",
                                  "maskrcnn_resnet50_fpn"])
def test_torchvision_detectors_start_from_coco_with_new_class_layers(name, monkeypatch):
    """--tv-detector NAME --coco: torchvision's COCO weights are asked for, the class layers are replaced for our classes, and
    the checkpoint rebuilds without downloading."""
    import torchvision.models

    from finegrain.tasks.detection import TORCHVISION_DETECTORS

    asked, real = [], torchvision.models.get_model

    def offline(model_name, weights=None, **kw):  # no download here: the architecture with random weights, as COCO's would be
        asked.append(weights)
        return real(model_name, weights=None, **({"num_classes": 91} if weights else {}), **kw)

    monkeypatch.setattr(torchvision.models, "get_model", offline)
    task = build_task("detection", create_backbone("test_resnet", num_classes=3), 3, tv_detector=name, coco=True, img_size=64)
    family = TORCHVISION_DETECTORS[name]
    assert asked == ["DEFAULT"] and task.task_args()["coco"] is False and task.task_args()["detector"] == family
    outputs = {"faster_rcnn": lambda m: m.roi_heads.box_predictor.cls_score.out_features, "mask_rcnn":
               lambda m: m.roi_heads.mask_predictor.mask_fcn_logits.out_channels,
               "retinanet": lambda m: m.head.classification_head.num_classes, "fcos": lambda m: m.head.classification_head.num_classes}
    assert outputs[family](task.model) == (4 if family in ("faster_rcnn", "mask_rcnn") else 3)
    new = task.new_parameter_names()
    assert new and all(".box_predictor." in n or ".mask_predictor." in n or ".classification_head." in n for n in new)
    images, targets = _batch(masks=family == "mask_rcnn")
    task.train()
    assert torch.isfinite(task({"image": images, "targets": targets})["loss"])
    rebuilt = build_task("detection", create_backbone("test_resnet", num_classes=3), 3, **task.task_args())
    rebuilt.load_state_dict(task.state_dict())  # same architecture, from the arguments a checkpoint keeps
    assert asked == ["DEFAULT", None]


def test_tv_detector_options_are_checked():
    opts = TASKS.get("detection").Options
    with pytest.raises(ValueError, match="--tv-detector must be one of"):
        opts(tv_detector="yolov8").check()
    with pytest.raises(ValueError, match="--tv-detector"):
        opts(coco=True).check()
    o = opts(tv_detector="fcos_resnet50_fpn")
    o.check()
    assert o.family == "fcos" and o.detector == "faster_rcnn"  # the family follows the named detector; check() changes nothing
    o = opts(tv_detector="maskrcnn_resnet50_fpn")
    assert TASKS.get("detection").build_args(o, BuildContext())["detector"] == "mask_rcnn"


def test_loader_shrinks_only_images_larger_than_max_side(squares):
    """max_side bounds a huge photo (boxes and masks follow it) and leaves smaller images as they are."""
    from finegrain.detect.dataset import DetectionDataset
    from finegrain.detect.readers import open_detection

    data = open_detection(squares, "train")
    plain = DetectionDataset(data, masks=True, max_side=2048)[2]
    assert plain["image"].shape[1:] == (72, 96)  # not enlarged
    torch.testing.assert_close(plain["target"]["boxes"], torch.from_numpy(data.boxes[2]))
    small = DetectionDataset(data, masks=True, max_side=48)[2]
    assert small["image"].shape[1:] == (36, 48)
    torch.testing.assert_close(small["target"]["boxes"], torch.from_numpy(data.boxes[2]) / 2)
    assert small["target"]["masks"].shape[1:] == (36, 48)
    assert int(small["target"]["masks"].sum()) == pytest.approx(int(plain["target"]["masks"].sum()) / 4, rel=0.1)


def test_finegrain_train_sends_a_detector_to_detect_train(tmp_path, capsys):
    from finegrain.cli import main

    from .helpers import make_cub_with_parts

    data = make_cub_with_parts(tmp_path / "cub", n_train=2, n_test=1, size=48)
    assert main(["train", "--data", str(data), "--task", "detection", "--backbone", "test_resnet", "--pretrained", "none",
                 "--out", str(tmp_path / "runs")]) == 2
    assert "finegrain detect train" in "".join(capsys.readouterr())


def test_boxes_are_clipped_to_the_pixels_the_loader_delivers_for_an_exif_rotated_jpeg(tmp_path):
    """The loader does not apply EXIF rotation, so sanitising must not either (it clipped a 40x20 photo's box to 20x40)."""
    from finegrain.detect.data import make_list
    from finegrain.detect.dataset import DetectionDataset

    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees to view"
    Image.new("RGB", (40, 20), (200, 30, 30)).save(path, exif=exif)
    data = make_list([str(path)], [np.array([[2.0, 1, 38, 19]])], [np.array([0])], ["thing"])
    assert data.fixes.clipped == 0 and data.sizes == [(20, 40)]
    item = DetectionDataset(data)[0]
    assert item["image"].shape[1:] == (20, 40)
    torch.testing.assert_close(item["target"]["boxes"], torch.tensor([[2.0, 1, 38, 19]]))
