"""Conv-4, the small few-shot backbone, registered with timm as ``conv4``.

Four blocks of conv3x3 (64 channels) - BatchNorm - ReLU - 2x2 max-pool, as used by Snell et al.
(arXiv:1703.05175) and Finn et al. (arXiv:1703.03400). It keeps timm's contract
(``forward_features``, ``forward_head(x, pre_logits)``, ``get_classifier``, ``reset_classifier``,
``num_features``, ``pretrained_cfg``), so ``create_backbone("conv4", num_classes=...)`` works
once :mod:`finegrain.fewshot` is imported.
"""

from __future__ import annotations

import torch
from timm.models import register_model
from torch import nn

_CFG = {
    "input_size": (3, 84, 84),
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "crop_pct": 0.875,
    "interpolation": "bilinear",
    "classifier": "fc",
    "num_classes": 0,
}


class Conv4(nn.Module):
    """Conv-4 feature extractor with a global-average-pool and an optional linear classifier."""

    def __init__(self, num_classes: int = 0, *, in_chans: int = 3, width: int = 64, drop_rate: float = 0.0):
        super().__init__()
        layers, c = [], in_chans
        for _ in range(4):
            layers += [nn.Conv2d(c, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c = width
        self.features = nn.Sequential(*layers)
        self.num_features = self.head_hidden_size = width
        self.drop = nn.Dropout(drop_rate)
        self.num_classes = num_classes
        self.fc = nn.Linear(width, num_classes) if num_classes else nn.Identity()
        self.pretrained_cfg = self.default_cfg = dict(_CFG)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(x.mean((2, 3)))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()


@register_model
def conv4(pretrained: bool = False, **kwargs) -> Conv4:
    """Conv-4 (64 channels); no pretrained weights exist."""
    if pretrained:
        raise ValueError("conv4 has no pretrained weights; use --pretrained none")
    for k in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "drop_path_rate"):
        kwargs.pop(k, None)
    return Conv4(**kwargs)
