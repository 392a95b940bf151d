"""Localization scores: pointing game, energy in the box, boxes mapped through the eval transform."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from finegrain.explain.score import crop_geometry, energy_in_box, localization_scores, map_box, pointing_game

from ..helpers import make_explain_checkpoint as make_checkpoint


def test_pointing_game_and_energy_on_a_hand_built_map():
    heat = np.zeros((10, 10), dtype=np.float32)
    heat[2, 3] = 1.0
    heat[7, 7] = 0.5
    heat[8, 8] = 0.5
    assert pointing_game(heat, (2, 1, 5, 4))  # peak pixel (row 2, col 3) has centre (3.5, 2.5)
    assert not pointing_game(heat, (6, 6, 10, 10))
    assert pointing_game(heat, (5, 4, 10, 10), tolerance=2.0)  # within 2 px of the box
    assert energy_in_box(heat, (2, 1, 5, 4)) == pytest.approx(0.5)
    assert energy_in_box(heat, (0, 0, 10, 10)) == pytest.approx(1.0)
    assert energy_in_box(np.zeros((4, 4)), (0, 0, 4, 4)) == 0.0
    assert not pointing_game(np.zeros((4, 4)), (0, 0, 4, 4))  # no evidence is not a hit


@pytest.mark.parametrize("size", [(120, 80), (80, 130), (100, 100)])
def test_map_box_follows_the_eval_transform(size):
    """Draw the box on an image, run the real eval transform, and find it where map_box says."""
    from finegrain.data.transforms import eval_transform

    prep = {"img_size": 64, "crop_pct": 0.875, "interpolation": "bilinear", "mean": [0, 0, 0], "std": [1, 1, 1]}
    box = (size[0] * 0.3, size[1] * 0.35, size[0] * 0.3, size[1] * 0.25)
    img = Image.new("RGB", size)
    ImageDraw.Draw(img).rectangle([box[0], box[1], box[0] + box[2] - 1, box[1] + box[3] - 1], fill=(255, 255, 255))
    t = eval_transform(64, mean=prep["mean"], std=prep["std"], crop_pct=prep["crop_pct"])(img)
    assert t.shape[-2:] == (64, 64)
    ys, xs = np.nonzero(t[0].numpy() > 0.5)
    x0, y0, x1, y1 = map_box(box, size, prep)
    assert abs(xs.min() - x0) <= 1.5 and abs(xs.max() + 1 - x1) <= 1.5
    assert abs(ys.min() - y0) <= 1.5 and abs(ys.max() + 1 - y1) <= 1.5
    assert crop_geometry(size, prep)[-1] == 64


def test_map_box_outside_the_crop_is_empty():
    prep = {"img_size": 64, "crop_pct": 0.875}
    x0, y0, x1, y1 = map_box((0, 0, 10, 10), (300, 100), prep)  # left edge is cropped away
    assert x1 <= x0


def test_localization_scores_per_class(tmp_path):
    from finegrain.data.base import ImageList
    from finegrain.predict import Predictor

    ckpt = make_checkpoint(tmp_path / "m.safetensors", "test_resnet", img_size=64)
    p = Predictor.from_checkpoint(ckpt, device="cpu")
    paths = []
    for i in range(4):
        f = tmp_path / f"{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (73, 73, 3), dtype=np.uint8)).save(f)
        paths.append(str(f))
    full = (0.0, 0.0, 73.0, 73.0)
    images = ImageList(paths, [0, 1, 2, 0], ["blue", "green", "red"], boxes=[full, full, None, full])
    r = localization_scores(p, images)
    # the box is the whole image: every non-empty map scores 1 on both, an all-zero map 0 on both
    assert r["n"] == 3 and r["mean_energy"] == pytest.approx(r["pointing_acc"] / 100)
    assert set(r["per_class"]) == {"blue", "green"} and r["per_class"]["blue"]["n"] == 2
    with pytest.raises(ValueError, match="bounding boxes"):
        localization_scores(p, ImageList(paths, [0, 1, 2, 0], ["blue", "green", "red"]))
