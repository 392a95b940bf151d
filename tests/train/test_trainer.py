"""The one trainer: every caller (fit, few-shot, prune and QAT fine-tunes) resumes exactly after Ctrl-C.

Each test interrupts a run part-way through an epoch (a KeyboardInterrupt raised right after an
optimizer step, as a Ctrl-C between two batches would), resumes it, and checks that the final
weights and buffers equal those of the same run left uninterrupted.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from finegrain.tasks import Task
from finegrain.train.run import fit

from ..conftest import tiny_config


def interrupt_after(monkeypatch, *, epoch_call: int, steps: int) -> None:
    """Make the ``epoch_call``-th epoch of the next trainer run stop with Ctrl-C after ``steps`` optimizer steps."""
    import finegrain.train.trainer as trainer

    real = trainer.train_one_epoch
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) != epoch_call:
            return real(*args, **kwargs)
        on_step, done = kwargs["on_step"], []

        def stop_after(n, acc):
            on_step(n, acc)
            done.append(1)
            if len(done) == steps:
                raise KeyboardInterrupt

        return real(*args, **{**kwargs, "on_step": stop_after})

    monkeypatch.setattr(trainer, "train_one_epoch", wrapped)


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"


def _weights(path):
    from finegrain.checkpoint import load

    return load(path)[0]


def test_fit_resumes_bit_exact_from_the_middle_of_an_epoch(image_folder, tmp_path, monkeypatch):
    from finegrain.train.run import fit

    full = fit(tiny_config(image_folder, tmp_path / "a", epochs=2, ema=True))
    interrupt_after(monkeypatch, epoch_call=2, steps=1)  # second epoch, after its first step
    cfg = tiny_config(image_folder, tmp_path / "b", epochs=2, ema=True)
    first = fit(cfg)
    assert first.interrupted
    state = torch.load(first.run_dir / "last.state.pt", weights_only=False)
    assert (state["epoch"], state["step"]) == (1, 1)
    monkeypatch.undo()
    cfg.train.resume = str(first.run_dir)
    resumed = fit(cfg)
    assert not resumed.interrupted and resumed.epochs_run == 2
    assert_same_state(_weights(full.run_dir / "last.safetensors"), _weights(resumed.run_dir / "last.safetensors"))
    assert_same_state(_weights(full.run_dir / "best.safetensors"), _weights(resumed.run_dir / "best.safetensors"))
    rows = [json.loads(line) for line in (resumed.run_dir / "metrics.jsonl").read_text().splitlines()]
    full_rows = [json.loads(line) for line in (full.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and rows[-1]["val_loss"] == full_rows[-1]["val_loss"]


@pytest.mark.parametrize("method,extra", [("protonet", {}), ("baseline", {"batch_size": 4, "method_args": {"steps": 3}})])
def test_fewshot_training_resumes_exactly(tmp_path, monkeypatch, method, extra):
    from finegrain.fewshot.run import fit_episodic

    from ..helpers import _colour_folder

    data = _colour_folder(tmp_path / "data")
    kw = dict(method=method, n_way=2, k_shot=1, q_query=2, episodes=3, epochs=2, val_episodes=2, img_size=32, device="cpu",
              split_fractions=(0.34, 0.33, 0.33), **extra)
    full = fit_episodic(data, out=tmp_path / "a", **kw)
    interrupt_after(monkeypatch, epoch_call=1, steps=1)
    first = fit_episodic(data, out=tmp_path / "b", **kw)
    assert first["interrupted"]
    monkeypatch.undo()
    with pytest.raises(FileExistsError, match="--resume"):
        fit_episodic(data, out=tmp_path / "b", **kw)
    with pytest.raises(ValueError, match="other arguments.*episodes"):
        fit_episodic(data, out=tmp_path / "b", resume=True, **{**kw, "episodes": 4})
    resumed = fit_episodic(data, out=tmp_path / "b", resume=True, **kw)
    assert not resumed["interrupted"] and resumed["epochs"] == 2
    assert_same_state(_weights(tmp_path / "a" / "last.safetensors"), _weights(tmp_path / "b" / "last.safetensors"))
    assert resumed["best_val_acc"] == full["best_val_acc"]


def test_pruned_fine_tune_resumes_exactly(trained_run, tmp_path, monkeypatch):
    pytest.importorskip("torch_pruning")
    from finegrain.compress.prune import prune_checkpoint

    result, data = trained_run
    kw = dict(ratio=0.5, data=str(data), epochs=2, batch_size=8, workers=0, device="cpu")
    prune_checkpoint(result.best_checkpoint, tmp_path / "full.safetensors", **kw)
    interrupt_after(monkeypatch, epoch_call=2, steps=1)
    s = prune_checkpoint(result.best_checkpoint, tmp_path / "p.safetensors", **kw)
    assert s["interrupted"] and s["out"] is None and not (tmp_path / "p.safetensors").exists()
    monkeypatch.undo()
    s = prune_checkpoint(result.best_checkpoint, tmp_path / "p.safetensors", resume=True, **kw)
    assert s["out"] == str(tmp_path / "p.safetensors")
    assert_same_state(_weights(tmp_path / "full.safetensors"), _weights(tmp_path / "p.safetensors"))


def test_qat_fine_tune_resumes_exactly(trained_run, tmp_path, monkeypatch):
    from finegrain.checkpoint import load_task
    from finegrain.compress.qat import qat_finetune

    result, data = trained_run
    task, meta = load_task(result.best_checkpoint)
    kw = dict(epochs=2, batch_size=8, workers=0, calib_images=6, device="cpu")
    full, _ = qat_finetune(copy.deepcopy(task), meta, data, run_dir=tmp_path / "a", **kw)
    interrupt_after(monkeypatch, epoch_call=1, steps=1)
    with pytest.raises(KeyboardInterrupt, match="--resume"):
        qat_finetune(copy.deepcopy(task), meta, data, run_dir=tmp_path / "b", **kw)
    monkeypatch.undo()
    resumed, history = qat_finetune(copy.deepcopy(task), meta, data, run_dir=tmp_path / "b", resume=True, **kw)
    assert [row["epoch"] for row in history] == [1, 2]
    assert_same_state(full.state_dict(), resumed.state_dict())


def test_ctrl_c_saves_a_resumable_checkpoint(image_folder, tmp_path, monkeypatch):
    import finegrain.train.trainer as run

    real = run.train_one_epoch
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # Ctrl-C during the second epoch, after two batches
            on_step = kwargs["on_step"]
            on_step(8, {"loss": torch.tensor(1.0), "correct": torch.tensor(1), "seen": 8})
            on_step(8, {"loss": torch.tensor(1.0), "correct": torch.tensor(1), "seen": 8})
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(run, "train_one_epoch", interrupted)
    cfg = tiny_config(image_folder, tmp_path, epochs=3)
    result = fit(cfg)
    assert result.interrupted
    from finegrain.checkpoint import load_train_state, read_meta

    meta = read_meta(result.run_dir / "last.safetensors")
    state = load_train_state(result.run_dir / "last.state.pt")
    assert meta["epoch"] == state["epoch"] == 1 and state["step"] == 2
    monkeypatch.setattr(run, "train_one_epoch", real)
    cfg.train.resume = str(result.run_dir)
    resumed = fit(cfg)
    assert resumed.epochs_run == 3 and not resumed.interrupted
    rows = [json.loads(l) for l in (resumed.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]


class _BoxRegressor(Task):
    """A detection-shaped task: its batches are lists of images of different sizes with one target dict each."""

    name = "box-regressor"
    selection_metric = "val_score"

    def __init__(self):
        super().__init__(torch.nn.Linear(3, 4), 0)

    def forward(self, batch):
        preds = [self.model(im.mean((1, 2))) for im in batch["image"]]
        losses = [torch.nn.functional.mse_loss(p, t["boxes"].mean(0)) for p, t in zip(preds, batch["targets"])]
        return {"loss": torch.stack(losses).mean()}


def _box_batches(epoch, start, steps=4):
    g = torch.Generator().manual_seed(100 + epoch)
    out = []
    for _ in range(steps):
        sizes = [(int(torch.randint(8, 20, (1,), generator=g)), int(torch.randint(8, 20, (1,), generator=g))) for _ in range(3)]
        images = [torch.rand(3, h, w, generator=g) for h, w in sizes]
        targets = [{"boxes": torch.rand(2, 4, generator=g), "labels": torch.tensor([0, 0])} for _ in sizes]
        out.append({"image": images, "targets": targets, "skipped": []})
    return out[start:]


def _box_run(run_dir, *, resume=False):
    from finegrain import checkpoint as ckpt
    from finegrain.train.trainer import Trainer, TrainSetup

    torch.manual_seed(0)
    task = _BoxRegressor()
    opt = torch.optim.SGD(task.parameters(), lr=0.1)

    def validate(module):
        with torch.no_grad():
            return {"val_score": -float(module(_box_batches(99, 0)[0])["loss"])}

    setup = TrainSetup(module=task, optimizer=opt, scheduler=None, batches=_box_batches,
                       epoch_images=lambda e, s: 3 * (4 - s), validate=validate, metric=task.selection_metric)
    meta = ckpt.describe(task, model={"backbone": "none", "pretrained": "none", "task": task.name}, classes=[],
                         preprocessing={"img_size": 16, "mean": [0.5] * 3, "std": [0.5] * 3})
    run_dir.mkdir(parents=True, exist_ok=True)
    return task, Trainer(run_dir, epochs=3, meta=meta, device=torch.device("cpu")).run(setup, resume=resume)


def test_trainer_takes_lists_of_images_with_per_image_targets_and_the_task_s_metric(tmp_path, monkeypatch):
    """What a detector will need: variable-size images, per-image targets moved along, selection by the task's metric."""
    full_task, full = _box_run(tmp_path / "a")
    assert full.epochs_run == 3 and not full.interrupted
    rows = full.history
    best = max(range(3), key=lambda i: rows[i]["val_score"])
    assert full.best_epoch == best + 1 and full.best_metric == rows[best]["val_score"]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    interrupt_after(monkeypatch, epoch_call=2, steps=2)
    _, first = _box_run(tmp_path / "b")
    assert first.interrupted
    monkeypatch.undo()
    resumed_task, resumed = _box_run(tmp_path / "b", resume=True)
    assert resumed.epochs_run == 3
    assert_same_state(full_task.state_dict(), resumed_task.state_dict())


class _Planted:
    """A pickle that would create a file when unpickled with arbitrary globals."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_resume_refuses_a_planted_pickle_and_runs_nothing(image_folder, tmp_path):
    cfg = tiny_config(image_folder, tmp_path, epochs=2)
    first = fit(cfg, max_epochs=1)
    state = first.run_dir / "last.state.pt"
    real = torch.load(state, weights_only=True)  # what finegrain writes loads without arbitrary globals
    assert real["epoch"] == 1 and isinstance(real["rng"]["numpy"][1], torch.Tensor)
    marker = tmp_path / "ran.txt"
    torch.save({**real, "payload": _Planted(marker)}, state)
    cfg.train.resume = str(first.run_dir)
    with pytest.raises(ValueError, match="other than tensors and numbers.*nothing in it ran"):
        fit(cfg)
    assert not marker.exists()


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_a_signal_during_a_forward_pass_stops_after_the_step_and_resumes_bit_exact(image_folder, tmp_path, monkeypatch, signum):
    """The signal lands inside the forward of the second epoch's second batch (BatchNorm has already
    seen that batch): the step finishes, the run stops, and the resumed run equals the uninterrupted
    one, running statistics and num_batches_tracked included."""
    import os
    import signal

    from finegrain.tasks.supervised import SupervisedTask

    def config(out):
        cfg = tiny_config(image_folder, out, epochs=2)
        cfg.data.batch_size = 4  # 16 training images: 4 steps per epoch
        return cfg

    full = fit(config(tmp_path / "a"))
    real, calls = SupervisedTask.forward, []

    def forward_then_signal(self, batch):
        calls.append(1)
        out = real(self, batch)
        if self.training and len(calls) == 6:  # the second step of epoch 2
            os.kill(os.getpid(), getattr(signal, signum))
        return out

    monkeypatch.setattr(SupervisedTask, "forward", forward_then_signal)
    cfg = config(tmp_path / "b")
    first = fit(cfg)
    monkeypatch.undo()
    assert first.interrupted
    state = torch.load(first.run_dir / "last.state.pt", weights_only=True)
    assert (state["epoch"], state["step"]) == (1, 2)  # the step in flight was finished, not replayed
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    cfg.train.resume = str(first.run_dir)
    resumed = fit(cfg)
    assert_same_state(_weights(full.run_dir / "last.safetensors"), _weights(resumed.run_dir / "last.safetensors"))


class _Crash(BaseException):
    """A kill: not an exception the trainer handles."""


def test_a_crash_at_any_write_of_a_save_leaves_a_resumable_run(image_folder, tmp_path, monkeypatch):
    """Kill the run before each file write of its checkpoints in turn (best, state, last of every
    epoch), leaving the half-written temporary behind: each time the run resumes and ends where the
    uninterrupted run ends, bit for bit."""
    import finegrain.checkpoint as ckpt

    real, writes = ckpt.atomic_write, []

    def counting(path, write):
        writes.append(Path(path).name)
        return real(path, write)

    monkeypatch.setattr(ckpt, "atomic_write", counting)
    full = fit(tiny_config(image_folder, tmp_path / "a", epochs=2))
    monkeypatch.undo()
    names = [n for n in writes if n.startswith(("best.", "last."))]
    assert names.count("last.state.pt") == 2 and len(names) >= 5
    for crash_at in range(len(names)):
        out, seen = tmp_path / f"b{crash_at}", []

        def crashing(path, write, _at=crash_at, _seen=seen):
            if Path(path).name.startswith(("best.", "last.")):
                _seen.append(1)
                if len(_seen) == _at + 1:
                    (Path(path).parent / f".{Path(path).name}.killed.tmp").write_bytes(b"")  # the kill lands mid-write
                    raise _Crash
            return real(path, write)

        monkeypatch.setattr(ckpt, "atomic_write", crashing)
        with pytest.raises(_Crash):
            fit(tiny_config(image_folder, out, epochs=2))
        monkeypatch.undo()
        run_dir = out / "run"
        if not (run_dir / "last.state.pt").is_file():  # killed before the first state existed: start again
            with pytest.raises(FileNotFoundError, match="last.state.pt"):
                fit(tiny_config(image_folder, out, epochs=2, resume=str(run_dir)))
            continue
        resumed = fit(tiny_config(image_folder, out, epochs=2, resume=str(run_dir)))
        assert not resumed.interrupted and not list(run_dir.glob(".*.tmp"))
        assert_same_state(_weights(full.run_dir / "last.safetensors"), _weights(run_dir / "last.safetensors"))


def test_resuming_a_finished_run_says_it_is_finished(image_folder, tmp_path, capsys):
    cfg = tiny_config(image_folder, tmp_path, epochs=1)
    done = fit(cfg)
    before = (done.run_dir / "last.safetensors").read_bytes()
    cfg.train.resume = str(done.run_dir)
    capsys.readouterr()
    again = fit(cfg)
    err = capsys.readouterr().err
    assert "is finished" in err and "resuming /" not in err and "epoch 1:" not in err  # trained nothing
    assert not again.interrupted and (done.run_dir / "last.safetensors").read_bytes() == before


def test_a_diverged_epoch_stops_the_run_before_it_is_saved(image_folder, tmp_path, monkeypatch, capsys):
    """A NaN training loss (lr too high, a bf16 kernel's garbage) stops the run with the fix in the
    message; the previous epoch's checkpoints stay as they were, readable."""
    import finegrain.train.trainer as trainer
    from finegrain.checkpoint import load, read_meta
    from finegrain.cli import main

    real, calls = trainer.train_one_epoch, []

    def nan_in_epoch_2(*args, **kwargs):
        calls.append(1)
        out = real(*args, **kwargs)
        return {**out, "loss": float("nan")} if len(calls) == 2 else out

    monkeypatch.setattr(trainer, "train_one_epoch", nan_in_epoch_2)
    rc = main(["train", "--data", str(image_folder), "--backbone", "test_resnet", "--pretrained", "none", "--img-size", "32",
               "--epochs", "3", "--workers", "0", "--device", "cpu", "--out", str(tmp_path), "--name", "run"])
    err = capsys.readouterr().err
    assert rc == 2 and len(calls) == 2
    assert "training loss is nan in epoch 2" in " ".join(err.split()) and "--lr" in err and "--no-amp" in err
    run = tmp_path / "run"
    assert read_meta(run / "last.safetensors").epoch == 1 and read_meta(run / "best.safetensors").epoch == 1
    weights, _ = load(run / "last.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())
