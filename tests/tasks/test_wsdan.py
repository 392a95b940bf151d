"""WS-DAN: a train step, the centre buffer, bilinear attention pooling, attention crop and drop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from finegrain.models.backbone import create_backbone
from finegrain.tasks import build_task
from finegrain.tasks.wsdan import attention_crop, attention_drop, bilinear_attention_pooling

from ..helpers import BACKBONES, _batch, _train_step_and_roundtrip


@pytest.mark.parametrize("backbone", BACKBONES)
def test_wsdan(backbone, tmp_path):
    task, out = _train_step_and_roundtrip(backbone, "wsdan", tmp_path, num_parts=4)
    assert {"ce_raw", "ce_crop", "ce_drop", "center"} <= set(out)
    assert task.feature_center.abs().sum() > 0  # the momentum update ran
    assert set(task.new_parameter_names()) >= {"attention.0.weight", "classifier.weight"}


def test_wsdan_center_buffer_is_not_updated_in_eval():
    task = build_task("wsdan", create_backbone("test_resnet", num_classes=3, pretrained="none"), 3, num_parts=2)
    task.eval()
    task(_batch())
    assert task.feature_center.abs().sum() == 0


def test_bap_matches_einsum_reference():
    feats, maps = torch.randn(2, 5, 3, 4), torch.rand(2, 6, 3, 4)
    ref = torch.einsum("imjk,injk->imn", maps, feats) / 12
    ref = ref.reshape(2, -1)
    ref = torch.nn.functional.normalize(torch.sign(ref) * torch.sqrt(ref.abs() + 1e-8), dim=-1)
    torch.testing.assert_close(bilinear_attention_pooling(feats, maps), ref)


def test_attention_crop_and_drop_follow_the_map():
    images = torch.arange(16.0).view(1, 1, 4, 4).expand(1, 3, 4, 4).contiguous()
    peak = torch.zeros(1, 1, 4, 4)
    peak[0, 0, 0, 0] = 1.0  # attention only in the top-left corner
    crop = attention_crop(images, peak, torch.tensor([0.9]), padding_ratio=0.0)
    torch.testing.assert_close(crop, torch.zeros_like(images))  # zoomed onto pixel (0, 0), value 0
    dropped = attention_drop(images + 1, peak, torch.tensor([0.9]))
    assert dropped[0, 0, 0, 0] == 0 and (dropped[0, 0].flatten()[1:] > 0).all()


def _crop_by_slicing(images, maps, theta, padding_ratio):
    """The crop as the WS-DAN authors write it: a box per image, sliced and resized on its own."""
    b, _, hh, ww = images.shape
    up = F.interpolate(maps.float(), size=(hh, ww), mode="bilinear", align_corners=True)[:, 0]
    out = []
    for i in range(b):
        mask = up[i] >= theta[i] * up[i].max()
        rows, cols = torch.nonzero(mask.any(1)).flatten(), torch.nonzero(mask.any(0)).flatten()
        ph, pw = int(padding_ratio * hh), int(padding_ratio * ww)
        r0, r1 = max(int(rows.min()) - ph, 0), min(int(rows.max()) + 1 + ph, hh)
        c0, c1 = max(int(cols.min()) - pw, 0), min(int(cols.max()) + 1 + pw, ww)
        out.append(F.interpolate(images[i : i + 1, :, r0:r1, c0:c1], size=(hh, ww), mode="bilinear", align_corners=True))
    return torch.cat(out)


def test_batched_attention_crop_equals_cropping_each_image_by_slicing():
    g = torch.Generator().manual_seed(3)
    images = torch.randn(5, 3, 40, 36, generator=g)
    maps = torch.rand(5, 1, 7, 6, generator=g) ** 4  # peaked maps: boxes of different sizes and places
    theta = torch.tensor([0.2, 0.5, 0.8, 1.0, 0.0])
    torch.testing.assert_close(attention_crop(images, maps, theta, 0.1), _crop_by_slicing(images, maps, theta, 0.1),
                               atol=1e-5, rtol=1e-5)


def test_center_update_moves_each_class_once_by_the_mean_of_its_images():
    """Naive reference: for each class in the batch, ``c += beta (mean of its f - normalize(c))``."""
    task = build_task("wsdan", create_backbone("test_resnet", num_classes=3, pretrained="none"), 3, num_parts=2,
                      center_momentum=0.1)
    g = torch.Generator().manual_seed(0)
    task.feature_center.copy_(torch.randn(task.feature_center.shape, generator=g))
    before = task.feature_center.clone()
    feats = torch.randn(5, before.shape[1], generator=g)
    labels = torch.tensor([2, 0, 2, 2, 0])  # class 1 absent: its centre must not move
    task.update_centers(feats, labels)
    expected = before.clone()
    for c in (0, 2):
        mine = feats[labels == c]
        expected[c] = before[c] + 0.1 * (mine.mean(0) - F.normalize(before[c], dim=0))
    torch.testing.assert_close(task.feature_center, expected)


def test_center_update_under_ddp_equals_the_update_on_all_ranks_images(monkeypatch):
    """Rank 0's update, with a fake all-reduce adding rank 1's sums, is the 1-process update on both batches."""
    import torch.distributed as dist

    from finegrain.models.losses import class_sums

    def build():
        torch.manual_seed(0)
        return build_task("wsdan", create_backbone("test_resnet", num_classes=3, pretrained="none"), 3, num_parts=2,
                          center_momentum=0.1)

    g = torch.Generator().manual_seed(1)
    single, rank0 = build(), build()
    start = torch.randn(single.feature_center.shape, generator=g)
    single.feature_center.copy_(start)
    rank0.feature_center.copy_(start)
    feats = torch.randn(6, start.shape[1], generator=g)
    labels = torch.tensor([0, 2, 0, 2, 2, 1])  # rank 0 holds no image of class 1, rank 1 holds it
    single.update_centers(feats, labels)
    other = class_sums(feats[3:], labels[3:], 3)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: t.add_(torch.cat([other[0], other[1][:, None]], 1)))
    rank0.update_centers(feats[:3], labels[:3])
    torch.testing.assert_close(rank0.feature_center, single.feature_center)
    assert not torch.equal(single.feature_center[1], start[1])
