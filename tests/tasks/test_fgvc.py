"""The fgvc task: losses and reduction; token backbones and the feature-map check."""

from __future__ import annotations

import pytest
import torch

from finegrain.models.backbone import create_backbone
from finegrain.tasks import build_task

from ..helpers import BACKBONES, _train_step_and_roundtrip


@pytest.mark.parametrize("backbone", BACKBONES)
def test_fgvc_all_losses_and_reduction(backbone, tmp_path):
    _, out = _train_step_and_roundtrip(backbone, "fgvc", tmp_path, attention="dual", pooling="bilinear",
                                       reduce_dim=16, drop_rate=0.2, loss="ce+focal:0.5+center:0.01+triplet:1.0")
    assert {"ce", "focal", "center", "triplet"} <= set(out)


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


@pytest.mark.parametrize("task_name", ["racnn", "parts", "parts-weak"])
def test_token_backbones_are_refused_with_the_compatible_kinds(task_name):
    with pytest.raises(ValueError, match="CNN backbone.*resnet"):
        build_task(task_name, create_backbone("test_vit", num_classes=3), 3)
