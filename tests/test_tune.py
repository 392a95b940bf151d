"""finegrain tune: search-space parsing, a tiny real study, pruning, the grid sampler and the CLI."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import yaml

from finegrain.tune.space import Dimension, check_space, grid_size, parse_dimension, parse_space

from .conftest import tiny_config

optuna = pytest.importorskip("optuna")


# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize("spec, expected", [
    ("train.lr=loguniform:1e-4:1e-2", Dimension("train.lr", "loguniform", low=1e-4, high=1e-2)),
    ("data.scale_min=uniform:0.1:0.5:3", Dimension("data.scale_min", "uniform", low=0.1, high=0.5, grid_points=3)),
    ("train.epochs=int:2:6:2", Dimension("train.epochs", "int", low=2, high=6, step=2)),
    ("model.attention=choice:none,se", Dimension("model.attention", "choice", choices=("none", "se"))),
    ("lr=loguniform:1e-4:1e-2", Dimension("train.lr", "loguniform", low=1e-4, high=1e-2)),
    ("--scale-min=uniform:0.1:0.5", Dimension("data.scale_min", "uniform", low=0.1, high=0.5)),
    ("train.ema=choice:true,false", Dimension("train.ema", "choice", choices=(True, False))),
    ("train.accum_steps=choice:1,2", Dimension("train.accum_steps", "choice", choices=(1, 2))),
    ("train.lr=choice:1e-3,3e-3", Dimension("train.lr", "choice", choices=(1e-3, 3e-3))),
    ("train.name=choice:none", None),  # not a hyperparameter: checked below
])
def test_parse_dimension(spec, expected):
    if expected is None:
        with pytest.raises(ValueError, match="set it as a flag"):
            parse_dimension(spec)
        return
    assert parse_dimension(spec) == expected


@pytest.mark.parametrize("spec, message", [
    ("train.lr", "expected FIELD=KIND:ARGS"),
    ("training.lr=uniform:0:1", "unknown config section 'training'"),
    ("train.lrr=uniform:0:1", "did you mean lr"),
    ("lrr=uniform:0:1", "did you mean lr"),
    ("train.lr=gaussian:0:1", "unknown kind 'gaussian'"),
    ("train.lr=unifrom:0:1", "did you mean uniform"),
    ("train.lr=uniform:0.1", "uniform takes uniform:LOW:HIGH"),
    ("train.lr=uniform:a:1", "LOW must be a number"),
    ("train.lr=uniform:0.5:0.1", "need LOW < HIGH"),
    ("train.lr=loguniform:0:0.1", "loguniform needs LOW > 0"),
    ("train.lr=uniform:0.1:0.5:2.5", "positive integer"),
    ("train.epochs=uniform:1:5", "is an integer; use int"),
    ("train.lr=int:1:5", "is a float"),
    ("train.epochs=int:1.5:5", "int bounds must be integers"),
    ("train.optimizer=uniform:0:1", "is not a number"),
    ("train.epochs=choice:1,two", "is an integer, got 'two'"),
    ("train.ema=choice:maybe", "true/false"),
    ("train.lr=choice:", "choice needs values"),
    ("train.optimizer=choice:sgd,sgd", "listed twice"),
    ("data.mean=choice:0.5", "cannot be searched"),
    ("data.data=choice:a,b", "set it as a flag"),
])
def test_bad_specs_say_what_is_wrong(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_dimension(spec)


def test_parse_space_rejects_empty_and_duplicates():
    with pytest.raises(ValueError, match="no search space"):
        parse_space([])
    with pytest.raises(ValueError, match="twice"):
        parse_space(["train.lr=uniform:0.1:0.2", "lr=loguniform:1e-3:1e-2"])


def test_grid_values_and_size():
    lr, scale, epochs, att = parse_space(["train.lr=loguniform:1e-4:1e-2:3", "data.scale_min=uniform:0.1:0.5:5",
                                          "train.epochs=int:2:6:2", "model.attention=choice:none,se"])
    assert lr.grid() == pytest.approx([1e-4, 1e-3, 1e-2])
    assert scale.grid() == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    assert epochs.grid() == [2, 4, 6]
    assert att.grid() == ["none", "se"]
    assert grid_size([lr, scale, epochs, att]) == 90
    with pytest.raises(ValueError, match="needs a number of points"):
        parse_dimension("train.lr=loguniform:1e-4:1e-2").grid()


def test_space_values_are_checked_against_the_other_flags(tmp_path):
    cfg = tiny_config(tmp_path / "data", tmp_path / "runs")
    with pytest.raises(ValueError, match="--task fgvc"):
        check_space(cfg, parse_space(["model.attention=choice:none,se"]))
    with pytest.raises(ValueError, match="--scale-min"):
        check_space(cfg, parse_space(["data.scale_min=uniform:0.5:1.5"]))
    cfg.model.task = "fgvc"
    check_space(cfg, parse_space(["model.attention=choice:none,se", "data.scale_min=uniform:0.1:0.5"]))


# ---------------------------------------------------------------- a fake fit, for the study machinery


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


# ---------------------------------------------------------------- real training


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
