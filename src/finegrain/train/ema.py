"""Exponential moving average of the weights, with timm's warmup of the decay.

A fixed decay ``d`` averages over about ``1 / (1 - d)`` steps: 500 at 0.998, more than a short
fine-tune has (3 epochs of cub50 are 120 steps), so the average would still hold most of the
pretrained start with its untrained head. With warmup the decay at optimizer step ``t`` is
``min(d, 1 - (1 + t) ** -2/3)`` (timm's ``ModelEmaV3(use_warmup=True)``, after TensorFlow's
``ExponentialMovingAverage(num_updates=...)``): a running mean at first, reaching ``d`` only
once the run is long enough for it.
"""

from __future__ import annotations

import torch
from timm.utils import ModelEmaV3
from torch import nn


class WarmupEma(ModelEmaV3):
    """timm's ``ModelEmaV3`` that counts its own updates, so the count is saved and resumed with it.

    Args:
        model: the module to average (copied).
        decay: the largest decay per update.
        warmup: grow the decay as ``1 - (1 + t) ** -2/3`` up to ``decay`` (t = updates so far);
            off: ``decay`` from the first update.
    """

    def __init__(self, model: nn.Module, *, decay: float, warmup: bool = True):
        super().__init__(model, decay=decay, use_warmup=warmup)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.int64))

    def update(self, model: nn.Module, step: int | None = None) -> None:
        self.num_updates += 1
        # timm's step 1 copies the weights (decay 0), so the count starts there
        super().update(model, step=int(self.num_updates) if self.use_warmup else None)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if "num_updates" not in state_dict:  # saved before the count existed: the run is past any warmup
            state_dict = {**state_dict, "num_updates": torch.tensor(10**9, dtype=torch.int64)}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
