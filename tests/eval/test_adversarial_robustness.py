"""``eval-robust --attacks``: top-1 under FGSM/PGD per epsilon, with the attacks' settings in the results."""

from __future__ import annotations

import json

import pytest
import torch


def test_eval_robust_attacks_end_to_end(trained_run, tmp_path):
    from finegrain.cli import main

    result, data = trained_run
    out = tmp_path / "adv"
    rc = main(["eval-robust", str(result.run_dir), "--data", str(data), "--split", "test", "--corruptions", "none",
               "--attacks", "fgsm", "pgd", "--epsilons", "1", "8", "--attack-steps", "3", "--seed", "5",
               "--workers", "0", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    r = json.loads((out / "robustness.json").read_text())
    assert r["results"] == {} and r["mean_corruption_acc"] is None
    adv = r["adversarial"]
    assert adv["n"] == 9 and adv["clean"] == pytest.approx(r["clean"])  # Task.infer is what predict returns
    assert set(adv["results"]) == {"fgsm", "pgd"} and set(adv["results"]["pgd"]) == {"1", "8"}
    pgd, fgsm = adv["settings"]["pgd"], adv["settings"]["fgsm"]
    assert (pgd["steps"], pgd["random_start"], pgd["keep_best"], pgd["seed"], pgd["norm"]) == (3, True, True, 5, "linf")
    assert pgd["epsilons_255"] == pytest.approx([1, 8]) and pgd["step_size_255"]["8"] == pytest.approx(2.5 * 8 / 3)
    assert (fgsm["steps"], fgsm["random_start"], fgsm["step_size"]["8"]) == (1, False, pytest.approx(8 / 255))
    for accs in adv["results"].values():
        assert all(0 <= a <= adv["clean"] for a in accs.values())
    assert adv["results"]["pgd"]["8"] <= adv["results"]["pgd"]["1"]


def test_eval_robust_attack_numbers_are_the_attack_s_and_repeat(trained_run, tmp_path):
    """FGSM's top-1 equals attacking each test image by hand with the same function; PGD's random
    starts are seeded, so a second run gives the same numbers."""
    from finegrain.checkpoint import resolve_checkpoint
    from finegrain.data.base import open_dataset
    from finegrain.eval.robustness import _CorruptedDataset, robustness_eval
    from finegrain.predict import Predictor
    from finegrain.train.adversarial import adversarial_images, fgsm

    result, data = trained_run
    kw = dict(corruptions=[], attacks=["fgsm", "pgd"], epsilons=[4], attack_steps=2, workers=0, device="cpu")
    a = robustness_eval(result.run_dir, data, out_dir=tmp_path / "a", batch_size=4, **kw)["adversarial"]
    b = robustness_eval(result.run_dir, data, out_dir=tmp_path / "b", batch_size=4, **kw)["adversarial"]
    assert a["results"] == b["results"]
    predictor = Predictor.from_checkpoint(resolve_checkpoint(result.run_dir), device="cpu")
    prep = predictor.meta["preprocessing"]
    ds = _CorruptedDataset(open_dataset(data, "test"), prep, None, 0, 0)
    correct = 0
    for i in range(len(ds)):
        item = ds[i]
        x, y = item["image"][None], torch.tensor([item["label"]])
        adv = adversarial_images(predictor.task, x, y, fgsm(4 / 255), mean=prep["mean"], std=prep["std"])
        correct += int(predictor.task.predict(adv).argmax(1).item() == item["label"])
    assert a["results"]["fgsm"]["4"] == pytest.approx(100 * correct / len(ds))


def test_eval_robust_refuses_bad_attack_settings(trained_run):
    from finegrain.eval.robustness import robustness_eval

    result, data = trained_run
    with pytest.raises(ValueError, match="epsilons"):
        robustness_eval(result.run_dir, data, corruptions=[], attacks=["pgd"], epsilons=[0], device="cpu")
    with pytest.raises(ValueError, match="Did you mean 'fgsm'"):
        robustness_eval(result.run_dir, data, corruptions=[], attacks=["fgms"], device="cpu")
