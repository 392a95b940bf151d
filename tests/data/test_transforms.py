"""Train and eval transforms, and batch mixing (CutMix / MixUp)."""

import pytest
import torch

from finegrain.data.transforms import BatchEraser, BatchMixer, eval_transform, train_transform


def test_train_and_eval_transforms(image_folder):
    from PIL import Image

    img = Image.open(next((image_folder / "train" / "red").iterdir())).convert("RGB")
    t = train_transform(32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), augment="randaugment")
    x = t(img)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    e = eval_transform(32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=0.875)
    a, b = e(img), e(img)
    assert torch.equal(a, b) and a.shape == (3, 32, 32)
    # normalisation: a mid-grey image maps to ~0 with mean = std = 0.5
    grey = e(Image.new("RGB", (40, 40), (128, 128, 128)))
    assert grey.abs().max() < 0.01


def test_eval_transform_geometry_resize_then_center_crop():
    from PIL import Image

    # left half black, right half white, 100x50: resize short side to 64/0.5=128 -> 256x128, crop 64 centre
    img = Image.new("RGB", (100, 50), (0, 0, 0))
    img.paste((255, 255, 255), (50, 0, 100, 50))
    x = eval_transform(64, mean=(0, 0, 0), std=(1, 1, 1), crop_pct=0.5)(img)
    assert x.shape == (3, 64, 64)
    assert x[:, :, :28].max() < 0.05 and x[:, :, 36:].min() > 0.95


def test_batch_mixer_soft_targets():
    torch.manual_seed(0)
    images, labels = torch.randn(8, 3, 16, 16), torch.arange(8) % 4
    mixer = BatchMixer(4, cutmix=1.0, mixup=0.2, prob=1.0)
    mixed, target = mixer(images, labels)
    assert mixed.shape == images.shape and target.shape == (8, 4)
    assert torch.allclose(target.sum(1), torch.ones(8))
    plain = BatchMixer(4)
    assert not plain.active
    same, onehot = plain(images, labels)
    assert torch.equal(same, images) and torch.equal(onehot.argmax(1), labels)


def _erased_box(before: torch.Tensor, after: torch.Tensor):
    """The rows and columns of the one rectangle that changed (None if nothing did); asserts it is a full rectangle."""
    changed = (before != after).any(0)
    if not changed.any():
        return None
    rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
    top, bottom, left, right = rows.min().item(), rows.max().item() + 1, cols.min().item(), cols.max().item() + 1
    assert changed[top:bottom, left:right].all() and changed.sum() == (bottom - top) * (right - left)  # one solid rectangle
    return top, bottom, left, right


def test_batch_eraser_erases_one_noise_rectangle_per_image_as_the_paper_sets_it():
    """Zhong et al.: area 2-33% of the image, aspect 0.3-3.3, noise values; each image on its own coin, layout kept."""
    torch.manual_seed(0)
    images = torch.zeros(400, 3, 40, 40).contiguous(memory_format=torch.channels_last)
    out = BatchEraser(1.0)(images.clone())
    assert out.is_contiguous(memory_format=torch.channels_last)
    boxes = [_erased_box(images[i], out[i]) for i in range(len(out))]
    assert sum(b is not None for b in boxes) >= 390  # torchvision gives up after 10 draws that do not fit
    areas, noise = [], []
    for i, b in enumerate(boxes):
        if b is None:
            continue
        top, bottom, left, right = b
        h, w = bottom - top, right - left
        areas.append(h * w / 1600)
        assert 0.3 * 0.8 <= w / h <= 3.3 / 0.8  # the drawn ratio, up to rounding to whole pixels
        noise.append(out[i, :, top:bottom, left:right].flatten())
    assert 0.02 * 0.8 <= min(areas) and max(areas) <= 1 / 3 * 1.15 and 0.1 < sum(areas) / len(areas) < 0.25
    values = torch.cat(noise)
    assert abs(values.mean().item()) < 0.02 and abs(values.std().item() - 1.0) < 0.02  # per-pixel N(0, 1) noise
    assert len({b for b in boxes if b is not None}) > 300  # each image draws its own rectangle


def test_batch_eraser_probability_and_reproducibility():
    images = torch.zeros(1000, 3, 16, 16)
    torch.manual_seed(1)
    half = BatchEraser(0.5)(images.clone())
    erased = sum(_erased_box(images[i], half[i]) is not None for i in range(1000))
    assert 440 <= erased <= 560  # Binomial(1000, ~0.5 x the fit rate): far outside +-4 sd otherwise
    torch.manual_seed(1)
    assert torch.equal(BatchEraser(0.5)(images.clone()), half)  # torch's generator: a resumed run repeats it
    off = BatchEraser(0.0)
    assert not off.active and torch.equal(off(images.clone()), images)


def test_random_erase_flag_is_checked_and_reaches_the_training_step(image_folder, tmp_path, monkeypatch):
    from finegrain.config import DataConfig
    from finegrain.train import trainer
    from finegrain.train.run import fit

    from ..conftest import tiny_config

    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="--random-erase"):
            DataConfig(data="x", random_erase=bad).check()
    seen = []
    real = trainer.train_one_epoch
    monkeypatch.setattr(trainer, "train_one_epoch", lambda *a, **kw: (seen.append(kw["eraser"]), real(*a, **kw))[1])
    cfg = tiny_config(image_folder, tmp_path)
    cfg.data.random_erase = 0.25
    fit(cfg)
    assert seen and seen[0].active and seen[0].prob == 0.25
