"""Class weights, and training with class weights and the balanced sampler."""

from __future__ import annotations

import pytest
import torch

from finegrain.train.balance import class_weights
from finegrain.train.run import fit

from ..conftest import make_image_folder, tiny_config


def test_class_weights_formulas():
    counts = torch.tensor([100.0, 10.0, 1.0])
    inv = class_weights(counts, "inverse")
    ref = 1 / counts
    assert torch.allclose(inv, (ref / ref.mean()).float())
    eff = class_weights(counts, "effective", beta=0.99)
    ref = (1 - 0.99) / (1 - 0.99 ** counts)
    assert torch.allclose(eff, (ref / ref.mean()).float())
    assert eff[2] / eff[0] < inv[2] / inv[0]  # effective numbers re-weight less than 1/n
    with pytest.raises(ValueError, match="effective, inverse"):
        class_weights(counts, "sqrt")


def test_balanced_sampler_and_class_weights_train(tmp_path):
    data = make_image_folder(tmp_path / "img", n_train=6)
    cfg = tiny_config(data, tmp_path / "runs", class_weights="effective")
    cfg.data.sampler = "balanced"
    assert fit(cfg).best_checkpoint.is_file()
    cfg = tiny_config(data, tmp_path / "runs2", class_weights="inverse")
    cfg.model.task = "wsdan"
    with pytest.raises(ValueError, match="--class-weights is not supported by --task wsdan"):
        fit(cfg)
