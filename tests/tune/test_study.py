"""finegrain tune: a tiny real study, pruning, the grid sampler, the results files and the CLI."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import yaml

from ..conftest import tiny_config

optuna = pytest.importorskip("optuna")


# -------------------------------------------------------------- a fake fit, for the study machinery


class FakeFit:
    """Stands in for ``fit``: each epoch reports a validation top-1 given by ``curve(cfg)``."""

    def __init__(self, curve):
        self.curve, self.calls = curve, []

    def __call__(self, cfg, *, max_epochs=None, on_epoch=None):
        from finegrain.train.run import RunResult

        run_dir = Path(cfg.train.out) / cfg.train.name
        run_dir.mkdir(parents=True)
        values = self.curve(cfg)
        call = {"cfg": cfg, "epochs": 0}
        self.calls.append(call)
        for epoch, v in enumerate(values, 1):
            call["epochs"] = epoch
            if on_epoch is not None:
                on_epoch({"epoch": epoch, "train_loss": 1.0, "val_top1": v})
        return RunResult(run_dir, run_dir / "best.safetensors", len(values), max(values), len(values), False, False)


def _study(tmp_path, monkeypatch, curve, space, **kw):
    import finegrain.tune.study as study_mod

    fake = FakeFit(curve)
    monkeypatch.setattr(study_mod, "fit", fake)
    cfg = tiny_config(tmp_path / "data", tmp_path / "studies", epochs=3)
    cfg.train.name = "study"
    return study_mod.run_study(cfg, space, **kw), fake


def test_grid_sampler_enumerates_the_grid(tmp_path, monkeypatch):
    result, fake = _study(tmp_path, monkeypatch, lambda cfg: [10 * cfg.train.lr + cfg.data.scale_min] * 2,
                          ["train.lr=choice:1,2,3", "data.scale_min=uniform:0.1:0.5:2"], sampler="grid", pruner="none")
    seen = sorted((c["cfg"].train.lr, c["cfg"].data.scale_min) for c in fake.calls)
    assert seen == sorted(itertools.product([1.0, 2.0, 3.0], [0.1, 0.5]))
    assert len(result.trials) == 6 and all(r["state"] == "complete" for r in result.trials)
    assert result.best_params == {"train.lr": 3.0, "data.scale_min": 0.5}
    assert [c["cfg"].train.name for c in fake.calls] == [f"trial-{i:03d}" for i in range(6)]
    # asking for more trials than grid points runs the grid once
    result2, fake2 = _study(tmp_path / "again", monkeypatch, lambda cfg: [50.0], ["train.lr=choice:1,2"], sampler="grid",
                            trials=10)
    assert len(fake2.calls) == 2


def test_median_pruner_stops_a_collapsing_trial(tmp_path, monkeypatch):
    # the third trial "collapses" to chance (as with a huge learning rate); the first two learn
    started = []

    def curve(cfg):
        started.append(cfg.train.lr)
        return [33.0, 33.0, 33.0] if len(started) == 3 else [60.0, 80.0, 90.0]

    result, fake = _study(tmp_path, monkeypatch, curve, ["train.lr=choice:0.001,0.002,5.0"], sampler="grid",
                          pruner="median", prune_startup_trials=2, prune_warmup_epochs=0)
    assert [c["epochs"] for c in fake.calls] == [3, 3, 1]  # stopped right after its first epoch
    states = {r["trial"]: r["state"] for r in result.trials}
    assert states == {0: "complete", 1: "complete", 2: "pruned"}
    pruned = next(r for r in result.trials if r["state"] == "pruned")
    assert pruned["epochs"] == 1 and pruned["val_top1"] == 33.0  # its value when it was stopped
    assert result.trials[-1] is pruned  # finished trials are listed first
    assert result.best_value == 90.0 and result.best_params["train.lr"] != started[2]


def test_no_pruning_during_warmup_or_without_a_pruner(tmp_path, monkeypatch):
    started = []

    def curve(cfg):
        started.append(cfg.train.lr)
        return [33.0, 33.0, 33.0] if len(started) % 3 == 0 else [60.0, 80.0, 90.0]

    _, fake = _study(tmp_path / "a", monkeypatch, curve, ["train.lr=choice:0.001,0.002,5.0"], sampler="grid",
                     pruner="median", prune_startup_trials=2, prune_warmup_epochs=1)
    assert [c["epochs"] for c in fake.calls] == [3, 3, 2]  # epoch 1 is warm-up, pruned after epoch 2
    _, fake = _study(tmp_path / "b", monkeypatch, curve, ["train.lr=choice:0.001,0.002,5.0"], sampler="grid", pruner="none")
    assert [c["epochs"] for c in fake.calls] == [3, 3, 3]


def test_results_files_and_best_yaml(tmp_path, monkeypatch):
    from finegrain.cli import build_parser, config_from_args

    result, _ = _study(tmp_path, monkeypatch, lambda cfg: [100 * cfg.train.lr], ["train.lr=uniform:0.1:0.5"],
                       sampler="random", trials=3, seed=1)
    d = result.study_dir
    rows = json.loads((d / "trials.json").read_text())
    assert len(rows) == 3 and rows[0]["val_top1"] == max(r["val_top1"] for r in rows)  # best first
    header = (d / "trials.csv").read_text().splitlines()[0]
    assert header.startswith("trial,state,val_top1,epochs,train.lr")
    settings = json.loads((d / "study.json").read_text())
    assert settings["sampler"] == "random" and "validation top-1" in settings["objective"]
    # best.yaml is a config for `finegrain train --config`: a fresh run with the best value
    args = build_parser().parse_args(["train", "--config", str(result.best_config)])
    cfg = config_from_args(args)
    assert cfg.train.lr == pytest.approx(result.best_params["train.lr"])
    assert cfg.train.name is None and cfg.train.resume is None and cfg.train.out == str(tmp_path / "studies")
    # the study folder is not reused
    with pytest.raises(FileExistsError, match="another --name"):
        _study(tmp_path, monkeypatch, lambda cfg: [1.0], ["train.lr=uniform:0.1:0.5"], sampler="random", trials=1)


def test_study_needs_validation_and_trials(tmp_path, monkeypatch):
    import finegrain.tune.study as study_mod

    cfg = tiny_config(tmp_path / "data", tmp_path / "studies")
    with pytest.raises(ValueError, match="--trials"):
        study_mod.run_study(cfg, ["train.lr=uniform:0.1:0.5"], sampler="tpe")
    with pytest.raises(ValueError, match="--search"):
        study_mod.run_study(cfg, ["train.lr=uniform:0.1:0.5"], sampler="bayes", trials=2)
    cfg.data.val_fraction = 0.0
    with pytest.raises(ValueError, match="--val-fraction"):
        study_mod.run_study(cfg, ["train.lr=uniform:0.1:0.5"], trials=2)


def test_failed_trials_are_reported(tmp_path, monkeypatch):
    def curve(cfg):
        raise ValueError("classes with no training images")

    with pytest.raises(ValueError, match="no trial finished.*classes with no training images"):
        _study(tmp_path, monkeypatch, curve, ["train.lr=uniform:0.1:0.5"], sampler="random", trials=2)


# ------------------------------------------------------------------------------------ real training


def test_tiny_random_study_end_to_end(image_folder, tmp_path, capsys):
    from finegrain.cli import main

    rc = main(["tune", "--data", str(image_folder), "--backbone", "test_resnet", "--pretrained", "none",
               "--img-size", "32", "--batch-size", "8", "--workers", "0", "--val-fraction", "0.25", "--epochs", "2",
               "--warmup-epochs", "0", "--device", "cpu", "--out", str(tmp_path / "studies"), "--name", "s",
               "--trials", "3", "--search", "random", "--study-seed", "3",
               "--space", "train.lr=loguniform:1e-4:1e-2", "--space", "data.scale_min=uniform:0.1:0.5"])
    assert rc == 0
    d = tmp_path / "studies" / "s"
    rows = json.loads((d / "trials.json").read_text())
    assert len(rows) == 3
    for r in rows:
        assert r["state"] in ("complete", "pruned")
        assert 1e-4 <= r["train.lr"] <= 1e-2 and 0.1 <= r["data.scale_min"] <= 0.5
        run = Path(r["run_dir"])
        assert (run / "best.safetensors").is_file() and (run / "metrics.jsonl").is_file()
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        assert cfg["train"]["lr"] == pytest.approx(r["train.lr"])
    best = yaml.safe_load((d / "best.yaml").read_text())
    assert best["data"]["data"] == str(image_folder) and best["train"]["epochs"] == 2


def test_a_pruned_fit_leaves_a_consistent_resumable_run(image_folder, tmp_path):
    from finegrain.checkpoint import read_meta
    from finegrain.train.run import fit

    cfg = tiny_config(image_folder, tmp_path / "runs", epochs=2)
    rows = []

    def prune(row):
        rows.append(row)
        raise optuna.TrialPruned("stop here")

    with pytest.raises(optuna.TrialPruned):
        fit(cfg, on_epoch=prune)
    run = tmp_path / "runs" / "run"
    assert len(rows) == 1 and rows[0]["epoch"] == 1 and "val_top1" in rows[0]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    assert read_meta(run / "last.safetensors")["epoch"] == 1
    assert read_meta(run / "best.safetensors")["epoch"] == 1
    resumed = fit(tiny_config(image_folder, tmp_path / "runs", epochs=2, resume=str(run)))
    assert resumed.epochs_run == 2 and len((run / "metrics.jsonl").read_text().splitlines()) == 2


def test_cli_reports_bad_spec(tmp_path, capsys):
    from finegrain.cli import main

    rc = main(["tune", "--data", str(tmp_path), "--space", "train.lr=uniform:1:0", "--trials", "2"])
    assert rc == 2 and "need LOW < HIGH" in capsys.readouterr().err
