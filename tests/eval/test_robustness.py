"""The robustness evaluation end to end."""

from __future__ import annotations

import json

import pytest


def test_eval_robust_cli_end_to_end(trained_run, tmp_path):
    from finegrain.cli import main
    from finegrain.eval.robustness import robustness_eval

    result, data = trained_run
    out = tmp_path / "robust"
    rc = main(["eval-robust", str(result.run_dir), "--data", str(data), "--split", "test", "--corruptions", "jpeg",
               "occlusion", "--severities", "1", "5", "--workers", "0", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    r = json.loads((out / "robustness.json").read_text())
    assert r["n"] == 9 and set(r["results"]) == {"jpeg", "occlusion"} and set(r["results"]["jpeg"]) == {"1", "5"}
    assert 0 <= r["clean"] <= 100
    assert r["mean_drop"]["jpeg"] == pytest.approx(r["clean"] - r["mean"]["jpeg"])
    assert (out / "robustness.png").stat().st_size > 1000
    again = robustness_eval(result.run_dir, data, corruptions=["occlusion"], severities=[5], workers=0, device="cpu",
                            out_dir=tmp_path / "again")
    assert again["results"]["occlusion"]["5"] == r["results"]["occlusion"]["5"]  # seeded: same numbers
    with pytest.raises(ValueError, match="severities"):
        robustness_eval(result.run_dir, data, severities=[0], device="cpu")
