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
