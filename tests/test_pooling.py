"""Poolings and attention blocks: shapes, and parity with naive formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from finegrain.models.attention import ATTENTIONS, DeformConvBlock, DualAttention, build_attention
from finegrain.models.pooling import POOLINGS, CompactBilinearPool, build_pooling, signed_sqrt


@pytest.mark.parametrize("name", POOLINGS.names())
def test_pooling_shapes(name):
    pool = build_pooling(name, 8, dim=64)
    y = pool(torch.randn(3, 8, 4, 5))
    assert y.shape == (3, pool.out_dim) and torch.isfinite(y).all()


def test_bilinear_matches_naive_outer_products():
    x = torch.randn(2, 4, 3, 3)
    y = build_pooling("bilinear", 4)(x)
    for b in range(2):
        acc = torch.zeros(4, 4)
        for i in range(3):
            for j in range(3):
                v = x[b, :, i, j]
                acc += torch.outer(v, v)
        ref = F.normalize(signed_sqrt(acc.flatten() / 9), dim=0)
        torch.testing.assert_close(y[b], ref, rtol=1e-5, atol=1e-6)


def test_compact_bilinear_approximates_the_polynomial_kernel():
    """<TS(x), TS(y)> estimates <B(x), B(y)> (B: the full bilinear vector); averaged over seeds."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(1, 16, 3, 3, generator=g), torch.rand(1, 16, 3, 3, generator=g)

    def full(t):
        flat = t.reshape(16, 9)
        return (flat @ flat.T / 9).flatten()

    exact = torch.dot(full(x), full(y))
    est = torch.stack([
        torch.dot(*(CompactBilinearPool(16, dim=4096, normalize=False, seed=s)(t)[0] for t in (x, y)))
        for s in range(8)
    ]).mean()
    assert abs(est - exact) / exact < 0.05
    # a single location: the second-order polynomial kernel <x, y>^2
    u, v = torch.randn(1, 16, 1, 1, generator=g), torch.randn(1, 16, 1, 1, generator=g)
    kern = torch.dot(u.flatten(), v.flatten()) ** 2
    norm = u.flatten().norm() ** 2 * v.flatten().norm() ** 2
    est = torch.stack([
        torch.dot(*(CompactBilinearPool(16, dim=4096, normalize=False, seed=s)(t)[0] for t in (u, v)))
        for s in range(8)
    ]).mean()
    assert abs(est - kern) / norm < 0.05


def test_compact_bilinear_hashes_are_saved_and_deterministic():
    a, b = CompactBilinearPool(8, dim=32, seed=3), CompactBilinearPool(8, dim=32, seed=3)
    assert {"h1", "s1", "h2", "s2"} <= set(a.state_dict())
    x = torch.randn(2, 8, 2, 2)
    torch.testing.assert_close(a(x), b(x))


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


def test_unknown_names_suggest_close_ones():
    with pytest.raises(ValueError, match="compact_bilinear"):
        POOLINGS.get("compact-bilinear")
    with pytest.raises(ValueError, match="cbam"):
        ATTENTIONS.get("cbm")


def test_netvlad_matches_a_naive_loop():
    from finegrain.models.pooling import NetVLADPool

    torch.manual_seed(0)
    pool = NetVLADPool(5, dim=3)
    x = torch.randn(2, 5, 4, 3)
    out = pool(x)
    assert out.shape == (2, 15)
    xn = torch.nn.functional.normalize(x, dim=1)
    for b in range(2):
        v = torch.zeros(3, 5)
        for i in range(4):
            for j in range(3):
                f = xn[b, :, i, j]
                logits = pool.assign.weight[:, :, 0, 0] @ f + pool.assign.bias
                a = torch.softmax(logits, 0)
                for k in range(3):
                    v[k] += a[k] * (f - pool.centers[k])
        ref = torch.nn.functional.normalize(torch.nn.functional.normalize(v, dim=1).flatten(), dim=0)
        assert torch.allclose(out[b], ref, atol=1e-5)
    out.sum().backward()
    assert pool.centers.grad is not None and pool.assign.weight.grad is not None
