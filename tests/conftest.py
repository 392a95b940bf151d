"""Shared fixtures: tiny generated image sets and a tiny trained checkpoint (CPU, seconds)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

COLORS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (50, 60, 210)}


def make_image_folder(root: Path, n_train: int = 8, n_test: int = 3, size: int = 40, seed: int = 0) -> Path:
    """``root/train/<class>/*.jpg`` and ``root/test/<class>/*.jpg`` of noisy single-colour images."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for name, rgb in COLORS.items():
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = np.clip(np.array(rgb) + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(d / f"{name}_{i}.jpg", quality=90)
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "images")


def tiny_config(data: Path, out: Path, **train):
    from finegrain.config import DataConfig, ModelConfig, RunConfig, TrainConfig

    t = dict(epochs=1, lr=3e-3, warmup_epochs=0.0, out=str(out), name="run", seed=0, device="cpu")
    t.update(train)
    return RunConfig(
        DataConfig(data=str(data), img_size=32, batch_size=8, workers=0, val_fraction=0.25),
        ModelConfig(backbone="test_resnet", pretrained="none"),
        TrainConfig(**t),
    )


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A run folder trained for 2 epochs on the generated colours (shared by read-only tests)."""
    from finegrain.train.run import fit

    tmp = tmp_path_factory.mktemp("trained")
    data = make_image_folder(tmp / "images")
    result = fit(tiny_config(data, tmp / "runs", epochs=2))
    return result, data
