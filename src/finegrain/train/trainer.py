"""The one epoch driver: epochs, validation, best/last checkpoints, resume, DDP, Ctrl-C, logging, callbacks.

Every training in finegrain goes through :class:`Trainer`: supervised ``fit`` (and distillation,
which is a task), episodic few-shot training, and the fine-tunes after pruning and for QAT. A
caller describes its training as a :class:`TrainSetup` (the module, its optimizer, how to get an
epoch's batches, how to validate and which validation metric selects the best epoch) and the
trainer does the rest the same way for all of them:

- ``last.state.pt`` (weights, optimizer, scheduler, EMA, RNG, best-so-far: one atomic file) and
  ``last.safetensors`` (the same weights with metadata) after every epoch and on Ctrl-C or
  SIGTERM, which stop the run between two optimizer steps; any run resumes exactly, part-way
  through an epoch included, and a crash during a save leaves the previous state whole;
- ``best.safetensors``: the inference form of the epoch the selection rule picks on the
  validation metric (``select``: the highest, the last, or the latest one within one standard
  error of the highest; the last epoch when there is no validation);
- ``metrics.jsonl`` (+ TensorBoard / W&B through a :class:`~finegrain.train.logger.RunLogger`),
  ``skipped_images.txt``; early stopping and per-epoch callbacks (tune's pruning);
- an epoch whose training loss is NaN or infinite stops the run before it is saved
  (:class:`TrainingDiverged`, with the fixes in its message).

In a distributed run only rank 0 writes; training metrics are summed across ranks.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import signal
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from finegrain import checkpoint as ckpt
from finegrain.train import distributed as dist_
from finegrain.train.distributed import World
from finegrain.train.loop import train_one_epoch
from finegrain.utils import console, progress_bar


class TrainingDiverged(ValueError):
    """The training loss of an epoch is NaN or infinite; the run stops before saving that epoch."""


@dataclass
class StepConfig:
    """How batches become optimizer steps (see :func:`finegrain.train.loop.train_one_epoch`)."""

    accum_steps: int = 1
    clip_grad: float = 0.0
    amp: bool = True
    channels_last: bool = False
    normalize: tuple | None = None
    adversarial: Any = None
    """An :class:`~finegrain.train.adversarial.AdversarialTraining` (``--adv-attack``), or None."""


@dataclass
class TrainSetup:
    """What one training is: everything the trainer needs from its caller.

    Attributes:
        module: the trained module (a Task, or a wrapper such as QAT's); ``last.safetensors``
            holds its ``state_dict``.
        optimizer, scheduler: stepped once per optimizer step.
        batches: ``(epoch, start_step) -> iterable of batches`` for the rest of that epoch; the
            order must depend only on the seed and the epoch, so that a resumed run sees what an
            uninterrupted one would.
        epoch_images: ``(epoch, start_step) -> images`` this rank will see (the progress bar).
        validate: ``module -> {metric: value}`` (on every rank), or None for no validation.
        metric: the validation metric that selects ``best.safetensors`` (higher is better).
        standard_error: ``(value, row) -> `` the standard error of ``metric`` at ``value`` on the
            validation set of ``row`` (for ``select="1se"``); None where it has none.
        forward: what the loop calls instead of ``module`` (DDP / compiled wrappers).
        on_epoch_start: called with the epoch index before its batches are drawn.
    """

    module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    batches: Callable[[int, int], Iterable]
    epoch_images: Callable[[int, int], int]
    validate: Callable[[nn.Module], dict] | None = None
    metric: str = "val_top1"
    standard_error: Callable[[float, dict], float] | None = None
    forward: Callable | None = None
    mixer: Any = None
    eraser: Any = None
    ema: Any = None
    step: StepConfig = field(default_factory=StepConfig)
    on_epoch_start: Callable[[int], None] | None = None


@dataclass
class TrainResult:
    """What :meth:`Trainer.run` returns."""

    run_dir: Path
    best_checkpoint: Path
    best_epoch: int
    best_metric: float | None
    epochs_run: int
    stopped_early: bool
    interrupted: bool
    history: list[dict] = field(default_factory=list)


@dataclass
class _Progress:
    """Where the run is; saved in ``last.state.pt``."""

    epoch: int = 0
    step: int = 0
    best: float | None = None
    """The highest validation metric so far."""
    best_epoch: int = -1
    """The epoch in ``best.safetensors`` (the selection rule's pick)."""
    bad_epochs: int = 0
    chosen: float | None = None
    """The validation metric of ``best_epoch``."""


SELECT = ("best", "last", "1se")
"""How ``best.safetensors`` is picked: the epoch with the highest validation metric (the earliest
of a tie); the last epoch; or the latest epoch whose metric is within one standard error of the
highest, the one-standard-error rule (Breiman et al. 1984; Hastie et al., *The Elements of
Statistical Learning*, 2009, sec. 7.10) applied to epochs: among the epochs the validation split
cannot tell apart, keep the one trained longest, at the end of the learning-rate schedule, rather
than the one that drew the luckiest validation noise."""


class Trainer:
    """Runs a :class:`TrainSetup` for ``epochs`` epochs in ``run_dir``.

    Args:
        run_dir: the run folder (made by the caller).
        epochs: total epochs of the run.
        meta: the checkpoint metadata of the trained module; epoch, step and metrics are filled in.
        device: where the module is.
        seed: seeds each epoch's RNG (augmentation on the device, dropout, mixing).
        world: this process's place in a distributed run.
        patience: stop after this many epochs without improvement of ``setup.metric`` (0: never).
        callbacks: each called with every epoch's row once its checkpoints are saved; an
            exception one raises (``optuna.TrialPruned``) ends training and propagates.
        logger: where rows go (``metrics.jsonl``...); None on ranks other than 0.
        select: which epoch ``best.safetensors`` keeps, one of :data:`SELECT`; ``1se`` falls back
            to ``best`` for a metric without a standard error.
        save_best: write ``best.safetensors`` (off where the best form is made afterwards, QAT).
        label: what the progress bar calls an epoch.
    """

    def __init__(self, run_dir: Path, *, epochs: int, meta: ckpt.CheckpointMeta, device: torch.device, seed: int = 0,
                 world: World = World(), patience: int = 0, callbacks: Sequence[Callable[[dict], None]] = (),
                 logger=None, select: str = "best", save_best: bool = True, label: str = "epoch"):
        if select not in SELECT:
            raise ValueError(f"select={select!r}: expected one of {', '.join(SELECT)}")
        self.select = select
        self.run_dir, self.epochs, self.meta, self.device, self.seed = Path(run_dir), epochs, meta, device, seed
        self.world, self.patience, self.callbacks, self.logger = world, patience, list(callbacks), logger
        self.save_best, self.label = save_best, label
        self.skipped: dict[str, str] = {}

    # ------------------------------------------------------------------ the loop

    def run(self, setup: TrainSetup, *, resume: bool = False, max_epochs: int | None = None) -> TrainResult:
        """Train (or continue, with ``resume``) until ``epochs``, early stopping, Ctrl-C or ``max_epochs`` in this call."""
        at = self._restore(setup) if resume else _Progress()
        start_epoch, history = at.epoch, []
        interrupted = stopped_early = False
        with _GracefulStop() as stop:
            self._stop = stop
            try:
                while at.epoch < self.epochs:
                    row = self._epoch(setup, at)
                    history.append(row)
                    if self._end_epoch(setup, at, row):
                        stopped_early = True
                        break
                    stop.check()
                    if max_epochs is not None and at.epoch - start_epoch >= max_epochs:
                        break
            except (KeyboardInterrupt, RuntimeError) as e:
                if isinstance(e, RuntimeError) and stop.requested is None:
                    raise  # a real error (a signal also kills DataLoader workers, which raises RuntimeError)
                interrupted = True
                stop.ignore()  # a further signal must not break the save
                self._save_last(setup, at, {"interrupted": True})
                if self.world.is_main:
                    console.print(f"[yellow]interrupted: saved a resumable checkpoint in {self.run_dir}; continue with --resume")
        dist_.barrier(self.world)  # the others wait for rank 0's last checkpoint before anyone returns
        self._report_skipped(final=True)
        if self.world.is_main and at.chosen is not None and at.best is not None and at.chosen < at.best:
            rule = "the last epoch" if self.select == "last" else "the latest within one standard error of the highest"
            console.print(f"best.safetensors: {self.label} {at.best_epoch} ({setup.metric} {at.chosen:.2f}), {rule} "
                          f"({at.best:.2f})")
        return TrainResult(self.run_dir, self.run_dir / "best.safetensors", at.best_epoch, at.chosen, at.epoch,
                           stopped_early, interrupted, history)

    def _epoch(self, setup: TrainSetup, at: _Progress) -> dict:
        """Train one epoch (from ``at.step``) and validate; return its row. ``at.step`` counts finished steps."""
        epoch = at.epoch
        if at.step == 0:  # a resumed epoch continues from the RNG state saved part-way through it
            torch.manual_seed(self.seed * 7919 + epoch)
        if setup.on_epoch_start is not None:
            setup.on_epoch_start(epoch)
        loader = setup.batches(epoch, at.step)
        with progress_bar(f"{self.label} {epoch + 1}/{self.epochs}", total=setup.epoch_images(epoch, at.step),
                          enabled=None if self.world.is_main else False) as bar:
            def on_step(n, acc, _bar=bar):
                at.step += 1
                if at.step % setup.step.accum_steps == 0:  # a signal stops the run between optimizer steps
                    self._stop.check()
                if at.step % 5 == 0 and _bar.progress is not None:  # .item() syncs: only for a visible bar
                    _bar.advance(n, loss=(acc["loss"] / acc["seen"]).item(), acc=100 * acc["correct"].item() / acc["seen"])
                else:
                    _bar.advance(n)

            s = setup.step
            tr = train_one_epoch(setup.module, loader, setup.optimizer, setup.scheduler, device=self.device,
                                 forward=setup.forward, mixer=setup.mixer, eraser=setup.eraser, accum_steps=s.accum_steps, clip_grad=s.clip_grad,
                                 ema=setup.ema, amp=s.amp, channels_last=s.channels_last, normalize=s.normalize,
                                 adversarial=s.adversarial, on_step=on_step)
        tr = _reduce_train(self.world, tr, self.device)
        if not math.isfinite(tr["loss"]):
            raise TrainingDiverged(self._diverged(epoch, tr["loss"], at))
        row = {"epoch": epoch + 1, "train_loss": tr["loss"], "train_acc": tr["acc"],
               "lr": setup.optimizer.param_groups[-1]["lr"], "images_per_s": tr["images_per_s"],
               "epoch_seconds": tr["seconds"]}
        skipped = tr.pop("skipped")
        if setup.validate is not None:
            row.update(setup.validate(self._eval_module(setup)))
            skipped += row.pop("skipped", [])  # validation's unreadable images are listed too
        self.skipped.update(dict(skipped))
        row["skipped_images"] = len(self.skipped)
        at.epoch, at.step = epoch + 1, 0
        return row

    def _end_epoch(self, setup: TrainSetup, at: _Progress, row: dict) -> bool:
        """Log the row, save best/last, run the callbacks; return whether early stopping ends the run."""
        if self.logger is not None:
            self.logger.log(row)
            print_epoch(row, setup.metric)
        value = row.get(setup.metric) if setup.validate is not None else None
        improved = setup.validate is None or at.best is None or value > at.best
        if improved:
            at.best, at.bad_epochs = value, 0
        else:
            at.bad_epochs += 1
        if self._chosen(setup, at, value, improved, row):
            at.best_epoch, at.chosen = at.epoch, value
            if self.save_best and self.world.is_main:
                best_meta, weights = ckpt.inference_meta(self._eval_module(setup), self.meta, epoch=at.epoch, step=0, metrics=row)
                ckpt.save(self.run_dir / "best.safetensors", weights, best_meta)
        self._save_last(setup, at, row)
        self._report_skipped()
        for callback in self.callbacks:
            callback(dict(row))
        if self.patience and at.bad_epochs >= self.patience:
            console.print(f"early stop: no validation improvement for {at.bad_epochs} epochs")
            return True
        return False

    def _chosen(self, setup: TrainSetup, at: _Progress, value: float | None, improved: bool, row: dict) -> bool:
        """Whether this epoch replaces ``best.safetensors`` (``at.best`` already counts it). Epochs come in
        order, so "this one is within a standard error of the best so far" leaves, at the end, the latest
        epoch within a standard error of the final best: that best was itself chosen when it came."""
        if setup.validate is None or self.select == "last":
            return True
        if self.select == "best" or setup.standard_error is None:
            return improved
        return value >= at.best - setup.standard_error(at.best, row)

    def _diverged(self, epoch: int, loss: float, at: _Progress) -> str:
        """The message of a diverged ``epoch`` (0-based): what the run folder keeps and how to train again."""
        if epoch == 0:
            kept = "no checkpoint was written"
        else:
            best = f"; best.safetensors: {self.label} {at.best_epoch}" if at.best_epoch > 0 else ""
            kept = f"{self.run_dir} keeps {self.label} {epoch}'s checkpoints (last.safetensors{best})"
        return (f"the training loss is {loss} in {self.label} {epoch + 1}: training diverged and was stopped before "
                f"saving; {kept}. Start again with a lower --lr, with --clip-grad 1.0, or in fp32 (--no-amp)")

    @staticmethod
    def _eval_module(setup: TrainSetup) -> nn.Module:
        return setup.ema.module if setup.ema is not None else setup.module

    # ------------------------------------------------------------------ saving and resuming

    def _save_last(self, setup: TrainSetup, at: _Progress, metrics: dict) -> None:
        if not self.world.is_main:
            return
        # last.state.pt is the whole resumable state, weights included, in one atomic file: a crash at
        # any instant leaves either the previous or the new state, never a pair from two steps.
        # last.safetensors, written after it, is the readable checkpoint of the same weights.
        ckpt.save_train_state(self.run_dir / "last.state.pt", {
            "epoch": at.epoch, "step": at.step, "model": setup.module.state_dict(), "optimizer": setup.optimizer.state_dict(),
            "scheduler": setup.scheduler.state_dict() if setup.scheduler is not None else None,
            "ema": setup.ema.state_dict() if setup.ema is not None else None, "rng": _rng_state(),
            "best_top1": at.best, "best_epoch": at.best_epoch, "bad_epochs": at.bad_epochs, "chosen": at.chosen,
        })
        meta = dataclasses.replace(self.meta, epoch=at.epoch, step=at.step, metrics=metrics)
        ckpt.save(self.run_dir / "last.safetensors", setup.module.state_dict(), meta)

    def _restore(self, setup: TrainSetup) -> _Progress:
        for stale in self.run_dir.glob(".*.tmp"):  # half-written files of a killed save; the complete ones are intact
            stale.unlink(missing_ok=True)
        state = ckpt.load_train_state(self.run_dir / "last.state.pt")
        if "model" in state:
            sd = state["model"]
        else:  # written before the state held the weights: the pair must match
            sd, meta = ckpt.load(self.run_dir / "last.safetensors")
            if state["epoch"] != meta.epoch or state.get("step", 0) != meta.step:
                raise ValueError(f"{self.run_dir}: last.safetensors and last.state.pt are from different epochs; "
                                 "cannot resume exactly (start the run again, or train from last.safetensors with --pretrained)")
        setup.module.load_state_dict(sd)
        setup.optimizer.load_state_dict(state["optimizer"])
        if setup.scheduler is not None and state.get("scheduler") is not None:
            setup.scheduler.load_state_dict(state["scheduler"])
        if setup.ema is not None and state.get("ema") is not None:
            setup.ema.load_state_dict(state["ema"])
        _set_rng_state(state["rng"])
        at = _Progress(state["epoch"], state.get("step", 0), state["best_top1"], state["best_epoch"], state["bad_epochs"],
                       state.get("chosen", state["best_top1"]))  # written before select: the best was the pick
        if at.epoch >= self.epochs:
            self._finish_saved(setup, at)
        elif self.world.is_main:
            console.print(f"resuming {self.run_dir} at {self.label} {at.epoch + 1}" + (f", step {at.step}" if at.step else ""))
        return at

    def _finish_saved(self, setup: TrainSetup, at: _Progress) -> None:
        """A finished run: nothing to train; rewrite ``last.safetensors`` if a crash kept it from the final state."""
        last = self.run_dir / "last.safetensors"
        try:
            current = ckpt.read_meta(last).epoch == at.epoch
        except (FileNotFoundError, ValueError):
            current = False
        if not current:
            self._save_last(setup, at, {})
        if self.world.is_main:
            console.print(f"{self.run_dir} is finished: all {self.epochs} epochs are trained, nothing to resume"
                          + ("" if current else " (last.safetensors rewritten from the final state)")
                          + "; to train longer, start a new run from its checkpoint with --pretrained")

    def _report_skipped(self, final: bool = False) -> None:
        if not self.skipped or not self.world.is_main:
            return
        ckpt.write_text_atomic(self.run_dir / "skipped_images.txt",
                               "".join(f"{p}\t{e}\n" for p, e in sorted(self.skipped.items())))
        if final:
            console.print(f"[yellow]{len(self.skipped)} unreadable images were skipped; list in {self.run_dir / 'skipped_images.txt'}")


class _GracefulStop:
    """SIGINT (Ctrl-C) and SIGTERM (``kill``, a scheduler's pre-emption, a container stop) ask the
    trainer to stop after the optimizer step in flight, so the saved state is exactly the state
    between two steps (BatchNorm statistics included); a second signal stops at once.

    Handlers can only be installed from the main thread; elsewhere the run keeps Python's default
    (Ctrl-C raises where it lands).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}")
        self.requested = signal.Signals(signum).name
        console.print(f"[yellow]{self.requested}: finishing the current step, then saving a resumable checkpoint "
                      "(send it again to stop at once)")

    def check(self) -> None:
        """Raise ``KeyboardInterrupt`` if a stop was asked for."""
        if self.requested is not None:
            raise KeyboardInterrupt(self.requested)

    def ignore(self) -> None:
        for s in self._previous:
            signal.signal(s, signal.SIG_IGN)

    def __enter__(self) -> _GracefulStop:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def open_job(run_dir: Path, args: dict[str, Any], *, resume: bool) -> bool:
    """Prepare ``run_dir`` for a job with ``args``; return whether it continues an earlier one.

    A new job refuses a folder that already holds one (pass ``resume``); a resumed one must have
    the same arguments (they decide the batches and the schedule).
    """
    run_dir = Path(run_dir)
    job = run_dir / "job.json"
    started = (run_dir / "last.state.pt").is_file() or (run_dir / "last.safetensors").is_file()
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
    ckpt.write_text_atomic(job, json.dumps(args, indent=1))
    return False


def print_epoch(row: dict, metric: str = "val_top1") -> None:
    """One line per epoch: training loss and accuracy, validation numbers, speed."""
    msg = f"epoch {row['epoch']}: loss {row['train_loss']:.3f}"
    if row.get("train_acc") is not None:  # a detector has no training accuracy
        msg += f" train acc {row['train_acc']:.1f}%"
    if "val_loss" in row:
        msg += f" | val loss {row['val_loss']:.3f}"
    if metric in row:
        name = "val top-1" if metric == "val_top1" else metric.replace("_", " ")
        msg += f" {name} {row[metric]:.2f}%" + (f" +- {row['val_ci95']:.2f}" if "val_ci95" in row else "")
    msg += f" | {row['images_per_s']:.1f} img/s"
    if row.get("skipped_images"):
        msg += f" | [yellow]{row['skipped_images']} images skipped[/yellow]"
    console.print(msg)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    # plain tensors, numbers and tuples only: last.state.pt is read back with torch.load(weights_only=True)
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _reduce_train(world: World, tr: dict, device: torch.device) -> dict:
    """Training metrics of all ranks together (every rank gets the same numbers)."""
    if not world.distributed:
        return tr
    acc = tr["acc"] if tr["acc"] is not None else 0.0
    loss, correct, n = dist_.all_reduce_sums(world, [tr["loss"] * tr["images"], acc * tr["images"], tr["images"]], device)
    return {**tr, "loss": loss / max(n, 1), "acc": correct / max(n, 1) if tr["acc"] is not None else None, "images": int(n),
            "images_per_s": n / max(tr["seconds"], 1e-9), "skipped": dist_.all_gather_lists(world, tr["skipped"])}
