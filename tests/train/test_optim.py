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


@pytest.mark.parametrize("task_name,stem_power", [("supervised", 5), ("fgvc", 4)])
def test_layer_decay_scales_match_timms_reference(task_name, stem_power):
    """Each pretrained parameter's lr is lr x backbone_lr_mult x timm's layer-decay scale for it; new layers keep lr."""
    import torch
    from timm.optim import param_groups_layer_decay

    from finegrain.tasks import build_task

    task = build_task(task_name, create_backbone("test_resnet", num_classes=3), 3)
    ours = param_groups(task, lr=1.0, backbone_lr_mult=0.1, weight_decay=0.05, layer_decay=0.5)
    lr_of = {id(p): g["lr"] for g in ours for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in ours for p in g["params"]}
    assert len(lr_of) == len(list(task.parameters()))
    new = {id(p) for n, p in task.named_parameters() if n in task.new_parameter_names()}
    reference = param_groups_layer_decay(task.model, weight_decay=0.05, layer_decay=0.5)
    checked = 0
    for g in reference:
        for p in g["params"]:
            if id(p) in new:
                assert lr_of[id(p)] == 1.0
                continue
            assert lr_of[id(p)] == pytest.approx(0.1 * g["lr_scale"]) and decay_of[id(p)] == g["weight_decay"]
            checked += 1
    assert checked > 10
    stem = task.model.conv1[0].weight
    # test_resnet: stem, 4 stages and the classifier; fgvc replaces the classifier with its own head, one layer fewer
    assert lr_of[id(stem)] == pytest.approx(0.1 * 0.5 ** stem_power)
    assert param_groups(task, lr=1.0, backbone_lr_mult=0.1, weight_decay=0.05, layer_decay=1.0) == \
        param_groups(task, lr=1.0, backbone_lr_mult=0.1, weight_decay=0.05)
    with pytest.raises(ValueError, match="--layer-decay needs a backbone"):
        param_groups(torch.nn.Sequential(torch.nn.Linear(2, 2)), lr=1.0, backbone_lr_mult=0.1, weight_decay=0.0, layer_decay=0.5)


def test_layer_decay_flag_is_checked():
    from finegrain.config import TrainConfig

    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="--layer-decay"):
            TrainConfig(layer_decay=bad).check()


def test_build_optimizer_takes_layer_decay_from_the_config():
    from finegrain.config import TrainConfig
    from finegrain.tasks import build_task
    from finegrain.train.optim import build_optimizer

    task = build_task("supervised", create_backbone("test_resnet", num_classes=3), 3)
    opt = build_optimizer(task, TrainConfig(layer_decay=0.5, backbone_lr_mult=1.0), lr=1.0)
    lrs = sorted({g["lr"] for g in opt.param_groups})
    assert lrs[0] == pytest.approx(0.5 ** 5) and lrs[-1] == 1.0 and len(lrs) == 6
