"""TransFG: a train step, attention and part selection against timm, the contrastive loss, its options."""

from __future__ import annotations

import pytest
import torch

from finegrain.config import DataConfig, ModelConfig, RunConfig
from finegrain.models.backbone import create_backbone
from finegrain.tasks import build_task

from ..helpers import _train_step_and_roundtrip


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


def test_transfg_contrastive_loss_is_the_authors_pair_sum_over_the_batch_size():
    """The authors' con_loss (TACJu/TransFG): the pair sum divided by B; "pairs" divides by B^2."""
    from finegrain.tasks.transfg import contrastive_loss

    feats, labels = torch.randn(5, 4), torch.tensor([0, 1, 0, 2, 1])
    total = 0.0
    for i in range(5):
        for j in range(5):
            cos = float(torch.nn.functional.cosine_similarity(feats[i], feats[j], dim=0))
            total += 1 - cos if labels[i] == labels[j] else max(cos - 0.4, 0.0)
    assert contrastive_loss(feats, labels, 0.4).item() == pytest.approx(total / 5, abs=1e-5)
    assert contrastive_loss(feats, labels, 0.4, "pairs").item() == pytest.approx(total / 25, abs=1e-5)


def _vit_task(**kw):
    torch.manual_seed(0)
    model = create_backbone("test_vit", num_classes=3, pretrained="none")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    return build_task("transfg", model, 3, **kw), before


def test_transfg_patches_overlap_by_default_with_stride_12():
    task, before = _vit_task()
    pe = task.model.patch_embed
    assert pe.proj.stride == (12, 12) and pe.proj.kernel_size == (16, 16)
    grid = (160 - 16) // 12 + 1  # 13 x 13 patches instead of 10 x 10
    assert tuple(pe.grid_size) == (grid, grid) and task.model.pos_embed.shape[1] == 1 + grid * grid
    torch.testing.assert_close(task.model.pos_embed[:, 0], before["pos_embed"][:, 0])  # the class token's is kept
    images = torch.randn(2, 3, 160, 160)
    tokens, idx = task.tokens(images)
    assert tokens.shape[1] == 1 + task.model.blocks[0].attn.num_heads and int(idx.max()) <= grid * grid
    with torch.no_grad():
        torch.testing.assert_close(task.model.patch_embed(images).flatten(1, 2)[0, 13],  # row 1, column 0
                                   (torch.nn.functional.conv2d(images[:1, :, 12:28, 0:16], pe.proj.weight) +
                                    pe.proj.bias[None, :, None, None]).flatten())
    plain, _ = _vit_task(slide_step=0)
    assert plain.model.patch_embed.proj.stride == (16, 16) and plain.model.pos_embed.shape[1] == 101
    with pytest.raises(ValueError, match="larger than the 16 px patches"):
        _vit_task(slide_step=20)


def test_transfg_part_layer_starts_untrained_as_in_the_authors_code():
    task, before = _vit_task()
    last = len(task.model.blocks) - 1
    sd = task.model.state_dict()
    for k, v in sd.items():
        if k.startswith(f"blocks.{last}.") and k.endswith("weight") and v.ndim == 2:
            assert not torch.allclose(v, before[k]), k  # re-initialised
        elif k.startswith("blocks.") and not k.startswith(f"blocks.{last}."):
            torch.testing.assert_close(v, before[k])  # the other blocks keep their (pretrained) weights
    assert sd[f"blocks.{last}.mlp.fc1.bias"].abs().max() < 1e-4  # the authors' Mlp init: N(0, 1e-6) biases
    torch.testing.assert_close(sd["norm.weight"], torch.ones_like(sd["norm.weight"]))
    assert {f"model.blocks.{last}.attn.qkv.weight", "model.norm.weight"} <= task.new_parameter_names()
    kept, before = _vit_task(part_layer="pretrained")
    for k, v in kept.model.state_dict().items():
        if k.startswith("blocks."):
            torch.testing.assert_close(v, before[k])
    assert not any(n.startswith("model.blocks.") for n in kept.new_parameter_names())


def test_transfg_takes_its_weight_and_margin_from_the_config():
    from finegrain.train.run import build_task_from_config

    cfg = RunConfig(DataConfig(data="x", img_size=32), ModelConfig(backbone="test_vit", pretrained="none", task="transfg",
                                                                 options={"contrastive_weight": 0.25, "margin": 0.2}))
    task = build_task_from_config(cfg, 3)
    assert (task.contrastive_weight, task.margin) == (0.25, 0.2)
    assert task.task_args()["margin"] == 0.2
