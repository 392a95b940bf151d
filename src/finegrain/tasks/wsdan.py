"""WS-DAN: "See Better Before Looking Closer: Weakly Supervised Data Augmentation Network for
Fine-Grained Visual Classification" (Hu, Qi, Huang and Lu, arXiv:1901.09891).

M attention maps (a 1x1 conv on the last feature map) pool the features part by part (bilinear
attention pooling, BAP); a feature-center loss pulls each image's part features towards a
momentum-updated center of its class. During training one attention map per image guides a
crop (zoom into the part) and another a drop (erase the part), and both augmented batches are
trained too. ``predict`` averages the logits of the raw image and of its crop around the mean
attention map. Defaults follow the authors' PyTorch code (GuYuc/WS-DAN.PyTorch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from finegrain.models.losses import class_sums
from finegrain.models.pooling import signed_sqrt
from finegrain.tasks.base import TASKS, Task, TaskOptions, option
from finegrain.tasks.fgvc import check_feature_map
from finegrain.tasks.supervised import soft_cross_entropy


def bilinear_attention_pooling(features: torch.Tensor, attentions: torch.Tensor) -> torch.Tensor:
    """BAP: ``f_mc = mean_hw a_m * x_c``, signed sqrt, L2 norm over the flattened ``[B, M*C]``.

    Args:
        features: ``[B, C, H, W]``.
        attentions: ``[B, M, H, W]``.
    """
    b, c, h, w = features.shape
    m = attentions.shape[1]
    parts = torch.bmm(attentions.float().reshape(b, m, h * w), features.float().reshape(b, c, h * w).transpose(1, 2))
    return F.normalize(signed_sqrt(parts.reshape(b, m * c) / (h * w)), dim=-1)


def attention_crop(images: torch.Tensor, maps: torch.Tensor, theta: torch.Tensor, padding_ratio: float) -> torch.Tensor:
    """Crop each image to the box where its map (upsampled) is ``>= theta * max``, padded, resized back.

    Args:
        images: ``[B, 3, H, W]``.
        maps: ``[B, 1, h, w]`` one attention map per image.
        theta: ``[B]`` thresholds as fractions of each map's maximum.
    """
    b, _, hh, ww = images.shape
    up = F.interpolate(maps.float(), size=(hh, ww), mode="bilinear", align_corners=True)[:, 0]
    mask = up >= theta.view(b, 1, 1) * up.amax((1, 2)).view(b, 1, 1)
    pad_h, pad_w = int(padding_ratio * hh), int(padding_ratio * ww)
    r0, r1 = _extent(mask.any(2), pad_h)
    c0, c1 = _extent(mask.any(1), pad_w)
    # Bilinear resampling of rows r0..r1-1 and columns c0..c1-1 onto the full size, as
    # F.interpolate(align_corners=True) of the slice would, but batched and with no
    # data-dependent shapes (so the exported ONNX graph crops each image at its own box).
    t_h = torch.linspace(0, 1, hh, device=images.device).view(1, hh)
    t_w = torch.linspace(0, 1, ww, device=images.device).view(1, ww)
    rows = r0[:, None] + t_h * (r1 - 1 - r0)[:, None]
    cols = c0[:, None] + t_w * (c1 - 1 - c0)[:, None]
    gy = (2 * rows / max(hh - 1, 1) - 1)[:, :, None].expand(b, hh, ww)
    gx = (2 * cols / max(ww - 1, 1) - 1)[:, None, :].expand(b, hh, ww)
    grid = torch.stack([gx, gy], -1).to(images.dtype)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=True)


def _extent(hit: torch.Tensor, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First and one-past-last index of the true entries of each row of ``hit`` ``[B, N]``, padded, clipped."""
    n = hit.shape[1]
    idx = torch.arange(n, device=hit.device).expand_as(hit)
    first = torch.where(hit, idx, n).amin(1)
    last = torch.where(hit, idx, -1).amax(1)
    first, last = torch.where(last < 0, 0, first), torch.where(last < 0, n - 1, last)  # no hit: keep the whole side
    return (first - pad).clamp_min(0).float(), (last + 1 + pad).clamp_max(n).float()


def attention_drop(images: torch.Tensor, maps: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Zero the pixels where each map (upsampled) is ``>= theta * max`` (an all-zero map drops nothing)."""
    b, _, hh, ww = images.shape
    up = F.interpolate(maps.float(), size=(hh, ww), mode="bilinear", align_corners=True)
    peak = up.amax((2, 3), keepdim=True)
    keep = (up < theta.view(b, 1, 1, 1) * peak) | (peak <= 0)
    return images * keep.to(images.dtype)


@dataclass
class WSDANOptions(TaskOptions):
    num_parts: int = option(32, "number of attention maps M", flag="wsdan-parts")

    def check(self) -> None:
        if self.num_parts < 1:
            raise ValueError(f"--wsdan-parts must be at least 1, got {self.num_parts}")


@TASKS.register("wsdan")
class WSDANTask(Task):
    """WS-DAN on any CNN backbone's last feature map.

    Args:
        num_parts: number of attention maps M.
        center_weight: weight of the feature-center loss.
        center_momentum: beta of the center update ``c_y += beta (f - c_y)``.
        crop_theta, drop_theta: ranges the training crop and drop thresholds are drawn from.
        drop: train on the attention-dropped images too.
        eval_theta: crop threshold of the mean attention map at prediction.
    """

    name = "wsdan"
    Options = WSDANOptions

    def __init__(self, model: nn.Module, num_classes: int, *, label_smoothing: float = 0.0, num_parts: int = 32,
                 center_weight: float = 1.0, center_momentum: float = 0.05, crop_theta=(0.4, 0.6),
                 drop_theta=(0.2, 0.5), drop: bool = True, eval_theta: float = 0.1):
        super().__init__(model, num_classes, label_smoothing=label_smoothing)
        if num_parts < 1:
            raise ValueError(f"--wsdan-parts must be at least 1, got {num_parts}")
        check_feature_map(model, {"method": "wsdan"})
        model.reset_classifier(0)
        c = model.num_features
        self.attention = nn.Sequential(nn.Conv2d(c, num_parts, 1, bias=False), nn.BatchNorm2d(num_parts),
                                       nn.ReLU(inplace=True))
        self.classifier = nn.Linear(num_parts * c, num_classes, bias=False)
        self.register_buffer("feature_center", torch.zeros(num_classes, num_parts * c))
        self.num_parts = num_parts
        self.center_weight, self.center_momentum = center_weight, center_momentum
        self.crop_theta, self.drop_theta, self.drop, self.eval_theta = tuple(crop_theta), tuple(drop_theta), drop, eval_theta
        self.args = {"num_parts": num_parts, "center_weight": center_weight, "center_momentum": center_momentum,
                     "crop_theta": list(crop_theta), "drop_theta": list(drop_theta), "drop": drop,
                     "eval_theta": eval_theta, "label_smoothing": label_smoothing}

    def parts(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(logits, part features [B, M*C], attention maps [B, M, h, w])``."""
        fmap = self.model.forward_features(images)
        maps = self.attention(fmap)
        feats = bilinear_attention_pooling(fmap, maps)
        return self.classifier(feats * 100.0), feats, maps  # x100: the authors' scale for normalised features

    def _thetas(self, lo_hi, n, device):
        lo, hi = lo_hi
        return lo + (hi - lo) * torch.rand(n, device=device)

    def update_centers(self, feats: torch.Tensor, labels: torch.Tensor) -> None:
        """One step per class present in the batch: ``c_y += beta (mean_{i: y_i = y} f_i - normalize(c_y))``.

        The authors' update ``c[y] += beta (f - normalize(c[y]))`` writes once per class when
        several images share one (advanced-index assignment keeps one of them); the mean of the
        class's images is that one step made independent of which image is written last. Under
        DDP the per-class sums and counts are all-reduced first (:func:`class_sums`), so the mean
        is over every rank's images and all ranks make the same update.
        """
        sums, counts = class_sums(feats, labels, self.feature_center.shape[0])
        present = counts > 0
        c = self.feature_center[present].float()
        mean = sums[present] / counts[present, None]
        self.feature_center[present] = (c + self.center_momentum * (mean - F.normalize(c, dim=-1))).to(self.feature_center.dtype)

    def forward(self, batch):
        images, labels = batch["image"], batch["label"]
        target = batch.get("target", labels)
        logits, feats, maps = self.parts(images)
        ce_raw = soft_cross_entropy(logits, target, self.label_smoothing)
        center = F.normalize(self.feature_center[labels], dim=-1)
        center_loss = (feats - center).pow(2).sum() / feats.shape[0]
        if self.training:
            with torch.no_grad():
                self.update_centers(feats.detach(), labels)
        with torch.no_grad():
            # one map per image for the crop and one for the drop, drawn by sqrt of their mass
            weights = torch.sqrt(maps.detach().float().sum((2, 3)) + 1e-12)
            pick = torch.multinomial(weights / weights.sum(1, keepdim=True), 2, replacement=True)
            chosen = torch.gather(maps.detach(), 1, pick[:, :, None, None].expand(-1, -1, *maps.shape[2:]))
            n = images.shape[0]
            crops = attention_crop(images, chosen[:, :1], self._thetas(self.crop_theta, n, images.device), 0.1)
        ce_crop = soft_cross_entropy(self.parts(crops)[0], target, self.label_smoothing)
        out = {"logits": logits, "ce_raw": ce_raw.detach(), "ce_crop": ce_crop.detach(), "center": center_loss.detach()}
        if self.drop:
            with torch.no_grad():
                dropped = attention_drop(images, chosen[:, 1:], self._thetas(self.drop_theta, n, images.device))
            ce_drop = soft_cross_entropy(self.parts(dropped)[0], target, self.label_smoothing)
            out["ce_drop"] = ce_drop.detach()
            ce = (ce_raw + ce_crop + ce_drop) / 3
        else:
            ce = (ce_raw + ce_crop) / 2
        out["loss"] = ce + self.center_weight * center_loss
        return out

    def infer(self, images: torch.Tensor) -> torch.Tensor:
        logits, _, maps = self.parts(images)
        theta = torch.full((images.shape[0],), self.eval_theta, device=images.device)
        crops = attention_crop(images, maps.mean(1, keepdim=True), theta, 0.05)
        return (logits + self.parts(crops)[0]) / 2

    def task_args(self):
        return dict(self.args)
