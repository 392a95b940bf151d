"""Every attention x pooling of the fgvc task and every registered task on the tiny test backbones:
one train step (shapes, no NaN, every parameter gets a gradient) and a checkpoint round trip."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finegrain.checkpoint import CheckpointMeta, load_task, save
from finegrain.config import ModelConfig
from finegrain.models.attention import ATTENTIONS
from finegrain.models.backbone import create_backbone
from finegrain.models.pooling import POOLINGS
from finegrain.tasks import TASKS, build_task
from finegrain.tasks.wsdan import attention_crop, attention_drop, bilinear_attention_pooling

BACKBONES = ["test_resnet", "test_efficientnet"]
NUM_CLASSES = 3


def _batch(size: int = 64):
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 0, 1, 2])
    parts = torch.rand(4, 15, 3, generator=g)
    parts[..., 2] = (parts[..., 2] > 0.3).float()  # about a third of the parts invisible
    box = torch.tensor([[0.1, 0.2, 0.8, 0.9], [0.0, 0.0, 1.0, 1.0], [0.3, 0.1, 0.6, 0.5], [0.2, 0.2, 0.9, 0.7]])
    return {"image": torch.randn(4, 3, size, size, generator=g), "label": labels, "target": labels,
            "box": box, "parts": parts}


def make_cub_with_parts(root: Path, *, n_train: int = 4, n_test: int = 2, size: int = 48, boxes: bool = True,
                        parts: bool = True, seed: int = 0) -> Path:
    """A tiny CUB-200-2011 folder (3 coloured "species") with bounding_boxes.txt and the 15 part locations."""
    rng = np.random.default_rng(seed)
    base = root / "CUB_200_2011"
    colours = {1: ("001.Red_Bird", (200, 40, 40)), 2: ("002.Green_Bird", (40, 180, 60)), 3: ("003.Blue_Bird", (50, 60, 210))}
    files = {k: [] for k in ("images", "labels", "split", "boxes", "locs")}
    image_id = 0
    for cid, (folder, rgb) in colours.items():
        for k in range(n_train + n_test):
            image_id += 1
            rel = f"{folder}/{folder.split('.')[1]}_{k:04d}.jpg"
            arr = np.clip(np.array(rgb) + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
            (base / "images" / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(base / "images" / rel, quality=90)
            files["images"].append(f"{image_id} {rel}")
            files["labels"].append(f"{image_id} {cid}")
            files["split"].append(f"{image_id} {int(k < n_train)}")
            x, y = rng.uniform(0, size / 3, 2)
            files["boxes"].append(f"{image_id} {x:.1f} {y:.1f} {size / 2:.1f} {size / 2:.1f}")
            for pid in range(1, 16):
                visible = int(rng.random() > 0.2)
                px, py = (rng.uniform(x, x + size / 2), rng.uniform(y, y + size / 2)) if visible else (0.0, 0.0)
                files["locs"].append(f"{image_id} {pid} {px:.1f} {py:.1f} {visible}")
    from finegrain.tasks.parts import CUB_PARTS

    out = {"images.txt": files["images"], "image_class_labels.txt": files["labels"], "train_test_split.txt": files["split"],
           "classes.txt": [f"{cid} {folder}" for cid, (folder, _) in colours.items()]}
    if boxes:
        out["bounding_boxes.txt"] = files["boxes"]
    if parts:
        out["parts/part_locs.txt"] = files["locs"]
        out["parts/parts.txt"] = [f"{i} {n}" for i, n in enumerate(CUB_PARTS, 1)]
    for name, lines in out.items():
        (base / name).parent.mkdir(parents=True, exist_ok=True)
        (base / name).write_text("\n".join(lines) + "\n")
    return root


def _train_step_and_roundtrip(backbone, task_name, tmp_path, size=64, **kw):
    torch.manual_seed(0)
    model = create_backbone(backbone, num_classes=NUM_CLASSES, pretrained="none")
    task = build_task(task_name, model, NUM_CLASSES, label_smoothing=0.1, **kw)
    task.train()
    out = task(_batch(size))
    assert out["logits"].shape == (4, NUM_CLASSES)
    assert torch.isfinite(out["loss"]) and torch.isfinite(out["logits"]).all()
    out["loss"].backward()
    missing = [n for n, p in task.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in task.parameters() if p.grad is not None)
    with torch.no_grad():  # move off the initial state so the round trip is not trivially equal
        for p in task.parameters():
            p.add_(0.01 * torch.randn_like(p))
    task.eval()
    images = _batch(size)["image"][:2]
    expected = task.predict(images)
    assert expected.shape == (2, NUM_CLASSES) and torch.isfinite(expected).all()
    model_cfg = dataclasses.asdict(ModelConfig(backbone=backbone, pretrained="none", task=task_name))
    path = save(tmp_path / "ckpt.safetensors", task.state_dict(), CheckpointMeta(**{
        "task": task_name, "task_args": task.task_args(), "model": model_cfg, "num_classes": NUM_CLASSES,
        "classes": ["a", "b", "c"], "preprocessing": {"img_size": size, "mean": [0.5] * 3, "std": [0.5] * 3,
                                                      "crop_pct": 1.0, "interpolation": "bilinear"}}))
    rebuilt, _ = load_task(path, "cpu")
    torch.testing.assert_close(rebuilt.predict(images), expected)
    return task, out


REGISTRY_CASES = {  # task -> (backbone, image size or None for the backbone's native size, task kwargs)
    "supervised": ("test_resnet", 32, {}),
    "fgvc": ("test_efficientnet", 32, {}),
    "wsdan": ("test_resnet", 64, {"num_parts": 4}),
    "transfg": ("test_vit", None, {}),
    "racnn": ("test_resnet", 64, {}),
    "parts": ("test_efficientnet", 64, {}),
    "parts-weak": ("test_resnet", 64, {}),
}
ELSEWHERE = {"distill": "needs a teacher checkpoint (tests/test_distill.py, tests/test_methods_more.py)",
             "fewshot_baseline": "episodic (tests/test_fewshot.py)", "maml": "episodic", "protonet": "episodic",
             "relationnet": "episodic"}


def test_registry_cases_cover_every_task():
    assert set(TASKS.names()) <= set(REGISTRY_CASES) | set(ELSEWHERE)


@pytest.mark.parametrize("task_name", sorted(REGISTRY_CASES))
def test_every_registered_task(task_name, tmp_path):
    backbone, size, kw = REGISTRY_CASES[task_name]
    size = size or create_backbone(backbone, num_classes=3).pretrained_cfg["input_size"][1]
    task, _ = _train_step_and_roundtrip(backbone, task_name, tmp_path, size=size, **kw)
    if task.annotations:  # the annotations are for training only: predict works without them
        assert set(task.annotations) <= {"boxes", "parts"}


@pytest.mark.parametrize("pooling", POOLINGS.names())
@pytest.mark.parametrize("attention", ATTENTIONS.names())
@pytest.mark.parametrize("backbone", BACKBONES)
def test_fgvc_every_attention_and_pooling(backbone, attention, pooling, tmp_path):
    _train_step_and_roundtrip(backbone, "fgvc", tmp_path, size=32 if attention == "none" else 64,
                              attention=attention, pooling=pooling, pool_dim=128)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_fgvc_all_losses_and_reduction(backbone, tmp_path):
    _, out = _train_step_and_roundtrip(backbone, "fgvc", tmp_path, attention="dual", pooling="bilinear",
                                       reduce_dim=16, drop_rate=0.2, loss="ce+focal:0.5+center:0.01+triplet:1.0")
    assert {"ce", "focal", "center", "triplet"} <= set(out)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_wsdan(backbone, tmp_path):
    task, out = _train_step_and_roundtrip(backbone, "wsdan", tmp_path, num_parts=4)
    assert {"ce_raw", "ce_crop", "ce_drop", "center"} <= set(out)
    assert task.feature_center.abs().sum() > 0  # the momentum update ran
    assert set(task.new_parameter_names()) >= {"attention.0.weight", "classifier.weight"}


def test_wsdan_center_buffer_is_not_updated_in_eval():
    task = build_task("wsdan", create_backbone("test_resnet", num_classes=3, pretrained="none"), 3, num_parts=2)
    task.eval()
    task(_batch())
    assert task.feature_center.abs().sum() == 0


def test_bap_matches_einsum_reference():
    feats, maps = torch.randn(2, 5, 3, 4), torch.rand(2, 6, 3, 4)
    ref = torch.einsum("imjk,injk->imn", maps, feats) / 12
    ref = ref.reshape(2, -1)
    ref = torch.nn.functional.normalize(torch.sign(ref) * torch.sqrt(ref.abs() + 1e-8), dim=-1)
    torch.testing.assert_close(bilinear_attention_pooling(feats, maps), ref)


def test_attention_crop_and_drop_follow_the_map():
    images = torch.arange(16.0).view(1, 1, 4, 4).expand(1, 3, 4, 4).contiguous()
    peak = torch.zeros(1, 1, 4, 4)
    peak[0, 0, 0, 0] = 1.0  # attention only in the top-left corner
    crop = attention_crop(images, peak, torch.tensor([0.9]), padding_ratio=0.0)
    torch.testing.assert_close(crop, torch.zeros_like(images))  # zoomed onto pixel (0, 0), value 0
    dropped = attention_drop(images + 1, peak, torch.tensor([0.9]))
    assert dropped[0, 0, 0, 0] == 0 and (dropped[0, 0].flatten()[1:] > 0).all()


def test_token_backbone_refuses_feature_map_parts_and_accepts_avg():
    vit = lambda: create_backbone("test_vit", num_classes=3, pretrained="none")  # noqa: E731
    for kw in ({"pooling": "bilinear"}, {"attention": "se"}):
        with pytest.raises(ValueError, match="--pooling avg"):
            build_task("fgvc", vit(), 3, **kw)
    with pytest.raises(ValueError, match="4-D feature map"):
        build_task("wsdan", vit(), 3)
    task = build_task("fgvc", vit(), 3, loss="ce+center:0.1")
    size = vit().pretrained_cfg["input_size"][1]
    out = task({"image": torch.randn(2, 3, size, size), "label": torch.tensor([0, 1])})
    assert out["logits"].shape == (2, 3) and torch.isfinite(out["loss"])


def test_model_config_check_names_the_flag():
    from finegrain.config import RunConfig

    def model(task, **flags):  # task options by flag name, as the CLI and config files give them
        return RunConfig.from_dict({"model": {"task": task, **flags}}).model

    model("fgvc", attention="cbam", pooling="compact_bilinear", loss="ce+triplet:1").check()
    ModelConfig(task="fgvc", options={"attention": "cbam", "pooling": "compact_bilinear"}).check()
    with pytest.raises(ValueError, match="--pooling must be one of"):
        model("fgvc", pooling="billinear").check()
    with pytest.raises(ValueError, match="--task fgvc"):
        model("supervised", attention="se").check()
    with pytest.raises(ValueError, match="--wsdan-parts"):
        model("wsdan", wsdan_parts=0).check()
    with pytest.raises(ValueError, match="task wsdan has no options.*num_parts"):
        ModelConfig(task="wsdan", options={"parts": 3}).check()


@pytest.mark.parametrize("extra", [
    ["--task", "fgvc", "--attention", "se", "--pooling", "compact_bilinear", "--pool-dim", "64",
     "--loss", "ce+center:0.01+triplet:1"],
    ["--task", "wsdan", "--wsdan-parts", "4"],
    ["--task", "racnn", "--racnn-scales", "2"],
    ["--task", "parts-weak", "--parts-num", "2", "--parts-pool", "mil"],
])
def test_train_and_predict_through_the_cli(image_folder, tmp_path, capsys, extra):
    from finegrain.cli import main
    from finegrain.predict import Predictor

    out = tmp_path / "runs"
    rc = main(["train", "--data", str(image_folder), "--backbone", "test_resnet", "--pretrained", "none",
               "--img-size", "64", "--batch-size", "8", "--workers", "0", "--epochs", "1", "--lr", "3e-3",
               "--warmup-epochs", "0", "--device", "cpu", "--out", str(out), "--name", "m", *extra])
    assert rc == 0
    capsys.readouterr()
    pred = Predictor.from_checkpoint(out / "m", device="cpu")
    assert pred.meta["task"] == extra[1]
    res = pred.predict([image_folder / "test" / "red"], topk=2)
    assert len(res) == 3 and all(len(r["topk"]) == 2 for r in res)


def test_cli_refuses_fgvc_flags_without_the_task(image_folder, tmp_path, capsys):
    from finegrain.cli import main

    rc = main(["train", "--data", str(image_folder), "--backbone", "test_resnet", "--pretrained", "none",
               "--img-size", "32", "--workers", "0", "--epochs", "1", "--device", "cpu",
               "--out", str(tmp_path / "runs"), "--pooling", "bilinear"])
    assert rc == 2
    assert "--task fgvc" in " ".join(capsys.readouterr().err.split())


def test_transfg_train_step_and_roundtrip(tmp_path):
    size = create_backbone("test_vit", num_classes=3, pretrained="none").pretrained_cfg["input_size"][1]
    task, out = _train_step_and_roundtrip("test_vit", "transfg", tmp_path, size=size)
    assert {"ce", "contrastive"} <= set(out)


def test_transfg_attention_and_part_selection_match_references():
    from finegrain.tasks.transfg import attention_probs, select_parts

    torch.manual_seed(0)
    model = create_backbone("test_vit", num_classes=3, pretrained="none").eval()
    size = model.pretrained_cfg["input_size"][1]
    images = torch.randn(2, 3, size, size)
    captured = []
    for blk in model.blocks:  # timm's own (unfused) attention probabilities, captured at attn_drop
        blk.attn.fused_attn = False
        blk.attn.attn_drop.register_forward_hook(lambda mod, inp, out: captured.append(out))
    with torch.no_grad():
        model.forward_features(images)
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
        ours = []
        for blk in model.blocks:
            ours.append(attention_probs(blk, x))
            x = blk(x)
    for a, b in zip(ours, captured):
        torch.testing.assert_close(a, b)
    idx = select_parts(ours[:-1], 1)
    b_, h, n, _ = ours[0].shape
    for b in range(b_):
        for head in range(h):
            roll = ours[0][b, head]
            for a in ours[1:-1]:
                roll = a[b, head] @ roll
            assert idx[b, head] == 1 + int(roll[0, 1:].argmax())


def test_transfg_refuses_cnn_backbones():
    with pytest.raises(ValueError, match="VisionTransformer"):
        build_task("transfg", create_backbone("test_resnet", num_classes=3, pretrained="none"), 3)


def test_transfg_contrastive_loss_matches_pair_loop():
    from finegrain.tasks.transfg import contrastive_loss

    feats, labels = torch.randn(5, 4), torch.tensor([0, 1, 0, 2, 1])
    total = 0.0
    for i in range(5):
        for j in range(5):
            cos = float(torch.nn.functional.cosine_similarity(feats[i], feats[j], dim=0))
            total += 1 - cos if labels[i] == labels[j] else max(cos - 0.4, 0.0)
    assert contrastive_loss(feats, labels, 0.4).item() == pytest.approx(total / 25, abs=1e-5)
