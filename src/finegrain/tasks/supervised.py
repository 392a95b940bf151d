"""Plain supervised fine-tuning with (label-smoothed) cross-entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from finegrain.tasks.base import TASKS, Task


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0,
                       weight: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy for hard (``[B]`` int) or soft (``[B, C]`` probabilities) targets.

    With ``weight`` (one per class) each image's loss ``-sum_c w_c t_c log p_c`` is weighted and
    the batch mean divides by ``sum_i sum_c w_c t_ic``, the same for hard and soft (CutMix/MixUp)
    targets; for hard targets without smoothing this is PyTorch's weighted cross-entropy.
    """
    if weight is None:
        return F.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)
    num_classes = logits.shape[1]
    t = F.one_hot(target, num_classes).float() if target.dim() == 1 else target.float()
    t = t * (1 - label_smoothing) + label_smoothing / num_classes
    wt = t * weight.float()
    return -(wt * F.log_softmax(logits.float(), dim=1)).sum() / wt.sum()


@TASKS.register("supervised")
class SupervisedTask(Task):
    """Classify with the backbone's classifier and a cross-entropy loss."""

    name = "supervised"
    supports_class_weight = True

    def forward(self, batch):
        logits = self.model(batch["image"])
        target = batch.get("target", batch["label"])
        return {"loss": soft_cross_entropy(logits, target, self.label_smoothing, self.class_weight), "logits": logits}
