"""Global pooling of a feature map ``[B, C, H, W]`` into one vector per image.

"bilinear" follows "Bilinear CNN Models for Fine-grained Visual Recognition" (Lin, RoyChowdhury
and Maji, arXiv:1504.07889); "compact_bilinear" follows "Compact Bilinear Pooling" (Gao, Beijbom,
Zhang and Darrell, arXiv:1511.06062), its Tensor Sketch variant. "netvlad" aggregates the local
features of the last map around learned centres, after "NetVLAD: CNN architecture for weakly
supervised place recognition" (Arandjelović, Gronat, Torii, Pajdla and Sivic, arXiv:1511.07247).

Every pooling is an ``nn.Module`` built by ``build_pooling(name, in_dim, dim=...)`` with an
``out_dim`` attribute; ``POOLINGS.names()`` lists them.

The two bilinear poolings end in an L2 norm: their vectors have norm 1, where average-pooled
features are an order larger (about 12 for EfficientNet-Lite0 on CUB), so the new classifier needs
larger weights for the same logits. The authors train it alone first at a large learning rate;
with finegrain's one-stage recipe the head's rate does that job. Measured for compact bilinear
with ``benchmarks/methods.py`` (``benchmarks/RESULTS.md``), the rate chosen on a val split, on
both of two seeds, is 10x the default at 224 px (cub50, 3 epochs: 85.7 top-1 against 67.6 at the
default rate) and 30x at 448 px (cub27, 2 epochs): ``--lr 0.05 --backbone-lr-mult 0.01`` gives
the head 10x and keeps the backbone's rate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from finegrain.registry import Registry

POOLINGS: Registry[type[nn.Module]] = Registry("pooling")

FEATURE_MAP_ONLY = ("bilinear", "compact_bilinear", "netvlad")
"""Poolings that need a 4-D feature map (not a ViT token sequence)."""


def signed_sqrt(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``sign(x) * sqrt(|x|)``; ``eps`` keeps the gradient finite at zero."""
    return torch.sign(x) * torch.sqrt(x.abs() + eps)


@POOLINGS.register("avg")
class AvgPool(nn.Module):
    """Mean over spatial positions (``[B, C, H, W]``) or tokens (``[B, N, C]``)."""

    def __init__(self, in_dim: int, *, dim: int = 0):
        super().__init__()
        self.out_dim = in_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3)) if x.ndim == 4 else x.mean(1)


@POOLINGS.register("bilinear")
class BilinearPool(nn.Module):
    """B-CNN (symmetric): ``vec(X X^T) / HW`` over locations, signed square root, L2 norm.

    The output has ``in_dim ** 2`` entries: reduce the channels first (``reduce_dim`` of the
    fgvc task) for wide backbones.
    """

    def __init__(self, in_dim: int, *, dim: int = 0):
        super().__init__()
        self.out_dim = in_dim * in_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x = x.float().reshape(b, c, h * w)
        gram = torch.bmm(x, x.transpose(1, 2)) / (h * w)
        return F.normalize(signed_sqrt(gram.reshape(b, c * c)), dim=1)


@POOLINGS.register("compact_bilinear")
class CompactBilinearPool(nn.Module):
    """Tensor Sketch approximation of bilinear pooling in ``dim`` dimensions.

    Each location's feature ``x`` is sketched twice (``Ψ_k(x)[h_k(c)] += s_k(c) x_c``), the two
    sketches are convolved circularly (a product of FFTs) and averaged over locations, so that
    ``<TS(x), TS(y)> ≈ <x, y>^2``; then signed square root and L2 norm, as in the paper.
    The random hashes are buffers: they are saved in checkpoints.

    Args:
        in_dim: channels C.
        dim: sketch size D (the paper uses 8192 for VGG's 512 channels).
        normalize: apply signed sqrt and L2 norm (off for the kernel-approximation test).
        seed: seed of the hashes.
    """

    def __init__(self, in_dim: int, *, dim: int = 8192, normalize: bool = True, seed: int = 0):
        super().__init__()
        if dim < 1:
            raise ValueError(f"compact bilinear pooling needs a positive output dim, got {dim}")
        g = torch.Generator().manual_seed(seed)
        for k in (1, 2):
            self.register_buffer(f"h{k}", torch.randint(dim, (in_dim,), generator=g))
            self.register_buffer(f"s{k}", torch.randint(2, (in_dim,), generator=g).float() * 2 - 1)
        self.out_dim, self.normalize = dim, normalize

    def _sketch(self, x: torch.Tensor, h: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(x.shape[0], self.out_dim)
        return out.index_add(1, h, x * s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        loc = x.float().permute(0, 2, 3, 1).reshape(-1, c)  # [B*HW, C]
        f1 = torch.fft.rfft(self._sketch(loc, self.h1, self.s1), dim=1)
        f2 = torch.fft.rfft(self._sketch(loc, self.h2, self.s2), dim=1)
        ts = torch.fft.irfft(f1 * f2, n=self.out_dim, dim=1)
        y = ts.reshape(b, hh * ww, self.out_dim).mean(1)
        return F.normalize(signed_sqrt(y), dim=1) if self.normalize else y


@POOLINGS.register("netvlad")
class NetVLADPool(nn.Module):
    """Local feature aggregation: soft-assign each location to ``K`` learned centres and sum the residuals.

    ``V[k] = sum_i a_k(x_i) (x_i - c_k)`` with ``a = softmax_k(w_k . x_i + b_k)`` over the locations
    ``x_i`` of the L2-normalised feature map; each ``V[k]`` is L2-normalised (intra-normalisation),
    then the flattened ``K x C`` vector. ``dim`` is K (default 16); the output has ``K * C`` entries.
    """

    def __init__(self, in_dim: int, *, dim: int = 16):
        super().__init__()
        k = dim or 16
        self.assign = nn.Conv2d(in_dim, k, 1)
        self.centers = nn.Parameter(torch.randn(k, in_dim) * 0.1)
        self.out_dim, self.k = k * in_dim, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(x.float(), dim=1)
        a = torch.softmax(self.assign(x).flatten(2), dim=1)  # [B, K, HW]
        feats = x.flatten(2)  # [B, C, HW]
        v = torch.einsum("bkn,bcn->bkc", a, feats) - a.sum(2).unsqueeze(2) * self.centers.unsqueeze(0)
        return F.normalize(F.normalize(v, dim=2).flatten(1), dim=1)


def build_pooling(name: str, in_dim: int, *, dim: int = 0) -> nn.Module:
    """Build pooling ``name`` for ``in_dim`` channels (``dim``: output size where it is a choice)."""
    cls = POOLINGS.get(name)
    if name == "compact_bilinear":
        return cls(in_dim, dim=dim or 8192)
    return cls(in_dim, dim=dim)
