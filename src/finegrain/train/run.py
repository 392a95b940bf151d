"""``fit``: build everything from a ``RunConfig``, train with the one loop, keep the run folder."""

from __future__ import annotations

import dataclasses
import functools
import json
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader, Dataset, Sampler

from finegrain.config import RunConfig
from finegrain.data.base import ImageList
from finegrain.data.datasets import open_dataset
from finegrain.data.cache import CachedImageDataset, open_or_build_cache
from finegrain.data.device import DeviceAugment, eval_batches, DevicePrefetcher, EncodedImageDataset, collate_device, device_batch
from finegrain.data.loader import ImageDataset, check_annotations, collate, load_split, save_split, stratified_split
from finegrain.data.transforms import BatchMixer, eval_transform, train_transform
from finegrain.models.backbone import create_backbone, data_config
from finegrain.tasks import TASKS, build_task
from finegrain.train import checkpoint as ckpt
from finegrain.train import distributed as dist_
from finegrain.train.distributed import World, shard
from finegrain.train.loop import predict_loader, train_one_epoch
from finegrain.train.optim import build_optimizer, build_scheduler
from finegrain.utils import console, progress_bar, resolve_device


@dataclass
class RunResult:
    """What ``fit`` returns: the run folder and the best validation metrics."""

    run_dir: Path
    best_checkpoint: Path
    best_epoch: int
    best_val_top1: float | None
    epochs_run: int
    stopped_early: bool
    interrupted: bool


class EpochSampler(Sampler[int]):
    """A shuffled order that depends only on (seed, epoch), optionally starting part-way in.

    With ``weights`` (one per image) the order is drawn with replacement in proportion to them
    (the class-balanced sampler); in a distributed run each rank takes its share of the order
    (:func:`finegrain.train.distributed.shard`), and ``start`` counts global positions.
    """

    def __init__(self, n: int, seed: int, epoch: int, start: int = 0, *, world: World = World(),
                 weights: torch.Tensor | None = None):
        self.n, self.seed, self.epoch, self.start, self.world, self.weights = n, seed, epoch, start, world, weights

    def order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.weights is not None:
            full = torch.multinomial(self.weights, self.n, replacement=True, generator=g)
        else:
            full = torch.randperm(self.n, generator=g)
        return shard(full[self.start :].tolist(), self.world)

    def __iter__(self):
        return iter(self.order())

    def __len__(self) -> int:
        return len(shard(list(range(self.n - self.start)), self.world))


class SeededItems(Dataset):
    """Each item's random augmentation is drawn from its own seed ``(seed, epoch, index)``.

    The augmented batch then depends neither on the number of loader workers nor on how the
    images are split between ranks, which makes distributed runs match single-process ones and
    resumed runs match uninterrupted ones.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((self.seed * 1_000_003 + self.epoch) * 10_000_019 + i) % 2**62)
            return self.dataset[i]


def build_task_from_config(cfg: RunConfig, num_classes: int, *, pretrained: str | None = None):
    """The backbone and task a run config describes (``pretrained`` overrides the config's)."""
    m = cfg.model
    m.check()
    model = create_backbone(
        m.backbone,
        num_classes=num_classes,
        pretrained=m.pretrained if pretrained is None else pretrained,
        drop_rate=m.drop_rate,
        drop_path_rate=m.drop_path_rate,
    )
    extra = TASKS.get(m.task).config_args(cfg, preprocessing(cfg, model))
    return build_task(m.task, model, num_classes, label_smoothing=cfg.train.label_smoothing, **extra)


def preprocessing(cfg: RunConfig, model) -> dict:
    """Eval preprocessing stored in checkpoints: size, mean/std (config overrides pretrained cfg)."""
    dc = data_config(model)
    return {
        "img_size": cfg.data.img_size,
        "mean": list(cfg.data.mean or dc["mean"]),
        "std": list(cfg.data.std or dc["std"]),
        "crop_pct": dc["crop_pct"],
        "interpolation": dc["interpolation"],
    }


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _new_run_dir(cfg: RunConfig) -> Path:
    name = cfg.train.name or f"{cfg.model.backbone}-{Path(cfg.data.data).stem or 'data'}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.train.out) / name
    if (run_dir / "last.safetensors").exists():
        raise FileExistsError(f"run folder {run_dir} already holds a run: pass --resume {run_dir} or another --name")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _resume_paths(resume: str) -> Path:
    p = Path(resume)
    run_dir = p.parent if p.is_file() else p
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"--resume {resume}: no config.yaml in {run_dir}; give the run folder of an earlier run")
    return run_dir


class _Logger:
    """Per-epoch rows to ``metrics.jsonl``, TensorBoard (when installed) and Weights & Biases (when asked)."""

    def __init__(self, run_dir: Path, cfg: RunConfig | None = None):
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        self.wandb = None
        project = cfg.train.wandb_project if cfg is not None else None
        if project:
            import weakref

            self.wandb = self._start_wandb(run_dir, cfg, project)
            # fit has no close hook: the W&B run finishes when this logger goes away (fit returned or raised).
            weakref.finalize(self, self.wandb.finish)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"))
        except Exception:  # noqa: BLE001  (TensorBoard is optional)
            self.tb = None

    @staticmethod
    def _start_wandb(run_dir: Path, cfg: RunConfig, project: str):
        import uuid

        mode = cfg.train.wandb_mode
        if mode not in ("offline", "online"):
            raise ValueError(f"--wandb-mode must be offline or online, got {mode!r}")
        try:
            import wandb
        except ImportError as e:
            raise ImportError("--wandb-project needs Weights & Biases: pip install 'finegrain[track]'") from e
        # A run id kept in the run folder, so that --resume continues the same W&B run.
        id_file = run_dir / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
        run = wandb.init(project=project, mode=mode, dir=str(run_dir), name=run_dir.name, id=run_id, resume="allow",
                         config=cfg.to_dict())
        return run

    def log(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "epoch"}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, row["epoch"])
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=row["epoch"])


def fit(cfg: RunConfig, *, max_epochs: int | None = None, on_epoch: Callable[[dict], None] | None = None) -> RunResult:
    """Train a model as ``cfg`` says and keep everything in a run folder.

    The validation split is carved from the training images (stratified, seeded) and saved as
    ``split.json``; the test split is never read here. ``best.safetensors`` is the epoch with the
    best validation top-1 (the last epoch when there is no validation split).

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
        run_dir = _resume_paths(cfg.train.resume)
        saved = RunConfig.from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
        saved.train.resume = cfg.train.resume
        cfg = saved
    cfg.check()
    world = dist_.world_from_env()
    device = dist_.setup(world, resolve_device(cfg.train.device))
    try:
        return _fit(cfg, world, device, max_epochs, on_epoch)
    finally:
        dist_.teardown(world)


def _fit(cfg: RunConfig, world: World, device: torch.device, max_epochs: int | None,
         on_epoch: Callable[[dict], None] | None = None) -> RunResult:
    main = world.is_main
    _seed_everything(cfg.train.seed)
    images = open_dataset(cfg.data.data, "train", dataset=cfg.data.dataset, download=cfg.data.download)
    # a task trained on boxes / part locations: the data must have them and nothing may drop or scramble them
    check_annotations(images, TASKS.get(cfg.model.task).annotations, task=cfg.model.task, cache=cfg.data.cache,
                      mixing=cfg.data.cutmix > 0 or cfg.data.mixup > 0, augment=cfg.data.augment,
                      pipeline=pipeline_for(cfg, device))
    if cfg.train.resume:
        run_dir = _resume_paths(cfg.train.resume)
    else:  # rank 0 names and makes the folder; the others use the same one
        run_dir = Path(dist_.broadcast_object(world, str(_new_run_dir(cfg)) if main else None))
    split_file = run_dir / "split.json"
    if main:  # rank 0 reads or writes the split; the others read it once it is complete
        if split_file.exists():
            train_idx, val_idx = load_split(split_file, images)
        else:
            train_idx, val_idx = stratified_split(images.labels, cfg.data.val_fraction, cfg.data.split_seed)
            save_split(split_file, images, train_idx, val_idx, fraction=cfg.data.val_fraction, seed=cfg.data.split_seed)
    dist_.barrier(world)
    if not main:
        train_idx, val_idx = load_split(split_file, images)
    train_set, val_set = images.subset(train_idx), images.subset(val_idx)
    empty = [c for c, n in zip(images.classes, train_set.class_counts()) if n == 0]
    if empty:
        raise ValueError(f"classes with no training images after the validation split: {empty[:10]}; add images or lower --val-fraction")
    if main:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    num_classes = len(images.classes)
    task = build_task_from_config(cfg, num_classes, pretrained="none" if cfg.train.resume else None)
    prep = preprocessing(cfg, task.model)
    task.to(device)
    if cfg.train.channels_last:
        task.to(memory_format=torch.channels_last)
    forward = task
    if world.distributed:
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(task, device_ids=[device.index] if device.type == "cuda" else None,
                                          find_unused_parameters=getattr(task, "find_unused_parameters", False))
    if cfg.train.compile:
        forward = torch.compile(forward, mode=cfg.train.compile_mode)

    train_data, collate_fn, prepare = build_train_data(cfg, images, train_idx, prep, world, device)
    t_eval = eval_transform(cfg.data.img_size, mean=prep["mean"], std=prep["std"], crop_pct=prep["crop_pct"],
                            interpolation=prep["interpolation"])
    train_data = SeededItems(train_data, cfg.train.seed)
    counts = torch.tensor(train_set.class_counts(), dtype=torch.float64)
    labels_t = torch.tensor(train_set.labels)
    sample_weights = (1.0 / counts)[labels_t] if cfg.data.sampler == "balanced" else None
    if cfg.train.class_weights != "none":
        task.set_class_weight(class_weights(counts, cfg.train.class_weights).to(device))
    bs, accum = cfg.data.batch_size, cfg.train.accum_steps
    global_batch = bs * world.size * accum
    steps_per_epoch = max(1, len(train_set) // (bs * world.size) // accum)
    lr = cfg.train.lr * global_batch / 32  # the linear rule, on the global batch
    optimizer = build_optimizer(task, cfg.train, lr=lr, fused=device.type == "cuda" and cfg.train.optimizer != "rmsprop")
    scheduler = build_scheduler(optimizer, total_steps=cfg.train.epochs * steps_per_epoch,
                                warmup_steps=int(cfg.train.warmup_epochs * steps_per_epoch))
    mixer = BatchMixer(num_classes, cutmix=cfg.data.cutmix, mixup=cfg.data.mixup, prob=cfg.data.mix_prob)
    ema = None
    if cfg.train.ema:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(task, decay=cfg.train.ema_decay)

    start_epoch, start_step, best_top1, best_epoch, bad_epochs = 0, 0, None, -1, 0
    if cfg.train.resume:
        sd, meta = ckpt.load_checkpoint(run_dir / "last.safetensors")
        state = ckpt.load_train_state(run_dir / "last.state.pt")
        if state["epoch"] != meta["epoch"] or state.get("step", 0) != meta.get("step", 0):
            raise ValueError(f"{run_dir}: last.safetensors and last.state.pt are from different epochs; cannot resume exactly")
        task.load_state_dict(sd)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        start_epoch, start_step = state["epoch"], state.get("step", 0)
        best_top1, best_epoch, bad_epochs = state["best_top1"], state["best_epoch"], state["bad_epochs"]
        _set_rng_state(state["rng"])
        console.print(f"resuming {run_dir} at epoch {start_epoch + 1}" + (f", step {start_step}" if start_step else ""))

    logger = _Logger(run_dir, cfg) if main else None
    skipped: dict[str, str] = {}
    base_meta = {
        "task": cfg.model.task,
        "task_args": task.task_args(),
        "model": dataclasses.asdict(cfg.model),
        "num_classes": num_classes,
        "classes": images.classes,
        "preprocessing": prep,
        "config": cfg.to_dict(),
    }

    def save_last(epoch: int, step: int, metrics: dict) -> None:
        if not main:
            return
        # State first, weights second: a crash between the two leaves an epoch mismatch that resume detects.
        ckpt.save_train_state(run_dir / "last.state.pt", {
            "epoch": epoch, "step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "ema": ema.state_dict() if ema is not None else None, "rng": _rng_state(),
            "best_top1": best_top1, "best_epoch": best_epoch, "bad_epochs": bad_epochs,
        })
        ckpt.save_checkpoint(run_dir / "last.safetensors", task.state_dict(), {**base_meta, "epoch": epoch, "step": step, "metrics": metrics})

    eval_module = ema.module if ema is not None else task
    interrupted = stopped_early = False
    epoch = start_epoch
    previous_handler = signal.getsignal(signal.SIGINT)
    try:
        for epoch in range(start_epoch, cfg.train.epochs):
            torch.manual_seed(cfg.train.seed * 7919 + epoch)
            train_data.epoch = epoch
            sampler = EpochSampler(len(train_set), cfg.train.seed, epoch, min(start_step * bs * world.size, len(train_set)),
                                   world=world, weights=sample_weights)
            loader = DataLoader(train_data, batch_size=bs, sampler=sampler,
                                num_workers=cfg.data.workers, collate_fn=collate_fn, pin_memory=device.type == "cuda",
                                drop_last=len(sampler) > bs,
                                generator=torch.Generator().manual_seed(cfg.train.seed * 31 + epoch))
            if prepare is not None:
                loader = DevicePrefetcher(loader, device, prepare)
            done_steps = [start_step]
            with progress_bar(f"epoch {epoch + 1}/{cfg.train.epochs}", total=len(sampler), enabled=None if main else False) as bar:
                def on_step(n, acc, _bar=bar):
                    done_steps[0] += 1
                    if done_steps[0] % 5 == 0 and _bar.progress is not None:  # .item() syncs: only for a visible bar
                        _bar.advance(n, loss=(acc["loss"] / acc["seen"]).item(), acc=100 * acc["correct"].item() / acc["seen"])
                    else:
                        _bar.advance(n)

                tr = train_one_epoch(task, loader, optimizer, scheduler, device=device, forward=forward, mixer=mixer,
                                     accum_steps=accum, clip_grad=cfg.train.clip_grad, ema=ema, amp=cfg.train.amp,
                                     channels_last=cfg.train.channels_last, normalize=(prep["mean"], prep["std"]),
                                     on_step=on_step)
            start_step = 0
            tr = _reduce_train(world, tr, device)
            for path, err in tr.pop("skipped"):
                skipped[path] = err
            row = {"epoch": epoch + 1, "train_loss": tr["loss"], "train_acc": tr["acc"], "lr": optimizer.param_groups[-1]["lr"],
                   "images_per_s": tr["images_per_s"], "epoch_seconds": tr["seconds"], "skipped_images": len(skipped)}
            if len(val_set):
                row.update(_validate(eval_module, val_set, t_eval, prep, cfg, device, world))
            if main:
                logger.log(row)
                _print_epoch(row)
            improved = len(val_set) == 0 or best_top1 is None or row["val_top1"] > best_top1
            if improved:
                best_top1, best_epoch, bad_epochs = row.get("val_top1"), epoch + 1, 0
            if improved and main:
                inf_name, inf_args, inf_weights = eval_module.inference_form()
                ckpt.save_checkpoint(run_dir / "best.safetensors", inf_weights,
                                     {**base_meta, "task": inf_name, "task_args": inf_args, "trained_as": cfg.model.task,
                                      "epoch": epoch + 1, "step": 0, "metrics": row})
            if not improved:
                bad_epochs += 1
            save_last(epoch + 1, 0, row)
            if skipped and main:
                _write_skipped(run_dir, skipped)
            if on_epoch is not None:
                on_epoch(dict(row))
            if max_epochs is not None and epoch + 1 - start_epoch >= max_epochs:
                break
            if cfg.train.patience and bad_epochs >= cfg.train.patience:
                stopped_early = True
                console.print(f"early stop: no validation improvement for {bad_epochs} epochs")
                break
    except KeyboardInterrupt:
        interrupted = True
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not break the save
        save_last(epoch, done_steps[0] if "done_steps" in locals() else 0, {"interrupted": True})
        if main:
            console.print(f"[yellow]interrupted: saved a resumable checkpoint; continue with `finegrain train --resume {run_dir}`")
    finally:
        signal.signal(signal.SIGINT, previous_handler)
    dist_.barrier(world)  # the others wait for rank 0's last checkpoint before anyone returns
    if skipped and main:
        _write_skipped(run_dir, skipped)
        console.print(f"[yellow]{len(skipped)} unreadable images were skipped; list in {run_dir / 'skipped_images.txt'}")
    best = run_dir / "best.safetensors"
    return RunResult(run_dir, best, best_epoch, best_top1, epoch + 1, stopped_early, interrupted)


def pipeline_for(cfg: RunConfig, device: torch.device) -> str:
    """``cpu`` or ``device``: where images are cropped, flipped and normalised (``--pipeline``)."""
    choice = cfg.data.pipeline
    if choice == "auto":  # annotations (boxes, parts) travel only through the CPU pipeline
        choice = "device" if device.type == "cuda" and not TASKS.get(cfg.model.task).annotations else "cpu"
    if choice == "device" and cfg.data.augment in ("randaugment", "trivialaugment"):
        raise ValueError(f"--augment {cfg.data.augment} runs only in the CPU pipeline: add --pipeline cpu, "
                         "or use --augment basic/colorjitter with the device pipeline")
    return choice


def _keep(img):
    return img


def build_train_data(cfg: RunConfig, images: ImageList, train_idx: list[int], prep: dict, world: World, device: torch.device):
    """The training dataset, its collate function, and the device-side step (None in the CPU pipeline)."""
    train_set = images.subset(train_idx)
    cache = None
    if cfg.data.cache:
        short_side = round(1.15 * cfg.data.img_size)
        # rank 0 builds (or verifies) the cache while the others wait, then they open it
        if world.is_main:
            cache = open_or_build_cache(images, cfg.data.cache_dir, short_side, workers=max(1, cfg.data.workers))
        dist_.barrier(world)
        if cache is None:
            cache = open_or_build_cache(images, cfg.data.cache_dir, short_side, workers=max(1, cfg.data.workers))
    if pipeline_for(cfg, device) == "device":
        augment = DeviceAugment(cfg.data.img_size, scale_min=cfg.data.scale_min, mean=prep["mean"], std=prep["std"],
                                jitter=0.3 if cfg.data.augment == "colorjitter" else 0.0)
        data = (CachedImageDataset(cache, images.labels, _keep, indices=train_idx) if cache is not None
                else EncodedImageDataset(train_set))
        return data, collate_device, functools.partial(device_batch, device=device, augment=augment)
    if cache is not None:
        t_uint8 = train_transform(cfg.data.img_size, scale_min=cfg.data.scale_min, augment=cfg.data.augment,
                                  interpolation=prep["interpolation"], normalize=False)
        return CachedImageDataset(cache, images.labels, t_uint8, indices=train_idx), collate, None
    t_train = train_transform(cfg.data.img_size, mean=prep["mean"], std=prep["std"], scale_min=cfg.data.scale_min,
                              augment=cfg.data.augment, interpolation=prep["interpolation"])
    return ImageDataset(train_set, t_train, annotations=TASKS.get(cfg.model.task).annotations), collate, None


def class_weights(counts: torch.Tensor, kind: str, beta: float = 0.999) -> torch.Tensor:
    """Per-class loss weights from training counts, scaled to mean 1.

    ``inverse``: ``1 / n_c``. ``effective``: the inverse of the effective number of samples
    ``(1 - beta^n_c) / (1 - beta)`` (Cui et al., "Class-Balanced Loss Based on Effective Number of
    Samples", CVPR 2019), which re-weights less aggressively when classes are large.
    """
    counts = counts.double().clamp_min(1)
    if kind == "inverse":
        w = 1.0 / counts
    elif kind == "effective":
        w = (1 - beta) / (1 - beta**counts)
    else:
        raise ValueError(f"--class-weights must be none, inverse or effective, got {kind!r}")
    return (w / w.mean()).float()


def _reduce_train(world: World, tr: dict, device: torch.device) -> dict:
    """Training metrics of all ranks together (every rank gets the same numbers)."""
    if not world.distributed:
        return tr
    loss, correct, n = dist_.all_reduce_sums(world, [tr["loss"] * tr["images"], tr["acc"] * tr["images"], tr["images"]], device)
    import torch.distributed as dist

    gathered: list = [None] * world.size
    dist.all_gather_object(gathered, tr["skipped"])
    return {**tr, "loss": loss / max(n, 1), "acc": correct / max(n, 1), "images": int(n),
            "images_per_s": n / max(tr["seconds"], 1e-9), "skipped": [s for part in gathered for s in part]}


@torch.no_grad()
def _validate(module, val_set: ImageList, transform, prep: dict, cfg: RunConfig, device, world: World = World()) -> dict:
    """Validation loss and top-1; in a distributed run each rank predicts every N-th image and the sums are reduced."""
    module.eval()
    mine = list(range(world.rank, len(val_set), world.size))
    loss_sum = correct = n = 0.0
    if mine:
        loader = eval_batches(val_set.subset(mine), prep, device, pipeline=pipeline_for(cfg, device),
                              transform=transform, batch_size=cfg.data.batch_size * 2, workers=cfg.data.workers)
        logits, labels, _ = predict_loader(module.predict, loader, device=device, amp=cfg.train.amp,
                                           channels_last=cfg.train.channels_last)
        loss_sum = F.cross_entropy(logits, labels, reduction="sum").item()
        correct, n = (logits.argmax(1) == labels).sum().item(), labels.numel()
    loss_sum, correct, n = dist_.all_reduce_sums(world, [loss_sum, correct, n], device)
    if n == 0:
        raise ValueError("no readable validation images")
    return {"val_loss": loss_sum / n, "val_top1": 100.0 * correct / n}


def _print_epoch(row: dict) -> None:
    msg = f"epoch {row['epoch']}: loss {row['train_loss']:.3f} train acc {row['train_acc']:.1f}%"
    if "val_top1" in row:
        msg += f" | val loss {row['val_loss']:.3f} val top-1 {row['val_top1']:.2f}%"
    console.print(msg + f" | {row['images_per_s']:.1f} img/s")


def _write_skipped(run_dir: Path, skipped: dict[str, str]) -> None:
    (run_dir / "skipped_images.txt").write_text("".join(f"{p}\t{e}\n" for p, e in sorted(skipped.items())))
