"""Distillation: the KD and attention-transfer losses, the frozen teacher, the distill command."""

import pytest
import torch
import torch.nn.functional as F

from finegrain.checkpoint import load_task
from finegrain.cli import main
from finegrain.models.backbone import create_backbone
from finegrain.predict import Predictor
from finegrain.tasks.distill import attention_transfer_loss, kd_loss


def test_kd_loss_against_the_formula():
    torch.manual_seed(0)
    s, t, T = torch.randn(4, 5), torch.randn(4, 5), 3.0
    p_t = (t / T).softmax(1)
    naive = (p_t * (p_t.log() - (s / T).log_softmax(1))).sum(1).mean() * T * T
    assert torch.allclose(kd_loss(s, t, T), naive, atol=1e-6)
    assert kd_loss(t, t, T).abs() < 1e-6


def test_distill_cli_trains_a_student_that_predicts_without_its_teacher(trained_run, tmp_path, capsys):
    result, data = trained_run
    rc = main(["distill", "--teacher", str(result.best_checkpoint), "--student", "test_efficientnet", "--data", str(data),
               "--pretrained", "none", "--img-size", "32", "--batch-size", "8", "--workers", "0", "--epochs", "1",
               "--kd-feature-weight", "0.5", "--device", "cpu", "--out", str(tmp_path), "--name", "student"])
    assert rc == 0
    _, meta = load_task(tmp_path / "student" / "best.safetensors")
    assert meta["task"] == "supervised" and meta["trained_as"] == "distill" and meta["model"]["backbone"] == "test_efficientnet"
    preds = Predictor.from_checkpoint(tmp_path / "student", device="cpu").predict([data / "test" / "red"])
    assert len(preds) == 3 and preds[0]["topk"][0]["class"] in ("red", "green", "blue")


def test_teacher_is_frozen_and_not_saved(trained_run):
    from finegrain.checkpoint import build_task  # opens the teacher checkpoint the task receives
    from finegrain.models.backbone import create_backbone

    result, _ = trained_run
    task = build_task("distill", create_backbone("test_efficientnet", num_classes=3), 3,
                      {"teacher": str(result.best_checkpoint), "feature_weight": 1.0})
    assert not any(k.startswith("teacher") for k in task.state_dict())
    task.train()
    out = task({"image": torch.randn(4, 3, 32, 32), "label": torch.tensor([0, 1, 2, 0])})
    out["loss"].backward()
    assert all(p.grad is not None for p in task.parameters())
    assert all(p.grad is None for p in task.teacher.parameters()) and not task.teacher.training


def test_distill_without_teacher_or_with_other_classes(trained_run, image_folder, tmp_path, capsys):
    assert main(["distill", "--student", "test_resnet", "--data", str(image_folder), "--out", str(tmp_path)]) == 2
    assert "--teacher" in capsys.readouterr().err
    from finegrain.checkpoint import build_task
    from finegrain.models.backbone import create_backbone

    with pytest.raises(ValueError, match="3 classes"):
        build_task("distill", create_backbone("test_resnet", num_classes=5), 5, {"teacher": str(trained_run[0].best_checkpoint)})


def test_attention_transfer_matches_the_hand_formula():
    torch.manual_seed(0)
    s = [torch.randn(2, 3, 4, 4), torch.randn(2, 5, 2, 2)]
    t = [torch.randn(2, 6, 4, 4), torch.randn(2, 2, 4, 4)]  # the second pair differs in size
    hand = 0.0
    for fs, ft in zip(s, t):
        qs, qt = (fs ** 2).sum(1) / fs.shape[1], (ft ** 2).sum(1) / ft.shape[1]
        if qs.shape != qt.shape:
            qs = F.interpolate(qs[:, None], size=qt.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        for b in range(2):
            a, c = qs[b].flatten(), qt[b].flatten()
            hand += ((a / a.norm() - c / c.norm()) ** 2).sum() / (2 * a.numel())
    assert attention_transfer_loss(s, t).item() == pytest.approx(hand.item(), rel=1e-5)
    assert attention_transfer_loss(t, t).item() == pytest.approx(0.0, abs=1e-7)


def test_distill_with_attention_transfer(trained_run, tmp_path):
    result, _ = trained_run  # a test_resnet teacher; the student has other stage sizes and widths
    from finegrain.checkpoint import build_task as build_with_teacher

    task = build_with_teacher("distill", create_backbone("test_efficientnet", num_classes=3), 3,
                              {"teacher": str(result.best_checkpoint), "attention_weight": 500.0})
    task.train()
    out = task({"image": torch.randn(4, 3, 48, 48), "label": torch.tensor([0, 1, 2, 0])})
    assert out["attention"] > 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(p.grad is not None for p in task.parameters())
    assert task.task_args()["attention_weight"] == 500.0
