"""RA-CNN: "Look Closer to See Better: Recurrent Attention Convolutional Neural Network for
Fine-grained Image Recognition" (Fu, Zheng and Mei, CVPR 2017; no arXiv id).

Scale 1 sees the whole image. At each scale an attention proposal network (APN: 1x1 conv, a
4x4 pooled grid, two fully connected layers) reads that scale's feature map and predicts a
square ``(tx, ty, tl)``; the image is multiplied by a soft boxcar mask around it and zoomed back
to the input size (:func:`finegrain.models.crops.masked_zoom`), which is the next scale's input.
Every scale has its own classifier. The loss is the paper's Eq. 6: the scales' cross-entropies
summed (not averaged, which would weaken them against the ranking term by the number of
scales) plus the inter-scale pairwise ranking loss ``max(0, p_t^(s) - p_t^(s+1) + margin)`` that
asks each finer scale to be more confident on the true class ``t`` than the coarser one.

The paper's ``tl`` is half the square's side, and it is kept above a third of the side of the
scale's input, so the crop side is at least 2/3 of it (``min_side=2/3``; each scale zooms by at
most 1.5x). Checkpoints saved before this default kept ``min_side=1/3`` (their task arguments
say so and are rebuilt that way); ``min_side=1/3`` remains the variant that zooms up to 3x.

Differences from the paper, on purpose:

* Joint training instead of the paper's alternation (classifiers with cross-entropy, then APNs
  with the ranking loss): everything trains in one step, and ``p_t^(s)`` of the coarser scale is
  detached in the ranking term, so that term moves the APNs and the finer scale (as in the
  paper) and never lowers the coarser scale's confidence.
* One backbone shared by all scales by default (fewer parameters, one set of pretrained
  weights to fine-tune); ``shared_backbone=False`` (``--no-racnn-shared-backbone``) gives each
  scale its own copy, as in the paper.
* The APN's last layer starts near zero (a centred square of side ``(1 + min_side) / 2``)
  instead of being pre-trained on the strongest response region.
* ``predict`` (and the training logits) fuse the scales by averaging their logits with equal
  weights, instead of the paper's classifier on the concatenated normalised descriptors.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from finegrain.models.crops import masked_zoom, square_boxes
from finegrain.tasks.base import TASKS, Task, TaskOptions, option
from finegrain.tasks.fgvc import check_feature_map
from finegrain.tasks.supervised import soft_cross_entropy


def ranking_loss(probs: list[torch.Tensor], margin: float = 0.05) -> torch.Tensor:
    """``sum_s mean_i max(0, p^(s)_i - p^(s+1)_i + margin)`` over consecutive scales.

    Args:
        probs: per scale, ``[B]`` probabilities of the true class (coarse to fine).
    """
    return sum(F.relu(a - b + margin).mean() for a, b in zip(probs[:-1], probs[1:]))


class AttentionProposal(nn.Module):
    """APN: feature map ``[B, C, h, w]`` -> ``(tx, ty, side)``, each in (0, 1), side >= ``min_side``."""

    def __init__(self, channels: int, min_side: float = 2 / 3, reduce: int = 64, hidden: int = 256, grid: int = 4):
        super().__init__()
        self.min_side, self.grid = min_side, grid
        self.reduce = nn.Sequential(nn.Conv2d(channels, reduce, 1), nn.ReLU(inplace=True))
        self.fc = nn.Sequential(nn.Linear(reduce * grid * grid, hidden), nn.Tanh(), nn.Linear(hidden, 3))
        nn.init.normal_(self.fc[-1].weight, std=1e-3)
        nn.init.zeros_(self.fc[-1].bias)

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.reduce(fmap), self.grid).flatten(1)
        t = torch.sigmoid(self.fc(x).float())
        return torch.stack([t[:, 0], t[:, 1], self.min_side + (1 - self.min_side) * t[:, 2]], 1)

    def boxes(self, fmap: torch.Tensor) -> torch.Tensor:
        """The proposed squares as ``[B, 4]`` boxes in [0, 1] coordinates of this scale's image."""
        t = self(fmap)
        return square_boxes(t[:, :2], t[:, 2])


@dataclass
class RACNNOptions(TaskOptions):
    scales: int = option(3, "number of scales, each zooming into the previous one: 2 or 3", flag="racnn-scales")
    margin: float = option(0.05, "margin of the inter-scale ranking loss", flag="racnn-margin")
    shared_backbone: bool = option(True, "one backbone for all scales; --no-racnn-shared-backbone gives each scale a copy",
                                   flag="racnn-shared-backbone")

    def check(self) -> None:
        if self.scales not in (2, 3):
            raise ValueError(f"--racnn-scales must be 2 or 3, got {self.scales}")


@TASKS.register("racnn")
class RACNNTask(Task):
    """RA-CNN on any CNN backbone (2 or 3 scales).

    Args:
        scales: number of scales (2 or 3).
        shared_backbone: one backbone for all scales (else each scale gets a copy).
        margin: margin of the ranking loss (the paper's 0.05).
        rank_weight: weight of the ranking loss.
        sharpness: boxcar mask steepness ``k`` per pixel (the paper's 10).
        min_side: smallest crop side, as a fraction of the previous scale's image; the paper's
            half-side ``tl`` is kept above a third of that side, so 2/3 (see the module docstring).
    """

    name = "racnn"
    Options = RACNNOptions

    def __init__(self, model: nn.Module, num_classes: int, *, label_smoothing: float = 0.0, scales: int = 3,
                 shared_backbone: bool = True, margin: float = 0.05, rank_weight: float = 1.0,
                 sharpness: float = 10.0, min_side: float = 2 / 3):
        super().__init__(model, num_classes, label_smoothing=label_smoothing)
        if scales not in (2, 3):
            raise ValueError(f"--racnn-scales must be 2 or 3, got {scales}")
        if not 0 < min_side <= 1:
            raise ValueError(f"RA-CNN min_side must be in (0, 1], got {min_side}")
        check_feature_map(model, {"method": "racnn"})
        model.reset_classifier(0)
        self.extra_backbones = nn.ModuleList([] if shared_backbone else [copy.deepcopy(model) for _ in range(scales - 1)])
        d = model.num_features
        self.classifiers = nn.ModuleList(nn.Linear(d, num_classes) for _ in range(scales))
        self.apns = nn.ModuleList(AttentionProposal(d, min_side) for _ in range(scales - 1))
        self.scales, self.margin, self.rank_weight, self.sharpness = scales, margin, rank_weight, sharpness
        self.args = {"scales": scales, "shared_backbone": shared_backbone, "margin": margin, "rank_weight": rank_weight,
                     "sharpness": sharpness, "min_side": min_side, "label_smoothing": label_smoothing}

    def backbone(self, scale: int) -> nn.Module:
        return self.model if scale == 0 or not len(self.extra_backbones) else self.extra_backbones[scale - 1]

    def scale_outputs(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Per scale: ``(logits [B, classes], input images, boxes [B, 4] that made the next scale)``."""
        logits, inputs, boxes = [], [images], []
        x = images
        for s in range(self.scales):
            net = self.backbone(s)
            fmap = net.forward_features(x)
            logits.append(self.classifiers[s](net.forward_head(fmap, pre_logits=True)))
            if s + 1 < self.scales:
                box = self.apns[s].boxes(fmap)
                x = masked_zoom(x, box, images.shape[-2:], self.sharpness)
                boxes.append(box)
                inputs.append(x)
        return logits, inputs, boxes

    def forward(self, batch):
        logits, _, boxes = self.scale_outputs(batch["image"])
        target = batch.get("target", batch["label"])
        ces = [soft_cross_entropy(l, target, self.label_smoothing) for l in logits]
        labels = batch["label"][:, None]
        p = [torch.softmax(l.float(), 1).gather(1, labels).squeeze(1) for l in logits]
        # each pair's coarser side is detached (see the module docstring)
        rank = sum(ranking_loss([p[s].detach(), p[s + 1]], self.margin) for s in range(self.scales - 1))
        side = (boxes[0][:, 2] - boxes[0][:, 0]).mean()
        out = {"logits": torch.stack(logits).mean(0), "rank": rank.detach(), "box_side": side.detach()}
        for s, ce in enumerate(ces):
            out[f"ce_{s + 1}"] = ce.detach()
        out["loss"] = torch.stack(ces).sum() + self.rank_weight * rank  # Eq. 6: summed over scales
        return out

    def infer(self, images: torch.Tensor) -> torch.Tensor:
        return torch.stack(self.scale_outputs(images)[0]).mean(0)

    def task_args(self):
        return dict(self.args)

    def new_parameter_names(self) -> set[str]:
        # the per-scale backbone copies start from the same (pretrained) weights as ``model``
        return {n for n in super().new_parameter_names() if not n.startswith("extra_backbones.")}
