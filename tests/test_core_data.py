import torch

from finegrain.data.base import open_dataset
from finegrain.data.dataset import ImageDataset, collate
from finegrain.data.split import stratified_split
from finegrain.data.transforms import BatchMixer, eval_transform, train_transform


def test_stratified_split_per_class_fraction_disjoint_and_seeded():
    labels = [0] * 20 + [1] * 10 + [2] * 3 + [3] * 1
    tr, va = stratified_split(labels, 0.1, seed=1)
    assert not set(tr) & set(va)
    assert sorted(tr + va) == list(range(len(labels)))
    val_counts = [sum(1 for i in va if labels[i] == c) for c in range(4)]
    assert val_counts == [2, 1, 1, 0]  # round(10%), at least one, none from a single-image class
    assert stratified_split(labels, 0.1, seed=1) == (tr, va)
    assert stratified_split(labels, 0.1, seed=2)[1] != va


def test_split_zero_fraction_keeps_everything_in_train():
    tr, va = stratified_split([0, 1, 1], 0.0, seed=0)
    assert tr == [0, 1, 2] and va == []


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


def test_corrupt_image_is_skipped_not_fatal(image_folder):
    bad = image_folder / "train" / "red" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    images = open_dataset(image_folder, "train")
    ds = ImageDataset(images, eval_transform(32))
    items = [ds[i] for i in range(len(ds))]
    batch = collate(items)
    assert [p for p, _ in batch["skipped"]] == [str(bad.resolve())]
    assert batch["image"].shape[0] == len(images) - 1
