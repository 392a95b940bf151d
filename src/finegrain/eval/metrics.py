"""Classification metrics, calibration error and confusion-matrix exports.

Every classification number here comes from two sets of counts: a confusion matrix (rows = true
class, columns = argmax prediction) and, for each k, how many samples had their true class among
the k highest scores. :class:`MetricAccumulator` keeps both on the device while an evaluation loop
runs; :func:`classification_metrics` is the one-shot form. Both end in :func:`metrics_from_counts`,
so a streamed evaluation and a one-shot one give the same report.

Accuracies, precision, recall and F1 are percentages (0-100); calibration error is a fraction in
[0, 1]. Ties between scores are broken towards the lower class index, the way ``argmax`` does, so
top-1 accuracy always equals the trace of the confusion matrix over N.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finegrain import checkpoint as ckpt

__all__ = [
    "MetricAccumulator",
    "accuracy",
    "classification_metrics",
    "expected_calibration_error",
    "metrics_from_counts",
    "reliability_bins",
    "save_confusion_matrix_png",
    "write_confusion_csv",
    "write_per_class_csv",
]


# --------------------------------------------------------------------------- input checks


def _as_tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    try:
        return torch.as_tensor(np.asarray(x))
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{name} must be a tensor or array of numbers, got {type(x).__name__}") from e


def _check_inputs(
    scores: Any, targets: Any, *, name: str = "logits", num_classes: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check shapes and dtypes (metadata only, so no device sync); return (scores, long targets)."""
    scores = _as_tensor(scores, name)
    targets = _as_tensor(targets, "targets")
    if scores.ndim != 2:
        raise ValueError(f"{name} must have shape [N, C], got shape {tuple(scores.shape)}")
    if scores.dtype == torch.bool or scores.is_complex():
        raise ValueError(f"{name} must hold real scores, got dtype {scores.dtype}")
    if targets.ndim != 1:
        raise ValueError(
            f"targets must have shape [N] (class indices, not one-hot), got shape {tuple(targets.shape)}"
        )
    if targets.dtype.is_floating_point or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(f"targets must be integer class indices, got dtype {targets.dtype}")
    if scores.shape[0] != targets.shape[0]:
        raise ValueError(
            f"{name} has {scores.shape[0]} rows but targets has {targets.shape[0]} entries; "
            "they must describe the same samples"
        )
    if scores.shape[1] == 0:
        raise ValueError(f"{name} has no classes (shape {tuple(scores.shape)})")
    if num_classes is not None and scores.shape[1] != num_classes:
        raise ValueError(f"{name} has {scores.shape[1]} classes, expected {num_classes}")
    return scores, targets.to(device=scores.device, dtype=torch.long)


def _check_target_range(targets: torch.Tensor, num_classes: int) -> None:
    """Raise if a target is outside ``[0, num_classes)``. Reads the values, so syncs on a GPU."""
    bad = targets[(targets < 0) | (targets >= num_classes)]
    if bad.numel():
        examples = ", ".join(str(v) for v in bad[:5].tolist())
        raise ValueError(
            f"targets must be class indices in [0, {num_classes}) for {num_classes} classes; "
            f"{bad.numel()} are out of range (e.g. {examples})"
        )


def _check_class_names(class_names: Any, num_classes: int, source: str) -> list[str]:
    if isinstance(class_names, (str, bytes)) or not isinstance(class_names, Sequence):
        raise ValueError(f"class_names must be a list of {num_classes} names, got {type(class_names).__name__}")
    if len(class_names) != num_classes:
        raise ValueError(f"class_names has {len(class_names)} entries but {source} has {num_classes} classes")
    return [str(c) for c in class_names]


def _check_topk(topk: int | Sequence[int]) -> tuple[int, ...]:
    ks = (topk,) if isinstance(topk, int) else tuple(topk)
    if not ks or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
        raise ValueError(f"topk must be positive integers such as (1, 5), got {topk!r}")
    return tuple(sorted({int(k) for k in ks}))


def _check_confusion(confusion: Any) -> np.ndarray:
    if isinstance(confusion, torch.Tensor):
        confusion = confusion.detach().cpu().numpy()
    cm = np.asarray(confusion)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] == 0:
        raise ValueError(f"confusion matrix must be square [C, C] with C >= 1, got shape {cm.shape}")
    if not np.issubdtype(cm.dtype, np.integer):
        raise ValueError(f"confusion matrix must hold integer counts, got dtype {cm.dtype}")
    if (cm < 0).any():
        raise ValueError("confusion matrix has negative counts")
    return cm.astype(np.int64)


# --------------------------------------------------------------------------- metrics


def _percent(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """100 * num / den, with 0 where den == 0 (sklearn's zero_division=0)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    return 100.0 * np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def metrics_from_counts(
    confusion: Any,
    topk_correct: Mapping[int, int],
    class_names: Sequence[str],
    *,
    n_confused: int = 10,
) -> dict[str, Any]:
    """Build the metrics report from counts alone.

    This is what :func:`classification_metrics` and :meth:`MetricAccumulator.compute` return;
    call it directly when the counts were gathered elsewhere (e.g. summed across processes).

    Args:
        confusion: integer matrix [C, C]; ``confusion[i, j]`` counts samples of true class ``i``
            predicted (argmax) as class ``j``. N is its sum.
        topk_correct: for each k, how many samples had their true class among the top k scores.
        class_names: C names, in class-index order.
        n_confused: how many off-diagonal pairs to list under ``"most_confused"``.

    Returns:
        A JSON-serialisable dict with ``"n"``, ``"top{k}"`` for each k, ``"mean_per_class_acc"``,
        ``"macro_precision"``, ``"macro_recall"``, ``"macro_f1"``, ``"classes_without_samples"``,
        ``"per_class"``, ``"confusion_matrix"`` and ``"most_confused"``. Values are percentages.
        Macro averages run over classes that occur in the targets or the predictions (sklearn's
        ``average="macro"``); the mean per-class accuracy runs over classes with samples only.
        A class without samples has ``"accuracy": None``.

    Raises:
        ValueError: on a malformed matrix, wrong number of names, impossible top-k counts or N=0.
    """
    cm = _check_confusion(confusion)
    num_classes = cm.shape[0]
    names = _check_class_names(class_names, num_classes, "the confusion matrix")
    if isinstance(n_confused, bool) or not isinstance(n_confused, (int, np.integer)) or n_confused < 0:
        raise ValueError(f"n_confused must be a non-negative integer, got {n_confused!r}")
    n = int(cm.sum())
    ks = _check_topk_counts(topk_correct, n)

    tp = np.diag(cm)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    precision = _percent(tp, predicted)
    recall = _percent(tp, support)
    f1 = _percent(2 * tp, support + predicted)  # = 2PR / (P + R), 0 when both are 0
    has_samples = support > 0
    in_macro = has_samples | (predicted > 0)

    out: dict[str, Any] = {"n": n}
    for k in ks:
        out[f"top{k}"] = 100.0 * int(topk_correct[k]) / n
    out["mean_per_class_acc"] = float(recall[has_samples].mean())
    out["macro_precision"] = float(precision[in_macro].mean())
    out["macro_recall"] = float(recall[in_macro].mean())
    out["macro_f1"] = float(f1[in_macro].mean())
    out["classes_without_samples"] = [names[i] for i in np.flatnonzero(~has_samples)]
    out["per_class"] = [
        {
            "class": names[i],
            "index": i,
            "support": int(support[i]),
            "correct": int(tp[i]),
            "accuracy": float(recall[i]) if has_samples[i] else None,
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
        }
        for i in range(num_classes)
    ]
    out["confusion_matrix"] = cm.tolist()
    out["most_confused"] = _most_confused(cm, names, n_confused)
    return out


def _check_topk_counts(topk_correct: Mapping[int, int], n: int) -> list[int]:
    """Check that n > 0 and that each top-k count lies in [0, n]; return the checked k's."""
    if n == 0:
        raise ValueError("no samples to evaluate (N=0)")
    ks = _check_topk(list(topk_correct))
    for k in ks:
        if not 0 <= int(topk_correct[k]) <= n:
            raise ValueError(f"top-{k} correct count {topk_correct[k]} is outside [0, N={n}]")
    return ks


def _most_confused(cm: np.ndarray, names: Sequence[str], limit: int) -> list[dict[str, Any]]:
    """The ``limit`` largest off-diagonal cells of ``cm``, each with its rate within the true class."""
    off = cm.copy()
    np.fill_diagonal(off, 0)
    true_idx, pred_idx = np.nonzero(off)
    counts = off[true_idx, pred_idx]
    support = cm.sum(axis=1)
    # Count descending, then by (true, predicted) index so the order is reproducible.
    order = np.lexsort((pred_idx, true_idx, -counts))[:limit]
    return [
        {
            "true": names[true_idx[j]],
            "predicted": names[pred_idx[j]],
            "count": int(counts[j]),
            "rate": 100.0 * int(counts[j]) / int(support[true_idx[j]]),
        }
        for j in order
    ]


class MetricAccumulator:
    """Running confusion matrix and top-k counts, kept on the device of the logits.

    ``update`` only launches device work (no ``.item()``, no data-dependent shapes), so it can sit
    inside an evaluation loop without stalling it; ``compute`` copies the counts to the host once.

    Example::

        acc = MetricAccumulator(topk=(1, 5))
        for images, labels in loader:
            acc.update(model(images), labels)
        report = acc.compute(class_names)

    Args:
        num_classes: number of classes; taken from the first batch when None.
        topk: the k values to count top-k accuracy for; k larger than C counts every sample.
    """

    def __init__(self, num_classes: int | None = None, *, topk: int | Sequence[int] = (1, 5)):
        if num_classes is not None and (isinstance(num_classes, bool) or int(num_classes) < 1):
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.num_classes = None if num_classes is None else int(num_classes)
        self.topk = _check_topk(topk)
        self.reset()

    def reset(self) -> None:
        """Forget every batch seen so far."""
        # C*C confusion cells plus one spare cell that counts out-of-range targets.
        self._cells: torch.Tensor | None = None
        self._topk_correct: torch.Tensor | None = None

    @property
    def confusion_matrix(self) -> torch.Tensor | None:
        """The running [C, C] counts on their device (rows = true class), or None before any update."""
        if self._cells is None:
            return None
        c = self.num_classes
        return self._cells[: c * c].view(c, c)

    @torch.no_grad()
    def update(self, logits: Any, targets: Any) -> None:
        """Add a batch.

        Args:
            logits: scores or probabilities [B, C].
            targets: integer class indices [B].

        Raises:
            ValueError: on mismatched shapes or class count. Out-of-range targets raise here for
                CPU inputs; on other devices checking would need a sync, so they are counted
                apart and :meth:`compute` raises instead.
        """
        logits, targets = _check_inputs(logits, targets, num_classes=self.num_classes)
        c = logits.shape[1]
        if self._cells is not None:
            logits = logits.to(self._cells.device)
            targets = targets.to(self._cells.device)
        if logits.device.type == "cpu":
            _check_target_range(targets, c)
        if self._cells is None:
            self.num_classes = c
            self._cells = torch.zeros(c * c + 1, dtype=torch.long, device=logits.device)
            self._topk_correct = torch.zeros(len(self.topk), dtype=torch.long, device=logits.device)

        valid = (targets >= 0) & (targets < c)
        safe = torch.where(valid, targets, torch.zeros_like(targets))
        pred = logits.argmax(dim=1)
        cell = torch.where(valid, safe * c + pred, torch.full_like(pred, c * c))
        # index_add_ rather than bincount: bincount sizes its output from the data, which syncs.
        self._cells.index_add_(0, cell, torch.ones_like(cell))

        # Rank of the true class under a stable descending sort: classes scoring higher, plus
        # equal-scoring classes with a lower index (argmax's tie-break). Top-k hit iff rank < k.
        score = logits.gather(1, safe[:, None])
        lower = torch.arange(c, device=logits.device)[None, :] < safe[:, None]
        rank = (logits > score).sum(dim=1) + ((logits == score) & lower).sum(dim=1)
        hits = torch.stack([(rank < k) & valid for k in self.topk], dim=1)
        self._topk_correct += hits.sum(dim=0)

    def compute(self, class_names: Sequence[str], *, n_confused: int = 10) -> dict[str, Any]:
        """Return the metrics report of every batch so far (see :func:`metrics_from_counts`).

        Raises:
            ValueError: before any update, when no samples were seen, or when out-of-range
                targets were seen on a non-CPU device.
        """
        if self._cells is None:
            raise ValueError("no batches seen; call update(logits, targets) first")
        host = torch.cat([self._cells, self._topk_correct]).cpu()  # the one device->host copy
        c = self.num_classes
        n_invalid = int(host[c * c])
        if n_invalid:
            raise ValueError(
                f"{n_invalid} targets were outside [0, {c}) for {c} classes; they were left out of "
                "every count. Check the labels of the evaluation data."
            )
        confusion = host[: c * c].view(c, c).numpy()
        topk_correct = dict(zip(self.topk, host[c * c + 1 :].tolist()))
        return metrics_from_counts(confusion, topk_correct, class_names, n_confused=n_confused)


def classification_metrics(
    logits: Any,
    targets: Any,
    class_names: Sequence[str],
    *,
    topk: int | Sequence[int] = (1, 5),
    n_confused: int = 10,
) -> dict[str, Any]:
    """Compute the full metrics report for one set of predictions.

    Args:
        logits: scores or probabilities [N, C] (tensor or array); the prediction is the argmax.
        targets: integer class indices [N].
        class_names: C names, in class-index order.
        topk: the k values to report as ``"top{k}"``; k larger than C gives 100.
        n_confused: how many of the most frequent (true, predicted) mistakes to list.

    Returns:
        The dict described in :func:`metrics_from_counts`.

    Raises:
        ValueError: on mismatched shapes, out-of-range targets, NaN scores, a wrong number of
            class names or N=0.
    """
    logits, targets = _check_inputs(logits, targets)
    num_classes = logits.shape[1]
    _check_class_names(class_names, num_classes, "logits")
    if logits.shape[0] == 0:
        raise ValueError("no samples to evaluate: logits and targets are empty (N=0)")
    if logits.is_floating_point() and bool(torch.isnan(logits).any()):
        raise ValueError("logits contain NaN; check the model outputs before computing metrics")
    _check_target_range(targets, num_classes)
    acc = MetricAccumulator(num_classes, topk=topk)
    acc.update(logits, targets)
    return acc.compute(class_names, n_confused=n_confused)


def accuracy(logits: Any, targets: Any) -> float:
    """Top-1 accuracy in percent.

    Raises:
        ValueError: on mismatched shapes, out-of-range targets or N=0.
    """
    logits, targets = _check_inputs(logits, targets)
    if logits.shape[0] == 0:
        raise ValueError("no samples to evaluate: logits and targets are empty (N=0)")
    _check_target_range(targets, logits.shape[1])
    correct = int((logits.argmax(dim=1) == targets).sum())
    return 100.0 * correct / logits.shape[0]


# --------------------------------------------------------------------------- calibration


def _calibration_bins(probs: Any, targets: Any, n_bins: int) -> tuple[np.ndarray, ...]:
    """Per-bin (edges, count, sum of confidence, number correct) over equal-width bins."""
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    probs, targets = _check_inputs(probs, targets, name="probs")
    if probs.shape[0] == 0:
        raise ValueError("no samples to evaluate: probs and targets are empty (N=0)")
    _check_target_range(targets, probs.shape[1])
    probs = probs.double()
    lo, hi = float(probs.min()), float(probs.max())
    if not (lo >= 0.0 and hi <= 1.0 + 1e-6):  # also catches NaN
        raise ValueError(
            f"probs must be probabilities in [0, 1], got values in [{lo:.4g}, {hi:.4g}]; "
            "apply softmax to logits first"
        )
    conf, pred = probs.max(dim=1)
    correct = (pred == targets).double()
    edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64, device=probs.device)
    # Bins are (lo, hi]; bucketize's default puts a value equal to an edge in the lower bin,
    # and confidence 0 lands in the first bin.
    idx = torch.bucketize(conf, edges[1:-1])
    count = torch.zeros(n_bins, dtype=torch.long, device=probs.device).index_add_(0, idx, torch.ones_like(idx))
    conf_sum = torch.zeros(n_bins, dtype=torch.float64, device=probs.device).index_add_(0, idx, conf)
    hit_sum = torch.zeros(n_bins, dtype=torch.float64, device=probs.device).index_add_(0, idx, correct)
    return tuple(t.cpu().numpy() for t in (edges, count, conf_sum, hit_sum))


def expected_calibration_error(probs: Any, targets: Any, n_bins: int = 15) -> float:
    """Expected calibration error of the top-label confidence, as a fraction in [0, 1].

    Confidences are binned into ``n_bins`` equal-width bins ``(i/n, (i+1)/n]``; ECE is the
    sample-weighted mean over bins of ``|accuracy - mean confidence|`` (Guo et al., 2017).

    Args:
        probs: probabilities [N, C] (softmax outputs, not logits).
        targets: integer class indices [N].
        n_bins: number of bins.

    Raises:
        ValueError: on mismatched shapes, out-of-range targets, values outside [0, 1] or N=0.
    """
    _, count, conf_sum, hit_sum = _calibration_bins(probs, targets, n_bins)
    # sum_b (n_b / N) * |acc_b - conf_b| == sum_b |hits_b - conf_sum_b| / N
    return float(np.abs(hit_sum - conf_sum).sum() / count.sum())


def reliability_bins(probs: Any, targets: Any, n_bins: int = 15) -> dict[str, list]:
    """Per-bin mean confidence, accuracy and count, for reliability diagrams.

    Uses the same bins as :func:`expected_calibration_error`.

    Returns:
        A JSON-serialisable dict: ``"edges"`` (n_bins + 1 bin edges), ``"confidence"`` and
        ``"accuracy"`` (per-bin means as fractions, None for an empty bin) and ``"count"``.
    """
    edges, count, conf_sum, hit_sum = _calibration_bins(probs, targets, n_bins)
    return {
        "edges": edges.tolist(),
        "confidence": [float(s / c) if c else None for s, c in zip(conf_sum, count)],
        "accuracy": [float(h / c) if c else None for h, c in zip(hit_sum, count)],
        "count": count.tolist(),
    }


# --------------------------------------------------------------------------- exports


def save_confusion_matrix_png(
    cm: Any,
    class_names: Sequence[str],
    path: str | os.PathLike,
    *,
    normalize: bool = True,
    max_classes_labeled: int = 60,
) -> Path:
    """Draw the confusion matrix as a heatmap and save it as a PNG.

    Uses matplotlib's object API with the Agg canvas, so no pyplot or global backend state is
    touched and it works in headless processes and threads.

    Args:
        cm: integer confusion matrix [C, C], rows = true class.
        class_names: C names; drawn as tick labels when C <= ``max_classes_labeled``.
        path: where to write the PNG; parent folders are created.
        normalize: colour each row as a fraction of its true class (rows without samples stay 0);
            False colours raw counts.
        max_classes_labeled: above this many classes, ticks show class indices instead of names.

    Returns:
        The path written, as a :class:`~pathlib.Path`.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - matplotlib is a core dependency
        raise ImportError("save_confusion_matrix_png needs matplotlib: pip install matplotlib") from e

    mat = _check_confusion(cm)
    c = mat.shape[0]
    names = _check_class_names(class_names, c, "the confusion matrix")
    if normalize:
        support = mat.sum(axis=1, keepdims=True).astype(np.float64)
        values = np.divide(mat, support, out=np.zeros(mat.shape, dtype=np.float64), where=support > 0)
        vmax, bar_label = 1.0, "fraction of true class"
    else:
        values = mat.astype(np.float64)
        vmax, bar_label = max(float(values.max()), 1.0), "count"

    labeled = c <= max_classes_labeled
    # Roughly a quarter inch per labelled class, within limits that keep the file reasonable.
    side = float(np.clip(2.5 + 0.28 * c, 6.0, 22.0)) if labeled else float(np.clip(6.0 + 0.02 * c, 8.0, 16.0))
    fontsize = float(np.clip(12.0 - 0.12 * c, 5.0, 10.0))
    fig = Figure(figsize=(side + 1.2, side), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(values, cmap="Blues", vmin=0.0, vmax=vmax, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02, label=bar_label)

    if labeled:
        ax.set_xticks(range(c), labels=names, rotation=90, fontsize=fontsize)
        ax.set_yticks(range(c), labels=names, fontsize=fontsize)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
    else:
        ax.set_xlabel("predicted class index")
        ax.set_ylabel("true class index")
    if c <= 12:  # small enough to print each cell
        for i in range(c):
            for j in range(c):
                v = values[i, j]
                text = f"{v:.2f}" if normalize else str(int(v))
                ax.text(j, i, text, ha="center", va="center", fontsize=fontsize,
                        color="white" if v > 0.5 * vmax else "black")
    kind = "row-normalised" if normalize else "counts"
    ax.set_title(f"Confusion matrix ({c} classes, N={int(mat.sum())}, {kind})")

    path = Path(path)
    ckpt.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path


_PER_CLASS_FIELDS = ("class", "index", "support", "correct", "accuracy", "precision", "recall", "f1")


def write_per_class_csv(metrics: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write the ``"per_class"`` rows of a metrics report as CSV (percent, 4 decimals).

    A class without samples has an empty accuracy cell.

    Args:
        metrics: the dict from :func:`classification_metrics` or :meth:`MetricAccumulator.compute`.
        path: the CSV file to write; parent folders are created.

    Returns:
        The path written.
    """
    rows = metrics.get("per_class") if isinstance(metrics, Mapping) else None
    if rows is None:
        raise ValueError(
            "metrics has no 'per_class' entry; pass the dict returned by classification_metrics "
            "or MetricAccumulator.compute"
        )
    cells = [["" if (v := row[key]) is None else round(v, 4) if isinstance(v, float) else v for key in _PER_CLASS_FIELDS]
             for row in rows]
    return ckpt.write_csv_atomic(path, [_PER_CLASS_FIELDS, *cells])


def write_confusion_csv(cm: Any, class_names: Sequence[str], path: str | os.PathLike) -> Path:
    """Write the confusion matrix as CSV: a header of predicted classes, one row per true class.

    Returns:
        The path written.
    """
    mat = _check_confusion(cm)
    names = _check_class_names(class_names, mat.shape[0], "the confusion matrix")
    return ckpt.write_csv_atomic(path, [["true \\ predicted", *names], *([name, *row] for name, row in zip(names, mat.tolist()))])
