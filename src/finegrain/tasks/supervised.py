"""Plain supervised fine-tuning with (label-smoothed) cross-entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from finegrain.tasks.base import TASKS, Task


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy for hard (``[B]`` int) or soft (``[B, C]`` probabilities) targets."""
    return F.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)


@TASKS.register("supervised")
class SupervisedTask(Task):
    """Classify with the backbone's classifier and a cross-entropy loss."""

    name = "supervised"

    def forward(self, batch):
        logits = self.model(batch["image"])
        target = batch.get("target", batch["label"])
        return {"loss": soft_cross_entropy(logits, target, self.label_smoothing), "logits": logits}
