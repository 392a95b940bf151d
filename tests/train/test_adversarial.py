"""Adversarial examples and training: FGSM/PGD against naive and closed-form references, every
classifier task attacked and trained, the trainer's resume left exact."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from finegrain.config import TrainConfig
from finegrain.tasks import classifier_tasks
from finegrain.train.adversarial import (
    AdversarialTraining,
    Attack,
    adversarial_images,
    adversarial_training,
    classifier_loss,
    fgsm,
    linf_attack,
    make_attack,
    pgd,
)

from ..conftest import tiny_config
from ..helpers import CLASSES, _batch, task_checkpoint
from .test_trainer import _weights, assert_same_state, interrupt_after

MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)


class _Linear(nn.Module):
    """A linear classifier on the flattened image, with a Task's ``infer``."""

    name, outputs = "linear", "classes"

    def __init__(self, classes: int = 3, size: int = 4, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc = nn.Linear(3 * size * size, classes)

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


class _SmallNet(_Linear):
    """A tiny non-linear classifier (conv, BatchNorm, ReLU) whose loss is not linear in the image."""

    def __init__(self, seed: int = 0):
        super().__init__(seed=seed)
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def infer(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean(1, keepdim=True).expand(-1, 3, -1, -1).flatten(1))


def _pixels(n=6, size=4, seed=1, lo=0.0, hi=1.0):
    g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(n, 3, size, size, generator=g), torch.randint(0, 3, (n,), generator=g)


def _normalise(x):
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def test_fgsm_equals_the_naive_reference():
    model, eps = _Linear(), 8 / 255
    x, y = _pixels()
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model.infer(_normalise(xr)), y, reduction="sum"), xr)
    naive = (x + eps * grad.sign()).clamp(0, 1)
    ours = linf_attack(classifier_loss(model, MEAN, STD), x, y, fgsm(eps))
    assert torch.equal(ours, naive)
    assert ((x + eps * grad.sign() > 1) | (x + eps * grad.sign() < 0)).any()  # the clamp was exercised
    # through the normalised interface the step takes
    adv = adversarial_images(model, _normalise(x), y, fgsm(eps), mean=MEAN, std=STD)
    torch.testing.assert_close(adv, _normalise(naive), atol=1e-5, rtol=0)


def test_pgd_with_one_step_and_no_random_start_is_fgsm():
    model, eps = _SmallNet(), 4 / 255
    x, y = _pixels()
    loss = classifier_loss(model.eval(), MEAN, STD)
    one = Attack("pgd", eps, steps=1, step_size=eps, random_start=False)
    assert torch.equal(linf_attack(loss, x, y, one), linf_attack(loss, x, y, fgsm(eps)))


@pytest.mark.parametrize("random_start", [False, True])
def test_pgd_stays_in_the_ball_and_never_lowers_the_loss(random_start):
    model, eps = _SmallNet().eval(), 8 / 255
    x, y = _pixels(n=16)
    loss = classifier_loss(model, MEAN, STD)
    attack = dataclasses.replace(pgd(eps, steps=10, keep_best=True), random_start=random_start)
    torch.manual_seed(0)
    adv = linf_attack(loss, x, y, attack)
    assert (adv - x).abs().max() <= eps + 1e-7 and adv.min() >= 0 and adv.max() <= 1
    with torch.no_grad():
        clean_loss, adv_loss = loss(x, y), loss(adv, y)
    assert (adv_loss >= clean_loss - 1e-6).all()
    assert (adv_loss > clean_loss + 1e-4).float().mean() > 0.9  # and it does raise it


def test_on_a_linear_classifier_the_attacks_reach_the_closed_form_worst_case():
    """Two classes, ``logits = W x + b``: the cross-entropy falls with the margin ``(w_y - w_o) . x``,
    so the L-inf worst case is ``x - eps sign(w_y - w_o)`` (images inside the box: no clamp)."""
    model, eps = _Linear(classes=2), 4 / 255
    x, y = _pixels(n=8, lo=0.2, hi=0.8)
    y = y % 2
    w = model.fc.weight.detach().view(2, 3, 4, 4) / torch.tensor(STD).view(1, 3, 1, 1)  # d logits / d pixels
    d = w[y] - w[1 - y]
    closed = x - eps * d.sign()
    loss = classifier_loss(model, MEAN, STD)
    for attack in (fgsm(eps), pgd(eps, steps=10)):  # PGD's 10 steps of 0.25 eps reach the corner from any start
        torch.manual_seed(0)
        torch.testing.assert_close(linf_attack(loss, x, y, attack), closed, atol=1e-6, rtol=0)
    # one step of 1.25 eps from a random start (fast) reaches it only where the start was within 0.25 eps of it
    torch.manual_seed(0)
    fast = linf_attack(loss, x, y, make_attack("fast", eps))
    assert ((fast - closed).abs() < 1e-6).float().mean() > 0.5 and ((fast - x) * d.sign() <= 1e-6).all()
    margin = lambda z: (d * z).flatten(1).sum(1)  # noqa: E731
    torch.testing.assert_close(margin(x) - margin(closed), eps * d.abs().flatten(1).sum(1))


def test_the_attack_touches_no_weight_gradient_state_or_mode():
    model = _SmallNet().train()
    x, y = _pixels()
    model.infer(_normalise(x)).sum().backward()  # a gradient in flight (accumulation)
    grads = [p.grad.clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    adversarial_images(model, _normalise(x), y, pgd(4 / 255, steps=3), mean=MEAN, std=STD)
    assert model.training
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    assert_same_state(state, model.state_dict())  # BatchNorm statistics included: eval mode during the attack


def test_a_batch_is_replaced_in_the_given_fraction_with_labels_kept():
    model, eps = _Linear(), 8 / 255
    x, y = _pixels(n=8)
    step = AdversarialTraining(fgsm(eps), 0.5, MEAN, STD)
    out = step(model, _normalise(x), y)
    assert torch.equal(out[4:], _normalise(x)[4:])
    torch.testing.assert_close(out[:4], adversarial_images(model, _normalise(x[:4]), y[:4], fgsm(eps), mean=MEAN, std=STD))
    assert step.count(1) == 1 and step.count(3) == 2 and AdversarialTraining(fgsm(eps), 1.0, MEAN, STD).count(5) == 5
    with pytest.raises(TypeError, match="equal-sized"):
        step(model, list(_normalise(x)), y)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("adv-tasks")
    teacher = task_checkpoint(root / "teacher.safetensors", "supervised", CLASSES)
    return {t: task_checkpoint(root / f"{t}.safetensors", t, CLASSES, teacher=teacher) for t in classifier_tasks()}


def _load(path):
    from finegrain.checkpoint import load_task

    task, _ = load_task(path, "cpu")
    return task


@pytest.mark.parametrize("name", classifier_tasks())
def test_every_classifier_task_is_attacked_and_trained(name, checkpoints):
    """The attack stays in the ball, leaves the task as it was, and a step on it moves the weights
    differently from the clean step."""
    from finegrain.train.loop import train_one_epoch

    task = _load(checkpoints[name])
    b = _batch(64)
    images = _normalise((b["image"] * 0.2 + 0.5).clamp(0, 1))
    state = {k: v.clone() for k, v in task.state_dict().items()}
    attack = pgd(8 / 255, steps=2)
    torch.manual_seed(0)
    adv = adversarial_images(task, images, b["label"], attack, mean=MEAN, std=STD)
    assert_same_state(state, task.state_dict())
    delta = (adv - images) * torch.tensor(STD).view(1, 3, 1, 1)
    assert delta.abs().max() <= attack.eps + 1e-5 and delta.abs().max() > attack.eps / 2
    with torch.no_grad():
        assert (task.infer(adv) != task.infer(images)).any()
    after = {}
    for kind in ("clean", "adv"):
        task.load_state_dict(state)
        torch.manual_seed(0)
        loader = [{"image": images, "label": b["label"], "box": b["box"], "parts": b["parts"], "skipped": []}]
        opt = torch.optim.SGD(task.parameters(), lr=0.1)
        step = AdversarialTraining(attack, 1.0, MEAN, STD) if kind == "adv" else None
        out = train_one_epoch(task, loader, opt, None, device=torch.device("cpu"), adversarial=step, normalize=(MEAN, STD))
        assert torch.isfinite(torch.tensor(out["loss"]))
        after[kind] = {k: v.clone() for k, v in task.state_dict().items()}
    moved = [k for k in state if state[k].is_floating_point() and not torch.equal(after["adv"][k], after["clean"][k])]
    assert moved, f"{name}: adversarial training changed nothing"


def test_few_shot_tasks_are_refused_naming_the_supported_ones(tmp_path):
    path = task_checkpoint(tmp_path / "proto.safetensors", "protonet", CLASSES)
    with pytest.raises(ValueError, match="Supported tasks: .*supervised"):
        adversarial_training(TrainConfig(adv_attack="pgd"), _load(path), (MEAN, STD))
    assert adversarial_training(TrainConfig(), _load(path), (MEAN, STD)) is None


@pytest.mark.parametrize("flags,match", [
    ({"adv_attack": "pdg"}, "--adv-attack must be one of.*'pgd'"),
    ({"adv_attack": "pgd", "adv_eps": 0}, "--adv-eps"),
    ({"adv_attack": "pgd", "adv_ratio": 1.5}, "--adv-ratio"),
    ({"adv_attack": "pgd", "adv_steps": 0}, "--adv-steps"),
    ({"adv_attack": "fgsm", "adv_step_size": 1.0}, "--adv-step-size"),
])
def test_bad_adversarial_flags_are_refused_naming_the_flag(flags, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**flags).check()


def test_the_flags_become_the_attack_in_pixel_units():
    step = adversarial_training(TrainConfig(adv_attack="pgd", adv_eps=4, adv_steps=5, adv_ratio=1.0), _Linear(), (MEAN, STD))
    assert step.attack == Attack("pgd", 4 / 255, 5, 2.5 * 4 / 255 / 5, True) and step.ratio == 1.0
    fast = adversarial_training(TrainConfig(adv_attack="fast", adv_eps=8, adv_step_size=10), _Linear(), (MEAN, STD))
    assert fast.attack == Attack("fast", 8 / 255, 1, 10 / 255, True)


def test_pgd_training_differs_from_clean_and_resumes_bit_exact(image_folder, tmp_path, monkeypatch):
    """A run with --adv-attack pgd (bf16 autocast where the CPU has it, EMA, accumulation) interrupted
    part-way through its second epoch and resumed ends with the uninterrupted run's weights."""
    from finegrain.train.run import fit

    adv = dict(epochs=2, ema=True, adv_attack="pgd", adv_steps=2, adv_eps=8, adv_ratio=0.5)
    clean = fit(tiny_config(image_folder, tmp_path / "clean", epochs=2, ema=True))
    full = fit(tiny_config(image_folder, tmp_path / "a", **adv))
    assert not all(torch.equal(a, b) for a, b in zip(_weights(clean.run_dir / "last.safetensors").values(),
                                                      _weights(full.run_dir / "last.safetensors").values()))
    interrupt_after(monkeypatch, epoch_call=2, steps=1)
    cfg = tiny_config(image_folder, tmp_path / "b", **adv)
    assert fit(cfg).interrupted
    monkeypatch.undo()
    cfg.train.resume = str(tmp_path / "b" / "run")
    resumed = fit(cfg)
    assert not resumed.interrupted and resumed.epochs_run == 2
    assert_same_state(_weights(full.run_dir / "last.safetensors"), _weights(resumed.run_dir / "last.safetensors"))


def test_train_cli_takes_the_adversarial_flags(image_folder, tmp_path):
    import yaml

    from finegrain.cli import main

    rc = main(["train", "--data", str(image_folder), "--backbone", "test_resnet", "--pretrained", "none", "--img-size", "32",
               "--batch-size", "4", "--accum-steps", "2", "--epochs", "1", "--warmup-epochs", "0", "--workers", "0",
               "--device", "cpu", "--out", str(tmp_path), "--name", "fast", "--adv-attack", "fast", "--adv-eps", "2",
               "--adv-ratio", "1"])
    assert rc == 0
    cfg = yaml.safe_load((tmp_path / "fast" / "config.yaml").read_text())["train"]
    assert (cfg["adv_attack"], cfg["adv_eps"], cfg["adv_ratio"]) == ("fast", 2.0, 1.0)
    rows = [json.loads(line) for line in (tmp_path / "fast" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["train_loss"] > 0
