"""Poolings: shapes, and parity with naive formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

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
