"""``fit_episodic`` and ``evaluate_fewshot``: the public functions behind ``finegrain fewshot``.

Training feeds episodes through the one training loop (:func:`finegrain.train.loop.train_one_epoch`):
an :class:`~finegrain.fewshot.sampler.EpisodicSampler` is the DataLoader's ``batch_sampler``, so
each batch is one episode, and the method Task splits it into support and query by position.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader

from finegrain.config import ModelConfig, TrainConfig
from finegrain.data.base import ImageList
from finegrain.data.datasets import open_dataset
from finegrain.data.loader import ImageDataset, collate
from finegrain.data.transforms import eval_transform, train_transform
from finegrain.fewshot.evaluate import compute_features, evaluate_episodes
from finegrain.fewshot.methods import METHODS, EpisodicTask, build_method
from finegrain.fewshot.sampler import SPLITS, EpisodeCollate, EpisodicSampler, split_classes
from finegrain.models.backbone import create_backbone, data_config
from finegrain.train.checkpoint import save_checkpoint
from finegrain.train.loop import train_one_epoch
from finegrain.train.optim import build_optimizer, build_scheduler
from finegrain.utils import console, resolve_device


def open_all_images(data: str | Path, dataset: str | None = None) -> ImageList:
    """Every image of a data set (train and, when there is one, test): few-shot splits are by class."""
    train = open_dataset(data, "train", dataset=dataset)
    try:
        test = open_dataset(data, "test", dataset=dataset)
    except (ValueError, FileNotFoundError):
        return train
    if test.classes != train.classes:
        raise ValueError(f"{data}: the test split has other classes than the train split")
    return ImageList(train.paths + test.paths, train.labels + test.labels, train.classes, source=train.source)


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
) -> dict:
    """Train a few-shot method on episodes of the base classes; keep the best on the val classes.

    The baseline is the exception: it trains as a plain classifier of the base classes (batches of
    ``batch_size``), and is validated, like the others, on episodes of the val classes.

    The logged ``train_acc`` of an episodic method counts the support rows too (the loop scores
    every row of the batch), so it runs higher than query accuracy; ``val_acc`` is query-only.

    Writes ``best.safetensors`` and ``last.safetensors`` (self-describing checkpoints whose
    ``fewshot`` metadata names the class splits) and ``metrics.jsonl`` into ``out``.

    Returns:
        dict with ``run_dir``, ``best_checkpoint``, ``best_val_acc`` and ``epochs``.
    """
    torch.manual_seed(seed)
    dev = resolve_device(device)
    images = open_all_images(data, dataset)
    splits = split_classes(images, method=split_method, fractions=split_fractions, seed=split_seed)
    cls = METHODS.get(method)
    # The baseline pre-trains as an ordinary classifier of the base classes; the others on episodes.
    n_out = cls.head_classes(n_way) if cls.episodic else len(splits["base"])
    model = create_backbone(backbone, num_classes=n_out, pretrained=pretrained)
    task = cls(model, n_out, n_way=n_way, k_shot=k_shot, **(method_args or {})).to(dev)
    prep = _preprocessing(model, img_size)
    t_train = train_transform(prep["img_size"], mean=prep["mean"], std=prep["std"], interpolation=prep["interpolation"])
    sampler = None
    if cls.episodic:
        sampler = EpisodicSampler(images.labels, n_way=n_way, k_shot=k_shot, q_query=q_query, episodes=episodes,
                                  classes=splits["base"], class_names=images.classes, seed=seed)
        loader = DataLoader(ImageDataset(images, t_train), batch_sampler=sampler, num_workers=workers,
                            collate_fn=EpisodeCollate(n_way, k_shot, q_query))
    else:
        base_index = {c: i for i, c in enumerate(splits["base"])}
        pick = [i for i, l in enumerate(images.labels) if l in base_index]
        base = ImageList([images.paths[i] for i in pick], [base_index[images.labels[i]] for i in pick],
                         [images.classes[c] for c in splits["base"]], source=images.source)
        loader = DataLoader(ImageDataset(base, t_train), batch_size=batch_size, shuffle=True, num_workers=workers,
                            collate_fn=collate, drop_last=len(base) > batch_size,
                            generator=torch.Generator().manual_seed(seed))
    tcfg = TrainConfig(optimizer=optimizer, backbone_lr_mult=backbone_lr_mult, weight_decay=weight_decay)
    opt = build_optimizer(task, tcfg, lr=lr)
    sched = build_scheduler(opt, total_steps=epochs * len(loader), warmup_steps=0)
    val = images.subset([i for i, l in enumerate(images.labels) if l in set(splits["val"])])
    can_validate = len(splits["val"]) >= n_way and val_episodes > 0

    run_dir = Path(out)
    if (run_dir / "last.safetensors").exists():
        raise FileExistsError(f"{run_dir} already holds a few-shot run; pass another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "task": task.name, "task_args": task.task_args(),
        "model": dataclasses.asdict(ModelConfig(backbone=backbone, pretrained=pretrained, task=task.name)),
        "num_classes": task.num_classes, "classes": [f"way_{i}" for i in range(task.num_classes)],
        "preprocessing": prep,
        "fewshot": {"method": method, "n_way": n_way, "k_shot": k_shot, "q_query": q_query, "split_method": split_method,
                    "splits": {s: [images.classes[c] for c in splits[s]] for s in SPLITS}},
    }
    best, best_acc = run_dir / "best.safetensors", None
    for epoch in range(epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        tr = train_one_epoch(task, loader, opt, sched, device=dev, amp=False)
        row = {"epoch": epoch + 1, "train_loss": tr["loss"], "train_acc": tr["acc"], "steps_per_s":
               len(loader) / max(tr["seconds"], 1e-9), "skipped_images": len(tr["skipped"])}
        if can_validate:
            feats, labels, _ = compute_features(task, val, _eval_tf(prep), device=dev, workers=workers)
            r = evaluate_episodes(task, feats, labels, n_way=n_way, k_shot=k_shot, q_query=q_query, episodes=val_episodes,
                                  classes=splits["val"], class_names=images.classes, seed=seed + 1, device=dev)
            row.update(val_acc=r["acc"], val_ci95=r["ci95"])
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        console.print(f"epoch {epoch + 1}: loss {row['train_loss']:.3f} train acc {row['train_acc']:.1f}%"
                      + (f" | val {row['val_acc']:.2f} +- {row['val_ci95']:.2f}%" if "val_acc" in row else ""))
        if not can_validate or best_acc is None or row["val_acc"] > best_acc:
            best_acc = row.get("val_acc")
            save_checkpoint(best, task.state_dict(), {**meta, "epoch": epoch + 1, "metrics": row})
        save_checkpoint(run_dir / "last.safetensors", task.state_dict(), {**meta, "epoch": epoch + 1, "metrics": row})
    return {"run_dir": str(run_dir), "best_checkpoint": str(best), "best_val_acc": best_acc, "epochs": epochs}


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
    """
    if (checkpoint is None) == (backbone is None):
        raise ValueError("give either a checkpoint or --backbone (with --pretrained) to evaluate")
    valid = (*SPLITS, "all")
    if split not in valid:
        raise ValueError(f"--split must be one of {', '.join(valid)}, got {split!r}")
    dev = resolve_device(device)
    images = open_all_images(data, dataset)
    saved_splits = None
    if checkpoint is not None:
        from finegrain.predict import task_from_checkpoint

        task, meta = task_from_checkpoint(checkpoint, dev)
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
        model = create_backbone(backbone, num_classes=METHODS.get(name).head_classes(n_way), pretrained=pretrained)
        task = build_method(name, model, n_way=n_way, k_shot=min(k_shots), **(method_args or {}))
        prep = _preprocessing(model, img_size)
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
            "img_size": prep["img_size"], "results": results, "skipped": [p for p, _ in skipped]}
