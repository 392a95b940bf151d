"""Open-set rejection: scores that say how much an image looks like the known classes, and their thresholds.

Every score is "higher = more known":

- ``msp``: the maximum softmax probability (Hendrycks & Gimpel, ICLR 2017, arXiv:1610.02136),
  of the temperature-scaled logits when the checkpoint is calibrated;
- ``energy``: the negative free energy ``T * logsumexp(logits / T)`` (Liu et al., NeurIPS 2020,
  arXiv:2010.03759), with ``T = 1`` as in the paper;
- ``max_logit``: the largest raw logit (Hendrycks et al., ICML 2022, arXiv:1911.11132);
- ``knn``: minus the distance from the image's L2-normalised feature to its k-th nearest
  training feature (Sun et al., ICML 2022, arXiv:2204.06507; k = 50 there for ImageNet, here
  capped by the bank size). The bank of training features is stored in the checkpoint.

A threshold is chosen on known (validation) images for a target true-positive rate: at TPR 0.95,
95% of known images score at or above it. Images below it are answered "unknown".
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

SCORES = ("msp", "energy", "max_logit", "knn")
BANK_KEY = "openset.bank"
"""The checkpoint tensor holding the kNN bank (L2-normalised training features, float16)."""


def logit_scores(logits: torch.Tensor, temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """``msp``, ``energy`` and ``max_logit`` of each row of ``logits`` [N, C]."""
    logits = logits.float()
    return {"msp": (logits / temperature).softmax(1).max(1).values, "energy": torch.logsumexp(logits, 1),
            "max_logit": logits.max(1).values}


def knn_score(features: torch.Tensor, bank: torch.Tensor, k: int, *, chunk: int = 1024) -> torch.Tensor:
    """Minus the Euclidean distance of each normalised feature to its k-th nearest normalised bank feature."""
    if bank.ndim != 2 or bank.shape[0] == 0:
        raise ValueError("the kNN bank is empty: the checkpoint has no training features (refit with `finegrain calibrate`)")
    k = max(1, min(int(k), bank.shape[0]))
    q, b = F.normalize(features.float().flatten(1), dim=1), F.normalize(bank.float(), dim=1)
    out = []
    for i in range(0, q.shape[0], chunk):
        d = torch.cdist(q[i : i + chunk], b)
        out.append(-d.topk(k, dim=1, largest=False).values[:, -1])
    return torch.cat(out) if out else torch.zeros(0)


def all_scores(logits: torch.Tensor, features: torch.Tensor | None, bank: torch.Tensor | None, *, temperature: float = 1.0,
               k: int = 50) -> dict[str, torch.Tensor]:
    """Every score that the inputs allow (``knn`` needs features and a bank)."""
    scores = logit_scores(logits, temperature)
    if features is not None and bank is not None and bank.numel():
        scores["knn"] = knn_score(features, bank, k)
    return scores


def threshold_at_tpr(known: Any, tpr: float = 0.95) -> float:
    """The largest threshold that keeps at least ``tpr`` of the ``known`` scores at or above it."""
    known = np.sort(np.asarray(known, dtype=np.float64))
    if known.size == 0 or not 0 < tpr <= 1:
        raise ValueError(f"need known scores and 0 < tpr <= 1, got {known.size} scores and tpr={tpr}")
    index = int(np.floor((1.0 - tpr) * known.size + 1e-9))  # this many may fall below
    return float(known[min(index, known.size - 1)])


def auroc(known: Any, unknown: Any) -> float:
    """Area under the ROC curve of telling known (positive) from unknown by the score (ties count half)."""
    from sklearn.metrics import roc_auc_score

    known, unknown = np.asarray(known, dtype=np.float64), np.asarray(unknown, dtype=np.float64)
    if known.size == 0 or unknown.size == 0:
        raise ValueError("AUROC needs both known and unknown images")
    return float(roc_auc_score(np.r_[np.ones(known.size), np.zeros(unknown.size)], np.r_[known, unknown]))


def fpr_at_tpr(known: Any, unknown: Any, tpr: float = 0.95) -> float:
    """The fraction of unknown images accepted at the threshold that accepts ``tpr`` of the known ones."""
    t = threshold_at_tpr(known, tpr)
    return float((np.asarray(unknown, dtype=np.float64) >= t).mean())


def fit_thresholds(scores: dict[str, torch.Tensor], tpr: float = 0.95) -> dict[str, float]:
    """One threshold per score, each keeping ``tpr`` of these (known, validation) images."""
    return {name: threshold_at_tpr(s.numpy(), tpr) for name, s in scores.items()}


def evaluate_openset(known: dict[str, torch.Tensor], unknown: dict[str, torch.Tensor], correct: torch.Tensor,
                     thresholds: dict[str, float], tpr: float = 0.95) -> dict[str, dict[str, float]]:
    """Per score: AUROC, FPR at ``tpr`` (measured on these known images), and at the stored threshold the
    share of known images accepted, of unknown ones rejected, and the known-class accuracy (a rejected known
    image counts as wrong)."""
    out = {}
    for name in known:
        k, u = known[name].numpy(), unknown[name].numpy()
        row = {"auroc": auroc(k, u), f"fpr_at_{round(100 * tpr)}tpr": fpr_at_tpr(k, u, tpr)}
        if name in thresholds:
            t = thresholds[name]
            accepted = k >= t
            row.update({"threshold": t, "known_accepted": float(accepted.mean()), "unknown_rejected": float((u < t).mean()),
                        "known_accuracy_at_threshold": float((accepted & correct.numpy().astype(bool)).mean())})
        out[name] = row
    return out
