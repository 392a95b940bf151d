"""Attention blocks: shapes, and parity with naive formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from finegrain.models.attention import ATTENTIONS, DeformConvBlock, DualAttention, build_attention


@pytest.mark.parametrize("name", ATTENTIONS.names())
def test_attention_keeps_shape(name):
    x = torch.randn(2, 16, 4, 4)
    y = build_attention(name, 16)(x)
    assert y.shape == x.shape and torch.isfinite(y).all()


def test_dual_attention_starts_as_identity_and_matches_reference():
    block = DualAttention(8)
    x = torch.randn(2, 8, 3, 3)
    torch.testing.assert_close(block(x), x)
    with torch.no_grad():
        block.position.gamma.fill_(0.5)
        block.channel.beta.fill_(0.25)
    # naive per-position / per-channel reference of DANet's two modules
    ref = x.clone()
    for b in range(2):
        flat = x[b].reshape(8, 9)
        q = block.position.query(x[b : b + 1]).reshape(-1, 9)
        k = block.position.key(x[b : b + 1]).reshape(-1, 9)
        v = block.position.value(x[b : b + 1]).reshape(8, 9)
        for i in range(9):
            w = torch.softmax(torch.stack([q[:, i] @ k[:, j] for j in range(9)]), 0)
            ref[b].reshape(8, 9)[:, i] += 0.5 * (v * w).sum(1)
        energy = flat @ flat.T
        attn = torch.softmax(energy.max(1, keepdim=True).values - energy, 1)
        ref[b] += 0.25 * (attn @ flat).reshape(8, 3, 3)
    torch.testing.assert_close(block(x), ref, rtol=1e-4, atol=1e-5)


def test_deform_conv_with_zero_offsets_is_a_plain_conv():
    block = DeformConvBlock(6)
    x = torch.randn(2, 6, 5, 5)
    offsets = torch.zeros(2, 18, 5, 5)
    ref = F.conv2d(x, block.weight, block.bias, padding=1)
    torch.testing.assert_close(block.deform(x, offsets), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(block.offset(x), offsets)  # zero-initialised offset predictor
