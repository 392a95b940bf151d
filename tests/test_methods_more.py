"""RA-CNN, part-based tasks, MIL pooling, attention transfer and the annotation plumbing:
parity with naive references, properties, round trips and the errors for bad input."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2

from finegrain.config import DataConfig, ModelConfig, RunConfig
from finegrain.data.base import ImageList
from finegrain.data.dataset import ImageDataset, check_annotations, collate
from finegrain.data.transforms import eval_transform, train_transform
from finegrain.models.backbone import create_backbone
from finegrain.models.crops import boxcar_mask, masked_zoom, soft_argmax, zoom
from finegrain.models.mil import AttentionMILPool
from finegrain.tasks import build_task
from finegrain.tasks.distill import attention_transfer_loss
from finegrain.tasks.parts import PART_GROUPS, group_parts, parse_part_groups, pck
from finegrain.tasks.racnn import ranking_loss
from tests.test_methods import _batch, _train_step_and_roundtrip, make_cub_with_parts

# ------------------------------------------------------------------------------ crops and parts


def test_masked_zoom_matches_index_crop_at_a_hard_mask():
    images = torch.randn(2, 3, 8, 8)
    box = torch.tensor([[2 / 8, 1 / 8, 6 / 8, 5 / 8], [0.0, 4 / 8, 4 / 8, 1.0]])  # 4x4 squares on pixel edges
    out = masked_zoom(images, box, 4, sharpness=1e4)
    torch.testing.assert_close(out[0], images[0, :, 1:5, 2:6])
    torch.testing.assert_close(out[1], images[1, :, 4:8, 0:4])
    torch.testing.assert_close(zoom(images, torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2), 8), images)  # identity box


def test_boxcar_mask_is_one_inside_and_zero_outside():
    mask = boxcar_mask(torch.tensor([[0.25, 0.5, 0.75, 1.0]]), 8, 8, sharpness=1e4)[0, 0]
    expected = torch.zeros(8, 8)
    expected[4:8, 2:6] = 1
    torch.testing.assert_close(mask, expected)


def test_masked_zoom_sends_a_gradient_to_the_box():
    images = torch.randn(1, 3, 16, 16)
    box = torch.tensor([[0.2, 0.3, 0.7, 0.8]], requires_grad=True)
    masked_zoom(images, box, 8).pow(2).sum().backward()
    assert box.grad is not None and (box.grad.abs() > 0).all()


def test_soft_argmax_on_known_heatmaps():
    heat = torch.full((1, 3, 4, 5), -1e4)
    heat[0, 0, 1, 3] = 0.0  # a single peak at row 1, column 3
    heat[0, 1] = 0.0  # uniform: the centre
    heat[0, 2, 0, 0] = heat[0, 2, 3, 4] = 0.0  # two equal peaks: their midpoint
    xy = soft_argmax(heat)
    torch.testing.assert_close(xy[0, 0], torch.tensor([3.5 / 5, 1.5 / 4]))
    torch.testing.assert_close(xy[0, 1], torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(xy[0, 2], torch.tensor([0.5, 0.5]))


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


# ------------------------------------------------------------------------------ losses and pooling


def test_ranking_loss_matches_the_hand_formula():
    p = [torch.tensor([0.9, 0.2, 0.5]), torch.tensor([0.7, 0.6, 0.5]), torch.tensor([0.1, 0.9, 0.56])]
    m = 0.05
    hand = 0.0
    for s in range(2):
        hand += sum(max(0.0, float(p[s][i] - p[s + 1][i]) + m) for i in range(3)) / 3
    assert ranking_loss(p, m).item() == pytest.approx(hand, abs=1e-6)


@pytest.mark.parametrize("gated", [True, False])
def test_mil_pool_matches_a_loop_and_ignores_order(gated):
    torch.manual_seed(0)
    pool = AttentionMILPool(6, hidden=5, gated=gated)
    bags = torch.randn(2, 4, 6)
    out = pool(bags)
    for b in range(2):  # the paper's formula, instance by instance
        scores = []
        for h in bags[b]:
            a = torch.tanh(pool.V(h))
            if gated:
                a = a * torch.sigmoid(pool.U(h))
            scores.append(pool.w(a))
        weights = torch.softmax(torch.cat(scores), 0)
        torch.testing.assert_close(out[b], sum(w * h for w, h in zip(weights, bags[b])))
    for perm in itertools.islice(itertools.permutations(range(4)), 1, 6):
        torch.testing.assert_close(pool(bags[:, list(perm)]), out)
    mask = torch.tensor([[True, True, False, False]] * 2)  # masked instances do not count
    torch.testing.assert_close(pool(bags, mask), pool(bags[:, :2]))


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


# ------------------------------------------------------------------------------ annotations in the data


def _annotated_list(tmp_path, size=(40, 30), blobs=((10, 12), (35, 25))):
    w, h = size
    arr = np.zeros((h, w, 3), np.uint8)
    for x, y in blobs:
        arr[y, x] = 255
    path = tmp_path / "a.png"  # lossless: the blob stays one pixel
    Image.fromarray(arr).save(path)
    parts = [(i + 1, float(x), float(y), True) for i, (x, y) in enumerate(blobs)] + [(len(blobs) + 1, 0.0, 0.0, False)]
    return ImageList([str(path)], [0], ["a"], boxes=[(4.0, 6.0, 20.0, 12.0)], parts=[parts], source=f"test:{tmp_path}")


def test_box_and_keypoints_follow_crop_flip_and_resize(tmp_path):
    images = _annotated_list(tmp_path)
    t = v2.Compose([v2.ToImage(), v2.CenterCrop((20, 30)), v2.RandomHorizontalFlip(p=1.0), v2.Resize((40, 60)),
                    v2.ToDtype(torch.float32, scale=True)])
    item = ImageDataset(images, t, annotations=("boxes", "parts"))[0]
    # naive: crop offset (5, 5) (top, left), mirror x -> 29 - x (points) / 30 - x (box edges), scale x2, to [0, 1]
    naive_pts = [((29 - (x - 5)) * 2, (y - 5) * 2) for x, y in ((10, 12), (35, 25))]
    expected = torch.tensor([[(naive_pts[0][0] + 0.5) / 60, (naive_pts[0][1] + 0.5) / 40, 1.0],
                             [(naive_pts[1][0] + 0.5) / 60, (naive_pts[1][1] + 0.5) / 40, 0.0],  # cropped away
                             [(29 - (0 - 5)) * 2 / 60 + 0.5 / 60, (0 - 5) * 2 / 40 + 0.5 / 40, 0.0]])  # marked invisible
    torch.testing.assert_close(item["parts"], expected)
    x0, y0, x1, y1 = max(4 - 5, 0), 6 - 5, 24 - 5, 18 - 5  # box clipped to the crop, then mirrored
    torch.testing.assert_close(item["box"], torch.tensor([(30 - x1) * 2 / 60, y0 * 2 / 40, (30 - x0) * 2 / 60, y1 * 2 / 40]))


def test_keypoints_land_on_their_pixel_after_random_resized_crop(tmp_path):
    images = _annotated_list(tmp_path, size=(64, 48), blobs=((20, 30),))
    t = v2.Compose([v2.ToImage(), v2.RandomResizedCrop(48, scale=(0.5, 1.0), antialias=False,
                                                       interpolation=v2.InterpolationMode.NEAREST),
                    v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True)])
    data, checked = ImageDataset(images, t, annotations=("parts",)), 0
    for seed in range(30):
        torch.manual_seed(seed)
        item = data[0]
        x, y, visible = item["parts"][0].tolist()
        bright = item["image"].sum(0)
        if not visible or bright.max() == 0:  # cropped away, or nearest resampling skipped the one-pixel blob
            continue
        row, col = divmod(int(bright.argmax()), bright.shape[1])
        assert abs(x * 48 - (col + 0.5)) <= 1.5 and abs(y * 48 - (row + 0.5)) <= 1.5
        checked += 1
    assert checked >= 5


def test_presets_and_collate_carry_annotations(tmp_path):
    images = _annotated_list(tmp_path)
    for t in (train_transform(32), eval_transform(32)):
        data = ImageDataset(images, t, annotations=("boxes", "parts"))
        batch = collate([data[0], data[0], {"skipped": "x.jpg", "error": "bad"}])
        assert batch["image"].shape == (2, 3, 32, 32) and batch["box"].shape == (2, 4) and batch["parts"].shape == (2, 3, 3)
        assert ((batch["box"] >= 0) & (batch["box"] <= 1)).all() and batch["parts"][:, 2, 2].eq(0).all()
    plain = collate([ImageDataset(images, eval_transform(32))[0]])
    assert "box" not in plain and "parts" not in plain


def test_missing_annotations_and_conflicting_options_are_refused(tmp_path):
    plain = ImageList(["a.jpg"], [0], ["a"], source=f"cub:{tmp_path}")
    with pytest.raises(FileNotFoundError, match="bounding_boxes.txt"):
        check_annotations(plain, ("boxes",), task="parts")
    with pytest.raises(FileNotFoundError, match=r"parts/part_locs\.txt"):
        check_annotations(ImageList(["a.jpg"], [0], ["a"], boxes=[None]), ("boxes", "parts"), task="parts")
    full = _annotated_list(tmp_path)
    for kw, flag in (({"cache": True}, "drop --cache"), ({"mixing": True}, "drop --cutmix"),
                     ({"augment": "randaugment"}, "drop --augment"), ({"pipeline": "device"}, "--pipeline cpu")):
        with pytest.raises(ValueError, match=flag):
            check_annotations(full, ("parts",), task="parts", **kw)
    check_annotations(full, ("boxes", "parts"), task="parts", augment="colorjitter")
    check_annotations(plain, (), cache=True)  # nothing needed, nothing refused


# ------------------------------------------------------------------------------ tasks


@pytest.mark.parametrize("kw", [{"scales": 2}, {"scales": 3, "shared_backbone": False}])
def test_racnn_variants(kw, tmp_path):
    task, out = _train_step_and_roundtrip("test_efficientnet", "racnn", tmp_path, **kw)
    assert {f"ce_{s + 1}" for s in range(kw["scales"])} <= set(out) and "rank" in out
    assert len(task.classifiers) == kw["scales"] and len(task.apns) == kw["scales"] - 1
    if not kw.get("shared_backbone", True):  # the copies start pretrained: backbone learning rate
        assert not any(n.startswith("extra_backbones.") for n in task.new_parameter_names())


def test_racnn_crops_zoom_into_the_proposed_square():
    task = build_task("racnn", create_backbone("test_resnet", num_classes=3), 3, scales=2).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits, inputs, boxes = task.scale_outputs(images)
    assert len(logits) == 2 and inputs[1].shape == images.shape
    side = boxes[0][:, 2] - boxes[0][:, 0]
    torch.testing.assert_close(side, boxes[0][:, 3] - boxes[0][:, 1])  # squares
    assert ((side >= 1 / 3) & (side <= 1)).all()
    torch.testing.assert_close(task.predict(images), torch.stack(logits).mean(0))


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


def test_the_loop_hands_annotations_to_forward():
    from finegrain.train.loop import train_one_epoch

    task = build_task("parts", create_backbone("test_resnet", num_classes=3), 3)
    b = _batch()
    loader = [{"image": b["image"], "label": b["label"], "box": b["box"], "parts": b["parts"], "skipped": []}]
    opt = torch.optim.SGD(task.parameters(), lr=0.0)
    out = train_one_epoch(task, loader, opt, None, device=torch.device("cpu"))
    assert out["images"] == b["image"].shape[0] and math.isfinite(out["loss"])


@pytest.mark.parametrize("task_name", ["racnn", "parts", "parts-weak"])
def test_token_backbones_are_refused_with_the_compatible_kinds(task_name):
    with pytest.raises(ValueError, match="CNN backbone.*resnet"):
        build_task(task_name, create_backbone("test_vit", num_classes=3), 3)


def _model(task, **flags):
    """A ModelConfig given the way flags and config files give it: task options by their flag names."""
    return RunConfig.from_dict({"model": {"task": task, **flags}}).model


def test_model_config_checks_the_new_flags():
    _model("racnn", racnn_scales=2, racnn_shared_backbone=False).check()
    _model("parts", parts_groups="cub6", parts_pool="mil").check()
    _model("parts-weak", parts_num=6, parts_size=0.3).check()
    _model("distill", teacher="t.safetensors", kd_attention_weight=500).check()
    _model("transfg", transfg_contrastive_weight=0.5, transfg_margin=0.3).check()
    for task, flags, match in (("racnn", {"racnn_scales": 4}, "--racnn-scales must be 2 or 3"),
                               ("supervised", {"racnn_scales": 2}, "drop --racnn-scales"),
                               ("parts-weak", {"parts_groups": "cub6"}, "drop --parts-groups"),
                               ("parts", {"parts_num": 3}, "add --task parts-weak"),
                               ("fgvc", {"parts_pool": "mil"}, "--task parts or --task parts-weak"),
                               ("supervised", {"kd_attention_weight": 1.0}, "drop --kd-attention-weight"),
                               ("fgvc", {"transfg_margin": 0.2}, "drop --transfg-margin"),
                               ("parts", {"parts_pool": "max"}, "--parts-pool must be"),
                               ("parts", {"parts_groups": "wings"}, "--parts-groups must be"),
                               ("parts", {"parts_size": 0.0}, "--parts-size")):
        with pytest.raises(ValueError, match=match):
            _model(task, **flags).check()


def test_transfg_takes_its_weight_and_margin_from_the_config():
    from finegrain.train.run import build_task_from_config

    cfg = RunConfig(DataConfig(data="x", img_size=32), ModelConfig(backbone="test_vit", pretrained="none", task="transfg",
                                                                 options={"contrastive_weight": 0.25, "margin": 0.2}))
    task = build_task_from_config(cfg, 3)
    assert (task.contrastive_weight, task.margin) == (0.25, 0.2)
    assert task.task_args()["margin"] == 0.2


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


# ------------------------------------------------------------------------------ end to end


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
