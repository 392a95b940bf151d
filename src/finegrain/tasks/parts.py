"""Part-based classification: features of an object crop and of K part crops, concatenated.

Strongly supervised (``"parts"``) after "Part-based R-CNNs for Fine-grained Category Detection"
(Zhang, Donahue, Girshick and Darrell, ECCV 2014, arXiv:1407.3867): the object box and the parts
(CUB's ``bounding_boxes.txt`` and ``parts/part_locs.txt``) are used in training only. A part
localiser (one heatmap per part on the last feature map, read out by soft-argmax) learns the
ground-truth part locations and a box head the object box. During training the crops come from
the ground truth (a part marked invisible is cropped where the localiser puts it, as at test
time); ``predict`` crops at the predicted box and parts, so it needs no annotations. Instead of
Part R-CNN's region proposals and SVMs, everything is one network trained end to end.

Weakly supervised (``"parts-weak"``) after MA-CNN, "Learning Multi-Attention Convolutional
Neural Network for Fine-Grained Image Recognition" (Zheng, Fu, Mei and Luo, ICCV 2017; no arXiv
id): K attention maps (a 1x1 conv, i.e. learned channel groups) whose soft-argmax peaks are the
part locations, kept apart by a diversity loss (the overlap of the K spatial softmaxes, after
MA-CNN's Div term); the classification loss reaches the maps through the differentiable crops.
The object feature is the whole image's.

Both combine the object and part features by concatenation (``pool="concat"``) or by
attention-based multiple-instance pooling (``pool="mil"``, :mod:`finegrain.models.mil`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from finegrain.models.crops import soft_argmax, square_boxes, zoom
from finegrain.models.mil import AttentionMILPool
from finegrain.tasks.base import TASKS, BuildContext, Task, TaskOptions, option
from finegrain.tasks.fgvc import check_feature_map
from finegrain.tasks.supervised import soft_cross_entropy

CUB_PARTS = ("back", "beak", "belly", "breast", "crown", "forehead", "left eye", "left leg", "left wing", "nape",
             "right eye", "right leg", "right wing", "tail", "throat")
"""CUB-200-2011's part names; part id ``i`` is ``CUB_PARTS[i - 1]``."""

_HEAD = (2, 5, 6, 7, 10, 11, 15)
PART_GROUPS: dict[str, dict[str, tuple[int, ...]]] = {
    "cub2": {"head": _HEAD, "body": (1, 3, 4, 9, 13, 14)},  # Part R-CNN's head and body
    "cub4": {"head": _HEAD, "breast": (3, 4), "wing": (9, 13), "tail": (14,)},
    "cub6": {"head": _HEAD, "back": (1,), "breast": (3, 4), "wing": (9, 13), "tail": (14,), "leg": (8, 12)},
    "cub15": {name: (i,) for i, name in enumerate(CUB_PARTS, 1)},
}
"""Named groupings of CUB part ids: a group's location is the mean of its visible members (left
and right merge, so a horizontal flip does not matter)."""

POOLS = ("concat", "mil")


def parse_part_groups(spec: str) -> dict[str, tuple[int, ...]]:
    """A ``PART_GROUPS`` name, or ``"name=id,id;name=id"`` (e.g. ``"head=2,5,6;tail=14"``)."""
    if spec in PART_GROUPS:
        return dict(PART_GROUPS[spec])
    groups = {}
    try:
        for entry in filter(None, (e.strip() for e in spec.split(";"))):
            name, ids = entry.split("=")
            groups[name.strip()] = tuple(int(i) for i in ids.split(","))
    except ValueError:
        groups = {}
    if not groups or any(not ids or min(ids) < 1 for ids in groups.values()):
        raise ValueError(f"--parts-groups must be one of {', '.join(PART_GROUPS)} or 'name=id,id;name=id' with part ids "
                         f">= 1 (CUB: {', '.join(f'{i} {n}' for i, n in enumerate(CUB_PARTS, 1))}), got {spec!r}")
    return groups


def group_parts(parts: torch.Tensor, groups: dict[str, tuple[int, ...]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Group part locations ``[B, P, 3]`` ``(x, y, visible)`` into ``([B, K, 2] mean of visible members, [B, K] visible)``."""
    p = parts.shape[1]
    top = max(max(ids) for ids in groups.values())
    if top > p:
        raise ValueError(f"part groups use part id {top}, but the annotations have {p} parts; choose --parts-groups "
                         "from the data set's part ids")
    member = torch.zeros(len(groups), p, device=parts.device, dtype=parts.dtype)
    for k, ids in enumerate(groups.values()):
        member[k, [i - 1 for i in ids]] = 1
    w = member[None] * parts[:, None, :, 2]  # [B, K, P]: visible members
    count = w.sum(-1)
    xy = torch.einsum("bkp,bpc->bkc", w, parts[..., :2]) / count.clamp_min(1)[..., None]
    return xy, (count > 0).to(parts.dtype)


def pck(pred: torch.Tensor, target: torch.Tensor, visible: torch.Tensor, threshold: float = 0.1) -> float:
    """Percentage of visible parts predicted within ``threshold`` (image fraction) of the truth."""
    hit = ((pred - target).norm(dim=-1) <= threshold).float() * visible
    return 100.0 * hit.sum().item() / max(visible.sum().item(), 1.0)


_POOL_HELP = "how object and part crop features are combined: concat or mil (attention MIL pooling)"
_SIZE_HELP = "part crop side as a fraction of the object box's (parts) or the image's (parts-weak) longer side"


@dataclass
class _PartOptions(TaskOptions):
    pool: str = option("concat", _POOL_HELP, flag="parts-pool")
    part_size: float = option(0.4, _SIZE_HELP, flag="parts-size")

    def check(self) -> None:
        if self.pool not in POOLS:
            raise ValueError(f"--parts-pool must be one of {', '.join(POOLS)}, got {self.pool!r}")
        if not 0 < self.part_size <= 1:
            raise ValueError(f"--parts-size must be in (0, 1], got {self.part_size}")


@dataclass
class PartsOptions(_PartOptions):
    groups: str = option("cub4", "CUB parts that make the part crops: cub2, cub4, cub6, cub15, or 'name=id,id;name=id'",
                         flag="parts-groups")

    def check(self) -> None:
        super().check()
        parse_part_groups(self.groups)


@dataclass
class WeakPartsOptions(_PartOptions):
    num_parts: int = option(4, "number of attention parts K", flag="parts-num")

    def check(self) -> None:
        super().check()
        if self.num_parts < 1:
            raise ValueError(f"--parts-num must be at least 1, got {self.num_parts}")


class _PartCrops(Task):
    """Shared part: localiser heatmaps, crops, crop features and the classifier over them."""

    def __init__(self, model: nn.Module, num_classes: int, *, label_smoothing: float, num_parts: int, pool: str,
                 part_size: float, crop_ratio: float, drop_rate: float):
        super().__init__(model, num_classes, label_smoothing=label_smoothing)
        if pool not in POOLS:
            raise ValueError(f"--parts-pool must be one of {', '.join(POOLS)}, got {pool!r}")
        if not 0 < part_size <= 1 or not 0 < crop_ratio <= 1:
            raise ValueError(f"--parts-size and the crop ratio must be in (0, 1], got {part_size} and {crop_ratio}")
        check_feature_map(model, {"method": self.name})
        model.reset_classifier(0)
        d = model.num_features
        self.num_parts, self.part_size, self.crop_ratio = num_parts, part_size, crop_ratio
        self.heatmap = nn.Conv2d(d, num_parts, 1)
        self.mil = AttentionMILPool(d) if pool == "mil" else None
        self.drop = nn.Dropout(drop_rate)
        self.classifier = nn.Linear(d if self.mil is not None else d * (1 + num_parts), num_classes)
        self.args = {"pool": pool, "part_size": part_size, "crop_ratio": crop_ratio, "drop_rate": drop_rate,
                     "label_smoothing": label_smoothing}

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(images), pre_logits=True)

    def locate(self, fmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(part heatmaps [B, K, h, w], their soft-argmax locations [B, K, 2])``."""
        heat = self.heatmap(fmap)
        return heat, soft_argmax(heat)

    def classify(self, images: torch.Tensor, object_features: torch.Tensor, object_box: torch.Tensor,
                 centers: torch.Tensor) -> torch.Tensor:
        """Logits from the object features ``[B, D]`` and K square part crops around ``centers [B, K, 2]``.

        A part crop's side is ``part_size`` times the longer side of ``object_box [B, 4]``.
        """
        b, k = centers.shape[:2]
        side = self.part_size * (object_box[:, 2:] - object_box[:, :2]).amax(1).clamp_min(0.05)
        boxes = square_boxes(centers, side[:, None].expand(b, k)).reshape(b * k, 4)
        h, w = images.shape[-2:]
        size = (max(16, round(h * self.crop_ratio)), max(16, round(w * self.crop_ratio)))
        crops = zoom(images.repeat_interleave(k, 0), boxes, size)
        feats = torch.cat([object_features[:, None], self._embed(crops).reshape(b, k, -1)], 1)  # [B, 1 + K, D]
        pooled = self.mil(feats) if self.mil is not None else feats.flatten(1)
        return self.classifier(self.drop(pooled))

    def task_args(self):
        return dict(self.args)

    @classmethod
    def build_args(cls, options, context: BuildContext):
        return {**super().build_args(options, context), "drop_rate": context.drop_rate}


@TASKS.register("parts")
class PartsTask(_PartCrops):
    """Strongly supervised part crops (needs CUB's boxes and parts in training only).

    Args:
        groups: a ``PART_GROUPS`` name or ``"name=id,id;..."``: which CUB parts make the K crops.
        pool: "concat" or "mil".
        part_size: part crop side as a fraction of the object box's longer side.
        crop_ratio: part crops are resampled to this fraction of the input size.
        locate_weight, box_weight: weights of the part location (L1) and box (L1) losses.
        drop_rate: dropout before the classifier.
    """

    name = "parts"
    Options = PartsOptions
    annotations = ("boxes", "parts")

    def __init__(self, model: nn.Module, num_classes: int, *, label_smoothing: float = 0.0, groups: str = "cub4",
                 pool: str = "concat", part_size: float = 0.4, crop_ratio: float = 0.5, locate_weight: float = 1.0,
                 box_weight: float = 1.0, drop_rate: float = 0.0):
        parsed = parse_part_groups(groups)
        super().__init__(model, num_classes, label_smoothing=label_smoothing, num_parts=len(parsed), pool=pool,
                         part_size=part_size, crop_ratio=crop_ratio, drop_rate=drop_rate)
        self.groups = parsed
        self.box_head = nn.Linear(model.num_features, 4)
        self.locate_weight, self.box_weight = locate_weight, box_weight
        self.args.update(groups=groups, locate_weight=locate_weight, box_weight=box_weight)

    def predict_box(self, pooled: torch.Tensor) -> torch.Tensor:
        """Object box ``[B, 4]`` from pooled features: sigmoid ``(cx, cy, w, h)``, sides at least 0.1."""
        t = torch.sigmoid(self.box_head(pooled).float())
        wh = 0.1 + 0.9 * t[:, 2:]
        return torch.cat([t[:, :2] - wh / 2, t[:, :2] + wh / 2], 1)

    def localise(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(pooled features [B, D], predicted box [B, 4], predicted part locations [B, K, 2])``."""
        fmap = self.model.forward_features(images)
        pooled = self.model.forward_head(fmap, pre_logits=True)
        return pooled, self.predict_box(pooled), self.locate(fmap)[1]

    def forward(self, batch):
        images = batch["image"]
        gt_box, parts = self.annotation(batch, "box"), self.annotation(batch, "parts")
        gt_xy, visible = group_parts(parts, self.groups)
        _, box, xy = self.localise(images)
        locate = ((xy - gt_xy).abs().sum(-1) * visible).sum() / visible.sum().clamp_min(1)
        box_loss = F.l1_loss(box, gt_box)
        centers = torch.where(visible[..., None] > 0, gt_xy, xy.detach())
        obj = self._embed(zoom(images, gt_box, images.shape[-2:]))
        logits = self.classify(images, obj, gt_box, centers)
        ce = soft_cross_entropy(logits, batch.get("target", batch["label"]), self.label_smoothing)
        loss = ce + self.locate_weight * locate + self.box_weight * box_loss
        return {"loss": loss, "logits": logits, "ce": ce.detach(), "locate": locate.detach(), "box": box_loss.detach()}

    def infer(self, images: torch.Tensor) -> torch.Tensor:
        _, box, xy = self.localise(images)
        return self.classify(images, self._embed(zoom(images, box, images.shape[-2:])), box, xy)


@TASKS.register("parts-weak")
class WeakPartsTask(_PartCrops):
    """Part crops at the peaks of K learned attention maps (no annotations).

    Args:
        num_parts: K.
        pool: "concat" or "mil".
        part_size: part crop side as a fraction of the image side.
        crop_ratio: part crops are resampled to this fraction of the input size.
        diversity_weight: weight of the loss that keeps the K maps apart.
        drop_rate: dropout before the classifier.
    """

    name = "parts-weak"
    Options = WeakPartsOptions

    def __init__(self, model: nn.Module, num_classes: int, *, label_smoothing: float = 0.0, num_parts: int = 4,
                 pool: str = "concat", part_size: float = 0.4, crop_ratio: float = 0.5, diversity_weight: float = 1.0,
                 drop_rate: float = 0.0):
        if num_parts < 1:
            raise ValueError(f"--parts-num must be at least 1, got {num_parts}")
        super().__init__(model, num_classes, label_smoothing=label_smoothing, num_parts=num_parts, pool=pool,
                         part_size=part_size, crop_ratio=crop_ratio, drop_rate=drop_rate)
        self.diversity_weight = diversity_weight
        self.args.update(num_parts=num_parts, diversity_weight=diversity_weight)

    def _logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmap = self.model.forward_features(images)
        heat, xy = self.locate(fmap)
        whole = images.new_tensor([0.0, 0.0, 1.0, 1.0]).expand(images.shape[0], 4)
        return self.classify(images, self.model.forward_head(fmap, pre_logits=True), whole, xy), heat

    def forward(self, batch):
        logits, heat = self._logits(batch["image"])
        ce = soft_cross_entropy(logits, batch.get("target", batch["label"]), self.label_smoothing)
        out = {"logits": logits, "ce": ce.detach()}
        loss = ce
        if self.num_parts > 1:
            m = torch.softmax(heat.float().flatten(2), -1)  # [B, K, hw]
            overlap = torch.bmm(m, m.transpose(1, 2))  # [B, K, K]
            k = self.num_parts
            diversity = (overlap.sum((1, 2)) - overlap.diagonal(dim1=1, dim2=2).sum(1)).mean() / (k * (k - 1))
            loss = loss + self.diversity_weight * diversity
            out["diversity"] = diversity.detach()
        out["loss"] = loss
        return out

    def infer(self, images: torch.Tensor) -> torch.Tensor:
        return self._logits(images)[0]
