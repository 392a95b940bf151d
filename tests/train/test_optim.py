"""Parameter groups and the learning-rate schedule."""

import math

import pytest

from finegrain.models.backbone import create_backbone
from finegrain.train.optim import param_groups, warmup_cosine


def test_param_groups_lr_mult_and_no_decay_on_norms_and_biases():
    from finegrain.tasks import build_task

    task = build_task("supervised", create_backbone("test_resnet", num_classes=3), 3)
    groups = {g["name"]: g for g in param_groups(task, lr=1.0, backbone_lr_mult=0.1, weight_decay=0.05)}
    assert groups["backbone"]["lr"] == pytest.approx(0.1) and groups["backbone"]["weight_decay"] == 0.05
    assert groups["backbone_no_decay"]["weight_decay"] == 0.0
    assert groups["new"]["lr"] == 1.0 and groups["new_no_decay"]["weight_decay"] == 0.0
    head = task.model.get_classifier()
    assert any(p is head.weight for p in groups["new"]["params"])
    assert any(p is head.bias for p in groups["new_no_decay"]["params"])
    n_params = sum(len(g["params"]) for g in groups.values())
    assert n_params == len(list(task.parameters()))


def test_warmup_cosine_schedule_values():
    f = warmup_cosine(total_steps=110, warmup_steps=10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(110) == pytest.approx(0.0, abs=1e-12)
