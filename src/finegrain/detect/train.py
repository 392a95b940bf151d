"""``fit_detection``: train a detector (a :class:`~finegrain.tasks.detection.DetectionTask`) with the one trainer.

Batches are lists of images of different sizes with per-image targets; everything else (AMP,
EMA, gradient accumulation, exact resume, Ctrl-C, ``best``/``last`` self-describing checkpoints,
``metrics.jsonl``) is :class:`~finegrain.train.trainer.Trainer`'s, as for every other task. The
best epoch is the one with the highest validation box mAP (``val_map``) on a held-out part of
the training images, drawn per class so that each class keeps training images.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finegrain import checkpoint as ckpt
from finegrain.config import ModelConfig, TrainConfig, _f
from finegrain.detect.data import LABEL_MODES, DetectionList
from finegrain.detect.dataset import DetectionDataset, collate, eval_transform, train_transform
from finegrain.train.ema import WarmupEma
from finegrain.utils import console, resolve_device


@dataclass
class DetectConfig:
    """A detection run: data, detector, schedule."""

    data: str = _f("", "COCO JSON, Pascal VOC folder, CSV (path,xmin,ymin,xmax,ymax,label) or a benchmark root with boxes (CUB, ...)")
    format: str = _f("auto", "annotation format: auto, coco, voc, csv or benchmark")
    images: str | None = _f(None, "folder of the images of a COCO file (default: images/ beside annotations/, else the JSON's folder)")
    labels: str = _f("species", "species: the data set's classes; object: one class for every box (a detector for detect-then-classify)")
    dataset: str | None = _f(None, "benchmark reader name when --format benchmark is not guessed (cub, nabirds, dogs, cars, aircraft)")
    backbone: str = _f("efficientnet_lite0", "timm backbone under the feature pyramid")
    pretrained: str = _f("hub", "backbone weights: hub, none, or a local file (.safetensors, .pth)")
    img_size: int = _f(512, "short side images are resized to (the long side at most img_size * 1333 / 800)")
    epochs: int = _f(12, "training epochs")
    batch_size: int = _f(4, "images per step")
    optimizer: str = _f("adamw", "adamw, or sgd (momentum 0.9, torchvision's detection recipe; use --lr 0.01 or so)")
    lr: float = _f(2e-4, "learning rate of the new layers (pyramid and heads)")
    backbone_lr_mult: float = _f(0.5, "the backbone's learning rate as a fraction of --lr")
    weight_decay: float = _f(1e-4, "weight decay (not on norms and biases)")
    warmup_epochs: float = _f(0.5, "linear warmup before the cosine decay")
    val_fraction: float = _f(0.1, "fraction of training images held out to pick the best epoch (0: keep the last epoch)")
    split_seed: int = _f(0, "seed of the validation split")
    max_side: int = _f(2048, "images with a longer side are shrunk in the loader (tiled prediction keeps full resolution)")
    amp: bool = _f(True, "bf16 autocast on CUDA, and on CPUs with native bf16")
    accum_steps: int = _f(1, "batches per optimizer step (gradient accumulation)")
    clip_grad: float = _f(0.0, "clip the gradient norm to this value (0: off)")
    ema: bool = _f(False, "keep an exponential moving average of the weights; validation and best.safetensors use it")
    ema_decay: float = _f(0.9998, "EMA decay per optimizer step (the largest, with --ema-warmup)")
    ema_warmup: bool = _f(True, "grow the EMA decay as 1 - (1 + step)^(-2/3) up to --ema-decay (timm's EMA warmup)")
    workers: int = _f(max(1, min(8, (os.cpu_count() or 2) - 1)), "data loading processes")
    seed: int = _f(0, "seed of initialisation, order and augmentation")
    device: str = _f("auto", "auto, cpu, cuda or cuda:N")
    out: str = _f("runs/detect", "run folder (best.safetensors, last.safetensors, metrics.jsonl, dropped_boxes.txt)")

    def check(self) -> None:
        from finegrain.detect.readers import FORMATS

        if not self.data:
            raise ValueError("no data given: pass --data (a COCO JSON, VOC folder, CSV or benchmark root with boxes)")
        if self.format not in FORMATS:
            raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.labels not in LABEL_MODES:
            raise ValueError(f"--labels must be one of {', '.join(LABEL_MODES)}, got {self.labels!r}")
        for flag, value, low in (("--img-size", self.img_size, 64), ("--epochs", self.epochs, 1), ("--batch-size", self.batch_size, 1),
                                 ("--accum-steps", self.accum_steps, 1)):
            if value < low:
                raise ValueError(f"{flag} must be at least {low}, got {value}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"--optimizer must be adamw or sgd, got {self.optimizer!r}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")


def open_split(cfg: DetectConfig, split: str) -> DetectionList:
    from finegrain.detect.readers import open_detection

    return open_detection(cfg.data, split, fmt=cfg.format, labels=cfg.labels, dataset=cfg.dataset, images=cfg.images)


def val_split(data: DetectionList, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """``(train indices, val indices)``: ``fraction`` of each class's images (by their first object), at least one
    image of a class left for training; images without objects are split alike."""
    rng = np.random.default_rng(seed)
    groups: dict[int, list[int]] = {}
    for i, l in enumerate(data.labels):
        groups.setdefault(int(l[0]) if len(l) else -1, []).append(i)
    val = []
    for _, idx in sorted(groups.items()):
        n = min(int(round(fraction * len(idx))), len(idx) - 1)
        val += rng.permutation(idx)[:n].tolist()
    val_set = set(val)
    return [i for i in range(len(data)) if i not in val_set], sorted(val)


def build_detection_task(cfg: DetectConfig, options, num_classes: int, *, pretrained: str):
    from finegrain.models.backbone import create_backbone, data_config
    from finegrain.tasks import BuildContext, build_task

    if options.tv_detector:  # torchvision's own backbone: the timm model is not used, so it loads no weights
        pretrained = "none"
    model = create_backbone(cfg.backbone, num_classes=num_classes, pretrained=pretrained)
    dc = data_config(model) if not options.tv_detector else {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    prep = {"img_size": cfg.img_size, "mean": list(dc["mean"]), "std": list(dc["std"]), "crop_pct": 1.0, "interpolation": "bilinear"}
    from finegrain.tasks.detection import DetectionTask

    args = DetectionTask.build_args(options, BuildContext(preprocessing=prep))
    return build_task("detection", model, num_classes, **args), prep


def fit_detection(cfg: DetectConfig, options: Any = None, *, resume: bool = False, max_epochs: int | None = None) -> dict:
    """Train a detector on ``cfg.data``; keep the epoch with the best validation mAP.

    Args:
        cfg: the run.
        options: the detection task's options (``DetectionTask.Options`` or a dict: detector, fpn_channels, ...).
        resume: continue the run in ``cfg.out`` (same arguments) exactly where it stopped.
        max_epochs: stop after this many epochs in this call (the schedule stays that of ``cfg.epochs``).

    Returns:
        dict with ``run_dir``, ``best_checkpoint``, ``best_val_map``, ``epochs``, ``interrupted`` and ``history``.
    """
    from finegrain.tasks import resolve_options
    from finegrain.train import distributed as dist_

    cfg.check()
    options = resolve_options("detection", options)
    world = dist_.world_from_env()
    dev = dist_.setup(world, resolve_device(cfg.device))
    try:
        return _fit(cfg, options, world, dev, resume=resume, max_epochs=max_epochs)
    finally:
        dist_.teardown(world)


def _fit(cfg: DetectConfig, options, world, dev, *, resume: bool, max_epochs: int | None) -> dict:
    from finegrain.data.sampler import epoch_batches
    from finegrain.train import distributed as dist_
    from finegrain.train.logger import RunLogger
    from finegrain.train.optim import build_optimizer, build_scheduler
    from finegrain.train.trainer import StepConfig, Trainer, TrainSetup, open_job, seed_everything

    run_dir = Path(cfg.out)
    job = {"config": {**dataclasses.asdict(cfg), "workers": None, "device": None}, "options": dataclasses.asdict(options)}
    resumed = open_job(run_dir, job, resume=resume) if world.is_main else resume
    dist_.barrier(world)
    seed_everything(cfg.seed)
    data = open_split(cfg, "train")
    if world.is_main:
        _report_data(data, run_dir)
    masks = options.family == "mask_rcnn"
    train_idx, val_idx = val_split(data, cfg.val_fraction, cfg.split_seed)
    task, prep = build_detection_task(cfg, options, len(data.classes), pretrained="none" if resumed else cfg.pretrained)
    task = task.to(dev)
    train_ds = DetectionDataset(data.subset(train_idx), train_transform(), masks=masks, max_side=cfg.max_side)
    batches, epoch_images, seeded = epoch_batches(train_ds, seed=cfg.seed, batch_size=cfg.batch_size, workers=cfg.workers,
                                                  collate_fn=collate, world=world, pin_memory=dev.type == "cuda")
    steps = max(1, len(train_idx) // (cfg.batch_size * world.size) // cfg.accum_steps)
    tc = TrainConfig(optimizer=cfg.optimizer, backbone_lr_mult=cfg.backbone_lr_mult, weight_decay=cfg.weight_decay)
    opt = build_optimizer(task, tc, lr=cfg.lr)
    sched = build_scheduler(opt, total_steps=cfg.epochs * steps, warmup_steps=int(cfg.warmup_epochs * steps))
    validate = None
    if val_idx:
        val_ds = DetectionDataset(data.subset(val_idx), eval_transform(), masks=masks, max_side=cfg.max_side)
        validate = functools.partial(_validate, dataset=val_ds, classes=data.classes, masks=masks, device=dev, workers=cfg.workers)
    ema = None
    if cfg.ema:
        ema = WarmupEma(task, decay=cfg.ema_decay, warmup=cfg.ema_warmup)
    forward = task
    if world.distributed:
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(task, device_ids=[dev.index] if dev.type == "cuda" else None)
    setup = TrainSetup(module=task, optimizer=opt, scheduler=sched, batches=batches, epoch_images=epoch_images, validate=validate,
                       metric=task.selection_metric, forward=forward, ema=ema,
                       step=StepConfig(amp=cfg.amp, accum_steps=cfg.accum_steps, clip_grad=cfg.clip_grad),
                       on_epoch_start=lambda epoch: setattr(seeded, "epoch", epoch))
    model_cfg = ModelConfig(backbone=cfg.backbone, pretrained=cfg.pretrained, task="detection", options=options)
    meta = ckpt.describe(task, model=dataclasses.asdict(model_cfg), classes=data.classes, preprocessing=prep,
                         config={"detect": dataclasses.asdict(cfg)},
                         detection={"labels": cfg.labels, "format": cfg.format, "masks": masks, "train_images": len(train_idx),
                                    "val_images": len(val_idx)})
    trainer = Trainer(run_dir, epochs=cfg.epochs, meta=meta, device=dev, seed=cfg.seed, world=world,
                      logger=RunLogger(run_dir) if world.is_main else None)
    r = trainer.run(setup, resume=resumed, max_epochs=max_epochs)
    return {"run_dir": str(run_dir), "best_checkpoint": str(r.best_checkpoint), "best_val_map": r.best_metric,
            "epochs": r.epochs_run, "interrupted": r.interrupted, "history": r.history}


def _report_data(data: DetectionList, run_dir: Path) -> None:
    """Print what sanitising changed and list the dropped boxes in the run folder."""
    if data.num_objects == 0:
        raise ValueError(f"{data.source}: no objects to train on ({len(data)} images, no boxes left after sanitising)")
    summary = data.fixes.summary()
    listed = data.fixes.write(run_dir)
    if summary:
        console.print(f"[yellow]{summary}" + (f"; listed in {listed}" if listed else ""))
    console.print(f"detection data: {len(data)} images, {data.num_objects} objects, {len(data.classes)} classes ({data.source})")


@torch.no_grad()
def predict_dataset(task, dataset: DetectionDataset, *, device, workers: int = 0, batch_size: int = 4, amp: bool = False,
                    on_batch=None) -> tuple[list[dict], list[dict], list]:
    """``(predictions, targets, skipped)`` of every readable image of ``dataset``, on the CPU."""
    from torch.utils.data import DataLoader

    from finegrain.train.loop import autocast

    task.eval()
    preds, targets, skipped = [], [], []
    for batch in DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate):
        skipped += batch["skipped"]
        if batch["image"] is None:
            continue
        with autocast(device, amp):
            out = task.predict([im.to(device) for im in batch["image"]])
        preds += [{k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in o.items()} for o in out]
        targets += batch["targets"]
        if on_batch is not None:
            on_batch(len(out))
    return preds, targets, skipped


def _validate(task, *, dataset: DetectionDataset, classes: list[str], masks: bool, device, workers: int) -> dict:
    from finegrain.detect.metrics import DetectionMetrics

    preds, targets, skipped = predict_dataset(task, dataset, device=device, workers=workers)
    metrics = DetectionMetrics(classes, masks=masks)
    metrics.update(preds, targets)
    m = metrics.compute()
    row = {"val_map": m["map"] or 0.0, "val_map_50": m["map_50"] or 0.0, "skipped": skipped}  # None: nothing to score
    if masks:
        row["val_mask_map"] = m["mask_map"] or 0.0
    return row
