"""Parameter groups, optimizers and the warmup + cosine schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from finegrain.config import TrainConfig
from finegrain.registry import Registry

OPTIMIZERS: Registry = Registry("optimizer")
"""``--optimizer`` names: each builds ``(param_groups, lr, cfg, **kw) -> Optimizer``. Info ``fused``:
whether torch has a fused CUDA kernel for it."""

OPTIMIZERS.add("sgd", lambda groups, lr, cfg, **kw: torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=True, **kw),
               fused=True)
OPTIMIZERS.add("adamw", lambda groups, lr, cfg, **kw: torch.optim.AdamW(groups, lr=lr, **kw), fused=True)
OPTIMIZERS.add("adam", lambda groups, lr, cfg, **kw: torch.optim.Adam(groups, lr=lr, **kw), fused=True)
OPTIMIZERS.add("rmsprop", lambda groups, lr, cfg, **kw: torch.optim.RMSprop(groups, lr=lr, momentum=cfg.momentum, alpha=0.9,
                                                                            eps=1e-3), fused=False)


def param_groups(task: nn.Module, *, lr: float, backbone_lr_mult: float, weight_decay: float,
                 layer_decay: float = 1.0) -> list[dict]:
    """Groups of {pretrained, new} x {decayed, not decayed} parameters (x the backbone's layers with ``layer_decay``).

    Norm weights, biases and other 1-D parameters get no weight decay; pretrained backbone
    parameters get ``lr * backbone_lr_mult``; new parameters (classifier, method heads) get ``lr``.
    With ``layer_decay`` < 1 (layer-wise learning-rate decay, Clark et al. 2020 arXiv:2003.10555,
    Bao et al. 2021 arXiv:2106.08254) a pretrained parameter of layer ``i`` of ``L`` also gets the
    factor ``layer_decay ** (L - 1 - i)``: the layers as timm's ``group_matcher`` numbers them, the
    stem first, so layers near the input move least (timm's ``param_groups_layer_decay``).
    """
    new = task.new_parameter_names() if hasattr(task, "new_parameter_names") else set()
    layer_of, last = _backbone_layers(task) if layer_decay != 1.0 else ({}, 0)
    groups: dict[tuple[bool, bool, int], list] = {}
    for name, p in task.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.endswith(".bias")
        layer = last if name in new else layer_of.get(name, last)
        groups.setdefault((name in new, no_decay, layer), []).append(p)
    out = []
    for (is_new, no_decay, layer), params in sorted(groups.items()):
        scale = 1.0 if is_new else backbone_lr_mult * layer_decay ** (last - layer)
        suffix = f"_layer{layer}" if layer_of and not is_new else ""
        out.append({"params": params, "lr": lr * scale, "weight_decay": 0.0 if no_decay else weight_decay,
                    "name": f"{'new' if is_new else 'backbone'}{'_no_decay' if no_decay else ''}{suffix}"})
    return out


def _backbone_layers(task: nn.Module) -> tuple[dict[str, int], int]:
    """``({task parameter name: layer id}, last layer id)`` of the task's timm backbone, from its ``group_matcher``."""
    from timm.models import group_parameters

    model = getattr(task, "model", task)
    if not hasattr(model, "group_matcher"):
        raise ValueError(f"--layer-decay needs a backbone that numbers its layers (timm's group_matcher); "
                         f"{type(model).__name__} does not: drop --layer-decay")
    layers = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    prefix = "model." if model is not task else ""
    return {prefix + n: int(i) for n, i in layers.items()}, int(max(layers.values()))


def build_optimizer(task: nn.Module, cfg: TrainConfig, *, lr: float, fused: bool = False) -> torch.optim.Optimizer:
    """The ``cfg.optimizer`` optimizer over :func:`param_groups`; ``fused`` asks for the fused CUDA kernel where there is one."""
    groups = param_groups(task, lr=lr, backbone_lr_mult=cfg.backbone_lr_mult, weight_decay=cfg.weight_decay,
                          layer_decay=cfg.layer_decay)
    kw = {"fused": True} if fused and OPTIMIZERS.info(cfg.optimizer)["fused"] else {}
    return OPTIMIZERS.get(cfg.optimizer)(groups, lr, cfg, **kw)


def warmup_cosine(total_steps: int, warmup_steps: int):
    """LR multiplier: linear from 1/warmup to 1 over ``warmup_steps``, then cosine to 0."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def head_first(total_steps: int, warmup_steps: int, head_steps: int, *, new: bool):
    """LR multiplier of a run whose first ``head_steps`` train the new parameters alone (``--head-epochs``).

    Two schedules back to back, each a warmup + cosine: the head stage's, in which the pretrained
    parameters (``new=False``) get 0, then the fine-tune's over the remaining steps, for all of them.
    """
    first, rest = warmup_cosine(head_steps, warmup_steps), warmup_cosine(total_steps - head_steps, warmup_steps)

    def f(step: int) -> float:
        if step < head_steps:
            return first(step) if new else 0.0
        return rest(step - head_steps)

    return f


def build_scheduler(optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int, head_steps: int = 0):
    """Warmup + cosine over ``total_steps``; with ``head_steps``, :func:`head_first` per group (its ``name`` says new or backbone)."""
    if not head_steps:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, warmup_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, [
        head_first(total_steps, warmup_steps, head_steps, new=_is_new(g)) for g in optimizer.param_groups])


def freeze_pretrained(optimizer: torch.optim.Optimizer, frozen: bool) -> None:
    """Stop (or restart) gradients of the optimizer's pretrained groups, for ``--head-epochs``' head stage.

    Frozen parameters get no gradient, so the head stage skips the backbone's backward pass and
    its optimizer state stays empty until the fine-tune starts. Only parameters the optimizer
    trains are touched (a distillation teacher stays frozen). BatchNorm statistics still follow
    the training batches.
    """
    for group in optimizer.param_groups:
        if not _is_new(group):
            for p in group["params"]:
                p.requires_grad_(not frozen)


def check_head_first(optimizer: torch.optim.Optimizer, task_name: str) -> None:
    """Refuse ``--head-epochs`` for a task whose parameters are all pretrained: the head stage would train nothing."""
    if not any(_is_new(g) for g in optimizer.param_groups):
        raise ValueError(f"--head-epochs: task {task_name} has no new parameters to train alone (all of them are "
                         "pretrained); drop --head-epochs")


def _is_new(group: dict) -> bool:
    return group.get("name", "").startswith("new")
