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
    loss = CenterLoss(num_classes=3, feat_dim=2).eval()
    loss.centers.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, -1.0]]))
    feats = torch.tensor([[1.0, 0.0], [1.0, 3.0], [0.0, 0.0]])
    labels = torch.tensor([0, 1, 2])
    # 1/2 * mean(1 + (0 + 4) + (4 + 1)) = 10 / 6
    assert _call(loss, features=feats, labels=labels).item() == pytest.approx(10 / 6)


def test_center_update_is_wen_et_al_rule_with_its_own_alpha():
    """c_j <- c_j - alpha * sum_{y_i = j} (c_j - x_i) / (1 + n_j), by hand; no optimizer involved."""
    loss = CenterLoss(num_classes=3, feat_dim=2, alpha=0.5)
    assert [n for n, _ in loss.named_parameters()] == []  # not in the main optimizer (no lr, no decay)
    loss.centers.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, -1.0]]))
    feats = torch.tensor([[1.0, 0.0], [3.0, 2.0], [1.0, 3.0]], requires_grad=True)
    labels = torch.tensor([0, 0, 1])  # class 2 is absent and must not move
    _call(loss, features=feats, labels=labels).backward()
    # class 0: delta = ((0 - 1) + (0 - 3), (0 - 0) + (0 - 2)) / 3 = (-4/3, -2/3); c = 0 - 0.5 delta
    # class 1: delta = (1 - 1, 1 - 3) / 2 = (0, -1); c = (1, 1) - 0.5 (0, -1) = (1, 1.5)
    expected = torch.tensor([[2 / 3, 1 / 3], [1.0, 1.5], [2.0, -1.0]])
    torch.testing.assert_close(loss.centers, expected)
    loss.eval()
    _call(loss, features=feats.detach(), labels=labels)
    torch.testing.assert_close(loss.centers, expected)  # evaluation leaves them


def test_center_loss_weight_does_not_scale_the_centre_step():
    steps = []
    for w in (0.01, 1.0):
        combo = CombinedLoss(f"ce+center:{w}", num_classes=2, feat_dim=2)
        combo.parts["center"].centers.zero_()
        combo(logits=torch.zeros(2, 2), features=torch.ones(2, 2), target=torch.tensor([0, 0]), labels=torch.tensor([0, 0]))
        steps.append(combo.parts["center"].centers.clone())
    torch.testing.assert_close(steps[0], steps[1])
    torch.testing.assert_close(steps[0][0], torch.full((2,), 0.5 * 2 / 3))


def test_class_sums_all_reduced_over_two_ranks_equal_the_concatenated_batch(monkeypatch):
    """A fake 2-rank all-reduce (adds the other rank's packed sums) gives the 1-process sums of both halves."""
    import torch.distributed as dist

    from finegrain.models.losses import class_sums

    g = torch.Generator().manual_seed(0)
    feats, labels = torch.randn(7, 3, generator=g), torch.tensor([0, 2, 2, 1, 0, 2, 0])
    whole = class_sums(feats, labels, 4)  # no process group: local sums
    other = class_sums(feats[4:], labels[4:], 4)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: t.add_(torch.cat([other[0], other[1][:, None]], 1)))
    reduced = class_sums(feats[:4], labels[:4], 4)
    torch.testing.assert_close(reduced[0], whole[0])
    torch.testing.assert_close(reduced[1], whole[1])
    torch.testing.assert_close(whole[1], torch.tensor([3.0, 1.0, 3.0, 0.0]))


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
