"""RA-CNN: the ranking loss, variants, and the crops of the attention proposal network."""

from __future__ import annotations

import pytest
import torch

from finegrain.models.backbone import create_backbone
from finegrain.tasks import build_task
from finegrain.tasks.racnn import ranking_loss

from ..helpers import _train_step_and_roundtrip


def test_ranking_loss_matches_the_hand_formula():
    p = [torch.tensor([0.9, 0.2, 0.5]), torch.tensor([0.7, 0.6, 0.5]), torch.tensor([0.1, 0.9, 0.56])]
    m = 0.05
    hand = 0.0
    for s in range(2):
        hand += sum(max(0.0, float(p[s][i] - p[s + 1][i]) + m) for i in range(3)) / 3
    assert ranking_loss(p, m).item() == pytest.approx(hand, abs=1e-6)


@pytest.mark.parametrize("kw", [{"scales": 2}, {"scales": 3, "shared_backbone": False}])
def test_racnn_variants(kw, tmp_path):
    task, out = _train_step_and_roundtrip("test_efficientnet", "racnn", tmp_path, **kw)
    assert {f"ce_{s + 1}" for s in range(kw["scales"])} <= set(out) and "rank" in out
    assert len(task.classifiers) == kw["scales"] and len(task.apns) == kw["scales"] - 1
    if not kw.get("shared_backbone", True):  # the copies start pretrained: backbone learning rate
        assert not any(n.startswith("extra_backbones.") for n in task.new_parameter_names())


def test_racnn_crops_zoom_into_the_proposed_square():
    task = build_task("racnn", create_backbone("test_resnet", num_classes=3), 3, scales=2).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits, inputs, boxes = task.scale_outputs(images)
    assert len(logits) == 2 and inputs[1].shape == images.shape
    side = boxes[0][:, 2] - boxes[0][:, 0]
    torch.testing.assert_close(side, boxes[0][:, 3] - boxes[0][:, 1])  # squares
    assert ((side >= 2 / 3 - 1e-6) & (side <= 1)).all()  # the paper's half-side tl >= 1/3 of the side
    torch.testing.assert_close(task.predict(images), torch.stack(logits).mean(0))


def test_racnn_loss_is_the_sum_of_the_scales_cross_entropies_plus_the_ranking_loss():
    """The paper's Eq. 6, computed from the per-scale logits by hand."""
    torch.manual_seed(0)
    task = build_task("racnn", create_backbone("test_resnet", num_classes=3, pretrained="none"), 3, scales=3,
                      rank_weight=0.7).eval()  # eval: BN uses running stats, so both passes see the same numbers
    images, labels = torch.randn(4, 3, 64, 64), torch.tensor([0, 2, 1, 2])
    out = task({"image": images, "label": labels})
    logits = task.scale_outputs(images)[0]
    ce = sum(torch.nn.functional.cross_entropy(lg, labels) for lg in logits)
    p = [torch.softmax(lg, 1)[torch.arange(4), labels] for lg in logits]
    rank = sum(ranking_loss([p[s], p[s + 1]], 0.05) for s in range(2))
    torch.testing.assert_close(out["loss"], ce + 0.7 * rank)
    assert task.args["min_side"] == pytest.approx(2 / 3)
