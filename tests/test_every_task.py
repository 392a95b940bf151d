"""One contract over the whole task registry: every command that takes a checkpoint works with a
checkpoint of every registered task, or refuses at once with a message naming the tasks it supports.

Each case runs the real command (the CLI, or the served app) on a tiny random-init checkpoint of
the task and a tiny CUB-layout data set with boxes. A command that "works" must also give the
task's own predictions where it reports classes (explain's class equals predict's).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from finegrain.cli import main
from finegrain.tasks import TASKS, classifier_tasks

from .helpers import make_cub_with_parts, task_checkpoint

ALL_TASKS = TASKS.names()
REFUSAL = "Supported tasks:"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The data set, its class names, one checkpoint per task and a supervised teacher."""
    from finegrain.data.base import open_dataset

    root = tmp_path_factory.mktemp("every-task")
    data = make_cub_with_parts(root / "cub", n_train=3, n_test=1, size=48)
    classes = open_dataset(str(data), split="train").classes
    teacher = task_checkpoint(root / "teacher.safetensors", "supervised", classes)
    ckpts = {name: task_checkpoint(root / f"{name}.safetensors", name, classes, teacher=teacher) for name in ALL_TASKS}
    images = sorted((data / "CUB_200_2011" / "images").rglob("*.jpg"))
    return {"data": data, "classes": classes, "ckpts": ckpts, "images": images, "root": root}


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out + out.err


def check_outcome(task: str, rc: int, text: str) -> bool:
    """True when the command worked; a refusal must be clean (exit 2, naming the supported tasks)."""
    if rc == 0:
        return True
    assert rc == 2 and REFUSAL in text, f"{task}: exit {rc} without a clear refusal:\n{text[-2000:]}"
    return False


def _common(world, task, tmp_path):
    return str(world["ckpts"][task]), str(world["data"]), tmp_path


COMMANDS = {
    "eval": lambda c, d, t: ["eval", c, "--data", d, "--split", "test", "--workers", "0", "--out", str(t / "eval.json")],
    "predict": lambda c, d, t: ["predict", c, str(Path(d) / "CUB_200_2011" / "images"), "--format", "json", "--device", "cpu"],
    "explain": lambda c, d, t: ["explain", c, str(Path(d) / "CUB_200_2011" / "images"), "--out", str(t / "x"), "--device", "cpu"],
    "explain-score": lambda c, d, t: ["explain-score", c, "--data", d, "--split", "test", "--out", str(t / "s.json"),
                                      "--device", "cpu"],
    "report": lambda c, d, t: ["report", c, "--data", d, "--split", "test", "--out", str(t / "r.html"), "--examples", "1",
                               "--pairs", "1", "--workers", "0", "--device", "cpu"],
    "eval-robust": lambda c, d, t: ["eval-robust", c, "--data", d, "--split", "test", "--corruptions", "gaussian_noise", "--severities",
                                    "1", "--out", str(t / "robust"), "--workers", "0", "--device", "cpu"],
    "export": lambda c, d, t: ["export", c, "--format", "onnx", "--out", str(t / "m.onnx"), "--verify-data", d,
                               "--verify-images", "3"],
    "quantize": lambda c, d, t: ["quantize", c, "--data", d, "--out", str(t / "q.onnx"), "--calib-images", "3",
                                 "--verify-images", "3", "--workers", "0"],
    "quantize-qat": lambda c, d, t: ["quantize", c, "--data", d, "--qat", "--epochs", "1", "--max-train-images", "6",
                                     "--out", str(t / "qat.onnx"), "--calib-images", "3", "--verify-images", "3",
                                     "--batch-size", "3", "--workers", "0", "--device", "cpu"],
    "prune": lambda c, d, t: ["prune", c, "--ratio", "0.25", "--out", str(t / "pruned"), "--data", d, "--epochs", "1",
                              "--workers", "0", "--device", "cpu", "--batch-size", "4"],
    "distill-teacher": lambda c, d, t: ["distill", "--teacher", c, "--student", "test_resnet", "--pretrained", "none", "--data",
                                        d, "--img-size", "64", "--batch-size", "4", "--epochs", "1", "--warmup-epochs", "0",
                                        "--workers", "0", "--device", "cpu", "--out", str(t / "runs"), "--name", "s"],
    "enroll": lambda c, d, t: ["enroll", c, "--class", "Yellow_Bird", *map(str, sorted(Path(d).rglob("*Red_Bird_000*.jpg"))[:2]),
                               "--min-images", "2", "--out", str(t / "enrolled.safetensors"), "--device", "cpu"],
    "calibrate": lambda c, d, t: ["calibrate", c, "--data", d, "--split", "train", "--bank-size", "4", "--k", "2",
                                  "--out", str(t / "cal.safetensors"), "--workers", "0", "--device", "cpu"],
    "eval-unknown": lambda c, d, t: ["eval", c, "--data", d, "--split", "test", "--workers", "0", "--out", str(t / "e"),
                                     "--unknown", str(Path(d) / "CUB_200_2011" / "images")],
    "predict-reject": lambda c, d, t: ["predict", c, str(Path(d) / "CUB_200_2011" / "images"), "--format", "json",
                                       "--device", "cpu", "--reject", "energy", "--reject-threshold", "0.5"],
}
OPEN_WORLD = ("calibrate", "eval-unknown", "predict-reject")


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("task", ALL_TASKS)
def test_command_works_or_refuses_clearly(world, task, command, tmp_path, capsys):
    rc, text = run_cli(COMMANDS[command](*_common(world, task, tmp_path)), capsys)
    worked = check_outcome(task, rc, text)
    if TASKS.get(task).outputs == "classes" and command in ("eval", "predict", "explain", "report", "export", *OPEN_WORLD):
        assert worked, f"{command} must work with every classifier task; {task} failed:\n{text[-2000:]}"


@pytest.mark.parametrize("task", ALL_TASKS)
def test_explain_gives_the_class_predict_gives(world, task, tmp_path, capsys):
    """The explained class is the task's own prediction, for every task (today's bug: a feature channel)."""
    c = str(world["ckpts"][task])
    rc, text = run_cli(["predict", c, *map(str, world["images"][:4]), "--format", "json", "--device", "cpu"], capsys)
    if not check_outcome(task, rc, text):
        return
    predicted = [r["topk"][0]["class"] for r in json.loads(text[text.index("["):])]
    rc, text = run_cli(["explain", c, *map(str, world["images"][:4]), "--out", str(tmp_path), "--device", "cpu"], capsys)
    assert rc == 0, text
    records = json.loads((tmp_path / "explain.json").read_text())
    assert [r["predicted"] for r in records] == predicted


@pytest.mark.parametrize("task", ALL_TASKS)
def test_served_predict_and_explain(world, task):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from finegrain.predict import Predictor
    from finegrain.serve import create_app

    try:
        predictor = Predictor.from_checkpoint(world["ckpts"][task], device="cpu")
    except ValueError as e:
        assert task not in classifier_tasks() and REFUSAL in str(e)
        return
    buf = io.BytesIO()
    Image.open(world["images"][0]).save(buf, "JPEG")
    with TestClient(create_app(predictor, topk=2)) as client:
        p = client.post("/predict", files={"file": ("a.jpg", buf.getvalue(), "image/jpeg")})
        e = client.post("/explain", files={"file": ("a.jpg", buf.getvalue(), "image/jpeg")})
    assert p.status_code == 200 and e.status_code == 200, (p.text, e.text)
    assert e.json()["class"] == p.json()["topk"][0]["class"]
    assert e.json()["class"] in world["classes"]


@pytest.mark.parametrize("task", ALL_TASKS)
def test_explain_logits_are_the_task_predictions(world, task):
    """Grad-CAM's scores are ``predict``'s logits over the checkpoint's classes, for every classifier task."""
    from finegrain.checkpoint import load_task
    from finegrain.explain.cam import METHODS, default_method

    t, meta = load_task(world["ckpts"][task])
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    if t.outputs != "classes":
        with pytest.raises(ValueError, match=REFUSAL):
            from finegrain.explain.cam import explain_batch

            explain_batch(t, x)
        return
    for method in {"gradcam", default_method(t.model)}:
        maps, logits = METHODS.get(method)(t, x)
        assert logits.shape == (2, len(meta["classes"]))
        torch.testing.assert_close(logits, t.predict(x), atol=1e-5, rtol=1e-4)
        assert maps.shape == (2, 64, 64) and torch.isfinite(maps).all()
    assert all(p.grad is None for p in t.parameters())


@pytest.mark.parametrize("task", classifier_tasks())
def test_report_scores_images_with_the_task_predictions(world, task):
    """The report's confusion matrix, errors and calibration come from ``predict``'s logits, for every task."""
    from finegrain.checkpoint import load_task
    from finegrain.report.build import _logits_and_features

    t, meta = load_task(world["ckpts"][task])
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = _logits_and_features(t)(x)
    torch.testing.assert_close(out[:, : len(meta["classes"])], t.predict(x).float(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("feature_weight", [0.0, 0.5])
@pytest.mark.parametrize("task", classifier_tasks())
def test_distillation_soft_targets_are_the_teacher_predictions(world, task, feature_weight):
    """KD targets are the teacher task's own logits (WS-DAN's crops, TransFG's part selection), for every teacher."""
    from finegrain import checkpoint as ckpt
    from finegrain.models.backbone import create_backbone
    from finegrain.tasks import LoadedCheckpoint, build_task

    teacher, meta = ckpt.load_task(world["ckpts"][task])
    student = create_backbone("test_resnet", num_classes=len(meta["classes"]), pretrained="none")
    d = build_task("distill", student, len(meta["classes"]), feature_weight=feature_weight,
                   teacher=LoadedCheckpoint(teacher, meta, str(world["ckpts"][task])))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    logits, feats, _ = d.teacher_outputs(x)
    torch.testing.assert_close(logits, teacher.predict(x), atol=1e-5, rtol=1e-4)
    assert (feats is None) == (feature_weight == 0)
    d.train()
    out = d({"image": x, "label": torch.tensor([0, 1])})
    assert torch.isfinite(out["loss"])
