"""Train and eval transform presets (torchvision v2) and batch mixing (CutMix / MixUp)."""

from __future__ import annotations

import math

import torch
from torchvision.transforms import InterpolationMode, v2

from finegrain.registry import Registry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _interp(name: str) -> InterpolationMode:
    return InterpolationMode.BICUBIC if name == "bicubic" else InterpolationMode.BILINEAR


AUGMENTS: Registry = Registry("augmentation preset")
"""``--augment`` presets: each builds the ops that follow crop + flip. Info: ``pipelines`` (where
the preset runs: the CPU pipeline, and the device pipeline for those it re-implements batched),
``geometry_safe`` (boxes and part locations can follow it), ``jitter`` (device pipeline strength)."""

AUGMENTS.add("none", lambda: [], pipelines=("cpu", "device"), geometry_safe=True, jitter=0.0)
AUGMENTS.add("basic", lambda: [], pipelines=("cpu", "device"), geometry_safe=True, jitter=0.0)
AUGMENTS.add("colorjitter", lambda: [v2.ColorJitter(0.3, 0.3, 0.3, 0.0)], pipelines=("cpu", "device"), geometry_safe=True,
             jitter=0.3)
AUGMENTS.add("randaugment", lambda: [v2.RandAugment(num_ops=2, magnitude=9)], pipelines=("cpu",), geometry_safe=False)
AUGMENTS.add("trivialaugment", lambda: [v2.TrivialAugmentWide()], pipelines=("cpu",), geometry_safe=False)


def train_transform(
    img_size: int,
    *,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    scale_min: float = 0.25,
    augment: str = "basic",
    interpolation: str = "bilinear",
    normalize: bool = True,
) -> v2.Compose:
    """Random resized crop + horizontal flip, then the chosen extra augmentation, then normalise.

    Args:
        img_size: output crop size.
        scale_min: smallest area fraction of the crop. Fine-grained cues are small, so the default
            (0.25) crops less aggressively than ImageNet's 0.08.
        augment: an ``AUGMENTS`` preset: "none"/"basic" (crop+flip only), "colorjitter", "randaugment"
            or "trivialaugment".
        normalize: end with float conversion and normalisation; False keeps uint8 so that a
            batch can be normalised on the device (see :func:`normalize_batch`).
    """
    ops: list = [
        v2.ToImage(),
        v2.RandomResizedCrop(img_size, scale=(scale_min, 1.0), interpolation=_interp(interpolation), antialias=True),
        v2.RandomHorizontalFlip(),
    ]
    ops += AUGMENTS.get(augment)()
    if normalize:
        ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(ops)


def normalize_batch(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` -> normalised float32, on whatever device the batch is."""
    m = torch.tensor(mean, device=images.device, dtype=torch.float32).view(1, 3, 1, 1) * 255
    s = torch.tensor(std, device=images.device, dtype=torch.float32).view(1, 3, 1, 1) * 255
    return (images.float() - m) / s


def eval_transform(
    img_size: int, *, mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct: float = 0.875, interpolation: str = "bilinear"
) -> v2.Compose:
    """Resize the short side to ``img_size / crop_pct`` and center-crop ``img_size``."""
    resize = int(math.floor(img_size / crop_pct))
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(resize, interpolation=_interp(interpolation), antialias=True),
            v2.CenterCrop(img_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ]
    )


class BatchEraser:
    """Random erasing (Zhong et al. 2017, arXiv:1708.04896) of each image of a normalised batch, independently.

    With probability ``prob`` an image gets one rectangle of 2-33% of its area (aspect ratio
    0.3-3.3) filled with per-pixel normal noise: the settings of the paper and of timm's
    ``--reprob`` in ``pixel`` mode. The batch is erased in place on its device (its memory
    layout is kept), with torch's random generator (so a resumed run repeats it), before
    CutMix/MixUp, as timm erases in the loader before mixing.
    """

    def __init__(self, prob: float = 0.0):
        self.prob = prob
        self.op = v2.RandomErasing(p=prob, scale=(0.02, 1 / 3), ratio=(0.3, 1 / 0.3), value="random") if prob > 0 else None

    @property
    def active(self) -> bool:
        return self.op is not None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.op is not None:
            for i in range(len(images)):
                images[i] = self.op(images[i])
        return images


class BatchMixer:
    """Apply CutMix or MixUp to a whole batch with probability ``prob``.

    Returns soft targets ``[B, C]``; a batch left unmixed gets one-hot targets, so the loss
    always sees the same kind of target. Uses torchvision v2's CutMix/MixUp (Yun et al. 2019,
    arXiv:1905.04899; Zhang et al. 2018, arXiv:1710.09412).
    """

    def __init__(self, num_classes: int, *, cutmix: float = 0.0, mixup: float = 0.0, prob: float = 0.5):
        self.num_classes = num_classes
        self.prob = prob
        ops = []
        if cutmix > 0:
            ops.append(v2.CutMix(alpha=cutmix, num_classes=num_classes))
        if mixup > 0:
            ops.append(v2.MixUp(alpha=mixup, num_classes=num_classes))
        self.op = None if not ops else ops[0] if len(ops) == 1 else v2.RandomChoice(ops)

    @property
    def active(self) -> bool:
        return self.op is not None

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.op is not None and torch.rand(()).item() < self.prob:
            return self.op(images, labels)
        return images, torch.nn.functional.one_hot(labels, self.num_classes).to(images.dtype)
