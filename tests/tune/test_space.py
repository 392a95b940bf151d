"""finegrain tune: search-space parsing, grids, and space values checked against the other flags."""

from __future__ import annotations

import pytest

from finegrain.tune.space import Dimension, check_space, grid_size, parse_dimension, parse_space

from ..conftest import tiny_config


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
