"""Train and eval transforms, and batch mixing (CutMix / MixUp)."""

import torch

from finegrain.data.transforms import BatchMixer, eval_transform, train_transform


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
