"""The supervised task's loss: class-weighted soft cross-entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from finegrain.tasks.supervised import soft_cross_entropy


def test_weighted_cross_entropy_matches_torch_and_a_naive_loop():
    torch.manual_seed(0)
    logits, target = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 1, 1])
    w = torch.tensor([0.5, 2.0, 1.0, 3.0])
    assert torch.allclose(soft_cross_entropy(logits, target, 0.0, w), F.cross_entropy(logits, target, weight=w))
    soft = torch.softmax(torch.randn(6, 4), 1)
    num = den = 0.0
    for i in range(6):  # naive: per image and class
        for c in range(4):
            t = soft[i, c] * 0.9 + 0.1 / 4
            num -= w[c] * t * torch.log_softmax(logits[i], 0)[c]
            den += w[c] * t
    assert torch.allclose(soft_cross_entropy(logits, soft, 0.1, w), num / den, atol=1e-6)
    assert torch.allclose(soft_cross_entropy(logits, soft, 0.1, torch.ones(4)), soft_cross_entropy(logits, soft, 0.1))
