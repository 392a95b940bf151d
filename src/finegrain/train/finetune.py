"""Short fine-tunes of an already trained module (after pruning, for QAT) through the one :class:`Trainer`.

A fine-tune is a run folder like any other (``last.safetensors``, ``last.state.pt``,
``metrics.jsonl``), so an interrupted one resumes exactly; its callers keep their arguments in the
folder with :func:`finegrain.train.trainer.open_job`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from finegrain import checkpoint as ckpt
from finegrain.data.base import ImageList
from finegrain.data.dataset import ImageDataset, check_annotations, collate
from finegrain.data.sampler import epoch_batches
from finegrain.data.transforms import train_transform
from finegrain.train.logger import RunLogger
from finegrain.train.trainer import StepConfig, Trainer, TrainResult, TrainSetup


def finetune(module: nn.Module, images: ImageList, prep: dict, run_dir: Path, meta: ckpt.CheckpointMeta, *, epochs: int,
             lr: float, weight_decay: float = 0.0, batch_size: int = 32, workers: int = 1, device: torch.device,
             seed: int = 0, amp: bool = True, resume: bool = False, save_best: bool = True, label: str = "fine-tune",
             max_epochs: int | None = None, annotations: tuple[str, ...] | None = None) -> TrainResult:
    """Fine-tune ``module`` on ``images`` with AdamW and a cosine schedule; keep the run in ``run_dir``.

    The train transform is the checkpoint's preprocessing with random resized crop and flip;
    every epoch's order and each image's augmentation come from ``seed``, so a resumed
    fine-tune matches an uninterrupted one. The annotations the task trains with
    (``annotations``, default ``module.annotations``) are read with the images and checked before the first step.
    """
    if annotations is None:  # boxes/parts travel with the images (the part model)
        annotations = tuple(getattr(module, "annotations", ()))
    check_annotations(images, annotations, task=getattr(module, "name", ""))
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    t = train_transform(prep["img_size"], mean=prep["mean"], std=prep["std"], interpolation=prep["interpolation"])
    batches, epoch_images, data = epoch_batches(ImageDataset(images, t, annotations=annotations), seed=seed, batch_size=batch_size, workers=workers,
                                                collate_fn=collate)
    steps = max(1, len(images) // batch_size)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs * steps))

    setup = TrainSetup(module=module, optimizer=optimizer, scheduler=scheduler, batches=batches,
                       epoch_images=epoch_images, validate=None,
                       step=StepConfig(amp=amp), on_epoch_start=lambda epoch: setattr(data, "epoch", epoch))
    trainer = Trainer(run_dir, epochs=epochs, meta=meta, device=device, seed=seed, logger=RunLogger(run_dir),
                      save_best=save_best, label=label)
    return trainer.run(setup, resume=resume, max_epochs=max_epochs)
