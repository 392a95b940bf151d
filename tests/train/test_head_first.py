"""``--head-epochs``: the new layers train alone first (LP-FT), then every layer, for every supervised task."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from finegrain.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from finegrain.models.backbone import create_backbone
from finegrain.tasks import TASKS, build_task
from finegrain.train.optim import build_optimizer, build_scheduler, check_head_first

from ..helpers import make_cub_with_parts

SUPERVISED = [t for t in TASKS.names() if TASKS.get(t).trainer == "supervised"]


def _lrs(total: int, warmup: int, head: int) -> list[dict[str, float]]:
    """The learning rate of each group at every step of a scheduler built with ``head`` head steps."""
    task = build_task("supervised", create_backbone("test_resnet", num_classes=3), 3)
    opt = build_optimizer(task, TrainConfig(backbone_lr_mult=0.1), lr=1.0)
    sched = build_scheduler(opt, total_steps=total, warmup_steps=warmup, head_steps=head)
    out = []
    for _ in range(total):
        out.append({g["name"]: g["lr"] for g in opt.param_groups})
        opt.step()
        sched.step()
    return out


def test_the_head_stage_then_a_fresh_fine_tune_schedule():
    """Backbone at 0 while the head warms up and decays on its own; then exactly the schedule a fresh
    run of the remaining steps would have, for every group."""
    head, rest = _lrs(20, 4, 8), _lrs(12, 4, 0)
    assert all(row["backbone"] == 0.0 and row["backbone_no_decay"] == 0.0 for row in head[:8])
    assert head[3]["new"] == pytest.approx(1.0) and 0.0 < head[7]["new"] < 0.2  # warmed up, then decayed
    for got, want in zip(head[8:], rest):
        assert got == pytest.approx(want)
    assert rest[0]["backbone"] == pytest.approx(0.1 / 4)  # the fine-tune warms the backbone up again


def test_head_epochs_outside_the_run_are_refused():
    with pytest.raises(ValueError, match="--head-epochs must be between 0 and --epochs"):
        TrainConfig(epochs=3, head_epochs=4).check()
    with pytest.raises(ValueError, match="--head-epochs must be between"):
        TrainConfig(head_epochs=-1).check()
    TrainConfig(epochs=3, head_epochs=3).check()  # a linear probe only


def test_a_task_with_no_new_layers_is_refused():
    layer = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD([{"params": list(layer.parameters()), "name": "backbone"}], lr=0.1)
    with pytest.raises(ValueError, match="no new parameters.*drop --head-epochs"):
        check_head_first(opt, "mine")


@pytest.fixture(scope="module")
def cub(tmp_path_factory):
    return make_cub_with_parts(tmp_path_factory.mktemp("head-first"), n_train=4, n_test=1, size=48)


def _config(task: str, data, out) -> RunConfig:
    backbone = "test_vit" if task == "transfg" else "test_resnet"
    options = TASKS.get(task).Options()
    if task == "distill":  # a teacher of the same classes: a random-init supervised checkpoint
        from ..helpers import task_checkpoint

        teacher = task_checkpoint(out / "teacher.safetensors", "supervised", ["001.Red_Bird", "002.Green_Bird", "003.Blue_Bird"])
        options = dataclasses.replace(options, teacher=str(teacher))
    # fp32: torch 2.14's CPU bf16 weight gradient of a 3x3 stride-2 convolution over a 1x1 input (these 32 px
    # images, 16 px part crops) is garbage in some calls; real image sizes never reach a 1x1 map there
    return RunConfig(DataConfig(data=str(data), img_size=32, batch_size=4, workers=0, val_fraction=0.25),
                     ModelConfig(backbone=backbone, pretrained="none", task=task, options=options),
                     TrainConfig(epochs=2, head_epochs=1, lr=3e-3, warmup_epochs=0.0, out=str(out), name="run", seed=0,
                                 device="cpu", calibrate=False, amp=False))


def _optimizer_state(run_dir) -> dict[str, int]:
    """How many parameters of each optimizer group have optimizer state in ``last.state.pt``."""
    from finegrain.checkpoint import load_train_state

    opt = load_train_state(run_dir / "last.state.pt")["optimizer"]
    return {g["name"]: sum(i in opt["state"] for i in g["params"]) for g in opt["param_groups"]}


@pytest.mark.parametrize("task", SUPERVISED)
def test_every_supervised_task_trains_its_head_alone_then_everything(task, cub, tmp_path, monkeypatch):
    """After the head epoch the pretrained weights are the initial ones, the new ones moved, and only
    the new ones have optimizer state (the backbone got no gradient); after the fine-tune epoch the
    pretrained ones moved too, and a frozen teacher stayed frozen."""
    from finegrain.train import run

    built = {}

    def spy(*args, **kw):
        built["task"] = t = build_task_real(*args, **kw)
        built["start"] = {n: p.detach().clone() for n, p in t.named_parameters()}
        built["trainable"] = {n for n, p in t.named_parameters() if p.requires_grad}
        return t

    build_task_real = run.build_task
    monkeypatch.setattr(run, "build_task", spy)
    cfg = _config(task, cub, tmp_path)
    run.fit(cfg, max_epochs=1)
    t, start = built["task"], built["start"]
    new = t.new_parameter_names()
    pretrained = built["trainable"] - new
    assert new and pretrained, f"{task}: nothing to compare"
    after_head = {n: p.detach().clone() for n, p in t.named_parameters()}
    assert all(torch.equal(after_head[n], start[n]) for n in pretrained), f"{task}: a pretrained weight moved in the head stage"
    assert any(not torch.equal(after_head[n], start[n]) for n in new), f"{task}: the head stage trained nothing"
    state = _optimizer_state(tmp_path / "run")
    assert state["new"] > 0 and state["backbone"] == 0, f"{task}: the backbone had gradients in the head stage: {state}"
    cfg.train.resume = str(tmp_path / "run")
    run.fit(cfg)
    t = built["task"]
    moved = [n for n, p in t.named_parameters() if n in pretrained and not torch.equal(p.detach(), after_head[n])]
    assert moved, f"{task}: the fine-tune stage left the backbone as it was"
    assert _optimizer_state(tmp_path / "run")["backbone"] > 0
    assert {n for n, p in t.named_parameters() if p.requires_grad} == built["trainable"]  # a teacher stays frozen
