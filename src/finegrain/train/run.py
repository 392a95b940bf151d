"""``fit``: a supervised run from a ``RunConfig``: data, split, task, then the one :class:`~finegrain.train.trainer.Trainer`."""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from finegrain import checkpoint as ckpt
from finegrain.config import RunConfig
from finegrain.data.base import ImageList, open_dataset
from finegrain.data.cache import CachedImageDataset, open_or_build_cache
from finegrain.data.crop import box_crops
from finegrain.data.dataset import ImageDataset, check_annotations, check_files, collate
from finegrain.data.device import DeviceAugment, DevicePrefetcher, EncodedImageDataset, collate_device, device_batch, eval_batches
from finegrain.data.sampler import epoch_batches
from finegrain.data.split import load_split, save_split, stratified_split
from finegrain.data.transforms import AUGMENTS, BatchEraser, BatchMixer, eval_transform, train_transform
from finegrain.models.backbone import create_backbone
from finegrain.tasks import TASKS, BuildContext
from finegrain.train import distributed as dist_
from finegrain.train.adversarial import adversarial_training
from finegrain.train.balance import class_weights
from finegrain.train.distributed import World
from finegrain.train.ema import WarmupEma
from finegrain.train.logger import RunLogger
from finegrain.train.loop import NoImagesError, predict_loader
from finegrain.train.optim import build_optimizer, build_scheduler, check_head_first, freeze_pretrained
from finegrain.train.plan import Plan, make_plan, preprocessing
from finegrain.train.trainer import StepConfig, Trainer, TrainSetup, seed_everything
from finegrain.utils import resolve_device


@dataclass
class RunResult:
    """What ``fit`` returns: the run folder, the checkpoint ``--select`` kept, its epoch and validation top-1
    (what ``finegrain tune`` optimises: the score of the model a trial keeps, not the highest of its epochs)."""

    run_dir: Path
    best_checkpoint: Path
    best_epoch: int
    best_val_top1: float | None
    epochs_run: int
    stopped_early: bool
    interrupted: bool


def build_task_from_config(cfg: RunConfig, num_classes: int, *, pretrained: str | None = None):
    """The backbone and task a run config describes (``pretrained`` overrides the config's)."""
    cfg.model.check()
    model = build_backbone(cfg, num_classes, pretrained=pretrained)
    return build_task(cfg, model, num_classes, preprocessing(cfg, model))


def build_backbone(cfg: RunConfig, num_classes: int, *, pretrained: str | None = None):
    """The config's timm backbone with ``num_classes`` outputs and its pretrained weights (``pretrained`` overrides)."""
    m = cfg.model
    return create_backbone(m.backbone, num_classes=num_classes, pretrained=m.pretrained if pretrained is None else pretrained,
                           drop_rate=m.drop_rate, drop_path_rate=m.drop_path_rate)


def build_task(cfg: RunConfig, model, num_classes: int, prep: dict):
    """The config's task around ``model``, from its options and what it takes from the run (``Task.build_args``)."""
    m = cfg.model
    context = BuildContext(label_smoothing=cfg.train.label_smoothing, drop_rate=m.drop_rate, preprocessing=prep)
    return ckpt.build_task(m.task, model, num_classes, TASKS.get(m.task).build_args(m.options, context))


def fit(cfg: RunConfig, *, max_epochs: int | None = None, on_epoch: Callable[[dict], None] | None = None) -> RunResult:
    """Train a model as ``cfg`` says and keep everything in a run folder.

    The validation split is carved from the training images (stratified, seeded) and saved as
    ``split.json``; the test split is never read here. ``best.safetensors`` is the epoch that
    ``cfg.train.select`` picks on validation top-1 (the last epoch when there is no validation split).

    Args:
        cfg: the run configuration; with ``cfg.train.resume`` set, the saved config of that run
            folder is used and training continues from ``last.safetensors``.
        max_epochs: train at most this many epochs in this call and return; the run stays
            resumable (used to split a run across jobs, and by the resume tests).
        on_epoch: called with each epoch's ``metrics.jsonl`` row (``val_top1`` included) once the
            epoch's checkpoints are saved, on every process. An exception it raises (e.g.
            ``optuna.TrialPruned`` from ``finegrain tune``) ends training and propagates; the run
            folder then holds that epoch's checkpoints and stays resumable.
    """
    if cfg.train.resume:
        resume = cfg.train.resume
        cfg = RunConfig.from_dict(yaml.safe_load((_resume_dir(resume) / "config.yaml").read_text()))
        cfg.train.resume = resume
    cfg.check()
    world = dist_.world_from_env()
    device = dist_.setup(world, resolve_device(cfg.train.device))
    try:
        return _fit(_crops_on_cpu(make_plan(cfg, world, device)), max_epochs, on_epoch)
    finally:
        dist_.teardown(world)


def _fit(plan: Plan, max_epochs: int | None, on_epoch: Callable[[dict], None] | None) -> RunResult:
    cfg = plan.cfg
    seed_everything(cfg.train.seed)
    images = open_dataset(cfg.data.data, "train", dataset=cfg.data.dataset, download=cfg.data.download)
    if len(images.classes) < 2:
        raise ValueError(f"{cfg.data.data} has {len(images.classes)} class ({', '.join(images.classes) or 'none'}); a classifier "
                         "needs at least two (one folder per class), or it scores a meaningless 100%")
    check_files(images, cfg.data.data, fate="they are skipped and listed in the run folder's skipped_images.txt",
                warn=plan.is_main)
    if cfg.data.crop == "box":  # every dataset made from these (training, validation, calibration) reads the box crops
        images = box_crops(images, cfg.data.crop_margin, warn=plan.is_main)
    # a task trained on boxes / part locations: the data must have them and nothing may drop or scramble them
    check_annotations(images, plan.annotations, task=cfg.model.task, cache=cfg.data.cache,
                      mixing=cfg.data.cutmix > 0 or cfg.data.mixup > 0, augment=cfg.data.augment, pipeline=plan.pipeline)
    run_dir = _resume_dir(cfg.train.resume) if cfg.train.resume else Path(
        dist_.broadcast_object(plan.world, str(_new_run_dir(cfg)) if plan.is_main else None))
    train_idx, val_idx = _split(run_dir, images, plan, resume=bool(cfg.train.resume))
    if plan.is_main:
        text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
        ckpt.write_text_atomic(run_dir / "config.yaml", text)
    model = build_backbone(cfg, len(images.classes), pretrained="none" if cfg.train.resume else None)
    plan = _with_crop(plan.with_model(model))
    task = build_task(cfg, model, len(images.classes), plan.preprocessing)
    taxonomy = _taxonomy(cfg, images)
    meta = ckpt.describe(task, model=dataclasses.asdict(cfg.model), classes=images.classes, preprocessing=plan.preprocessing,
                         config=cfg.to_dict(), hierarchy=taxonomy.to_dict() if taxonomy else None)
    setup = _setup(plan, task, images, train_idx, val_idx)
    trainer = Trainer(run_dir, epochs=cfg.train.epochs, meta=meta, device=plan.device, seed=cfg.train.seed, world=plan.world,
                      patience=cfg.train.patience, select=cfg.train.select, callbacks=[on_epoch] if on_epoch else [],
                      logger=RunLogger(run_dir, cfg) if plan.is_main else None)
    r = trainer.run(setup, resume=bool(cfg.train.resume), max_epochs=max_epochs)
    if cfg.train.calibrate and plan.is_main and val_idx and not r.interrupted and r.best_checkpoint is not None:
        _calibrate_best(r.best_checkpoint, images, train_idx, val_idx, plan)
    return RunResult(r.run_dir, r.best_checkpoint, r.best_epoch, r.best_metric, r.epochs_run, r.stopped_early, r.interrupted)


def _crops_on_cpu(plan: Plan) -> Plan:
    """``--pipeline auto`` with ``--crop box``: the CPU pipeline, the one that crops (an explicit device pipeline is refused by the config)."""
    return dataclasses.replace(plan, pipeline="cpu") if plan.cfg.data.crop == "box" else plan


def _with_crop(plan: Plan) -> Plan:
    """The plan whose checkpoint preprocessing also says the model was trained on box crops (``crop``, ``crop_margin``),
    which ``finegrain eval`` follows by default; ``finegrain predict`` classifies the images it is given as they are."""
    d = plan.cfg.data
    if d.crop == "none":
        return plan
    return dataclasses.replace(plan, preprocessing={**plan.preprocessing, "crop": d.crop, "crop_margin": d.crop_margin})


def _taxonomy(cfg: RunConfig, images: ImageList):
    """The class hierarchy of the run: ``--hierarchy CSV``, else the reader's (NABirds, FGVC-Aircraft), else None."""
    from finegrain.eval.hierarchy import Taxonomy, taxonomy_of

    if cfg.data.hierarchy:
        taxonomy = Taxonomy.from_csv(cfg.data.hierarchy)
        taxonomy.check_classes(images.classes, cfg.data.hierarchy)
        return taxonomy
    return taxonomy_of(images)


def _calibrate_best(best: Path, images: ImageList, train_idx: list[int], val_idx: list[int], plan: Plan) -> None:
    """Fit temperature, open-set thresholds and the kNN bank on the validation split, into ``best.safetensors``."""
    from finegrain.eval.openworld import fit_open_world, write_open_world
    from finegrain.tasks import classifier_tasks

    meta = ckpt.read_meta(best)
    if meta.calibration is not None or meta.task not in classifier_tasks():
        return
    task, _ = ckpt.load_task(best, plan.device)
    d = plan.cfg.data
    new, extra = fit_open_world(task, meta, val=images.subset(val_idx), train=images.subset(train_idx), device=plan.device,
                                seed=plan.cfg.train.seed, batch_size=d.batch_size * 2, workers=d.workers)
    write_open_world(best, new, extra)


def _setup(plan: Plan, task, images: ImageList, train_idx: list[int], val_idx: list[int]) -> TrainSetup:
    """The trainer's view of a supervised run: the module on its device, optimizer, batches and validation."""
    cfg, device = plan.cfg, plan.device
    train_set, val_set = images.subset(train_idx), images.subset(val_idx)
    task.to(device)
    if cfg.train.channels_last:
        task.to(memory_format=torch.channels_last)
    counts = torch.tensor(train_set.class_counts(), dtype=torch.float64)
    if cfg.train.class_weights != "none":
        task.set_class_weight(class_weights(counts, cfg.train.class_weights).to(device))
    steps = plan.steps_per_epoch(len(train_set))
    optimizer = build_optimizer(task, cfg.train, lr=plan.lr, fused=device.type == "cuda")
    if cfg.train.head_epochs:
        check_head_first(optimizer, cfg.model.task)
    scheduler = build_scheduler(optimizer, total_steps=cfg.train.epochs * steps, warmup_steps=int(cfg.train.warmup_epochs * steps),
                                head_steps=cfg.train.head_epochs * steps)
    ema = None
    if cfg.train.ema:
        ema = WarmupEma(task, decay=cfg.train.ema_decay, warmup=cfg.train.ema_warmup)
    weights = (1.0 / counts)[torch.tensor(train_set.labels)] if cfg.data.sampler == "balanced" else None
    batches, epoch_images, seeded = _train_batches(plan, images, train_idx, weights)
    prep = plan.preprocessing
    return TrainSetup(
        module=task, optimizer=optimizer, scheduler=scheduler, batches=batches, epoch_images=epoch_images,
        validate=functools.partial(_validate, val_set=val_set, plan=plan) if len(val_set) else None,
        metric=plan.task_cls.selection_metric, forward=_forward(plan, task), ema=ema,
        standard_error=top1_standard_error if plan.task_cls.selection_metric == "val_top1" else None,
        mixer=BatchMixer(len(images.classes), cutmix=cfg.data.cutmix, mixup=cfg.data.mixup, prob=cfg.data.mix_prob),
        eraser=BatchEraser(cfg.data.random_erase),
        step=StepConfig(accum_steps=cfg.train.accum_steps, clip_grad=cfg.train.clip_grad, amp=cfg.train.amp,
                        channels_last=cfg.train.channels_last, normalize=(prep["mean"], prep["std"]),
                        adversarial=adversarial_training(cfg.train, task, (prep["mean"], prep["std"]))),
        on_epoch_start=functools.partial(_start_epoch, seeded=seeded, optimizer=optimizer, head_epochs=cfg.train.head_epochs))


def _start_epoch(epoch: int, *, seeded, optimizer, head_epochs: int) -> None:
    """Before an epoch's batches: the sampler's epoch, and whether the pretrained layers train (``--head-epochs``)."""
    seeded.epoch = epoch
    if head_epochs:
        freeze_pretrained(optimizer, epoch < head_epochs)


def _forward(plan: Plan, task):
    """What the loop calls: the task, wrapped in DistributedDataParallel and/or torch.compile."""
    forward = task
    if plan.world.distributed:
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(task, device_ids=[plan.device.index] if plan.device.type == "cuda" else None,
                                          find_unused_parameters=getattr(task, "find_unused_parameters", False)
                                          or plan.cfg.train.head_epochs > 0)  # the head stage leaves the backbone without gradients
    if plan.cfg.train.compile:
        forward = torch.compile(forward, mode=plan.cfg.train.compile_mode)
    return forward


def _train_batches(plan: Plan, images: ImageList, train_idx: list[int], weights):
    """``(batches(epoch, start_step), epoch_images(epoch, start_step), the seeded dataset)`` of the training split."""
    data, collate_fn, prepare = build_train_data(plan, images, train_idx)
    wrap = (lambda loader: DevicePrefetcher(loader, plan.device, prepare)) if prepare is not None else None
    return epoch_batches(data, seed=plan.cfg.train.seed, batch_size=plan.cfg.data.batch_size, workers=plan.cfg.data.workers,
                         collate_fn=collate_fn, world=plan.world, weights=weights, pin_memory=plan.device.type == "cuda",
                         wrap=wrap)


def _keep(img):
    return img


def build_train_data(plan: Plan, images: ImageList, train_idx: list[int]):
    """The training dataset, its collate function, and the device-side step (None in the CPU pipeline)."""
    cfg, prep = plan.cfg, plan.preprocessing
    cache = _open_cache(plan, images) if cfg.data.cache else None
    if plan.pipeline == "device":
        augment = DeviceAugment(cfg.data.img_size, scale_min=cfg.data.scale_min, mean=prep["mean"], std=prep["std"],
                                jitter=AUGMENTS.info(cfg.data.augment).get("jitter", 0.0))
        data = (CachedImageDataset(cache, images.labels, _keep, indices=train_idx) if cache is not None
                else EncodedImageDataset(images.subset(train_idx)))
        return data, collate_device, functools.partial(device_batch, device=plan.device, augment=augment)
    if cache is not None:
        t_uint8 = train_transform(cfg.data.img_size, scale_min=cfg.data.scale_min, augment=cfg.data.augment,
                                  interpolation=prep["interpolation"], normalize=False)
        return CachedImageDataset(cache, images.labels, t_uint8, indices=train_idx), collate, None
    t_train = train_transform(cfg.data.img_size, mean=prep["mean"], std=prep["std"], scale_min=cfg.data.scale_min,
                              augment=cfg.data.augment, interpolation=prep["interpolation"])
    return ImageDataset(images.subset(train_idx), t_train, annotations=plan.annotations), collate, None


def _open_cache(plan: Plan, images: ImageList):
    """Rank 0 builds (or verifies) the decoded cache while the others wait, then they open it."""
    d = plan.cfg.data
    short_side, cache = round(1.15 * d.img_size), None
    if plan.is_main:
        cache = open_or_build_cache(images, d.cache_dir, short_side, workers=max(1, d.workers))
    dist_.barrier(plan.world)
    if cache is None:
        cache = open_or_build_cache(images, d.cache_dir, short_side, workers=max(1, d.workers))
    return cache


@torch.no_grad()
def _validate(module, *, val_set: ImageList, plan: Plan) -> dict:
    """Validation loss and top-1; in a distributed run each rank predicts every N-th image and the sums are reduced."""
    cfg, world, device, prep = plan.cfg, plan.world, plan.device, plan.preprocessing
    module.eval()
    mine = list(range(world.rank, len(val_set), world.size))
    loss_sum = correct = n = 0.0
    if mine:
        transform = eval_transform(cfg.data.img_size, mean=prep["mean"], std=prep["std"], crop_pct=prep["crop_pct"],
                                   interpolation=prep["interpolation"])
        loader = eval_batches(val_set.subset(mine), prep, device, pipeline=plan.pipeline, transform=transform,
                              batch_size=cfg.data.batch_size * 2, workers=cfg.data.workers)
        try:
            logits, labels, skipped = predict_loader(module.predict, loader, device=device, amp=cfg.train.amp,
                                                     channels_last=cfg.train.channels_last)
        except NoImagesError as e:
            logits, labels, skipped = None, None, e.skipped
        if logits is not None:
            loss_sum = F.cross_entropy(logits, labels, reduction="sum").item()
            correct, n = (logits.argmax(1) == labels).sum().item(), labels.numel()
    loss_sum, correct, n = dist_.all_reduce_sums(world, [loss_sum, correct, n], device)
    skipped = dist_.all_gather_lists(world, skipped if mine else [])
    if n == 0:
        raise ValueError(f"none of the {len(val_set)} validation images could be read (e.g. {skipped[0][0] if skipped else '?'}: "
                         f"{skipped[0][1] if skipped else '?'}); check the files, or train with --val-fraction 0")
    return {"val_loss": loss_sum / n, "val_top1": 100.0 * correct / n, "val_images": int(n), "skipped": skipped}


def top1_standard_error(top1: float, row: dict) -> float:
    """The binomial standard error, in points, of a top-1 of ``top1`` percent on ``row["val_images"]`` images."""
    p = top1 / 100.0
    return 100.0 * math.sqrt(p * (1.0 - p) / row["val_images"])


def _split(run_dir: Path, images: ImageList, plan: Plan, *, resume: bool) -> tuple[list[int], list[int]]:
    """Rank 0 reads (on resume) or writes ``split.json``; the others read it once it is complete.

    A new run always draws its own split: a ``split.json`` left by an earlier start that failed
    before training (no checkpoint in the folder) is replaced, not reused.
    """
    cfg, split_file = plan.cfg, run_dir / "split.json"
    train_idx = val_idx = None
    if plan.is_main:
        if resume and split_file.exists():
            train_idx, val_idx = load_split(split_file, images)
        else:
            train_idx, val_idx = stratified_split(images.labels, cfg.data.val_fraction, cfg.data.split_seed)
            save_split(split_file, images, train_idx, val_idx, fraction=cfg.data.val_fraction, seed=cfg.data.split_seed)
    dist_.barrier(plan.world)
    if not plan.is_main:
        train_idx, val_idx = load_split(split_file, images)
    counts = images.subset(train_idx).class_counts()
    empty = [c for c, k in zip(images.classes, counts) if k == 0]
    if empty:
        raise ValueError(f"classes with no training images after the validation split: {empty[:10]}; add images or lower --val-fraction")
    return train_idx, val_idx


def _new_run_dir(cfg: RunConfig) -> Path:
    name = cfg.train.name or f"{cfg.model.backbone}-{Path(cfg.data.data).stem or 'data'}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.train.out) / name
    if (run_dir / "last.safetensors").exists():
        raise FileExistsError(f"run folder {run_dir} already holds a run: pass --resume {run_dir} or another --name")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _resume_dir(resume: str) -> Path:
    p = Path(resume)
    run_dir = p.parent if p.is_file() else p
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"--resume {resume}: no config.yaml in {run_dir}; give the run folder of an earlier run")
    return run_dir


__all__ = ["RunResult", "World", "build_task_from_config", "fit"]
