"""The one training loop: ``train_one_epoch`` and ``predict_loader``, shared by every Task."""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from finegrain.data.transforms import BatchEraser, BatchMixer, normalize_batch


class NoImagesError(ValueError):
    """None of a loader's images could be read; ``skipped`` lists ``(path, error)`` of each."""

    def __init__(self, skipped: list):
        self.skipped = skipped
        example = f" (e.g. {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        super().__init__(f"no readable images to evaluate: all {len(skipped)} failed to load{example}")


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), read from /proc/cpuinfo."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def autocast(device: torch.device, enabled: bool, *, cpu: bool = False):
    """bf16 autocast when enabled: on CUDA; on the CPU only with ``cpu=True`` and native bf16.

    Training (``cpu=True``) on a CPU with AVX512-BF16 measured about 2x the fp32 step rate with
    channels_last (EfficientNet-Lite0, 224 px; ``benchmarks/throughput.py``); without native bf16
    it is slower than fp32, so it stays off there. Prediction stays fp32 on the CPU, so eager
    outputs match exported models.
    """
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if enabled and cpu and device.type == "cpu" and cpu_has_native_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(images, device: torch.device, channels_last: bool, normalize=None):
    """Copy a batch to ``device``; uint8 batches (decoded cache) are normalised there with ``normalize=(mean, std)``.

    ``images`` is a tensor ``[B, 3, H, W]`` or a list of ``[3, H, W]`` tensors of different sizes
    (detection batches); each goes to the device the same way.
    """
    if isinstance(images, (list, tuple)):
        return [to_device(im[None], device, channels_last, normalize)[0] for im in images]
    images = images.to(device, non_blocking=True)
    if images.dtype == torch.uint8:
        if normalize is None:
            raise ValueError("a uint8 batch needs normalize=(mean, std)")
        images = normalize_batch(images, *normalize)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


ANNOTATION_KEYS = ("box", "parts", "targets")
"""Batch keys the loop passes on to the task's forward as they are (see ``ImageDataset(annotations=...)``):
per-batch tensors (``box``, ``parts``) or, for tasks whose batches are lists of images, ``targets``:
one dict of tensors per image (e.g. ``{"boxes", "labels", "masks"}``), moved to the device here."""


def _targets_to(targets: list[dict], device: torch.device) -> list[dict]:
    return [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]


def train_one_epoch(
    task: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    scheduler,
    *,
    device: torch.device,
    forward: Callable | None = None,
    mixer: BatchMixer | None = None,
    eraser: BatchEraser | None = None,
    accum_steps: int = 1,
    clip_grad: float = 0.0,
    ema=None,
    amp: bool = True,
    channels_last: bool = False,
    normalize: tuple | None = None,
    adversarial: Callable | None = None,
    on_step: Callable[[int, dict], None] | None = None,
) -> dict:
    """Train ``task`` for one pass over ``loader``.

    Loss and accuracy are summed on the device and read once at the end (no per-step host
    sync), except when ``on_step`` asks for progress every few steps. A batch is a dict with
    ``image`` (a tensor, or a list of tensors of different sizes) and ``label`` and/or
    per-image ``targets``; the task's forward returns at least ``loss`` (``logits`` too for
    classifiers, which the accuracy is computed from).

    ``eraser`` (a :class:`~finegrain.data.transforms.BatchEraser`) erases rectangles of the
    normalised batch before ``mixer`` mixes it.

    With ``adversarial`` (an :class:`~finegrain.train.adversarial.AdversarialTraining`) part of
    each batch is replaced, after CutMix/MixUp, by adversarial examples of ``task`` against the
    batch's targets; the accuracy is then that of the mixed clean and adversarial batch.

    Returns:
        dict with ``loss``, ``acc`` (percent, against the un-mixed labels; None for a task without
        class logits, a detector), ``images``,
        ``seconds``, ``images_per_s`` and ``skipped`` (list of ``(path, error)``).
    """
    forward = forward or task
    task.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen, skipped, step, scored = 0, [], 0, False
    t0 = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    for i, batch in enumerate(loader):
        skipped += batch["skipped"]
        if batch["image"] is None:
            continue
        images, labels, target, extra = _prepare_batch(
            task, batch, device=device, channels_last=channels_last, normalize=normalize, eraser=eraser,
            mixer=mixer, adversarial=adversarial, amp=amp)
        # Between optimizer steps a DistributedDataParallel model skips the gradient all-reduce.
        accumulating = (i + 1) % accum_steps != 0 and hasattr(forward, "no_sync")
        with forward.no_sync() if accumulating else contextlib.nullcontext():
            with autocast(device, amp, cpu=True):
                out = forward({"image": images, "label": labels, "target": target, **extra})
            (out["loss"] / accum_steps).backward()
        if (i + 1) % accum_steps == 0:
            step += 1
            _optimizer_step(task, optimizer, scheduler, clip_grad, ema)
        n = len(images)
        seen += n
        loss_sum += out["loss"].detach() * n
        if labels is not None and "logits" in out:  # a classifier's accuracy; other tasks report their loss only
            correct += (out["logits"].detach().argmax(1) == labels).sum()
            scored = True
        if on_step is not None:
            on_step(n, {"loss": loss_sum, "correct": correct, "seen": seen})
    if seen and (i + 1) % accum_steps != 0:  # flush a partial accumulation at the end of the epoch
        _optimizer_step(task, optimizer, scheduler, clip_grad, ema)
    seconds = time.perf_counter() - t0
    return {
        "loss": (loss_sum / max(seen, 1)).item(),
        "acc": 100.0 * correct.item() / max(seen, 1) if scored else None,
        "images": seen,
        "seconds": seconds,
        "images_per_s": seen / max(seconds, 1e-9),
        "skipped": skipped,
    }


def _prepare_batch(task: nn.Module, batch: dict, *, device: torch.device, channels_last: bool, normalize: tuple | None,
                   eraser: BatchEraser | None, mixer: BatchMixer | None, adversarial: Callable | None, amp: bool):
    """One loader batch made ready for the step: on ``device``, then erased, mixed and made adversarial as
    asked. Returns ``(images, labels, target, extra)``: ``target`` is the mixed (soft) target or ``labels``,
    ``extra`` the batch's annotations (boxes, parts, detection targets) on their way to the task."""
    images = to_device(batch["image"], device, channels_last, normalize)
    labels = batch["label"].to(device, non_blocking=True) if batch.get("label") is not None else None
    target = labels
    if eraser is not None and eraser.active and torch.is_tensor(images):
        images = eraser(images)
    if mixer is not None and mixer.active and torch.is_tensor(images):
        images, target = mixer(images, labels)
    if adversarial is not None:
        with autocast(device, amp, cpu=True):  # the attack runs in the step's precision
            images = adversarial(task, images, target)
    extra = {k: batch[k] for k in ANNOTATION_KEYS if k in batch}
    if "targets" in extra:
        extra["targets"] = _targets_to(extra["targets"], device)
    return images, labels, target, extra


def _optimizer_step(task, optimizer, scheduler, clip_grad, ema) -> None:
    if clip_grad > 0:
        nn.utils.clip_grad_norm_(task.parameters(), clip_grad)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if scheduler is not None:
        scheduler.step()
    if ema is not None:
        ema.update(task)


@torch.no_grad()
def predict_loader(
    predict: Callable[[torch.Tensor], torch.Tensor],
    loader,
    *,
    device: torch.device,
    amp: bool = True,
    channels_last: bool = False,
    tta_flip: bool = False,
    on_batch: Callable[[int], None] | None = None,
    cpu_amp: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Run ``predict`` over a loader; return ``(logits [N, C] float32 on CPU, labels [N], skipped)``.

    ``amp`` turns bf16 autocast on for CUDA; with ``cpu_amp`` too, on a CPU with native bf16.

    With ``tta_flip`` the logits are the mean over the image and its horizontal mirror.
    """
    all_logits, all_labels, skipped = [], [], []
    for batch in loader:
        skipped += batch["skipped"]
        if batch["image"] is None:
            continue
        images = to_device(batch["image"], device, channels_last)
        with autocast(device, amp, cpu=cpu_amp):
            logits = predict(images).float()
            if tta_flip:
                logits = (logits + predict(torch.flip(images, dims=[3])).float()) / 2
        all_logits.append(logits.to("cpu", non_blocking=True))
        all_labels.append(batch["label"])
        if on_batch is not None:
            on_batch(batch["label"].shape[0])
    if not all_logits:
        raise NoImagesError(skipped)
    return torch.cat(all_logits), torch.cat(all_labels), skipped
