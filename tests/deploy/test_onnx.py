"""Export round trips (ONNX Runtime / TorchScript vs eager), metadata, INT8 quantization, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnx  # noqa: E402

from finegrain.cli import main  # noqa: E402
from finegrain.deploy import (  # noqa: E402
    OnnxModel,
    export_checkpoint,
    export_onnx,
    export_torchscript,
    read_export_metadata,
)
from finegrain.models.backbone import create_backbone  # noqa: E402
from finegrain.predict import Predictor  # noqa: E402
from finegrain.tasks.supervised import SupervisedTask  # noqa: E402

from ..conftest import make_image_folder  # noqa: E402
from ..helpers import CLASSES, PREP, make_checkpoint  # noqa: E402


@pytest.mark.parametrize("backbone", ["test_resnet", pytest.param("test_efficientnet", marks=pytest.mark.slow)])
def test_onnx_round_trip_matches_eager(tmp_path, backbone):
    ckpt = make_checkpoint(tmp_path / "m.safetensors", backbone)
    pred = Predictor.from_checkpoint(ckpt, device="cpu")
    path = export_onnx(pred.task, pred.meta, tmp_path / "m.onnx")
    runtime = OnnxModel(path)
    for batch in (1, 5):  # the batch axis is dynamic (exported with batch 2)
        x = torch.randn(batch, 3, 32, 32)
        diff = np.abs(runtime.logits(x) - pred.logits(x).numpy()).max()
        assert diff < 1e-4, diff
    meta = read_export_metadata(path)
    assert meta["classes"] == CLASSES and meta["preprocessing"] == PREP and meta["backbone"] == backbone
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert {p.key for p in model.metadata_props} >= {"classes", "preprocessing"}


class _TwoHeads(SupervisedTask):
    """A task whose training forward differs from predict (stands in for auxiliary branches)."""

    def forward(self, batch):
        raise AssertionError("the exporter must not call the training forward")

    @torch.no_grad()
    def predict(self, images):
        return self.model(images) * 2 + 1


def test_export_uses_predict_not_the_training_forward(tmp_path):
    torch.manual_seed(0)
    task = _TwoHeads(create_backbone("test_resnet", num_classes=3, pretrained="none"), 3).eval()
    meta = {"classes": CLASSES, "preprocessing": PREP, "num_classes": 3, "task": "two-heads", "model": {"backbone": "test_resnet"}}
    x = torch.randn(2, 3, 32, 32)
    path = export_onnx(task, meta, tmp_path / "t.onnx")
    assert np.abs(OnnxModel(path).logits(x) - task.predict(x).numpy()).max() < 1e-4
    ts = export_torchscript(task, meta, tmp_path / "t.pt")
    assert torch.allclose(torch.jit.load(str(ts))(x), task.predict(x), atol=1e-5)


def test_torchscript_round_trip_and_sidecar_metadata(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m.safetensors")
    pred = Predictor.from_checkpoint(ckpt, device="cpu")
    path = export_torchscript(pred.task, pred.meta, tmp_path / "m.pt")
    x = torch.randn(3, 3, 32, 32)
    assert torch.allclose(torch.jit.load(str(path))(x), pred.logits(x), atol=1e-5)
    meta = read_export_metadata(path)
    assert meta["classes"] == CLASSES and meta["preprocessing"]["img_size"] == 32


def test_export_checkpoint_verifies_on_real_images(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m.safetensors")
    images = make_image_folder(tmp_path / "img", n_train=2, n_test=2)
    s = export_checkpoint(ckpt, tmp_path / "out" / "m.onnx", verify_data=images / "test", verify_images=4)
    assert s["verify"]["fp32"]["max_abs_diff"] < 1e-4 and s["verify"]["fp32"]["top1_agreement"] == 1.0
    assert s["verify"]["fp32"]["images"] == 4 and "real images" in s["verify_inputs"]
    s = export_checkpoint(ckpt, tmp_path / "m.onnx")  # no data: random inputs, and it says so
    assert "random" in s["verify_inputs"]


def test_int8_static_quantization_agrees_with_eager(trained_run, tmp_path):
    result, data = trained_run
    s = export_checkpoint(result.best_checkpoint, tmp_path / "q.onnx", int8=True, calib_data=data / "train",
                          calib_images=12, verify_data=data / "test", verify_images=9)
    q = Path(s["int8_path"])
    assert q.name == "q.int8.onnx" and s["calibration_images"] == 12
    ops = {n.op_type for n in onnx.load(str(q)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ format
    assert s["verify"]["int8"]["top1_agreement"] >= 8 / 9, s["verify"]
    meta = read_export_metadata(q)
    assert meta["classes"] == ["blue", "green", "red"] and meta["quantization"].startswith("int8-static-qdq")
    assert q.stat().st_size < Path(s["path"]).stat().st_size


def test_export_errors_name_the_flag(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="--calib-data"):
        export_checkpoint(ckpt, tmp_path / "m.onnx", int8=True)
    with pytest.raises(ValueError, match="--format"):
        export_checkpoint(ckpt, tmp_path / "m.onnx", format="tflite")
    with pytest.raises(ValueError, match="--int8 needs --format onnx"):
        export_checkpoint(ckpt, tmp_path / "m.pt", format="torchscript", int8=True, calib_data=tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_checkpoint(ckpt, tmp_path / "m.onnx", verify_data=tmp_path / "empty-does-not-exist")
    with pytest.raises(FileNotFoundError):
        export_checkpoint(tmp_path / "missing.safetensors", tmp_path / "m.onnx")


def test_export_cli(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "m.safetensors")
    images = make_image_folder(tmp_path / "img", n_train=2, n_test=1)
    assert main(["export", str(ckpt), "--format", "torchscript", "--verify-data", str(images), "--verify-images", "3"]) == 0
    out = capsys.readouterr().out
    assert "max abs diff" in out and "top-1 agreement" in out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["path"] == str(tmp_path / "m.pt") and summary["verify"]["fp32"]["top1_agreement"] == 1.0
    assert main(["export", str(ckpt), "--int8"]) == 2  # user error: no calibration data
