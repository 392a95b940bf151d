"""Quantization-aware fine-tuning: fake quantization against the naive formula and ONNX Runtime's
parameters, batch-norm folding, the QAT INT8 export and ``finegrain quantize``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnx  # noqa: E402

from finegrain.cli import main  # noqa: E402
from finegrain.compress.qat import (  # noqa: E402
    ActivationFakeQuant,
    QatModel,
    WeightFakeQuant,
    activation_qparams,
    fold_batchnorm,
    qat_checkpoint,
    weight_qparams,
)
from finegrain.deploy.onnx import OnnxModel  # noqa: E402
from finegrain.eval.calibration import temperature_of  # noqa: E402
from finegrain.models.backbone import create_backbone  # noqa: E402
from finegrain.predict import Predictor  # noqa: E402
from finegrain.tasks import build_task  # noqa: E402


def _naive_qdq(x: np.ndarray, scale, zero, qmin: int, qmax: int) -> np.ndarray:
    return (np.clip(np.round(x / scale) + zero, qmin, qmax) - zero) * scale


def test_activation_fake_quant_matches_the_naive_formula():
    torch.manual_seed(0)
    x = torch.randn(4, 8, 5, 5) * 3 + 1
    fq = ActivationFakeQuant()
    fq.calibrating = True
    fq(x)  # observe only
    fq.calibrating, fq.enabled = False, True
    lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    scale = (hi - lo) / 255
    zero = round(-lo / scale)
    s, z = fq.qparams()
    assert abs(s.item() - scale) < 1e-7 and z.item() == zero
    y = fq.eval()(x * 1.5)  # values beyond the range saturate
    ref = _naive_qdq((x * 1.5).double().numpy(), s.double().item(), zero, 0, 255)
    assert np.abs(y.numpy() - ref).max() < 1e-5
    assert len(np.unique(y.numpy())) <= 256


def test_weight_fake_quant_matches_the_naive_formula():
    torch.manual_seed(0)
    w = torch.randn(6, 3, 3, 3) * torch.linspace(0.01, 2, 6).view(-1, 1, 1, 1)
    w[2] = 0  # an all-zero channel must not divide by zero
    y = WeightFakeQuant()(w)
    absmax = w.abs().flatten(1).amax(1).double().numpy()
    scale = np.where(absmax > 0, absmax / 127, 1.0).reshape(-1, 1, 1, 1)
    ref = _naive_qdq(w.double().numpy(), scale, 0, -127, 127)
    assert np.abs(y.numpy() - ref).max() < 1e-6
    assert (y[2] == 0).all()
    for c in range(6):  # at most 255 levels per channel, the extreme one exactly representable
        assert len(torch.unique(y[c])) <= 255
        assert torch.isclose(y[c].abs().max(), w[c].abs().max())


def test_qparams_equal_onnxruntime_compute_scale_zp():
    from onnxruntime.quantization.quant_utils import compute_scale_zp

    rng = np.random.default_rng(0)
    for lo, hi in [(-1.3, 4.2), (0.0, 6.0), (0.2, 3.0), (-5.0, -0.5), (-0.001, 0.0007)]:
        zero, scale = compute_scale_zp(np.float32(lo), np.float32(hi), np.uint8(0), np.uint8(255))
        s, z = activation_qparams(torch.tensor(lo), torch.tensor(hi))
        assert s.item() == pytest.approx(float(scale), rel=1e-6) and z.item() == int(zero)
    w = torch.from_numpy(rng.normal(size=(4, 10)).astype(np.float32))
    s, z = weight_qparams(w)
    for c in range(4):
        rmin, rmax = np.float32(w[c].min()), np.float32(w[c].max())
        zero, scale = compute_scale_zp(rmin, rmax, np.int8(-127), np.int8(127), symmetric=True)
        assert s[c].item() == pytest.approx(float(scale), rel=1e-6) and z[c].item() == int(zero) == 0


def test_fake_quant_gradient_is_straight_through():
    fq = ActivationFakeQuant()
    fq.calibrating = True
    fq(torch.tensor([-1.0, 2.0]))
    fq.calibrating, fq.enabled = False, True
    x = torch.tensor([-3.0, -0.5, 0.3, 1.9, 5.0], requires_grad=True)
    fq.eval()(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]  # zero outside the range, identity inside
    w = torch.randn(3, 4, requires_grad=True)
    WeightFakeQuant()(w).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # the range always covers the weights


@pytest.mark.parametrize("backbone", ["test_resnet", "test_efficientnet"])
def test_fold_batchnorm_keeps_outputs_and_architecture(backbone):
    torch.manual_seed(0)
    model = create_backbone(backbone, num_classes=3, pretrained="none")
    for m in model.modules():  # non-trivial statistics, as after training
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    folded = fold_batchnorm(model, x)
    assert folded and all(not bn.weight.requires_grad for bn in folded)
    assert torch.allclose(model(x), ref, atol=1e-4 * ref.abs().max().item())
    fresh = create_backbone(backbone, num_classes=3, pretrained="none").eval()
    fresh.load_state_dict(model.state_dict())  # same keys and shapes: any command can load it
    assert torch.allclose(fresh(x), ref, atol=1e-4 * ref.abs().max().item())


def test_qat_model_keeps_bn_frozen_and_trains_through_fake_quant():
    torch.manual_seed(0)
    task = build_task("supervised", create_backbone("test_resnet", num_classes=3, pretrained="none"), 3)
    qat = QatModel(task, img_size=32)
    names = set(qat.sites)
    assert "conv1.0:in" in names and "fc:out" in names  # the image input and the logits
    assert "conv1.2:out" in names and "conv1.1:out" not in names  # after Conv -> BN -> ReLU, as ONNX Runtime
    qat.eval().set_mode(calibrating=True)
    qat.predict(torch.randn(4, 3, 32, 32))
    qat.set_mode(calibrating=False, enabled=True)
    qat.train()
    assert all(not bn.training for bn in qat._frozen)
    before = {k: v.clone() for k, v in task.state_dict().items() if "running" in k}
    out = qat({"image": torch.randn(4, 3, 32, 32), "label": torch.tensor([0, 1, 2, 0])})
    out["loss"].backward()
    assert all(p.grad is not None for p in qat.parameters() if p.requires_grad)
    assert all(torch.equal(before[k], v) for k, v in task.state_dict().items() if k in before)
    plain = qat.finalize()
    assert not any("parametrizations" in k for k in plain.state_dict())


def test_qat_int8_export_uses_qat_scales_and_agrees_with_eager(trained_run, tmp_path):
    result, data = trained_run
    s = qat_checkpoint(result.best_checkpoint, tmp_path / "m.int8.onnx", data, epochs=1, batch_size=8, workers=0,
                       calib_images=12, verify_images=9, device="cpu")
    assert s["verify"]["int8_vs_eager"]["top1_agreement"] >= 8 / 9, s["verify"]
    assert s["verify"]["int8_vs_simulated"]["top1_agreement"] >= 8 / 9, s["verify"]
    # the deployed model follows the fake-quantized one more closely than it follows float
    assert s["verify"]["int8_vs_simulated"]["max_abs_diff"] <= s["verify"]["int8_vs_eager"]["max_abs_diff"] + 1e-6
    assert s["qat_scaled_tensors"] >= s["quantized_tensors"] - 2, s
    q = onnx.load(s["int8_path"])
    init = {i.name: onnx.numpy_helper.to_array(i) for i in q.graph.initializer}
    act_scales = {float(init[n.input[1]]) for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in init}
    qat_scales = {v[0] for v in json.loads(json.dumps(Predictor.from_checkpoint(s["qat_checkpoint"], device="cpu")
                                                      .meta["qat"]["activation_qparams"])).values()}
    assert len(act_scales & {float(np.float32(v)) for v in qat_scales}) >= s["qat_scaled_tensors"] // 2
    # weights: ONNX Runtime's per-channel scales are the ones QAT trained against
    tuned = Predictor.from_checkpoint(s["qat_checkpoint"], device="cpu")
    w = tuned.task.model.fc.weight.detach()
    dq = [n for n in q.graph.node if n.op_type == "DequantizeLinear" and init.get(n.input[0]) is not None
          and init[n.input[0]].dtype == np.int8 and init[n.input[0]].shape == tuple(w.shape)]
    assert dq and np.allclose(init[dq[0].input[1]], weight_qparams(w)[0].numpy(), rtol=1e-6)
    meta = {p.key: p.value for p in q.metadata_props}
    assert meta["quantization"] == "int8-qat-qdq-per-channel" and "classes" in meta
    # the INT8 graph is the fine-tuned float one, which applies no temperature: its metadata must not claim the
    # original checkpoint's (the fixture's run is calibrated, so the two differ)
    assert temperature_of(Predictor.from_checkpoint(result.best_checkpoint, device="cpu").meta) != 1.0
    fp32_meta = {p.key: p.value for p in onnx.load(s["fp32_path"]).metadata_props}
    assert meta["temperature"] == fp32_meta["temperature"] == str(temperature_of(tuned.meta)) == "1.0"
    assert {k: meta.get(k) for k in fp32_meta} == fp32_meta  # every float-model key kept, with its value
    # the fine-tuned checkpoint is a normal one, and the float ONNX beside it is that model
    x = torch.randn(3, 3, 32, 32)
    assert np.abs(OnnxModel(s["fp32_path"]).logits(x) - tuned.logits(x).numpy()).max() < 1e-4
    assert tuned.meta["qat"]["epochs"] == 1 and tuned.meta.lineage[-1]["source"] == str(result.best_checkpoint)
    assert tuned.meta.lineage[-1]["kind"] == "qat"
    with pytest.raises(ValueError, match="--out"):
        qat_checkpoint(result.best_checkpoint, tmp_path / "q.pt", data, epochs=0, device="cpu")


def test_quantize_cli_qat(trained_run, tmp_path, capsys):
    result, data = trained_run
    ckpt = result.best_checkpoint
    out = tmp_path / "qat.int8.onnx"
    assert main(["quantize", str(ckpt), "--data", str(data), "--qat", "--out", str(out), "--epochs", "1",
                 "--batch-size", "8", "--workers", "0", "--calib-images", "6", "--verify-images", "3",
                 "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert out.is_file() and "QAT int8 model" in printed and "int8_vs_eager" in printed
    assert json.loads(printed.strip().splitlines()[-1])["int8_path"] == str(out)
    assert main(["quantize", str(ckpt), "--data", str(tmp_path / "missing")]) == 2


@pytest.mark.slow
def test_quantize_cli_ptq(trained_run, tmp_path, capsys):
    result, data = trained_run
    out = tmp_path / "ptq.int8.onnx"
    assert main(["quantize", str(result.best_checkpoint), "--data", str(data), "--out", str(out), "--calib-images", "6",
                 "--verify-images", "3"]) == 0
    assert out.is_file() and (tmp_path / "ptq.onnx").is_file() and "PTQ int8 model" in capsys.readouterr().out
