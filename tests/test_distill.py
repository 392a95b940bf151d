import pytest
import torch

from finegrain.checkpoint import load_task
from finegrain.cli import main
from finegrain.predict import Predictor
from finegrain.tasks.distill import kd_loss


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
