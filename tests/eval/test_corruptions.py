"""Corruption properties: identity at severity 0, determinism, and severity ordering."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from finegrain.eval.corruptions import CORRUPTIONS, PARAMS, corrupt


def _image(size=(64, 48), seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(40, 215, (size[1], size[0], 3), dtype=np.uint8))


@pytest.mark.parametrize("name", CORRUPTIONS.names())
def test_severity_zero_is_identity_and_size_is_kept(name):
    img = _image()
    assert np.array_equal(np.asarray(corrupt(img, name, 0)), np.asarray(img))
    for s in range(1, 6):
        out = corrupt(img, name, s, seed=3)
        assert out.size == img.size and out.mode == "RGB"
        assert np.array_equal(np.asarray(out), np.asarray(corrupt(img, name, s, seed=3)))  # deterministic


@pytest.mark.parametrize("name", CORRUPTIONS.names())
def test_uint8_tensor_in_tensor_out(name):
    t = torch.from_numpy(np.array(_image())).permute(2, 0, 1).contiguous()
    out = corrupt(t, name, 3, seed=1)
    assert out.dtype == torch.uint8 and out.shape == t.shape
    assert torch.equal(out, torch.from_numpy(np.array(corrupt(_image(), name, 3, seed=1))).permute(2, 0, 1))
    assert torch.equal(corrupt(t, name, 0), t)


def test_every_corruption_has_five_severities_and_identity_params_are_identity():
    assert set(PARAMS) == set(CORRUPTIONS.names())
    assert all(len(v) == 5 for v in PARAMS.values())
    img = _image()
    for name, neutral in (("brightness", 1.0), ("contrast", 1.0), ("rotation", 0), ("occlusion", 0.0)):
        old = PARAMS[name]
        PARAMS[name] = (neutral,) * 5
        try:
            out = np.asarray(corrupt(img, name, 1)).astype(int)
            assert np.abs(out - np.asarray(img).astype(int)).max() <= (1 if name == "rotation" else 0)
        finally:
            PARAMS[name] = old


def test_noise_std_grows_with_severity():
    img = Image.new("RGB", (96, 96), (128, 128, 128))
    stds = [float(np.asarray(corrupt(img, "gaussian_noise", s, seed=0), dtype=np.float32).std()) for s in range(1, 6)]
    assert all(a < b for a, b in zip(stds, stds[1:]))
    assert stds[0] == pytest.approx(255 * PARAMS["gaussian_noise"][0], rel=0.1)


def test_blur_and_contrast_reduce_variation_with_severity():
    img = _image((96, 96))
    for name in ("gaussian_blur", "contrast"):
        stds = [float(np.asarray(corrupt(img, name, s), dtype=np.float32).std()) for s in range(0, 6)]
        assert all(a > b for a, b in zip(stds, stds[1:])), name


def test_jpeg_output_decodes_and_gets_worse():
    img = _image((96, 96))
    errs = []
    for s in range(1, 6):
        out = corrupt(img, "jpeg", s)
        buf = io.BytesIO()
        out.save(buf, format="PNG")
        assert Image.open(io.BytesIO(buf.getvalue())).size == img.size
        errs.append(np.abs(np.asarray(out, dtype=float) - np.asarray(img, dtype=float)).mean())
    assert errs[0] < errs[-1]


@pytest.mark.parametrize("severity", [1, 3, 5])
def test_occlusion_covers_the_expected_area(severity):
    img = Image.new("RGB", (100, 100), (0, 0, 0))
    fractions = []
    for seed in range(5):
        out = np.asarray(corrupt(img, "occlusion", severity, seed=seed))
        # noise pixels are almost never exactly black in all three channels
        fractions.append((out.sum(-1) > 0).mean())
    assert np.mean(fractions) == pytest.approx(PARAMS["occlusion"][severity - 1], rel=0.1, abs=0.01)


def test_rotation_keeps_size_and_moves_pixels():
    img = _image((64, 48))
    out = corrupt(img, "rotation", 5, seed=0)
    assert out.size == (64, 48)
    assert (np.asarray(out).sum(-1) == 0).mean() > 0.05  # black corners appear


def test_bad_arguments():
    with pytest.raises(ValueError, match="severity"):
        corrupt(_image(), "jpeg", 6)
    with pytest.raises(ValueError, match="gaussian_noise"):
        corrupt(_image(), "gausian_noise", 1)
    with pytest.raises(TypeError):
        corrupt(torch.zeros(3, 8, 8), "jpeg", 1)
