"""The decisions a training run makes once, from its ``RunConfig``, and then passes down.

A :class:`Plan` says where the run is (device, rank), which task trains with which options, where
images are augmented (the CPU or the device pipeline), which annotations travel with them, the
eval preprocessing checkpoints will store, and the learning-rate scaling. Nothing below
``fit`` re-derives them from the raw config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from finegrain.config import RunConfig
from finegrain.data.transforms import AUGMENTS
from finegrain.models.backbone import data_config
from finegrain.tasks import TASKS, Task
from finegrain.train.distributed import World


@dataclass(frozen=True)
class Plan:
    """Resolved choices of one run (see :func:`make_plan`).

    Attributes:
        cfg: the checked config.
        world, device: this process's rank and device.
        task_cls: the task class (its options are ``cfg.model.options``).
        annotations: what the task trains with ("boxes", "parts"); the batches carry them.
        pipeline: "cpu" or "device" (``--pipeline auto`` resolved).
        global_batch: images per optimizer step over all ranks (batch x ranks x accumulation).
        lr: the head's learning rate after the linear scaling rule (``lr x global_batch / 32``).
        preprocessing: eval preprocessing (set by :meth:`with_model` once the backbone exists).
    """

    cfg: RunConfig
    world: World
    device: torch.device
    task_cls: type[Task]
    annotations: tuple[str, ...]
    pipeline: str
    global_batch: int
    lr: float
    preprocessing: dict[str, Any] | None = None

    @property
    def is_main(self) -> bool:
        return self.world.is_main

    def steps_per_epoch(self, train_images: int) -> int:
        """Optimizer steps in one epoch of ``train_images`` images."""
        d = self.cfg.data
        return max(1, train_images // (d.batch_size * self.world.size) // self.cfg.train.accum_steps)

    def with_model(self, model: nn.Module) -> Plan:
        """The plan with the eval preprocessing of ``model`` (the config's mean/std override the pretrained cfg)."""
        return dataclasses.replace(self, preprocessing=preprocessing(self.cfg, model))


def make_plan(cfg: RunConfig, world: World, device: torch.device) -> Plan:
    """Resolve ``cfg`` (already checked) for this process."""
    task_cls = TASKS.get(cfg.model.task)
    if task_cls.trainer == "detection":
        raise ValueError(f"--task {cfg.model.task} is a detector: train it with `finegrain detect train --data ANNOTATIONS`")
    if task_cls.trainer != "supervised":
        raise ValueError(f"--task {cfg.model.task} is a few-shot method: train it with "
                         f"`finegrain fewshot train --method {getattr(task_cls, 'method', cfg.model.task)}`")
    annotations = tuple(task_cls.annotations)
    global_batch = cfg.data.batch_size * world.size * cfg.train.accum_steps
    return Plan(cfg=cfg, world=world, device=device, task_cls=task_cls,
                annotations=annotations, pipeline=resolve_pipeline(cfg.data.pipeline, cfg.data.augment, device, annotations),
                global_batch=global_batch, lr=cfg.train.lr * global_batch / 32)


def resolve_pipeline(choice: str, augment: str, device: torch.device, annotations: tuple[str, ...] = ()) -> str:
    """``cpu`` or ``device``: where images are cropped, flipped and normalised (``--pipeline``)."""
    if choice == "auto":  # annotations (boxes, parts) travel only through the CPU pipeline
        choice = "device" if device.type == "cuda" and not annotations else "cpu"
    if choice not in AUGMENTS.info(augment)["pipelines"]:
        runs = [a for a in AUGMENTS.names() if choice in AUGMENTS.info(a)["pipelines"]]
        raise ValueError(f"--augment {augment} runs only in the CPU pipeline: add --pipeline cpu, "
                         f"or use --augment {'/'.join(runs)} with the {choice} pipeline")
    return choice


def preprocessing(cfg: RunConfig, model: nn.Module) -> dict:
    """Eval preprocessing stored in checkpoints: size, mean/std (config overrides pretrained cfg)."""
    dc = data_config(model)
    return {
        "img_size": cfg.data.img_size,
        "mean": list(cfg.data.mean or dc["mean"]),
        "std": list(cfg.data.std or dc["std"]),
        "crop_pct": dc["crop_pct"],
        "interpolation": dc["interpolation"],
    }
