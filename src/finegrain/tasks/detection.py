"""Object detection and instance segmentation as a Task: torchvision's detectors on any timm backbone.

The backbone's last four feature maps go through a feature pyramid (Lin et al. 2017, "Feature
Pyramid Networks for Object Detection", arXiv:1612.03144) into one of torchvision's detectors:

- ``faster_rcnn``: two-stage, region proposals then RoI heads (Ren et al. 2015, arXiv:1506.01497);
- ``retinanet``: one-stage with the focal loss (Lin et al. 2017, arXiv:1708.02002);
- ``fcos``: one-stage and anchor-free (Tian et al. 2019, arXiv:1904.01355);
- ``mask_rcnn``: Faster R-CNN with a mask head, for instance masks (He et al. 2017, arXiv:1703.06870).

With ``tv_detector`` the task is one of torchvision's own detectors instead (ResNet-50 or
MobileNetV3 backbones with their pyramids), and with ``coco`` it starts from torchvision's
COCO-trained weights, whose class layers are replaced for the data set's classes.

Labels in finegrain are ``0..C-1``; torchvision's R-CNN detectors reserve 0 for the background, so
for them the task adds one on the way in and removes it on the way out (RetinaNet and FCOS have
no background class and take the labels as they are). The detector resizes and normalises
its input itself (``min_size``/``max_size``, the backbone's mean and std): ``predict`` takes
images as they are, ``[3, H, W]`` floats in ``[0, 1]`` of any size, and returns boxes in their
pixel coordinates. In training the short side is drawn from ``img_size * (1 +- scale_jitter)``
(multi-scale training, box-aware because the detector's own transform rescales the targets).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from finegrain.tasks.base import TASKS, BuildContext, Task, TaskOptions, option

DETECTORS = ("faster_rcnn", "retinanet", "fcos", "mask_rcnn")


class PyramidBackbone(nn.Module):
    """A timm backbone's last four feature maps through a feature pyramid (torchvision's backbone contract).

    Args:
        model: a timm model; its head and the layers after the last feature map used are removed.
        out_channels: the pyramid's width.
        extra: "pool" (a max-pooled extra level, the R-CNN family) or "p6p7" (two strided convolutions
            on top, RetinaNet and FCOS); either way the pyramid has five levels.
    """

    def __init__(self, model: nn.Module, out_channels: int, extra: str):
        from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool, LastLevelP6P7

        super().__init__()
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        if cfg.get("fixed_input_size"):
            raise ValueError(f"detection feeds images of many sizes, and {cfg.get('architecture', type(model).__name__)} takes only "
                             f"{tuple(cfg.get('input_size', ()))[-2:]} inputs (ViT, Swin, MaxViT, CoAtNet...): choose a convolutional "
                             "backbone (ResNet, EfficientNet, MobileNet, ConvNeXt, ...)")
        info = list(getattr(model, "feature_info", []))
        reductions = [f["reduction"] for f in info]
        if len(set(reductions)) < 3 or not hasattr(model, "forward_intermediates"):
            raise ValueError(f"detection needs a backbone with feature maps at several strides (ResNet, EfficientNet, MobileNet, "
                             f"ConvNeXt, ...); {type(model).__name__} has strides {sorted(set(reductions)) or 'unknown'} "
                             "(a plain ViT has one): choose a convolutional or hierarchical backbone")
        # the last map of each stride, the finest four of the last four strides (4..32 or 8..32 px)
        last_of = {r: i for i, r in enumerate(reductions)}
        self.indices = sorted(last_of.values())[-4:] if extra == "pool" else sorted(last_of.values())[-3:]
        model.prune_intermediate_layers(self.indices, prune_head=True)
        self.body = model
        in_channels = [info[i]["num_chs"] for i in self.indices]
        blocks = LastLevelMaxPool() if extra == "pool" else LastLevelP6P7(out_channels, out_channels)
        if extra == "p6p7" and len(self.indices) < 3:
            raise ValueError("retinanet and fcos need three backbone strides")
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=blocks)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        feats = self.body.forward_intermediates(x, indices=self.indices, intermediates_only=True)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))


def build_detector(model: nn.Module, num_classes: int, *, detector: str, fpn_channels: int, min_size: tuple[int, ...],
                   max_size: int, mean, std, freeze_bn: bool) -> nn.Module:
    """torchvision's ``detector`` on ``model`` for ``num_classes`` foreground classes (one more for the background)."""
    from torchvision.models import detection as D

    if detector not in DETECTORS:
        raise ValueError(f"--detector must be one of {', '.join(DETECTORS)}, got {detector!r}")
    if freeze_bn:  # detection batches are a few images: BatchNorm statistics of so few would be noise
        from timm.layers import freeze_batch_norm_2d

        model = freeze_batch_norm_2d(model)
    two_stage = detector in ("faster_rcnn", "mask_rcnn")
    backbone = PyramidBackbone(model, fpn_channels, "pool" if two_stage else "p6p7")
    common = {"min_size": min_size, "max_size": max_size, "image_mean": list(mean), "image_std": list(std)}
    cls = {"faster_rcnn": D.FasterRCNN, "retinanet": D.RetinaNet, "fcos": D.FCOS, "mask_rcnn": D.MaskRCNN}[detector]
    if detector == "retinanet":  # torchvision's default anchors: three scales per level, sizes 32..512
        from torchvision.models.detection.anchor_utils import AnchorGenerator

        sizes = tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in (32, 64, 128, 256, 512))
        common["anchor_generator"] = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * 5)
    # the R-CNN family scores a background class 0; RetinaNet and FCOS have none (an unmatched anchor's targets are all zero)
    return cls(backbone, num_classes=num_classes + 1 if two_stage else num_classes, **common)


TORCHVISION_DETECTORS = {  # torchvision's own detectors with COCO weights: name -> the --detector family it belongs to
    "fasterrcnn_resnet50_fpn": "faster_rcnn", "fasterrcnn_resnet50_fpn_v2": "faster_rcnn",
    "fasterrcnn_mobilenet_v3_large_fpn": "faster_rcnn", "fasterrcnn_mobilenet_v3_large_320_fpn": "faster_rcnn",
    "retinanet_resnet50_fpn": "retinanet", "retinanet_resnet50_fpn_v2": "retinanet", "fcos_resnet50_fpn": "fcos",
    "maskrcnn_resnet50_fpn": "mask_rcnn", "maskrcnn_resnet50_fpn_v2": "mask_rcnn",
}


def detector_family(detector: str, tv_detector: str = "") -> str:
    """The architecture a detection task builds: the named torchvision detector's family, else ``detector``
    (an unknown ``tv_detector`` keeps ``detector``; building it then refuses the name)."""
    return TORCHVISION_DETECTORS.get(tv_detector, detector)


def build_torchvision_detector(name: str, num_classes: int, *, coco: bool, min_size: tuple[int, ...], max_size: int,
                               mean, std) -> nn.Module:
    """torchvision's detector ``name`` (its own backbone and pyramid) for ``num_classes``; with ``coco`` from its COCO
    weights (downloaded), whose class layers are replaced by new ones for these classes."""
    from torchvision.models import get_model

    if name not in TORCHVISION_DETECTORS:
        raise ValueError(f"--tv-detector must be one of {', '.join(TORCHVISION_DETECTORS)}, got {name!r}")
    family = TORCHVISION_DETECTORS[name]
    n_out = num_classes + 1 if family in ("faster_rcnn", "mask_rcnn") else num_classes
    common = {"min_size": min_size, "max_size": max_size, "image_mean": list(mean), "image_std": list(std), "weights_backbone": None}
    if not coco:
        return get_model(name, weights=None, num_classes=n_out, **common)
    model = get_model(name, weights="DEFAULT", **common)
    _new_class_layers(model, family, n_out)
    return model


def _new_class_layers(model: nn.Module, family: str, n_out: int) -> None:
    """Swap a COCO-trained detector's class-specific layers for fresh ones with ``n_out`` outputs."""
    if family in ("faster_rcnn", "mask_rcnn"):
        from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

        model.roi_heads.box_predictor = FastRCNNPredictor(model.roi_heads.box_predictor.cls_score.in_features, n_out)
        if family == "mask_rcnn":
            from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor

            old = model.roi_heads.mask_predictor
            model.roi_heads.mask_predictor = MaskRCNNPredictor(old.conv5_mask.in_channels, old.conv5_mask.out_channels, n_out)
        return
    head = model.head.classification_head
    anchors = model.anchor_generator.num_anchors_per_location()[0]
    if family == "retinanet":
        from torchvision.models.detection.retinanet import RetinaNetClassificationHead

        model.head.classification_head = RetinaNetClassificationHead(head.cls_logits.in_channels, anchors, n_out)
    else:
        from torchvision.models.detection.fcos import FCOSClassificationHead

        model.head.classification_head = FCOSClassificationHead(head.cls_logits.in_channels, anchors, n_out)


@TASKS.register("detection")
class DetectionTask(Task):
    """Find the objects of an image: boxes, scores, labels (and masks with ``mask_rcnn``).

    Args:
        model: a timm backbone (its classifier is dropped).
        num_classes: foreground classes.
        detector: one of :data:`DETECTORS`.
        fpn_channels: width of the feature pyramid and the heads.
        img_size: short side the detector resizes images to (``max_size`` is ``img_size * 1333 / 800``).
        scale_jitter: training draws the short side from ``img_size * [1 - j, 1 + j]``.
        freeze_bn: keep the backbone's BatchNorm statistics and affine fixed.
        mean, std: the backbone's input normalisation.
    """

    name = "detection"
    trainer: ClassVar[str] = "detection"
    outputs: ClassVar[str] = "detections"
    selection_metric: ClassVar[str] = "val_map"

    @dataclass
    class Options(TaskOptions):
        detector: str = option("faster_rcnn", f"detection architecture: {', '.join(DETECTORS)}")
        fpn_channels: int = option(128, "width of the feature pyramid and the detection heads (torchvision uses 256)")
        scale_jitter: float = option(0.25, "training draws each image's short side from img_size * [1 - j, 1 + j]")
        freeze_bn: bool = option(True, "freeze the backbone's BatchNorm (detection batches are too small for its statistics)")
        tv_detector: str = option("", "use torchvision's own detector of this name (its backbone, not --backbone): "
                                  f"{', '.join(TORCHVISION_DETECTORS)}")
        coco: bool = option(False, "with --tv-detector: start from torchvision's COCO-trained weights (downloaded, needs internet)")

        def check(self) -> None:
            if self.detector not in DETECTORS:
                raise ValueError(f"--detector must be one of {', '.join(DETECTORS)}, got {self.detector!r}")
            if not 0 <= self.scale_jitter < 1:
                raise ValueError(f"--scale-jitter must be in [0, 1), got {self.scale_jitter}")
            if self.fpn_channels < 8:
                raise ValueError(f"--fpn-channels must be at least 8, got {self.fpn_channels}")
            if self.tv_detector and self.tv_detector not in TORCHVISION_DETECTORS:
                raise ValueError(f"--tv-detector must be one of {', '.join(TORCHVISION_DETECTORS)}, got {self.tv_detector!r}")
            if self.coco and not self.tv_detector:
                raise ValueError("--coco starts from torchvision's COCO-trained detectors: name one with --tv-detector")

        @property
        def family(self) -> str:
            """The detection architecture: that of the ``tv_detector`` when one is named, else ``detector``."""
            return detector_family(self.detector, self.tv_detector)

    def __init__(self, model: nn.Module, num_classes: int, *, detector: str = "faster_rcnn", fpn_channels: int = 128,
                 img_size: int = 512, scale_jitter: float = 0.25, freeze_bn: bool = True, tv_detector: str = "", coco: bool = False,
                 mean: tuple = (0.485, 0.456, 0.406), std: tuple = (0.229, 0.224, 0.225)):
        detector = detector_family(detector, tv_detector)
        # coco is a starting point: a checkpoint holds the trained weights, so rebuilding it downloads nothing
        self._args = {"detector": detector, "fpn_channels": fpn_channels, "img_size": img_size, "scale_jitter": scale_jitter,
                      "freeze_bn": freeze_bn, "tv_detector": tv_detector, "coco": False, "mean": list(mean), "std": list(std)}
        sizes = sorted({int(round(img_size * (1 + f * scale_jitter) / 32) * 32) for f in (-1, -0.5, 0, 0.5, 1)} - {0})
        min_size = (*sizes, img_size)  # torchvision draws from all in training and uses the last one in eval
        size = {"min_size": min_size, "max_size": int(round(img_size * 1333 / 800)), "mean": mean, "std": std}
        if tv_detector:  # torchvision's own backbone: ``model`` (the timm one) is not used
            detector_module = build_torchvision_detector(tv_detector, num_classes, coco=coco, **size)
        else:
            detector_module = build_detector(model, num_classes, detector=detector, fpn_channels=fpn_channels, freeze_bn=freeze_bn,
                                             **size)
        super().__init__(detector_module, num_classes)
        self.masks = detector == "mask_rcnn"
        self.label_offset = 1 if detector in ("faster_rcnn", "mask_rcnn") else 0  # torchvision's label of class 0
        self.coco_start = bool(tv_detector and coco)

    @classmethod
    def build_args(cls, options: TaskOptions, context: BuildContext) -> dict[str, Any]:
        prep = context.preprocessing or {}
        args = {"detector": options.family, "fpn_channels": options.fpn_channels, "scale_jitter": options.scale_jitter,
                "freeze_bn": options.freeze_bn, "tv_detector": options.tv_detector, "coco": options.coco}
        if prep:
            args.update(img_size=int(prep["img_size"]), mean=tuple(prep["mean"]), std=tuple(prep["std"]))
        return args

    def task_args(self) -> dict[str, Any]:
        return dict(self._args)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The detector's summed losses (``loss``) and each of them, from ``batch["image"]`` and ``batch["targets"]``."""
        targets = batch.get("targets")
        if targets is None:
            raise ValueError("a detection batch needs per-image 'targets' (boxes and labels); train with finegrain.detect.fit_detection")
        shifted = [{**t, "labels": t["labels"] + self.label_offset} for t in targets]
        if self.masks and any("masks" not in t for t in targets):
            raise ValueError("--detector mask_rcnn trains on instance masks, and this data set has none: use COCO annotations with "
                             "segmentations, or --detector faster_rcnn")
        losses = self.model(list(batch["image"]), shifted)
        return {"loss": sum(losses.values()), **{k: v.detach() for k, v in losses.items()}}

    def infer(self, images) -> list[dict[str, torch.Tensor]]:
        """Detections of each image (a list of ``[3, H, W]`` tensors in [0, 1]): boxes in its pixels, scores, labels ``0..C-1``."""
        was_training = self.model.training
        self.model.eval()
        try:
            out = self.model(list(images))
        finally:
            self.model.train(was_training)
        return [{**o, "labels": o["labels"] - self.label_offset} for o in out]

    def new_parameter_names(self) -> set[str]:
        """Everything but the backbone starts untrained: the pyramid, the proposal network and the heads (all of a COCO
        detector's layers but its class layers are pretrained, and get the backbone's rate too)."""
        if self.coco_start:
            new = ("model.roi_heads.box_predictor.", "model.roi_heads.mask_predictor.", "model.head.classification_head.")
            return {n for n, _ in self.named_parameters() if n.startswith(new)}
        return {n for n, _ in self.named_parameters() if not n.startswith("model.backbone.body.")}
