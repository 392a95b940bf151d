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


def param_groups(task: nn.Module, *, lr: float, backbone_lr_mult: float, weight_decay: float) -> list[dict]:
    """Four groups: {pretrained, new} x {decayed, not decayed}.

    Norm weights, biases and other 1-D parameters get no weight decay; pretrained backbone
    parameters get ``lr * backbone_lr_mult``; new parameters (classifier, method heads) get ``lr``.
    """
    new = task.new_parameter_names() if hasattr(task, "new_parameter_names") else set()
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in task.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.endswith(".bias")
        groups.setdefault((name in new, no_decay), []).append(p)
    out = []
    for (is_new, no_decay), params in sorted(groups.items()):
        out.append(
            {
                "params": params,
                "lr": lr if is_new else lr * backbone_lr_mult,
                "weight_decay": 0.0 if no_decay else weight_decay,
                "name": f"{'new' if is_new else 'backbone'}{'_no_decay' if no_decay else ''}",
            }
        )
    return out


def build_optimizer(task: nn.Module, cfg: TrainConfig, *, lr: float, fused: bool = False) -> torch.optim.Optimizer:
    """The ``cfg.optimizer`` optimizer over :func:`param_groups`; ``fused`` asks for the fused CUDA kernel where there is one."""
    groups = param_groups(task, lr=lr, backbone_lr_mult=cfg.backbone_lr_mult, weight_decay=cfg.weight_decay)
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


def build_scheduler(optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, warmup_steps))
