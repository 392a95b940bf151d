"""``fit_episodic`` and ``evaluate_fewshot``: the public functions behind ``finegrain fewshot``.

Training feeds episodes through the one trainer (:class:`finegrain.train.trainer.Trainer`):
an :class:`~finegrain.fewshot.sampler.EpisodicSampler` is the DataLoader's ``batch_sampler``, so
each batch is one episode, and the method Task splits it into support and query by position.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from finegrain import checkpoint as ckpt
from finegrain.config import ModelConfig, TrainConfig
from finegrain.data.base import ImageList, open_dataset
from finegrain.data.dataset import ImageDataset, check_files, collate
from finegrain.data.sampler import SeededItems, epoch_batches
from finegrain.data.transforms import eval_transform, train_transform
from finegrain.fewshot.evaluate import compute_features, evaluate_episodes
from finegrain.fewshot.sampler import SPLITS, EpisodeCollate, EpisodicSampler, split_classes
from finegrain.models.backbone import create_backbone, data_config
from finegrain.tasks import resolve_options
from finegrain.tasks.fewshot import EpisodicTask, build_method, fewshot_method
from finegrain.train.logger import RunLogger
from finegrain.train.optim import build_optimizer, build_scheduler
from finegrain.train.trainer import StepConfig, Trainer, TrainSetup, open_job
from finegrain.utils import resolve_device


def open_all_images(data: str | Path, dataset: str | None = None) -> ImageList:
    """Every image of a data set (train and, when there is one, test): few-shot splits are by class."""
    train = open_dataset(data, "train", dataset=dataset)
    try:
        test = open_dataset(data, "test", dataset=dataset)
    except (ValueError, FileNotFoundError):
        test = None
    if test is not None and test.classes != train.classes:
        raise ValueError(f"{data}: the test split has other classes than the train split")
    images = train if test is None else ImageList(train.paths + test.paths, train.labels + test.labels, train.classes,
                                                  source=train.source)
    check_files(images, str(data), fate="episodes skip them")
    return images


def _preprocessing(model, img_size: int | None, mean=None, std=None) -> dict:
    dc = data_config(model)
    size = img_size or int(model.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
    return {"img_size": size, "mean": list(mean or dc["mean"]), "std": list(std or dc["std"]),
            "crop_pct": dc["crop_pct"], "interpolation": dc["interpolation"]}


def _eval_tf(prep: dict):
    return eval_transform(prep["img_size"], mean=prep["mean"], std=prep["std"], crop_pct=prep["crop_pct"],
                          interpolation=prep["interpolation"])


def fit_episodic(
    data: str | Path,
    *,
    out: str | Path,
    method: str = "protonet",
    backbone: str = "conv4",
    pretrained: str = "none",
    dataset: str | None = None,
    n_way: int = 5,
    k_shot: int = 1,
    q_query: int = 15,
    episodes: int = 100,
    epochs: int = 10,
    val_episodes: int = 100,
    img_size: int | None = 84,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    optimizer: str = "adam",
    lr: float = 1e-3,
    backbone_lr_mult: float = 1.0,
    weight_decay: float = 0.0,
    split_method: str = "auto",
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
    split_seed: int = 0,
    seed: int = 0,
    workers: int = 0,
    device: str = "auto",
    batch_size: int = 32,
    method_args: dict[str, Any] | None = None,
    resume: bool = False,
    max_epochs: int | None = None,
) -> dict:
    """Train a few-shot method on episodes of the base classes; keep the best on the val classes.

    The baseline is the exception: it trains as a plain classifier of the base classes (batches of
    ``batch_size``), and is validated, like the others, on episodes of the val classes.

    The logged ``train_acc`` of an episodic method counts the support rows too (the loop scores
    every row of the batch), so it runs higher than query accuracy; ``val_acc`` is query-only.

    Training runs through the one trainer in ``out``: ``best.safetensors`` and
    ``last.safetensors`` (self-describing checkpoints whose ``fewshot`` metadata names the class
    splits), ``metrics.jsonl``, and after Ctrl-C a state that ``resume=True`` continues exactly
    (the arguments are kept in ``job.json`` and must be the same).

    Returns:
        dict with ``run_dir``, ``best_checkpoint``, ``best_val_acc``, ``epochs`` and ``interrupted``.
    """
    args = {k: v for k, v in locals().items() if k not in ("resume", "max_epochs", "workers", "device")}
    run_dir = Path(out)
    resumed = open_job(run_dir, {**args, "data": str(data), "out": str(out)}, resume=resume)
    torch.manual_seed(seed)
    dev = resolve_device(device)
    images = open_all_images(data, dataset)
    splits = split_classes(images, method=split_method, fractions=split_fractions, seed=split_seed)
    cls = fewshot_method(method)
    options = resolve_options(cls.name, method_args)
    # The baseline pre-trains as an ordinary classifier of the base classes; the others on episodes.
    n_out = cls.head_classes(n_way) if cls.episodic else len(splits["base"])
    model = create_backbone(backbone, num_classes=n_out, pretrained="none" if resumed else pretrained)
    task = cls(model, n_out, n_way=n_way, k_shot=k_shot, **dataclasses.asdict(options)).to(dev)
    prep = _preprocessing(model, img_size, mean, std)
    batches, epoch_images, seeded = (_episode_batches if cls.episodic else _base_batches)(
        images, splits, prep, n_way=n_way, k_shot=k_shot, q_query=q_query, episodes=episodes, batch_size=batch_size,
        seed=seed, workers=workers)
    opt = build_optimizer(task, TrainConfig(optimizer=optimizer, backbone_lr_mult=backbone_lr_mult, weight_decay=weight_decay), lr=lr)
    sched = build_scheduler(opt, total_steps=epochs * len(batches(0, 0)), warmup_steps=0)
    val = images.subset([i for i, l in enumerate(images.labels) if l in set(splits["val"])])
    validate = None
    if len(splits["val"]) >= n_way and val_episodes > 0:
        validate = functools.partial(_validate, val=val, prep=prep, n_way=n_way, k_shot=k_shot, q_query=q_query,
                                     episodes=val_episodes, classes=splits["val"], class_names=images.classes, seed=seed + 1,
                                     device=dev, workers=workers)
    setup = TrainSetup(module=task, optimizer=opt, scheduler=sched, batches=batches, epoch_images=epoch_images,
                       validate=validate, metric=cls.selection_metric, step=StepConfig(amp=False),
                       on_epoch_start=lambda epoch: setattr(seeded, "epoch", epoch))
    model_cfg = ModelConfig(backbone=backbone, pretrained=pretrained, task=task.name, options=options)
    meta = ckpt.describe(task, model=dataclasses.asdict(model_cfg), classes=[f"way_{i}" for i in range(task.num_classes)],
                         preprocessing=prep, fewshot={"method": method, "n_way": n_way, "k_shot": k_shot, "q_query": q_query,
                                                      "split_method": split_method,
                                                      "splits": {s: [images.classes[c] for c in splits[s]] for s in SPLITS}})
    trainer = Trainer(run_dir, epochs=epochs, meta=meta, device=dev, seed=seed, logger=RunLogger(run_dir))
    r = trainer.run(setup, resume=resumed, max_epochs=max_epochs)
    return {"run_dir": str(run_dir), "best_checkpoint": str(r.best_checkpoint), "best_val_acc": r.best_metric,
            "epochs": r.epochs_run, "interrupted": r.interrupted}


def _episode_batches(images: ImageList, splits: dict, prep: dict, *, n_way: int, k_shot: int, q_query: int, episodes: int,
                     seed: int, workers: int, **_):
    """Episodes of the base classes: ``(batches(epoch, start), epoch_images(epoch, start), seeded dataset)``."""
    t_train = train_transform(prep["img_size"], mean=prep["mean"], std=prep["std"], interpolation=prep["interpolation"])
    seeded = SeededItems(ImageDataset(images, t_train), seed)
    sampler = EpisodicSampler(images.labels, n_way=n_way, k_shot=k_shot, q_query=q_query, episodes=episodes,
                              classes=splits["base"], class_names=images.classes, seed=seed)
    collate_fn = EpisodeCollate(n_way, k_shot, q_query)

    def batches(epoch: int, start: int):
        sampler.set_epoch(epoch, start)
        return DataLoader(seeded, batch_sampler=sampler, num_workers=workers, collate_fn=collate_fn)

    return batches, lambda epoch, start: (episodes - start) * n_way * (k_shot + q_query), seeded


def _base_batches(images: ImageList, splits: dict, prep: dict, *, batch_size: int, seed: int, workers: int, **_):
    """Ordinary batches of the base classes (the baseline's pre-training), in a (seed, epoch) order."""
    base_index = {c: i for i, c in enumerate(splits["base"])}
    pick = [i for i, l in enumerate(images.labels) if l in base_index]
    base = ImageList([images.paths[i] for i in pick], [base_index[images.labels[i]] for i in pick],
                     [images.classes[c] for c in splits["base"]], source=images.source)
    t_train = train_transform(prep["img_size"], mean=prep["mean"], std=prep["std"], interpolation=prep["interpolation"])
    return epoch_batches(ImageDataset(base, t_train), seed=seed, batch_size=batch_size, workers=workers, collate_fn=collate)


def _validate(task, *, val: ImageList, prep: dict, workers: int, device, **episodes) -> dict:
    """Query accuracy (+- 95% CI) on seeded episodes of the val classes."""
    feats, labels, _ = compute_features(task, val, _eval_tf(prep), device=device, workers=workers)
    r = evaluate_episodes(task, feats, labels, device=device, **episodes)
    return {"val_acc": r["acc"], "val_ci95": r["ci95"]}


def evaluate_fewshot(
    data: str | Path,
    *,
    checkpoint: str | Path | None = None,
    backbone: str | None = None,
    pretrained: str = "none",
    method: str | None = None,
    dataset: str | None = None,
    split: str = "novel",
    n_way: int = 5,
    k_shots: Sequence[int] = (1, 5),
    q_query: int = 15,
    episodes: int = 600,
    img_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    split_method: str = "auto",
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
    split_seed: int = 0,
    seed: int = 0,
    workers: int = 0,
    device: str = "auto",
    method_args: dict[str, Any] | None = None,
) -> dict:
    """Mean episode accuracy (+- 95% CI) of a few-shot method on one class split.

    The model is a checkpoint (a ``fewshot train`` run, whose saved class splits are used, or any
    supervised checkpoint, whose pre-logit embeddings are used) or a timm ``backbone`` with
    ``pretrained`` weights. Features are computed once per image and reused by every episode.

    Args:
        split: "base", "val", "novel", or "all" (every class of ``data``).
        k_shots: evaluate each of these shot counts on the same features.
        mean, std: normalisation of a ``backbone`` (default: its pretrained config); a checkpoint
            uses the normalisation it was trained with.
    """
    if (checkpoint is None) == (backbone is None):
        raise ValueError("give either a checkpoint or --backbone (with --pretrained) to evaluate")
    if checkpoint is not None and (mean is not None or std is not None):
        raise ValueError("--mean/--std apply to --backbone only: a checkpoint is evaluated with the normalisation it "
                         "was trained with (its preprocessing metadata)")
    valid = (*SPLITS, "all")
    if split not in valid:
        raise ValueError(f"--split must be one of {', '.join(valid)}, got {split!r}")
    dev = resolve_device(device)
    images = open_all_images(data, dataset)
    saved_splits = None
    if checkpoint is not None:
        task, meta = ckpt.load_task(checkpoint, dev)
        prep = dict(meta["preprocessing"], **({"img_size": img_size} if img_size else {}))
        saved_splits = meta.get("fewshot", {}).get("splits")
        same = isinstance(task, EpisodicTask) and method in (None, task.method)
        if not (same and task.head_classes(n_way) == task.num_classes):
            # A supervised checkpoint, another method, or a baseline's base-class head: wrap its backbone.
            saved = {k: v for k, v in task.task_args().items() if k not in ("n_way", "k_shot")} if same else {}
            task = build_method(method or getattr(task, "method", "protonet"), task.model, n_way=n_way, k_shot=min(k_shots),
                                **{**saved, **(method_args or {})})
    else:
        name = method or "protonet"
        model = create_backbone(backbone, num_classes=fewshot_method(name).head_classes(n_way), pretrained=pretrained)
        task = build_method(name, model, n_way=n_way, k_shot=min(k_shots), **(method_args or {}))
        prep = _preprocessing(model, img_size, mean, std)
    task = task.to(dev).eval()
    if split == "all":
        classes = list(range(len(images.classes)))
    elif saved_splits is not None:
        index = {c: i for i, c in enumerate(images.classes)}
        missing = [c for c in saved_splits[split] if c not in index]
        if missing:
            raise ValueError(f"{data} lacks {len(missing)} {split} classes of the checkpoint (e.g. {missing[:3]}); "
                             "evaluate on the data it was trained on, or pass --split all")
        classes = sorted(index[c] for c in saved_splits[split])
    else:
        classes = split_classes(images, method=split_method, fractions=split_fractions, seed=split_seed)[split]
    keep = set(classes)
    subset = images.subset([i for i, l in enumerate(images.labels) if l in keep])
    feats, labels, skipped = compute_features(task, subset, _eval_tf(prep), device=dev, workers=workers)
    results = []
    for k in k_shots:
        r = evaluate_episodes(task, feats, labels, n_way=n_way, k_shot=k, q_query=q_query, episodes=episodes,
                              classes=classes, class_names=images.classes, seed=seed, device=dev)
        results.append({k_: v for k_, v in r.items() if k_ != "per_episode"})
    return {"method": task.method, "split": split, "classes": len(classes), "images": int(labels.numel()),
            "img_size": prep["img_size"], "mean": prep["mean"], "std": prep["std"], "results": results, "skipped": [p for p, _ in skipped]}
