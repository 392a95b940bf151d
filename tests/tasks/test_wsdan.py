"""WS-DAN: a train step, the centre buffer, bilinear attention pooling, attention crop and drop."""

from __future__ import annotations

import pytest
import torch

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
