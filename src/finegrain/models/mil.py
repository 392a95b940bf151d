"""Attention-based multiple-instance pooling: "Attention-based Deep Multiple Instance Learning"
(Ilse, Tomczak and Welling, ICML 2018, arXiv:1802.04712).

A bag of instance features ``h_1..h_N`` (here: the features of several crops of one image) is
pooled as ``z = sum_k a_k h_k`` with ``a = softmax_k(w^T (tanh(V h_k) * sigmoid(U h_k)))`` (the
gated variant; without the gate, ``w^T tanh(V h_k)``). The result does not depend on the order
of the instances.
"""

from __future__ import annotations

import torch
from torch import nn


class AttentionMILPool(nn.Module):
    """Pool ``[B, N, D]`` instance features into ``[B, D]``.

    Args:
        dim: instance feature size D (the output has the same size).
        hidden: size L of the attention's hidden layer (the paper uses 128).
        gated: use the gated attention ``tanh(V h) * sigmoid(U h)``.
    """

    def __init__(self, dim: int, hidden: int = 128, gated: bool = True):
        super().__init__()
        self.out_dim = dim
        self.V = nn.Linear(dim, hidden)
        self.U = nn.Linear(dim, hidden) if gated else None
        self.w = nn.Linear(hidden, 1)

    def weights(self, instances: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attention weights ``[B, N]`` (summing to 1 over the kept instances; ``mask`` True keeps)."""
        h = torch.tanh(self.V(instances))
        if self.U is not None:
            h = h * torch.sigmoid(self.U(instances))
        score = self.w(h).squeeze(-1).float()
        if mask is not None:
            score = score.masked_fill(~mask, float("-inf"))
        return torch.softmax(score, -1).to(instances.dtype)

    def forward(self, instances: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return torch.einsum("bn,bnd->bd", self.weights(instances, mask), instances)
