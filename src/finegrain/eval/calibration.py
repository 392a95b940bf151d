"""Temperature scaling: one scalar ``T`` that makes a classifier's softmax confidences honest.

Guo et al., "On Calibration of Modern Neural Networks", ICML 2017 (arXiv:1706.04599): divide the
logits by the ``T > 0`` that minimises the negative log-likelihood on held-out data. The argmax,
and so accuracy, is unchanged; only the confidences move. ``T`` is fitted on the validation split
after training and stored in the checkpoint (``CheckpointMeta.calibration``), and
:class:`finegrain.Predictor`, the server and the exported models divide by it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from finegrain.eval.metrics import expected_calibration_error


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, *, max_iter: int = 200) -> float:
    """The temperature ``T`` minimising ``NLL(softmax(logits / T), labels)`` (L-BFGS on ``log T``)."""
    logits, labels = torch.as_tensor(logits).double().cpu(), torch.as_tensor(labels).long().cpu()
    if logits.ndim != 2 or logits.shape[0] != labels.shape[0] or logits.shape[0] == 0:
        raise ValueError(f"need logits [N, C] and labels [N] with N > 0, got {tuple(logits.shape)} and {tuple(labels.shape)}")
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().clamp(-5.0, 5.0).exp())  # T in [0.007, 148]: beyond that the data is degenerate


def calibration_summary(logits: torch.Tensor, labels: torch.Tensor, temperature: float, n_bins: int = 15) -> dict[str, Any]:
    """NLL and ECE before and after dividing by ``temperature`` (ECE as a fraction, Guo et al.'s 15 bins)."""
    logits, labels = torch.as_tensor(logits).float().cpu(), torch.as_tensor(labels).long().cpu()
    before, after = logits.softmax(1), (logits / temperature).softmax(1)
    return {
        "temperature": float(temperature), "n": int(labels.numel()),
        "nll_before": float(F.cross_entropy(logits, labels)), "nll_after": float(F.cross_entropy(logits / temperature, labels)),
        "ece_before": expected_calibration_error(before, labels, n_bins),
        "ece_after": expected_calibration_error(after, labels, n_bins),
    }


def temperature_of(meta: Any) -> float:
    """The checkpoint's fitted temperature (1.0 when it was never calibrated)."""
    calibration = meta.get("calibration") if isinstance(meta, dict) else getattr(meta, "calibration", None)
    return float((calibration or {}).get("temperature", 1.0))
