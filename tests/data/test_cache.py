import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from finegrain.data.base import open_dataset
from finegrain.data.cache import CachedImageDataset, cache_key, open_or_build_cache
from finegrain.data.dataset import collate


@pytest.fixture
def big_images(tmp_path):
    from tests.conftest import make_image_folder

    return make_image_folder(tmp_path / "imgs", n_train=4, n_test=1, size=80)


def test_cache_stores_resized_pixels(big_images, tmp_path):
    images = open_dataset(big_images, "train")
    cache = open_or_build_cache(images, tmp_path / "cache", short_side=40)
    assert len(cache) == len(images) and cache.verify() is None
    x = cache.get(0)
    assert x.dtype == torch.uint8 and x.shape == (3, 40, 40)
    ref = np.asarray(Image.open(images.paths[0]).convert("RGB").resize((40, 40), Image.BICUBIC)).astype(int)
    # JPEG draft decoding + resize differ slightly from a full decode + resize, not more
    assert np.abs(x.permute(1, 2, 0).numpy().astype(int) - ref).mean() < 6


def test_cache_is_reused_and_keyed_by_data_and_size(big_images, tmp_path):
    images = open_dataset(big_images, "train")
    a = open_or_build_cache(images, tmp_path / "cache", short_side=40)
    stamp = (a.folder / "data.u8").stat().st_mtime_ns
    b = open_or_build_cache(images, tmp_path / "cache", short_side=40)
    assert b.folder == a.folder and (b.folder / "data.u8").stat().st_mtime_ns == stamp
    assert cache_key(images, 48) != cache_key(images, 40)
    Image.new("RGB", (80, 80), (1, 2, 3)).save(images.paths[0])  # the data changed
    assert cache_key(images, 40) != a.folder.name


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_cache_is_detected_and_rebuilt(big_images, tmp_path, damage):
    images = open_dataset(big_images, "train")
    cache = open_or_build_cache(images, tmp_path / "cache", short_side=40)
    data = cache.folder / "data.u8"
    raw = bytearray(data.read_bytes())
    if damage == "truncate":
        data.write_bytes(bytes(raw[: len(raw) // 2]))
    else:
        raw[len(raw) // 2] ^= 0xFF
        data.write_bytes(bytes(raw))
    assert cache.__class__(cache.folder).verify() is not None
    rebuilt = open_or_build_cache(images, tmp_path / "cache", short_side=40)
    fresh = open_or_build_cache(images, tmp_path / "fresh", short_side=40)
    assert rebuilt.verify() is None
    assert (rebuilt.folder / "data.u8").read_bytes() == (fresh.folder / "data.u8").read_bytes()


def test_unreadable_image_becomes_a_skipped_item(big_images, tmp_path):
    bad = big_images / "train" / "red" / "zz_bad.jpg"
    bad.write_bytes(b"broken")
    images = open_dataset(big_images, "train")
    cache = open_or_build_cache(images, tmp_path / "cache", short_side=40)
    ds = CachedImageDataset(cache, images.labels, v2.RandomResizedCrop(32, antialias=True))
    batch = collate([ds[i] for i in range(len(ds))])
    assert [p for p, _ in batch["skipped"]] == [str(bad.resolve())]
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape[1:] == (3, 32, 32)


def test_not_enough_disk_space_says_how_much_and_where(big_images, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10, 10, 0))
    with pytest.raises(OSError, match=r"needs about .* GiB .* free"):
        open_or_build_cache(open_dataset(big_images, "train"), tmp_path / "cache", short_side=40)


def test_crop_boxes_have_the_same_distribution_on_cached_images():
    """RandomResizedCrop draws boxes relative to the image, so the resized cache keeps the distribution."""
    rrc = v2.RandomResizedCrop(224, scale=(0.25, 1.0))

    def boxes(h, w, seed):
        torch.manual_seed(seed)
        out = []
        for _ in range(4000):
            p = rrc.make_params([torch.empty(3, h, w)])
            out.append([p["left"] / w, p["top"] / h, p["width"] / w, p["height"] / h])
        return torch.tensor(out)

    original, cached = boxes(375, 500, 0), boxes(258, 344, 1)  # a 500x375 photo and its 1.15x224 short-side copy
    assert torch.allclose(original.mean(0), cached.mean(0), atol=0.01)
    assert torch.allclose(original.std(0), cached.std(0), atol=0.01)


def test_fit_with_cache(image_folder, tmp_path):
    from finegrain.train.run import fit
    from tests.conftest import tiny_config

    cfg = tiny_config(image_folder, tmp_path / "runs")
    cfg.data.cache, cfg.data.cache_dir = True, str(tmp_path / "cache")
    result = fit(cfg)
    assert (result.run_dir / "best.safetensors").is_file()
    assert any((tmp_path / "cache").iterdir())
