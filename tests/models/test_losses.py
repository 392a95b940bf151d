"""Losses against naive loops and hand formulas; the loss-spec parser."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from finegrain.models.losses import LOSSES, BatchHardTripletLoss, CenterLoss, CombinedLoss, FocalLoss, parse_loss_spec


def _call(loss, logits=None, features=None, target=None, labels=None):
    return loss(logits=logits, features=features, target=target, labels=labels)


def test_batch_hard_triplet_matches_python_loop():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(10, 5, generator=g)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 0, 2])
    margin = 0.3
    got = _call(BatchHardTripletLoss(num_classes=4, feat_dim=5, margin=margin), features=feats, labels=labels)
    terms = []
    for a in range(10):
        pos = [float((feats[a] - feats[p]).norm()) for p in range(10) if p != a and labels[p] == labels[a]]
        neg = [float((feats[a] - feats[n]).norm()) for n in range(10) if labels[n] != labels[a]]
        if pos and neg:
            terms.append(max(0.0, margin + max(pos) - min(neg)))
    assert got.item() == pytest.approx(sum(terms) / len(terms), rel=1e-4, abs=1e-5)


def test_triplet_without_positives_is_zero_with_a_gradient():
    feats = torch.randn(3, 4, requires_grad=True)
    loss = _call(BatchHardTripletLoss(num_classes=3, feat_dim=4), features=feats, labels=torch.tensor([0, 1, 2]))
    loss.backward()
    assert loss.item() == 0 and feats.grad is not None


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_focal_with_gamma_zero_is_cross_entropy(smoothing):
    logits, target = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 0])
    focal = FocalLoss(num_classes=5, feat_dim=1, label_smoothing=smoothing, gamma=0.0)
    ref = F.cross_entropy(logits, target, label_smoothing=smoothing)
    torch.testing.assert_close(_call(focal, logits=logits, target=target), ref)
    soft = torch.softmax(torch.randn(6, 5), 1)  # MixUp-style soft targets
    torch.testing.assert_close(_call(focal, logits=logits, target=soft), F.cross_entropy(logits, soft, label_smoothing=smoothing))


def test_focal_matches_its_formula():
    logits, target = torch.randn(4, 3), torch.tensor([2, 0, 1, 1])
    got = _call(FocalLoss(num_classes=3, feat_dim=1, gamma=2.0), logits=logits, target=target)
    p = torch.softmax(logits, 1)[torch.arange(4), target]
    torch.testing.assert_close(got, (-(1 - p) ** 2 * p.log()).mean())


def test_center_loss_matches_hand_formula():
    loss = CenterLoss(num_classes=3, feat_dim=2)
    with torch.no_grad():
        loss.centers.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, -1.0]]))
    feats = torch.tensor([[1.0, 0.0], [1.0, 3.0], [0.0, 0.0]])
    labels = torch.tensor([0, 1, 2])
    # 1/2 * mean(1 + (0 + 4) + (4 + 1)) = 10 / 6
    assert _call(loss, features=feats, labels=labels).item() == pytest.approx(10 / 6)


def test_loss_spec_parsing_and_combination():
    assert parse_loss_spec("ce+center:0.01+triplet") == [("ce", 1.0), ("center", 0.01), ("triplet", 1.0)]
    for bad, match in (("center:0.1", "classification"), ("ce+tripplet", "triplet"), ("ce+center:x", "number"),
                       ("ce+ce", "twice"), ("ce+center:-1", ">= 0")):
        with pytest.raises(ValueError, match=match):
            parse_loss_spec(bad)
    combo = CombinedLoss("ce+focal:0.5+center:0.1", num_classes=3, feat_dim=4)
    logits, feats, y = torch.randn(5, 3), torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    total, parts = combo(logits=logits, features=feats, target=y, labels=y)
    assert set(parts) == {"ce", "focal", "center"}
    torch.testing.assert_close(total, parts["ce"] + 0.5 * parts["focal"] + 0.1 * parts["center"])
    assert set(LOSSES.names()) == {"ce", "focal", "center", "triplet"}
