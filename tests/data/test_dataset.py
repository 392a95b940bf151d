"""ImageDataset and collate: corrupt images are skipped; boxes and part locations follow the transforms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from finegrain.data.base import ImageList, open_dataset
from finegrain.data.dataset import ImageDataset, check_annotations, collate
from finegrain.data.transforms import eval_transform, train_transform


def test_corrupt_image_is_skipped_not_fatal(image_folder):
    bad = image_folder / "train" / "red" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    images = open_dataset(image_folder, "train")
    ds = ImageDataset(images, eval_transform(32))
    items = [ds[i] for i in range(len(ds))]
    batch = collate(items)
    assert [p for p, _ in batch["skipped"]] == [str(bad.resolve())]
    assert batch["image"].shape[0] == len(images) - 1


# -------------------------------------------------------------------------------------- annotations


def _annotated_list(tmp_path, size=(40, 30), blobs=((10, 12), (35, 25))):
    w, h = size
    arr = np.zeros((h, w, 3), np.uint8)
    for x, y in blobs:
        arr[y, x] = 255
    path = tmp_path / "a.png"  # lossless: the blob stays one pixel
    Image.fromarray(arr).save(path)
    parts = [(i + 1, float(x), float(y), True) for i, (x, y) in enumerate(blobs)] + [(len(blobs) + 1, 0.0, 0.0, False)]
    return ImageList([str(path)], [0], ["a"], boxes=[(4.0, 6.0, 20.0, 12.0)], parts=[parts], source=f"test:{tmp_path}")


def test_box_and_keypoints_follow_crop_flip_and_resize(tmp_path):
    images = _annotated_list(tmp_path)
    t = v2.Compose([v2.ToImage(), v2.CenterCrop((20, 30)), v2.RandomHorizontalFlip(p=1.0), v2.Resize((40, 60)),
                    v2.ToDtype(torch.float32, scale=True)])
    item = ImageDataset(images, t, annotations=("boxes", "parts"))[0]
    # naive: crop offset (5, 5) (top, left), mirror x -> 29 - x (points) / 30 - x (box edges), scale x2, to [0, 1]
    naive_pts = [((29 - (x - 5)) * 2, (y - 5) * 2) for x, y in ((10, 12), (35, 25))]
    expected = torch.tensor([[(naive_pts[0][0] + 0.5) / 60, (naive_pts[0][1] + 0.5) / 40, 1.0],
                             [(naive_pts[1][0] + 0.5) / 60, (naive_pts[1][1] + 0.5) / 40, 0.0],  # cropped away
                             [(29 - (0 - 5)) * 2 / 60 + 0.5 / 60, (0 - 5) * 2 / 40 + 0.5 / 40, 0.0]])  # marked invisible
    torch.testing.assert_close(item["parts"], expected)
    x0, y0, x1, y1 = max(4 - 5, 0), 6 - 5, 24 - 5, 18 - 5  # box clipped to the crop, then mirrored
    torch.testing.assert_close(item["box"], torch.tensor([(30 - x1) * 2 / 60, y0 * 2 / 40, (30 - x0) * 2 / 60, y1 * 2 / 40]))


def test_keypoints_land_on_their_pixel_after_random_resized_crop(tmp_path):
    images = _annotated_list(tmp_path, size=(64, 48), blobs=((20, 30),))
    t = v2.Compose([v2.ToImage(), v2.RandomResizedCrop(48, scale=(0.5, 1.0), antialias=False,
                                                       interpolation=v2.InterpolationMode.NEAREST),
                    v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True)])
    data, checked = ImageDataset(images, t, annotations=("parts",)), 0
    for seed in range(30):
        torch.manual_seed(seed)
        item = data[0]
        x, y, visible = item["parts"][0].tolist()
        bright = item["image"].sum(0)
        if not visible or bright.max() == 0:  # cropped away, or nearest resampling skipped the one-pixel blob
            continue
        row, col = divmod(int(bright.argmax()), bright.shape[1])
        assert abs(x * 48 - (col + 0.5)) <= 1.5 and abs(y * 48 - (row + 0.5)) <= 1.5
        checked += 1
    assert checked >= 5


def test_presets_and_collate_carry_annotations(tmp_path):
    images = _annotated_list(tmp_path)
    for t in (train_transform(32), eval_transform(32)):
        data = ImageDataset(images, t, annotations=("boxes", "parts"))
        batch = collate([data[0], data[0], {"skipped": "x.jpg", "error": "bad"}])
        assert batch["image"].shape == (2, 3, 32, 32) and batch["box"].shape == (2, 4) and batch["parts"].shape == (2, 3, 3)
        assert ((batch["box"] >= 0) & (batch["box"] <= 1)).all() and batch["parts"][:, 2, 2].eq(0).all()
    plain = collate([ImageDataset(images, eval_transform(32))[0]])
    assert "box" not in plain and "parts" not in plain


def test_missing_annotations_and_conflicting_options_are_refused(tmp_path):
    plain = ImageList(["a.jpg"], [0], ["a"], source=f"cub:{tmp_path}")
    with pytest.raises(FileNotFoundError, match="bounding_boxes.txt"):
        check_annotations(plain, ("boxes",), task="parts")
    with pytest.raises(FileNotFoundError, match=r"parts/part_locs\.txt"):
        check_annotations(ImageList(["a.jpg"], [0], ["a"], boxes=[None]), ("boxes", "parts"), task="parts")
    full = _annotated_list(tmp_path)
    for kw, flag in (({"cache": True}, "drop --cache"), ({"mixing": True}, "drop --cutmix"),
                     ({"augment": "randaugment"}, "drop --augment"), ({"pipeline": "device"}, "--pipeline cpu")):
        with pytest.raises(ValueError, match=flag):
            check_annotations(full, ("parts",), task="parts", **kw)
    check_annotations(full, ("boxes", "parts"), task="parts", augment="colorjitter")
    check_annotations(plain, (), cache=True)  # nothing needed, nothing refused
