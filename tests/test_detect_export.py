"""ONNX export of detectors: every detector, real images of several sizes, eager parity, metadata, refusals, the CLI."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from finegrain import checkpoint as ckpt  # noqa: E402
from finegrain.cli import main  # noqa: E402
from finegrain.config import ModelConfig  # noqa: E402
from finegrain.detect import export as dx  # noqa: E402
from finegrain.models.backbone import create_backbone  # noqa: E402
from finegrain.tasks import TASKS, build_task  # noqa: E402
from finegrain.tasks.detection import DETECTORS  # noqa: E402

from .helpers import make_cub_with_parts, task_checkpoint  # noqa: E402

CUB = Path(__file__).resolve().parents[2] / "shared" / "data" / "cub27"
CLASSES = ["Red_Bird", "Green_Bird", "Blue_Bird"]
PREP = {"img_size": 128, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "crop_pct": 1.0, "interpolation": "bilinear"}
# random-init heads score low (RetinaNet's focal-loss prior starts near 0.01): keep every box, ten per image
LIMITS = {"score_thresh": 0.0, "max_detections": 10}
ALL = dx.Tolerance(score_threshold=0.0)


def detector_checkpoint(path: Path, detector: str) -> Path:
    """A random-init, perturbed ``detector`` on test_resnet, described as fit_detection would."""
    torch.manual_seed(0)
    model = create_backbone("test_resnet", num_classes=len(CLASSES), pretrained="none")
    task = build_task("detection", model, len(CLASSES), detector=detector, img_size=PREP["img_size"])
    with torch.no_grad():  # off the initial state, so that the heads tell boxes apart
        for p in task.parameters():
            p.add_(0.02 * torch.randn_like(p))
    options = TASKS.get("detection").Options(detector=detector)
    model_cfg = dataclasses.asdict(ModelConfig(backbone="test_resnet", pretrained="none", task="detection", options=options))
    meta = ckpt.describe(task, model=model_cfg, classes=CLASSES, preprocessing=PREP, epoch=1, metrics={},
                         detection={"labels": "species", "format": "benchmark", "masks": detector == "mask_rcnn"})
    return ckpt.save(path, task.state_dict(), meta)


def real_images(n: int = 2) -> list[Path]:
    """``n`` CUB photos of different sizes from the shared cub27 set (skip without it)."""
    root = CUB / "CUB_200_2011" / "images"
    if not root.is_dir():
        pytest.skip(f"shared CUB images not found at {root}")
    from PIL import Image

    picked, sizes = [], set()
    for f in sorted(root.rglob("*.jpg")):
        with Image.open(f) as im:
            if im.size not in sizes:
                sizes.add(im.size)
                picked.append(f)
        if len(picked) == n:
            return picked
    pytest.skip("the shared CUB images do not have two different sizes")


@pytest.fixture(scope="module", params=DETECTORS)
def exported(request, tmp_path_factory):
    """``(detector, checkpoint, onnx path, summary)`` of each detector, exported and verified on real images."""
    root = tmp_path_factory.mktemp(request.param)
    path = detector_checkpoint(root / "det.safetensors", request.param)
    summary = dx.export_detector_onnx(path, root / "det.onnx", verify_images=real_images(), tol=ALL, **LIMITS)
    return request.param, path, root / "det.onnx", summary


def test_export_matches_eager_on_images_of_several_sizes(exported):
    detector, _, path, s = exported
    v = s["verify"]
    assert path.is_file() and s["path"] == str(path) and s["detector"] == detector
    assert v["ok"] and v["unmatched"] == 0
    assert len(v["sizes"]) >= 3, v["sizes"]  # two real sizes and the synthetic ones: the input size is really dynamic
    assert v["detections"] > 0 and all(r["detections"] == r["exported_detections"] > 0 for r in v["images"])
    assert v["max_box_diff"] < 1e-2 and v["max_score_diff"] < 1e-4, v
    assert all(r["labels_equal"] for r in v["images"])
    if detector == "mask_rcnn":
        assert v["min_mask_iou"] > 0.99 and v["max_mask_diff"] < 1e-3
    else:
        assert "min_mask_iou" not in v


def test_exported_graph_is_one_image_of_any_size_in_and_finegrain_labels_out(exported):
    import onnx

    detector, ckpt_path, path, _ = exported
    model = onnx.load(str(path))
    (inp,) = model.graph.input
    dims = inp.type.tensor_type.shape.dim
    assert inp.name == "image" and len(dims) == 3 and dims[0].dim_value == 3
    assert dims[1].dim_param and dims[2].dim_param  # symbolic H and W
    masks = detector == "mask_rcnn"
    assert [o.name for o in model.graph.output] == dx.output_names(masks)

    task, _ = ckpt.load_task(ckpt_path, torch.device("cpu"))
    dx.set_limits(task.model, **LIMITS)
    task.eval()
    runner = dx.OnnxDetector(path)
    for h, w in ((96, 150), (181, 97)):  # sizes none of the verification images had
        image = dx.synthetic_image(h, w, seed=h)
        out = runner.detect(image)
        with torch.no_grad():
            eager = task.predict([image])[0]
        assert out["labels"].dtype == np.int64
        assert sorted(out["labels"].tolist()) == sorted(eager["labels"].tolist())  # shifted in the graph, like predict
        # RetinaNet and FCOS score the background slot like a class, so with no score threshold it comes out as -1 (in
        # eager predict too); the R-CNN family never returns it
        valid = set(range(len(CLASSES))) | ({-1} if detector in ("retinanet", "fcos") else set())
        assert set(out["labels"].tolist()) <= valid
        assert out["boxes"].shape == (len(eager["boxes"]), 4)
        assert (out["boxes"][:, 2] <= w + 1e-3).all() and (out["boxes"][:, 3] <= h + 1e-3).all()  # the input's pixels
        r = dx.compare_detections({k: v.numpy() for k, v in eager.items()}, out, (h, w), ALL)
        assert r["ok"] and r["max_box_diff"] < 1e-2, r
        if masks:
            assert out["masks"].shape[1:] == (1, h, w)


def test_metadata_describes_the_detector(exported):
    from finegrain.deploy.onnx import read_export_metadata

    detector, ckpt_path, path, _ = exported
    m = read_export_metadata(path)
    assert m["classes"] == CLASSES and m["num_classes"] == 3 and m["task"] == "detection" and m["detector"] == detector
    assert m["backbone"] == "test_resnet" and m["source_checkpoint"] == str(ckpt_path)
    assert m["outputs"].split(",") == dx.output_names(detector == "mask_rcnn")
    assert m["preprocessing"]["img_size"] == PREP["img_size"] and "0..C-1" in m["labels"]
    assert float(m["score_thresh"]) == 0.0 and int(m["max_detections"]) == 10
    assert json.loads(m["detection"])["labels"] == "species"


def test_float32_resize_of_the_plain_trace_is_caught_and_nothing_is_written(tmp_path, monkeypatch):
    """Without the float64 resize, torchvision's traced resize sizes a 220 px short side to 127 px, not 128:
    verification must see the different detections, refuse, and leave no file behind."""
    path = detector_checkpoint(tmp_path / "det.safetensors", "faster_rcnn")
    monkeypatch.setattr(dx, "_exact_resize_transform", lambda t: t)
    with pytest.raises(ValueError, match="does not reproduce the eager detections.*synthetic 220x333"):
        dx.export_detector_onnx(path, tmp_path / "det.onnx", tol=ALL, **LIMITS)
    assert not (tmp_path / "det.onnx").exists() and not list(tmp_path.glob(".det.onnx*"))


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_exact_resize_sizes_like_eager():
    """The traced resize alone, on the sizes where float32 loses a pixel (eager and ONNX give the same image)."""
    import onnxruntime as ort

    torch.manual_seed(0)
    task = build_task("detection", create_backbone("test_resnet", num_classes=3, pretrained="none"), 3, img_size=128).eval()

    class Resize(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.transform = dx._exact_resize_transform(task.model.transform)

        def forward(self, image):
            return self.transform([image])[0].tensors

    buf = io.BytesIO()
    torch.onnx.export(Resize().eval(), (torch.rand(3, 100, 140),), buf, dynamo=False, opset_version=17, input_names=["image"],
                      dynamic_axes={"image": {1: "h", 2: "w"}})
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    for h, w in ((220, 333), (330, 209), (159, 1000), (97, 411)):
        image = torch.rand(3, h, w)
        with torch.no_grad():
            eager = task.model.transform([image])[0]
        out = session.run(None, {"image": image.numpy()})[0]
        assert out.shape == tuple(eager.tensors.shape)
        np.testing.assert_allclose(out, eager.tensors.numpy(), atol=1e-3)  # bilinear weights in float32


def test_classifier_checkpoint_is_refused(tmp_path):
    path = task_checkpoint(tmp_path / "cls.safetensors", "supervised", CLASSES)
    with pytest.raises(ValueError, match="not a detector.*Supported tasks: detection"):
        dx.export_detector_onnx(path, tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="checkpoint itself"):
        dx.export_detector_onnx(path, path)


def test_compare_detections_matches_ties_in_any_order_and_flags_differences():
    boxes = np.array([[0, 0, 10, 10], [5, 5, 20, 20], [1, 1, 9, 9]], dtype=np.float32)
    eager = {"boxes": boxes, "scores": np.array([0.5, 0.5, 0.2], np.float32), "labels": np.array([0, 1, 2])}
    swapped = {"boxes": boxes[[1, 0, 2]], "scores": eager["scores"][[1, 0, 2]], "labels": eager["labels"][[1, 0, 2]]}
    assert dx.compare_detections(eager, swapped, (50, 50))["ok"]
    moved = {**swapped, "boxes": swapped["boxes"] + np.array([[0, 0, 0, 3]], np.float32)}
    r = dx.compare_detections(eager, moved, (50, 50))
    assert not r["ok"] and r["unmatched"] == 6
    relabelled = {**eager, "labels": np.array([0, 2, 2])}
    assert not dx.compare_detections(eager, relabelled, (50, 50))["ok"]
    below = dx.Tolerance(score_threshold=0.3)  # the 0.2 box is not compared, the threshold is
    dropped = {k: v[:2] for k, v in eager.items()}
    assert dx.compare_detections(eager, dropped, (50, 50), below)["ok"]
    assert not dx.compare_detections(eager, dropped, (50, 50))["ok"]


def test_cli_exports_a_detector_verified_on_its_data(tmp_path, capsys):
    data = make_cub_with_parts(tmp_path / "cub", n_train=2, n_test=1, size=96)
    path = task_checkpoint(tmp_path / "det.safetensors", "detection", CLASSES)
    out = tmp_path / "det.onnx"
    rc = main(["export", str(path), "--format", "onnx", "--out", str(out), "--verify-data", str(data), "--verify-images", "2"])
    text = capsys.readouterr().out
    assert rc == 0, text
    s = json.loads(text.strip().splitlines()[-1])
    assert out.is_file() and s["detector"] == "faster_rcnn" and s["verify"]["ok"]
    assert s["verify_inputs"].startswith("2 real image(s)")
    assert all("cub" in r["name"] for r in s["verify"]["images"][:2])  # images of the data set (its test split first)
    assert "max box diff" in text


def test_cli_refuses_what_detectors_do_not_export(tmp_path, capsys):
    path = task_checkpoint(tmp_path / "det.safetensors", "detection", CLASSES)
    assert main(["export", str(path), "--format", "torchscript", "--out", str(tmp_path / "x.pt")]) == 2
    assert "--format onnx" in capsys.readouterr().err
    assert main(["export", str(path), "--int8", "--calib-data", str(tmp_path), "--out", str(tmp_path / "x.onnx")]) == 2
    assert "--int8" in capsys.readouterr().err
    assert not list(tmp_path.glob("x.*"))
