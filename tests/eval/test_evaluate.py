"""The eval entry point: corruptions on request, data with other classes refused."""

from __future__ import annotations

import json

from finegrain.cli import main


def test_eval_with_corruptions_flag(trained_run, capsys):
    from finegrain.cli import main

    result, data = trained_run
    rc = main(["eval", str(result.run_dir), "--data", str(data), "--workers", "0", "--device", "cpu",
               "--corruptions", "gaussian_blur"])
    assert rc == 0
    r = json.loads((result.best_checkpoint.parent / "robust-test" / "robustness.json").read_text())
    assert set(r["results"]) == {"gaussian_blur"} and set(r["results"]["gaussian_blur"]) == {"1", "2", "3", "4", "5"}


def test_eval_refuses_data_with_other_classes(trained_run, tmp_path, capsys):
    from tests.conftest import make_image_folder

    result, _ = trained_run
    other = make_image_folder(tmp_path / "other")
    (other / "test" / "red").rename(other / "test" / "purple")
    (other / "train" / "red").rename(other / "train" / "purple")
    assert main(["eval", str(result.run_dir), "--data", str(other), "--workers", "0", "--device", "cpu"]) == 2
    assert "purple" in capsys.readouterr().err


def test_eval_on_a_subset_of_the_classes_scores_those_classes(trained_run, tmp_path, capsys):
    """A test set without one class is evaluated on the others: each present class scores as in the full eval."""
    import shutil

    result, data = trained_run
    full_out, sub_out = tmp_path / "full", tmp_path / "sub"
    assert main(["eval", str(result.run_dir), "--data", str(data), "--workers", "0", "--device", "cpu",
                 "--out", str(full_out)]) == 0
    part = tmp_path / "part"  # a flat folder of two class folders, read as its train split
    shutil.copytree(data / "test", part)
    shutil.rmtree(part / "blue")
    assert main(["eval", str(result.run_dir), "--data", str(part), "--split", "train", "--workers", "0", "--device", "cpu",
                 "--out", str(sub_out)]) == 0
    assert "2 of the model's 3 classes" in " ".join(capsys.readouterr().err.split())
    full = json.loads((full_out / "results.json").read_text())
    sub = json.loads((sub_out / "results.json").read_text())
    assert sub["classes_absent"] == ["blue"] and sub["n"] == full["n"] * 2 // 3
    by_name = lambda r: {c["class"]: c for c in r["per_class"]}  # noqa: E731
    for name in ("green", "red"):
        assert by_name(sub)[name]["recall"] == by_name(full)[name]["recall"]
    assert abs(sub["mean_per_class_acc"] - (by_name(full)["green"]["recall"] + by_name(full)["red"]["recall"]) / 2) < 1e-9


def test_eval_on_the_runs_validation_split_scores_exactly_its_images(trained_run, tmp_path):
    """``--split val`` is the run's split.json val list: the same images, each scored as Predictor scores it alone."""
    import shutil

    from finegrain.predict import Predictor

    result, data = trained_run
    out = tmp_path / "val"
    assert main(["eval", str(result.run_dir), "--data", str(data), "--split", "val", "--workers", "0", "--device", "cpu",
                 "--precision", "fp32", "--out", str(out)]) == 0
    r = json.loads((out / "results.json").read_text())
    saved = json.loads((result.run_dir / "split.json").read_text())
    val = saved["val"]
    assert r["split"] == "val" and r["n"] == len(val) and not set(val) & set(saved["train"])
    answers = Predictor.from_checkpoint(result.best_checkpoint, device="cpu").predict(val, topk=1)
    correct = sum(a["topk"][0]["class"] == path.split("/")[-2] for a, path in zip(answers, val))
    assert abs(r["top1"] - 100.0 * correct / len(val)) < 1e-9

    alone = tmp_path / "alone"  # a checkpoint away from its run folder has no split.json: refused, naming it
    alone.mkdir()
    shutil.copy(result.best_checkpoint, alone / "best.safetensors")
    assert main(["eval", str(alone / "best.safetensors"), "--data", str(data), "--split", "val", "--workers", "0",
                 "--device", "cpu"]) == 2
