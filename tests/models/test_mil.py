"""Attention-based MIL pooling against the paper's formula."""

from __future__ import annotations

import itertools

import pytest
import torch

from finegrain.models.mil import AttentionMILPool


@pytest.mark.parametrize("gated", [True, False])
def test_mil_pool_matches_a_loop_and_ignores_order(gated):
    torch.manual_seed(0)
    pool = AttentionMILPool(6, hidden=5, gated=gated)
    bags = torch.randn(2, 4, 6)
    out = pool(bags)
    for b in range(2):  # the paper's formula, instance by instance
        scores = []
        for h in bags[b]:
            a = torch.tanh(pool.V(h))
            if gated:
                a = a * torch.sigmoid(pool.U(h))
            scores.append(pool.w(a))
        weights = torch.softmax(torch.cat(scores), 0)
        torch.testing.assert_close(out[b], sum(w * h for w, h in zip(weights, bags[b])))
    for perm in itertools.islice(itertools.permutations(range(4)), 1, 6):
        torch.testing.assert_close(pool(bags[:, list(perm)]), out)
    mask = torch.tensor([[True, True, False, False]] * 2)  # masked instances do not count
    torch.testing.assert_close(pool(bags, mask), pool(bags[:, :2]))
