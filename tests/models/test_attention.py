"""Attention blocks: shapes, and parity with naive formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from finegrain.models.attention import ATTENTIONS, DeformConvBlock, DualAttention, attention_channels, build_attention


@pytest.mark.parametrize("name", ATTENTIONS.names())
def test_attention_keeps_the_spatial_shape_and_declares_its_channels(name):
    x = torch.randn(2, 16, 4, 4)
    block = build_attention(name, 16)
    y = block(x)
    assert y.shape == (2, attention_channels(block, 16), 4, 4) and torch.isfinite(y).all()


def test_dual_attention_modules_match_reference():
    """DANet's PAM and CAM against naive per-position / per-channel loops."""
    block = DualAttention(32, inter_channels=8)
    x = torch.randn(2, 8, 3, 3)
    torch.testing.assert_close(block.position(x), x)  # gamma and beta start at 0
    torch.testing.assert_close(block.channel(x), x)
    with torch.no_grad():
        block.position.gamma.fill_(0.5)
        block.channel.beta.fill_(0.25)
    pos, chan = x.clone(), x.clone()
    for b in range(2):
        flat = x[b].reshape(8, 9)
        q = block.position.query(x[b : b + 1]).reshape(-1, 9)
        k = block.position.key(x[b : b + 1]).reshape(-1, 9)
        v = block.position.value(x[b : b + 1]).reshape(8, 9)
        for i in range(9):
            w = torch.softmax(torch.stack([q[:, i] @ k[:, j] for j in range(9)]), 0)
            pos[b].reshape(8, 9)[:, i] += 0.5 * (v * w).sum(1)
        energy = flat @ flat.T
        attn = torch.softmax(energy.max(1, keepdim=True).values - energy, 1)
        chan[b] += 0.25 * (attn @ flat).reshape(8, 3, 3)
    torch.testing.assert_close(block.position(x), pos, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(block.channel(x), chan, rtol=1e-4, atol=1e-5)


def test_dual_attention_head_is_conv_attention_conv_per_branch_then_sum():
    """Fu et al. (DANetHead): 3x3 conv+BN+ReLU before and after each module, branches summed, C // 4 channels."""
    torch.manual_seed(0)
    block = DualAttention(32).eval()
    assert block.out_channels == 8
    with torch.no_grad():
        block.position.gamma.fill_(0.3)
        block.channel.beta.fill_(0.2)
    x = torch.randn(2, 32, 5, 5)

    def cbr(seq, t):  # conv (3x3, no bias) -> BN (eval: running stats) -> ReLU, written out
        conv, bn = seq[0], seq[1]
        assert conv.kernel_size == (3, 3) and conv.bias is None
        t = F.conv2d(t, conv.weight, padding=1)
        t = (t - bn.running_mean[None, :, None, None]) / torch.sqrt(bn.running_var[None, :, None, None] + bn.eps)
        return F.relu(t * bn.weight[None, :, None, None] + bn.bias[None, :, None, None])

    ref = cbr(block.position_out, block.position(cbr(block.position_in, x)))
    ref = ref + cbr(block.channel_out, block.channel(cbr(block.channel_in, x)))
    with torch.no_grad():
        torch.testing.assert_close(block(x), ref, rtol=1e-4, atol=1e-5)


def test_deform_conv_with_zero_offsets_is_a_plain_conv():
    block = DeformConvBlock(6)
    x = torch.randn(2, 6, 5, 5)
    offsets = torch.zeros(2, 18, 5, 5)
    ref = F.conv2d(x, block.weight, block.bias, padding=1)
    torch.testing.assert_close(block.deform(x, offsets), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(block.offset(x), offsets)  # zero-initialised offset predictor
