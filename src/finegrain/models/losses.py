"""Classification and metric losses that the fgvc task combines, e.g. ``"ce+center:0.01+triplet:1"``.

Center loss: "A Discriminative Feature Learning Approach for Deep Face Recognition" (Wen et al.,
ECCV 2016; no arXiv id). Batch-hard triplet loss: "In Defense of the Triplet Loss for Person
Re-Identification" (Hermans, Beyer and Leibe, arXiv:1703.07737). Focal loss: "Focal Loss for
Dense Object Detection" (Lin et al., arXiv:1708.02002).

Every loss is an ``nn.Module`` called as ``loss(logits=..., features=..., target=..., labels=...)``:
``target`` is what the classifier learns (int ``[B]`` or soft ``[B, C]`` after CutMix/MixUp),
``labels`` the true int labels that metric losses group by.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from finegrain.registry import Registry

LOSSES: Registry[type[nn.Module]] = Registry("loss")
CLASSIFICATION_LOSSES = ("ce", "focal")


@LOSSES.register("ce")
class CrossEntropy(nn.Module):
    """Cross-entropy with label smoothing, for hard or soft targets."""

    def __init__(self, *, num_classes: int, feat_dim: int, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, *, logits, features, target, labels):
        return F.cross_entropy(logits.float(), target, label_smoothing=self.label_smoothing)


@LOSSES.register("focal")
class FocalLoss(nn.Module):
    """``sum_c t_c (1 - p_c)^gamma (-log p_c)``, averaged over the batch (``t``: the smoothed target).

    With ``gamma = 0`` this is exactly the (label-smoothed) cross-entropy.
    """

    def __init__(self, *, num_classes: int, feat_dim: int, label_smoothing: float = 0.0, gamma: float = 2.0):
        super().__init__()
        self.num_classes, self.label_smoothing, self.gamma = num_classes, label_smoothing, gamma

    def forward(self, *, logits, features, target, labels):
        logp = F.log_softmax(logits.float(), dim=1)
        t = F.one_hot(target, self.num_classes).float() if target.ndim == 1 else target.float()
        t = t * (1 - self.label_smoothing) + self.label_smoothing / self.num_classes
        weight = (1 - logp.exp()).clamp_min(0).pow(self.gamma) if self.gamma else 1.0
        return -(t * weight * logp).sum(1).mean()


def class_sums(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class feature sums ``[C, D]`` and image counts ``[C]`` (float32) of one batch, summed over ranks.

    Under ``torch.distributed`` (when a process group is initialised) both are all-reduced, so
    every rank sees the global batch's sums and makes the same update to a buffer of class
    centres; DDP broadcasts buffers from rank 0 before each forward, so an update made from the
    local batch alone would keep only rank 0's images. On one process nothing is reduced.
    """
    feats = features.detach().float()
    sums = torch.zeros(num_classes, feats.shape[1], device=feats.device).index_add_(0, labels, feats)
    counts = torch.bincount(labels, minlength=num_classes).to(sums)
    return _all_reduce_sum(sums, counts)


def _all_reduce_sum(sums: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sums, counts)`` summed over the process group (one collective), or as given without one."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return sums, counts
    packed = torch.cat([sums, counts[:, None]], dim=1)
    dist.all_reduce(packed)
    return packed[:, :-1], packed[:, -1]


@LOSSES.register("center")
class CenterLoss(nn.Module):
    """``1/2 mean_i ||f_i - c_{y_i}||^2`` with one centre per class, moved by Wen et al.'s rule.

    "A Discriminative Feature Learning Approach for Deep Face Recognition" (Wen et al., ECCV 2016),
    Eq. 4 and Algorithm 1: the centres are not trained by the network's optimizer (so neither the
    loss weight lambda, the learning rate nor weight decay touch them); after each training
    forward every class ``j`` in the batch moves by its own rate ``alpha``::

        delta_j = sum_{i: y_i = j} (c_j - x_i) / (1 + n_j),   c_j <- c_j - alpha * delta_j

    with ``n_j`` the class's images in the (global, under DDP) batch; absent classes stay put.
    The centres are a buffer (saved in checkpoints, not a parameter).

    Args:
        alpha: the centres' rate (the paper's default 0.5).
    """

    def __init__(self, *, num_classes: int, feat_dim: int, label_smoothing: float = 0.0, alpha: float = 0.5):
        super().__init__()
        if not 0 <= alpha <= 1:
            raise ValueError(f"center loss alpha must be in [0, 1], got {alpha}")
        self.alpha = alpha
        self.register_buffer("centers", torch.randn(num_classes, feat_dim) * 0.01)

    def forward(self, *, logits, features, target, labels):
        diff = features.float() - self.centers[labels]
        loss = 0.5 * diff.pow(2).sum(1).mean()
        if self.training and torch.is_grad_enabled():
            self.update_centers(features, labels)
        return loss

    @torch.no_grad()
    def update_centers(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """One step of Wen et al.'s centre update from a batch (all ranks' images under DDP)."""
        sums, counts = class_sums(features, labels, self.centers.shape[0])
        c = self.centers.float()
        delta = (counts[:, None] * c - sums) / (1 + counts[:, None])
        self.centers.copy_((c - self.alpha * delta).to(self.centers.dtype))


def pairwise_distances(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Euclidean distances ``[B, B]``; ``eps`` keeps the gradient finite on the diagonal."""
    sq = x.pow(2).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * x @ x.T).clamp_min(0)
    return torch.sqrt(d2 + eps)


@LOSSES.register("triplet")
class BatchHardTripletLoss(nn.Module):
    """Batch-hard triplet loss: per anchor, ``max(0, margin + max d(a, p) - min d(a, n))``.

    Anchors without a positive or a negative in the batch are left out; a batch with none
    contributes zero (batches need two images of at least one class: use class-balanced
    sampling for this loss to matter).
    """

    def __init__(self, *, num_classes: int, feat_dim: int, label_smoothing: float = 0.0, margin: float = 0.3):
        super().__init__()
        self.margin = margin

    def forward(self, *, logits, features, target, labels):
        d = pairwise_distances(features.float())
        same = labels[:, None] == labels[None, :]
        eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
        pos, neg = same & ~eye, ~same
        hardest_pos = d.masked_fill(~pos, float("-inf")).amax(1)
        hardest_neg = d.masked_fill(~neg, float("inf")).amin(1)
        valid = pos.any(1) & neg.any(1)
        if not valid.any():
            return features.sum() * 0.0
        return F.relu(self.margin + hardest_pos[valid] - hardest_neg[valid]).mean()


def parse_loss_spec(spec: str) -> list[tuple[str, float]]:
    """``"ce+center:0.01+triplet"`` -> ``[("ce", 1.0), ("center", 0.01), ("triplet", 1.0)]``.

    Raises:
        ValueError: for an unknown loss, a bad weight, a repeated term, or no classification
            term (ce or focal).
    """
    terms: list[tuple[str, float]] = []
    for part in spec.replace(" ", "").split("+"):
        name, _, weight = part.partition(":")
        LOSSES.get(name)  # unknown names raise with the available ones
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"--loss {spec!r}: weight {weight!r} of {name!r} is not a number (use name:weight)") from None
        if w < 0:
            raise ValueError(f"--loss {spec!r}: weight of {name!r} must be >= 0, got {w}")
        if name in dict(terms):
            raise ValueError(f"--loss {spec!r}: {name!r} appears twice")
        terms.append((name, w))
    if not any(n in CLASSIFICATION_LOSSES for n, _ in terms):
        raise ValueError(f"--loss {spec!r} has no classification term: add 'ce' or 'focal' (e.g. 'ce+{spec}')")
    return terms


class CombinedLoss(nn.Module):
    """Weighted sum of registered losses; ``forward`` returns ``(total, {name: detached term})``."""

    def __init__(self, spec: str, *, num_classes: int, feat_dim: int, label_smoothing: float = 0.0):
        super().__init__()
        self.terms = parse_loss_spec(spec)
        self.parts = nn.ModuleDict({
            n: LOSSES.get(n)(num_classes=num_classes, feat_dim=feat_dim, label_smoothing=label_smoothing)
            for n, _ in self.terms
        })

    def forward(self, *, logits, features, target, labels):
        total, parts = 0.0, {}
        for name, w in self.terms:
            value = self.parts[name](logits=logits, features=features, target=target, labels=labels)
            total = total + w * value
            parts[name] = value.detach()
        return total, parts
