"""Short fine-tunes of an already trained module (after pruning, for QAT) through the one :class:`Trainer`.

A fine-tune is a run folder like any other (``last.safetensors``, ``last.state.pt``,
``metrics.jsonl``), so an interrupted one resumes exactly: :func:`open_job` keeps the arguments
of the job in ``job.json`` and refuses a resume with other arguments.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from finegrain import checkpoint as ckpt
from finegrain.data.base import ImageList
from finegrain.data.dataset import ImageDataset, collate
from finegrain.data.sampler import EpochSampler, SeededItems
from finegrain.data.transforms import train_transform
from finegrain.train.logger import RunLogger
from finegrain.train.trainer import StepConfig, Trainer, TrainResult, TrainSetup


def open_job(run_dir: Path, args: dict[str, Any], *, resume: bool) -> bool:
    """Prepare ``run_dir`` for a job with ``args``; return whether it continues an earlier one.

    A new job refuses a folder that already holds one (pass ``resume``); a resumed one must have
    the same arguments (they decide the batches and the schedule).
    """
    run_dir = Path(run_dir)
    job = run_dir / "job.json"
    started = (run_dir / "last.safetensors").is_file()
    if started and not resume:
        raise FileExistsError(f"{run_dir} already holds a run: add --resume to continue it, or choose another folder")
    if resume and not started:
        raise FileNotFoundError(f"--resume: {run_dir} holds no fine-tune to continue (no last.safetensors)")
    args = json.loads(json.dumps(args))  # as it would be read back
    if started:
        saved = json.loads(job.read_text())
        diff = sorted(k for k in set(saved) | set(args) if saved.get(k) != args.get(k))
        if diff:
            raise ValueError(f"--resume: {run_dir} was started with other arguments ({', '.join(diff)}); "
                             f"give the same ones: {json.dumps({k: saved.get(k) for k in diff})}")
        return True
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write(job, lambda tmp: Path(tmp).write_text(json.dumps(args, indent=1)))
    return False


def finetune(module: nn.Module, images: ImageList, prep: dict, run_dir: Path, meta: ckpt.CheckpointMeta, *, epochs: int,
             lr: float, weight_decay: float = 0.0, batch_size: int = 32, workers: int = 1, device: torch.device,
             seed: int = 0, amp: bool = True, resume: bool = False, save_best: bool = True, label: str = "fine-tune",
             max_epochs: int | None = None) -> TrainResult:
    """Fine-tune ``module`` on ``images`` with AdamW and a cosine schedule; keep the run in ``run_dir``.

    The train transform is the checkpoint's preprocessing with random resized crop and flip;
    every epoch's order and each image's augmentation come from ``seed``, so a resumed
    fine-tune matches an uninterrupted one.
    """
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    t = train_transform(prep["img_size"], mean=prep["mean"], std=prep["std"], interpolation=prep["interpolation"])
    data = SeededItems(ImageDataset(images, t), seed)
    n = len(images)
    steps = max(1, n // batch_size)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs * steps))

    def batches(epoch: int, start_step: int):
        sampler = EpochSampler(n, seed, epoch, min(start_step * batch_size, n))
        return DataLoader(data, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate,
                          drop_last=len(sampler) > batch_size)

    setup = TrainSetup(module=module, optimizer=optimizer, scheduler=scheduler, batches=batches,
                       epoch_images=lambda epoch, start: n - min(start * batch_size, n), validate=None,
                       step=StepConfig(amp=amp), on_epoch_start=lambda epoch: setattr(data, "epoch", epoch))
    trainer = Trainer(run_dir, epochs=epochs, meta=meta, device=device, seed=seed, logger=RunLogger(run_dir),
                      save_best=save_best, label=label)
    return trainer.run(setup, resume=resume, max_epochs=max_epochs)
