"""The device pipeline: crop boxes match torchvision's distribution, roi_align crops against
reference resizes, decoder fallback, and training through it (on the CPU here)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.stats import ks_2samp
from torchvision import tv_tensors
from torchvision.transforms import v2

from finegrain.data import device as dev
from finegrain.data.device import (
    DeviceAugment,
    DevicePrefetcher,
    center_crop_boxes,
    crop_resize,
    decode_jpegs,
    pad_batch,
    sample_crop_boxes,
)
from finegrain.data.transforms import eval_transform
from finegrain.train.run import fit

from ..conftest import tiny_config


@pytest.mark.parametrize("h,w", [(375, 500), (60, 400)])  # a usual photo, and a strip where the fallback is common
def test_crop_boxes_follow_torchvision_random_resized_crop(h, w):
    n, scale = 3000, (0.25, 1.0)
    torch.manual_seed(0)
    rrc = v2.RandomResizedCrop(224, scale=scale)
    img = tv_tensors.Image(torch.zeros(3, h, w, dtype=torch.uint8))
    ref = [rrc.make_params([img]) for _ in range(n)]
    ref = np.array([[p["left"], p["top"], p["width"], p["height"]] for p in ref], dtype=np.float64)
    ours = sample_crop_boxes(torch.full((n,), h), torch.full((n,), w), scale=scale,
                             generator=torch.Generator().manual_seed(1)).double().numpy()
    for name, f in {"area": lambda b: b[:, 2] * b[:, 3] / (h * w), "log_aspect": lambda b: np.log(b[:, 2] / b[:, 3]),
                    "center_x": lambda b: (b[:, 0] + b[:, 2] / 2) / w, "center_y": lambda b: (b[:, 1] + b[:, 3] / 2) / h}.items():
        p = ks_2samp(f(ref), f(ours)).pvalue
        assert p > 1e-3, (name, p)
    assert (ours[:, 0] >= 0).all() and (ours[:, 0] + ours[:, 2] <= w).all()
    assert (ours[:, 1] >= 0).all() and (ours[:, 1] + ours[:, 3] <= h).all()


def test_crop_resize_identity_and_2x_downscale_are_exact():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 16, 16) * 255
    full = torch.tensor([[0.0, 0.0, 16.0, 16.0]] * 2)
    assert torch.allclose(crop_resize(x, full, 16), x, atol=1e-4)
    assert torch.allclose(crop_resize(x, full, 8), F.avg_pool2d(x, 2), atol=1e-4)
    # a box per image: the second image's crop is its own bottom-right quarter
    boxes = torch.tensor([[0.0, 0.0, 16.0, 16.0], [8.0, 8.0, 8.0, 8.0]])
    out = crop_resize(x, boxes, 8)
    assert torch.allclose(out[1], x[1, :, 8:, 8:], atol=1e-4)


def test_eval_box_matches_resize_and_center_crop():
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 150), torch.linspace(0, 1, 200), indexing="ij")
    smooth = torch.stack([xx, yy, (xx + yy) / 2]) * 255
    pil = Image.fromarray(smooth.permute(1, 2, 0).round().byte().numpy())
    ref = eval_transform(64, mean=(0, 0, 0), std=(1, 1, 1), crop_pct=0.875)(pil) * 255
    box = center_crop_boxes(torch.tensor([150]), torch.tensor([200]), 64, 0.875)
    ours = crop_resize(smooth[None], box, 64)[0]
    # torchvision rounds the crop offset to whole pixels of the resized image (here half a pixel, ~1.3
    # grey levels on this ramp); the device box is exactly centred
    assert (ours - ref).abs().mean() < 2.5
    assert (ours - ref).abs().mean() > 0  # not the same code path


def test_device_augment_output_and_flip():
    torch.manual_seed(0)
    imgs, sizes = pad_batch([torch.randint(0, 256, (3, 40, 60), dtype=torch.uint8),
                             torch.randint(0, 256, (3, 50, 30), dtype=torch.uint8)])
    assert imgs.shape == (2, 3, 50, 60) and sizes.tolist() == [[40, 60], [50, 30]]
    aug = DeviceAugment(32, scale_min=0.5, jitter=0.3, mean=(0.5,) * 3, std=(0.25,) * 3)
    out = aug(imgs, sizes)
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert out.min() >= -2.0 - 1e-5 and out.max() <= 2.0 + 1e-5  # (x - 0.5) / 0.25 for x in [0, 1]


def test_device_augment_flips_about_half_the_images_left_to_right(monkeypatch):
    """With the crop fixed to the whole image and no jitter, each output is the resized image or its mirror."""
    monkeypatch.setattr(dev, "sample_crop_boxes", lambda h, w, scale: torch.stack(
        [torch.zeros_like(h), torch.zeros_like(h), w, h], 1).float())
    ramp = torch.linspace(0, 255, 32).expand(3, 32, 32).round().byte()  # dark left, bright right
    imgs, sizes = pad_batch([ramp.clone() for _ in range(200)])
    torch.manual_seed(0)
    out = DeviceAugment(32, scale_min=1.0, jitter=0.0, mean=(0,) * 3, std=(1 / 255,) * 3)(imgs, sizes)
    plain = ramp.float()
    is_plain = [torch.allclose(o, plain, atol=1e-3) for o in out]
    is_flipped = [torch.allclose(o, plain.flip(2), atol=1e-3) for o in out]
    assert all(a != b for a, b in zip(is_plain, is_flipped))  # exactly one of the two, never anything else
    assert 70 < sum(is_flipped) < 130  # p = 0.5: 200 draws, far outside +-30 happens with probability < 1e-4


def test_device_augment_eval_mode_matches_the_cpu_eval_transform_and_never_flips():
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 90), torch.linspace(0, 1, 120), indexing="ij")
    smooth = (torch.stack([xx, yy, (xx + yy) / 2]) * 255).round().byte()
    pil = Image.fromarray(smooth.permute(1, 2, 0).numpy())
    ref = eval_transform(48, mean=(0, 0, 0), std=(1, 1, 1), crop_pct=0.875)(pil) * 255
    imgs, sizes = pad_batch([smooth] * 16)
    torch.manual_seed(0)
    out = DeviceAugment(48, train=False, crop_pct=0.875, mean=(0,) * 3, std=(1 / 255,) * 3)(imgs, sizes)
    for o in out:  # all 16 the same un-flipped crop, within torchvision's half-pixel offset rounding
        assert (o - ref).abs().mean() < 2.5


def _jpeg(arr: np.ndarray, mode="RGB", fmt="JPEG") -> torch.Tensor:
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, format=fmt)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def test_decoder_falls_back_to_cpu_and_marks_unreadable(monkeypatch):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
    good, cmyk, png = _jpeg(arr), _jpeg(arr, mode="CMYK"), _jpeg(arr, fmt="PNG")
    broken = good[: len(good) // 3].clone()
    ref = torch.from_numpy(np.array(Image.open(io.BytesIO(good.numpy().tobytes())).convert("RGB"))).permute(2, 0, 1)

    real = dev.decode_jpeg
    calls = []

    def picky_device_decoder(data, mode, device):  # refuses batches and CMYK files, as nvJPEG may
        calls.append(type(data).__name__)
        if isinstance(data, list) or data is cmyk:
            raise RuntimeError("nvjpeg: unsupported")
        return real(data, mode=mode, device=device)

    monkeypatch.setattr(dev, "decode_jpeg", picky_device_decoder)
    out = decode_jpegs([good, cmyk, png, broken], torch.device("cpu"))
    assert calls[0] == "list"  # the batch was tried first
    assert torch.equal(out[0], ref)
    assert out[1] is not None and out[1].shape == (3, 24, 32)  # CMYK via the CPU decoder
    assert out[2] is not None and torch.equal(out[2], torch.from_numpy(arr).permute(2, 0, 1))  # PNG, lossless
    assert out[3] is None


def test_prefetcher_on_cpu_prepares_in_order():
    batches = [{"x": torch.tensor([i])} for i in range(4)]
    out = list(DevicePrefetcher(batches, torch.device("cpu"), lambda b: {"x": b["x"] * 10}))
    assert [b["x"].item() for b in out] == [0, 10, 20, 30]


@pytest.mark.parametrize("cache", [False, True])
def test_training_through_the_device_pipeline(image_folder, tmp_path, cache):
    cfg = tiny_config(image_folder, tmp_path / "runs")
    cfg.data.pipeline, cfg.data.cache, cfg.data.cache_dir, cfg.data.augment = "device", cache, str(tmp_path / "c"), "colorjitter"
    (image_folder / "train" / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    result = fit(cfg)
    assert result.best_checkpoint.is_file()
    assert "broken.jpg" in (result.run_dir / "skipped_images.txt").read_text()


def test_device_pipeline_refuses_cpu_only_augmentations(image_folder, tmp_path):
    cfg = tiny_config(image_folder, tmp_path / "runs")
    cfg.data.pipeline, cfg.data.augment = "device", "randaugment"
    with pytest.raises(ValueError, match="--pipeline cpu"):
        fit(cfg)


def test_evaluate_through_the_device_pipeline_agrees_with_cpu(trained_run, tmp_path):
    from finegrain.eval.evaluate import evaluate

    result, data = trained_run
    cpu = evaluate(result.best_checkpoint, data, workers=0, device="cpu", out_dir=tmp_path / "a")
    on_device = evaluate(result.best_checkpoint, data, workers=0, device="cpu", out_dir=tmp_path / "b", pipeline="device")
    assert on_device["pipeline"] == "device" and on_device["n"] == cpu["n"]
    assert abs(on_device["top1"] - cpu["top1"]) <= 100 / cpu["n"] + 1e-9  # at most one image flips
