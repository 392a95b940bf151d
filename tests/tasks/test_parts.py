"""The part-based tasks: part groups and PCK, variants, and training on CUB annotations end to end."""

from __future__ import annotations

import pytest
import torch

from finegrain.models.backbone import create_backbone
from finegrain.tasks import build_task
from finegrain.tasks.parts import PART_GROUPS, group_parts, parse_part_groups, pck

from ..helpers import _train_step_and_roundtrip, make_cub_with_parts


def test_group_parts_averages_visible_members():
    parts = torch.zeros(1, 15, 3)
    parts[0, 8] = torch.tensor([0.2, 0.4, 1.0])  # left wing (id 9)
    parts[0, 12] = torch.tensor([0.6, 0.8, 1.0])  # right wing (id 13)
    parts[0, 13] = torch.tensor([0.9, 0.9, 0.0])  # tail (id 14), invisible
    xy, vis = group_parts(parts, {"wing": (9, 13), "tail": (14,)})
    torch.testing.assert_close(xy[0, 0], torch.tensor([0.4, 0.6]))
    assert vis.tolist() == [[1.0, 0.0]]
    with pytest.raises(ValueError, match="part id 14"):
        group_parts(parts[:, :5], {"tail": (14,)})


def test_part_groups_and_pck():
    assert set(PART_GROUPS) == {"cub2", "cub4", "cub6", "cub15"} and len(PART_GROUPS["cub15"]) == 15
    assert parse_part_groups("head=2,5;tail=14") == {"head": (2, 5), "tail": (14,)}
    for bad in ("head", "head=", "head=0", "wing=a"):
        with pytest.raises(ValueError, match="--parts-groups"):
            parse_part_groups(bad)
    pred, gt = torch.tensor([[[0.5, 0.5], [0.0, 0.0]]]), torch.tensor([[[0.55, 0.5], [0.5, 0.5]]])
    assert pck(pred, gt, torch.tensor([[1.0, 1.0]])) == 50.0
    assert pck(pred, gt, torch.tensor([[1.0, 0.0]])) == 100.0


@pytest.mark.parametrize("task_name,kw", [("parts", {"pool": "mil", "groups": "cub15"}), ("parts", {"groups": "cub2"}),
                                          ("parts-weak", {"pool": "mil", "num_parts": 3})])
def test_part_task_variants(task_name, kw, tmp_path):
    task, out = _train_step_and_roundtrip("test_resnet", task_name, tmp_path, **kw)
    assert ("locate" in out and "box" in out) if task_name == "parts" else "diversity" in out


def test_parts_predicts_without_annotations_and_locates_parts():
    task = build_task("parts", create_backbone("test_resnet", num_classes=3), 3).eval()
    images = torch.randn(2, 3, 64, 64)
    _, box, xy = task.localise(images)
    assert xy.shape == (2, 4, 2) and box.shape == (2, 4) and (box[:, 2:] > box[:, :2]).all()
    assert task.predict(images).shape == (2, 3)
    task.train()
    with pytest.raises(ValueError, match="'box' annotations"):
        task({"image": images, "label": torch.tensor([0, 1])})


# --------------------------------------------------------------------------------------- end to end


def _train_args(data, out, *extra):
    return ["train", "--data", str(data), "--backbone", "test_resnet", "--pretrained", "none", "--img-size", "64",
            "--batch-size", "6", "--workers", "0", "--epochs", "1", "--warmup-epochs", "0", "--val-fraction", "0.25",
            "--device", "cpu", "--out", str(out), "--name", "m", *extra]


def test_parts_trains_on_cub_annotations_and_predicts_without_them(tmp_path, capsys):
    from finegrain.cli import main
    from finegrain.predict import Predictor

    root = make_cub_with_parts(tmp_path / "cub")
    rc = main(_train_args(root, tmp_path / "runs", "--task", "parts", "--parts-groups", "cub6", "--workers", "1"))
    assert rc == 0, capsys.readouterr().err
    pred = Predictor.from_checkpoint(tmp_path / "runs" / "m", device="cpu")
    assert pred.meta["task"] == "parts" and pred.meta["task_args"]["groups"] == "cub6"
    res = pred.predict([root / "CUB_200_2011" / "images"], topk=2)
    assert len(res) == 18 and all(len(r["topk"]) == 2 for r in res)


@pytest.mark.parametrize("boxes,parts,missing", [(False, True, "bounding_boxes.txt"), (True, False, "parts/part_locs.txt")])
def test_parts_without_annotation_files_stops_before_training(tmp_path, capsys, boxes, parts, missing):
    from finegrain.cli import main

    root = make_cub_with_parts(tmp_path / "cub", n_train=2, n_test=1, boxes=boxes, parts=parts)
    assert main(_train_args(root, tmp_path / "runs", "--task", "parts")) == 2
    assert f"missing {missing}" in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "runs").exists()  # refused before a run folder was made


@pytest.mark.parametrize("flags,drop", [(["--cache"], "--cache"), (["--cutmix", "1.0"], "--cutmix"),
                                        (["--augment", "trivialaugment"], "--augment")])
def test_parts_refuses_options_that_lose_the_annotations(tmp_path, capsys, flags, drop):
    from finegrain.cli import main

    root = make_cub_with_parts(tmp_path / "cub", n_train=2, n_test=1)
    assert main(_train_args(root, tmp_path / "runs", "--task", "parts", *flags)) == 2
    assert f"drop {drop}" in " ".join(capsys.readouterr().err.split())
