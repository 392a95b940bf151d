"""The "fgvc" task: any timm backbone + optional attention + a pooling + dropout + linear classifier.

The parts are registries: ``finegrain.models.attention.ATTENTIONS`` (se, cbam, dual, deform),
``finegrain.models.pooling.POOLINGS`` (avg, bilinear, compact_bilinear) and
``finegrain.models.losses.LOSSES`` (ce, focal, center, triplet, combined as
``"ce+center:0.01+triplet:1"``). The papers are cited in those modules.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from finegrain.models import attention as _attention
from finegrain.models import pooling as _pooling
from finegrain.models.losses import CombinedLoss
from finegrain.tasks.base import TASKS, BuildContext, Task, TaskOptions, option


@dataclass
class FGVCOptions(TaskOptions):
    attention: str = option("none", "attention on the last feature map: none, se, cbam, dual, deform", flag="attention")
    pooling: str = option("avg", "global pooling: avg, bilinear, compact_bilinear, netvlad (compact_bilinear, L2-normalised, "
                          "trained best with a 10-30x head rate, e.g. --lr 0.05 --backbone-lr-mult 0.01: see benchmarks/RESULTS.md)",
                          flag="pooling")
    loss: str = option("ce", "loss terms name[:weight] joined by '+': ce, focal, center, triplet; e.g. ce+center:0.01+triplet:1.0",
                       flag="loss")
    reduce_dim: int = option(0, "1x1 conv to this many channels before attention and pooling (0 turns it off)", flag="reduce-dim")
    pool_dim: int = option(0, "compact_bilinear: output size (0: 8192); netvlad: number of centres (0: 16)", flag="pool-dim")

    def check(self) -> None:
        from finegrain.models.losses import parse_loss_spec

        _attention.ATTENTIONS.check(self.attention, "--attention")
        _pooling.POOLINGS.check(self.pooling, "--pooling")
        parse_loss_spec(self.loss)
        if self.reduce_dim < 0 or self.pool_dim < 0:
            raise ValueError(f"--reduce-dim and --pool-dim must be >= 0, got {self.reduce_dim} and {self.pool_dim}")


def feature_map_shape(model: nn.Module, img_size: int = 64) -> torch.Size:
    """Shape of ``model.forward_features`` on one dummy image (``[1, C, H, W]`` or ``[1, N, C]``)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            p = next(model.parameters())
            size = getattr(model, "pretrained_cfg", {}).get("input_size", (3, img_size, img_size))[1:]
            return model.forward_features(torch.zeros(1, 3, *size, dtype=p.dtype, device=p.device)).shape
    finally:
        model.train(was_training)


def check_feature_map(model: nn.Module, parts: dict[str, str], backbone: str = "") -> None:
    """Refuse parts that need a 4-D feature map when the backbone gives tokens (e.g. a ViT).

    Args:
        parts: e.g. ``{"attention": "se", "pooling": "bilinear"}``; "method" entries are
            always feature-map only.
    """
    if len(feature_map_shape(model)) == 4:
        return
    name = backbone or type(model).__name__
    for kind, value in parts.items():
        needs_map = kind == "method" or value in _attention.FEATURE_MAP_ONLY + _pooling.FEATURE_MAP_ONLY
        if needs_map:
            raise ValueError(f"{kind} {value!r} needs a 4-D feature map [B, C, H, W], but backbone {name} gives "
                             "tokens [B, N, C]. Compatible with this backbone: --task supervised, or --task fgvc with "
                             "--attention none --pooling avg (any --loss); or pick a CNN backbone (resnet, efficientnet, convnext, ...)")


@TASKS.register("fgvc")
class FGVCTask(Task):
    """``forward_features -> [1x1 reduction] -> attention -> pooling -> dropout -> linear``.

    The backbone's own classifier is removed (``reset_classifier(0)``). With a token backbone
    (ViT) only ``pooling="avg"`` without attention works; it uses the backbone's own head pooling
    (class token or average, with its norm).

    Args:
        attention: an ``ATTENTIONS`` name ("none" to skip).
        pooling: a ``POOLINGS`` name.
        loss: loss spec, e.g. ``"ce"``, ``"focal"``, ``"ce+center:0.01+triplet:1.0"``.
        reduce_dim: 1x1 conv + BN + ReLU to this many channels before attention (0: none).
        pool_dim: output size of pooling where it is a choice (compact_bilinear; 0: its default).
        drop_rate: dropout before the classifier.
    """

    name = "fgvc"
    Options = FGVCOptions

    def __init__(self, model: nn.Module, num_classes: int, *, label_smoothing: float = 0.0,
                 attention: str = "none", pooling: str = "avg", loss: str = "ce", reduce_dim: int = 0,
                 pool_dim: int = 0, drop_rate: float = 0.0):
        super().__init__(model, num_classes, label_smoothing=label_smoothing)
        _attention.ATTENTIONS.get(attention)
        _pooling.POOLINGS.get(pooling)
        if reduce_dim < 0 or pool_dim < 0:
            raise ValueError(f"--reduce-dim and --pool-dim must be >= 0, got {reduce_dim} and {pool_dim}")
        model.reset_classifier(0)
        shape = feature_map_shape(model)
        self.tokens = len(shape) != 4
        if self.tokens:
            check_feature_map(model, {"attention": attention, "pooling": pooling})
            if reduce_dim:
                raise ValueError("--reduce-dim needs a 4-D feature map; this backbone gives tokens: use --reduce-dim 0")
        channels = model.num_features
        self.reduce = nn.Identity()
        if reduce_dim:
            self.reduce = nn.Sequential(nn.Conv2d(channels, reduce_dim, 1, bias=False), nn.BatchNorm2d(reduce_dim),
                                        nn.ReLU(inplace=True))
            channels = reduce_dim
        self.attention = _attention.build_attention(attention, channels)
        channels = _attention.attention_channels(self.attention, channels)  # DANet's head reduces them
        self.pool = _pooling.build_pooling(pooling, channels, dim=pool_dim)
        # a token backbone's own head (used for its pooling) already applies its drop_rate
        self.head_drop = nn.Identity() if self.tokens else nn.Dropout(drop_rate)
        self.classifier = nn.Linear(self.pool.out_dim, num_classes)
        self.loss = CombinedLoss(loss, num_classes=num_classes, feat_dim=self.pool.out_dim, label_smoothing=label_smoothing)
        self.args = {"attention": attention, "pooling": pooling, "loss": loss, "reduce_dim": reduce_dim,
                     "pool_dim": pool_dim, "drop_rate": drop_rate, "label_smoothing": label_smoothing}

    @classmethod
    def build_args(cls, options, context: BuildContext):
        return {**super().build_args(options, context), "drop_rate": context.drop_rate}

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled features ``[B, D]`` (before dropout and the classifier)."""
        x = self.model.forward_features(images)
        if self.tokens:
            return self.model.forward_head(x, pre_logits=True)
        return self.pool(self.attention(self.reduce(x)))

    def forward(self, batch):
        feats = self.features(batch["image"])
        logits = self.classifier(self.head_drop(feats))
        target = batch.get("target", batch["label"])
        loss, parts = self.loss(logits=logits, features=feats, target=target, labels=batch["label"])
        return {"loss": loss, "logits": logits, **parts}

    def infer(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images))

    def task_args(self):
        return dict(self.args)
