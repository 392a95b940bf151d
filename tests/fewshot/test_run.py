"""Episodic training and evaluation: the fewshot CLI, each method on a backbone, the baseline's base classes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finegrain.models.backbone import create_backbone, data_config

from ..helpers import _colour_folder


def test_cli_fewshot_train_then_eval(tmp_path, capsys):
    from finegrain.cli import main

    data = _colour_folder(tmp_path / "data")
    common = ["--data", str(data), "--n-way", "2", "--q-query", "2", "--img-size", "32", "--device", "cpu",
              "--split-fractions", "0.34", "0.33", "0.33"]
    rc = main(["fewshot", "train", *common, "--k-shot", "1", "--episodes", "3", "--epochs", "1", "--val-episodes", "2",
               "--out", str(tmp_path / "run")])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert Path(out["best_checkpoint"]).is_file()
    rc = main(["fewshot", "eval", "--checkpoint", out["best_checkpoint"], *common, "--k-shot", "1", "2",
               "--episodes", "4", "--json"])
    assert rc == 0
    text = capsys.readouterr().out
    result = json.loads(text[text.index("{"):])
    assert main(["fewshot", "train", *common, "--episodes", "1", "--epochs", "1", "--out", str(tmp_path / "run")]) == 2
    assert "already holds" in " ".join(capsys.readouterr().err.split())  # rich wraps lines
    assert result["method"] == "protonet" and [r["k_shot"] for r in result["results"]] == [1, 2]
    assert all(0 <= r["acc"] <= 100 and r["episodes"] == 4 for r in result["results"])
    # too many shots for 5 images per class: a clear error, exit status 2
    assert main(["fewshot", "eval", "--checkpoint", out["best_checkpoint"], *common, "--k-shot", "4", "--episodes", "1"]) == 2
    assert "has 5" in " ".join(capsys.readouterr().err.split())


@pytest.mark.parametrize("method,args", [("baseline", {"head": "cosine", "steps": 5}), ("maml", {"eval_steps": 1}),
                                         ("relationnet", {"relation": "maps"})])
def test_evaluate_a_backbone_with_each_method(tmp_path, method, args):
    from finegrain.fewshot.run import evaluate_fewshot

    data = _colour_folder(tmp_path / "data", n_classes=3, per_class=4)
    r = evaluate_fewshot(data, backbone="conv4", method=method, split="all", n_way=3, k_shots=[1], q_query=2,
                         episodes=2, img_size=32, device="cpu", method_args=args)
    assert r["method"] == method and r["classes"] == 3 and len(r["results"]) == 1
    assert r["mean"] == list(data_config(create_backbone("conv4", num_classes=0))["mean"])
    assert 0 <= r["results"][0]["acc"] <= 100


def test_evaluate_a_backbone_with_its_own_normalisation(tmp_path):
    from finegrain.fewshot.run import evaluate_fewshot

    data = _colour_folder(tmp_path / "data", n_classes=3, per_class=4)
    kw = dict(backbone="conv4", split="all", n_way=3, k_shots=[1], q_query=2, episodes=3, img_size=32, device="cpu")
    default, halves = evaluate_fewshot(data, **kw), evaluate_fewshot(data, mean=(0.5,) * 3, std=(0.5,) * 3, **kw)
    assert halves["mean"] == halves["std"] == [0.5] * 3 and default["mean"] != [0.5] * 3


def test_evaluate_needs_one_model_source(tmp_path):
    from finegrain.fewshot.run import evaluate_fewshot

    with pytest.raises(ValueError, match="either a checkpoint or --backbone"):
        evaluate_fewshot(tmp_path)


def test_baseline_pretrains_on_base_classes_then_evaluates_on_novel(tmp_path):
    from finegrain.checkpoint import read_meta
    from finegrain.fewshot.run import evaluate_fewshot, fit_episodic

    data = _colour_folder(tmp_path / "data")
    kw = dict(n_way=2, q_query=2, img_size=32, device="cpu", split_fractions=(0.34, 0.33, 0.33))
    r = fit_episodic(data, out=tmp_path / "run", method="baseline", epochs=1, batch_size=4, val_episodes=2,
                     method_args={"steps": 3}, **kw)
    meta = read_meta(r["best_checkpoint"])
    assert meta["task"] == "fewshot_baseline" and meta["num_classes"] == 2  # 2 base classes of 6
    splits = meta["fewshot"]["splits"]
    assert sorted(splits["base"] + splits["val"] + splits["novel"]) == [f"class{c}" for c in range(6)]
    ev = evaluate_fewshot(data, checkpoint=r["best_checkpoint"], k_shots=[1], episodes=2, **kw)
    assert ev["method"] == "baseline" and ev["classes"] == 2


def test_mean_and_std_reach_the_checkpoint_and_a_checkpoint_refuses_new_ones(tmp_path, capsys):
    from finegrain.checkpoint import read_meta
    from finegrain.cli import main

    data = _colour_folder(tmp_path / "data")
    common = ["--data", str(data), "--n-way", "2", "--q-query", "2", "--img-size", "32", "--device", "cpu",
              "--split-fractions", "0.34", "0.33", "0.33"]
    norm = ["--mean", "0.5", "0.5", "0.5", "--std", "0.25", "0.25", "0.25"]
    assert main(["fewshot", "train", *common, *norm, "--episodes", "1", "--epochs", "1", "--val-episodes", "1",
                 "--out", str(tmp_path / "run")]) == 0
    best = json.loads(capsys.readouterr().out)["best_checkpoint"]
    prep = read_meta(best)["preprocessing"]
    assert prep["mean"] == [0.5] * 3 and prep["std"] == [0.25] * 3
    assert main(["fewshot", "eval", "--checkpoint", best, *common, *norm, "--k-shot", "1", "--episodes", "1"]) == 2
    assert "--backbone only" in " ".join(capsys.readouterr().err.split())
