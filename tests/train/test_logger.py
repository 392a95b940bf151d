"""Experiment tracking: Weights & Biases through a fake ``wandb`` module (no network, no real wandb)."""

from __future__ import annotations

import gc
import sys
import types

import pytest

from ..conftest import tiny_config


class _FakeRun:
    def __init__(self, kwargs):
        self.kwargs, self.logged, self.finished = kwargs, [], 0

    def log(self, data, step=None):
        self.logged.append((step, dict(data)))

    def finish(self, *args, **kwargs):
        self.finished += 1


@pytest.fixture
def fake_wandb(monkeypatch):
    module = types.ModuleType("wandb")
    module.runs = []

    def init(**kwargs):
        run = _FakeRun(kwargs)
        module.runs.append(run)
        return run

    module.init = init
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


def test_fit_logs_every_epoch_to_wandb(image_folder, tmp_path, fake_wandb):
    from finegrain.train.run import fit

    result = fit(tiny_config(image_folder, tmp_path / "runs", epochs=2, wandb_project="birds"))
    gc.collect()
    (run,) = fake_wandb.runs
    kw = run.kwargs
    assert kw["project"] == "birds" and kw["mode"] == "offline"  # offline unless asked: no network by default
    assert kw["dir"] == str(result.run_dir) and kw["name"] == "run"
    assert kw["config"]["train"]["wandb_project"] == "birds" and kw["config"]["data"]["img_size"] == 32
    assert [step for step, _ in run.logged] == [1, 2]
    for _, data in run.logged:
        assert {"train_loss", "train_acc", "lr", "val_loss", "val_top1"} <= set(data) and "epoch" not in data
    assert run.finished == 1  # finished once fit is done with its logger
    assert kw["id"] == (result.run_dir / "wandb_id.txt").read_text().strip()


def test_resume_continues_the_same_wandb_run(image_folder, tmp_path, fake_wandb):
    from finegrain.train.run import fit

    first = fit(tiny_config(image_folder, tmp_path / "runs", epochs=2, wandb_project="birds"), max_epochs=1)
    fit(tiny_config(image_folder, tmp_path / "runs", epochs=2, resume=str(first.run_dir)))
    gc.collect()
    a, b = fake_wandb.runs
    assert a.kwargs["id"] == b.kwargs["id"] and b.kwargs["resume"] == "allow"
    assert [s for s, _ in a.logged] == [1] and [s for s, _ in b.logged] == [2]


def test_no_project_no_wandb(image_folder, tmp_path, fake_wandb):
    from finegrain.train.run import fit

    result = fit(tiny_config(image_folder, tmp_path / "runs", epochs=1))
    assert fake_wandb.runs == [] and not (result.run_dir / "wandb_id.txt").exists()


def test_missing_wandb_names_the_extra(image_folder, tmp_path, monkeypatch):
    from finegrain.train.run import fit

    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.raises(ImportError, match=r"finegrain\[track\]"):
        fit(tiny_config(image_folder, tmp_path / "runs", epochs=1, wandb_project="birds"))


def test_bad_wandb_mode(image_folder, tmp_path, fake_wandb):
    from finegrain.train.run import fit

    with pytest.raises(ValueError, match="--wandb-mode must be offline or online"):
        fit(tiny_config(image_folder, tmp_path / "runs", epochs=1, wandb_project="birds", wandb_mode="cloud"))
    assert fake_wandb.runs == []


def test_wandb_flags_on_the_cli(image_folder, tmp_path, fake_wandb):
    from finegrain.cli import main

    rc = main(["train", "--data", str(image_folder), "--backbone", "test_resnet", "--pretrained", "none",
               "--img-size", "32", "--batch-size", "8", "--workers", "0", "--epochs", "1", "--device", "cpu",
               "--out", str(tmp_path / "runs"), "--name", "cli", "--wandb-project", "p", "--wandb-mode", "online"])
    assert rc == 0
    (run,) = fake_wandb.runs
    assert run.kwargs["project"] == "p" and run.kwargs["mode"] == "online"


def test_a_row_cut_by_a_crash_is_dropped_and_the_log_stays_readable(tmp_path):
    import json

    from finegrain.train.logger import RunLogger, read_rows

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 1, "val_top1": 50.0}\n{"epoch": 2, "val_t')  # killed mid-append
    assert read_rows(path) == [{"epoch": 1, "val_top1": 50.0}]
    RunLogger(tmp_path).log({"epoch": 2, "val_top1": 60.0})  # the resumed run logs epoch 2 again
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"epoch": 1, "val_top1": 50.0}, {"epoch": 2, "val_top1": 60.0}]

    path.write_text('{"epoch": 1, "val_t')  # the first row itself was cut
    RunLogger(tmp_path).log({"epoch": 1, "val_top1": 40.0})
    assert path.read_text() == '{"epoch": 1, "val_top1": 40.0}\n'


def test_a_damaged_row_before_the_last_is_an_error(tmp_path):
    from finegrain.train.logger import read_rows

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 1}\nnot json\n{"epoch": 3}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_rows(path)
