"""The training loop for one epoch."""

from __future__ import annotations

import math

import torch

from finegrain.models.backbone import create_backbone
from finegrain.tasks import build_task

from ..helpers import _batch


def test_the_loop_hands_annotations_to_forward():
    from finegrain.train.loop import train_one_epoch

    task = build_task("parts", create_backbone("test_resnet", num_classes=3), 3)
    b = _batch()
    loader = [{"image": b["image"], "label": b["label"], "box": b["box"], "parts": b["parts"], "skipped": []}]
    opt = torch.optim.SGD(task.parameters(), lr=0.0)
    out = train_one_epoch(task, loader, opt, None, device=torch.device("cpu"))
    assert out["images"] == b["image"].shape[0] and math.isfinite(out["loss"])
