"""Re-weighting the loss by class frequency (``--class-weights``)."""

from __future__ import annotations

import torch

from finegrain.registry import Registry

CLASS_WEIGHTS: Registry = Registry("class weighting")
"""``--class-weights`` names: each maps training counts per class ``[C]`` to raw weights ``[C]``."""


@CLASS_WEIGHTS.register("inverse")
def _inverse(counts: torch.Tensor, beta: float) -> torch.Tensor:
    return 1.0 / counts


@CLASS_WEIGHTS.register("effective")
def _effective(counts: torch.Tensor, beta: float) -> torch.Tensor:
    return (1 - beta) / (1 - beta**counts)


def class_weights(counts: torch.Tensor, kind: str, beta: float = 0.999) -> torch.Tensor:
    """Per-class loss weights from training counts, scaled to mean 1.

    ``inverse``: ``1 / n_c``. ``effective``: the inverse of the effective number of samples
    ``(1 - beta^n_c) / (1 - beta)`` (Cui et al., "Class-Balanced Loss Based on Effective Number of
    Samples", CVPR 2019), which re-weights less aggressively when classes are large.
    """
    if kind not in CLASS_WEIGHTS:
        raise ValueError(f"--class-weights must be none or one of {', '.join(CLASS_WEIGHTS.names())}, got {kind!r}")
    w = CLASS_WEIGHTS.get(kind)(counts.double().clamp_min(1), beta)
    return (w / w.mean()).float()
