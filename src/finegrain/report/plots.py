"""The report's figures, drawn with matplotlib's object API (no pyplot state) and returned as PNG bytes."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig) -> bytes:
    """Render a matplotlib figure to PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def training_curves(rows: Sequence[dict], best_epoch: int | None = None) -> bytes:
    """Loss, accuracy (train and validation top-1) and learning rate per epoch.

    Args:
        rows: the ``metrics.jsonl`` rows, one per epoch.
        best_epoch: marked with a dashed line (the epoch of ``best.safetensors``).
    """
    fig = _figure(12.0, 3.4)
    axes = fig.subplots(1, 3)
    epochs = [r["epoch"] for r in rows]

    def plot(ax, key, label, **kw):
        pts = [(r["epoch"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if pts:
            x, y = zip(*pts)
            ax.plot(x, y, marker="o", markersize=4, label=label, **kw)
        return bool(pts)

    plot(axes[0], "train_loss", "train")
    plot(axes[0], "val_loss", "validation")
    axes[0].set_title("loss")
    plot(axes[1], "train_acc", "train (augmented)")
    plot(axes[1], "val_top1", "validation top-1")
    detector = plot(axes[1], "val_map", "validation box mAP")
    plot(axes[1], "val_mask_map", "validation mask mAP")
    axes[1].set_title("mAP (%)" if detector else "accuracy (%)")
    plot(axes[2], "lr", "end of epoch", color="tab:purple")
    axes[2].set_title("learning rate")
    axes[2].ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if epochs:
            ax.set_xticks(_epoch_ticks(epochs))
        if best_epoch is not None and best_epoch > 0:
            ax.axvline(best_epoch, color="grey", linestyle="--", linewidth=1, label=f"best (epoch {best_epoch})")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return png_bytes(fig)


def _epoch_ticks(epochs: Sequence[int]) -> list[int]:
    lo, hi = min(epochs), max(epochs)
    step = max(1, int(np.ceil((hi - lo + 1) / 10)))
    return list(range(lo, hi + 1, step))


def per_class_bars(names: Sequence[str], accuracy: Sequence[float], mean: float) -> bytes:
    """Horizontal bars of per-class accuracy, worst at the top; below-mean classes in red, the mean as a line."""
    n = len(names)
    fig = _figure(6.0, float(np.clip(1.2 + 0.26 * n, 2.8, 40.0)))
    ax = fig.add_subplot()
    y = np.arange(n)
    colors = ["tab:red" if a < mean else "tab:blue" for a in accuracy]
    ax.barh(y, accuracy, color=colors, height=0.7)
    ax.set_yticks(y, labels=list(names), fontsize=9 if n <= 60 else 5)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.margins(y=0.01)
    ax.axvline(mean, color="black", linestyle="--", linewidth=1)
    ax.set_title(f"accuracy per class (dashed: mean per-class {mean:.1f}%)", fontsize=10)
    ax.set_xlabel("accuracy (%)")
    ax.grid(axis="x", alpha=0.3)
    return png_bytes(fig)


def reliability_diagram(bins: dict, ece: float, confidences: np.ndarray) -> bytes:
    """Accuracy per confidence bin against the diagonal, and a histogram of confidences."""
    fig = _figure(10.0, 4.0)
    ax, hist = fig.subplots(1, 2)
    edges = np.asarray(bins["edges"])
    centers = (edges[:-1] + edges[1:]) / 2
    width = (edges[1] - edges[0]) * 0.92
    filled = np.array([c > 0 for c in bins["count"]])
    acc = np.array([a if a is not None else 0.0 for a in bins["accuracy"]])[filled]
    conf = np.array([c if c is not None else 0.0 for c in bins["confidence"]])[filled]
    x = centers[filled]
    ax.bar(x, acc, width=width, color="tab:blue", label="accuracy of the bin")
    # The gap between what the model claims (mean confidence) and what it achieves.
    ax.bar(x, np.abs(conf - acc), bottom=np.minimum(conf, acc), width=width, fill=False, edgecolor="tab:red",
           hatch="///", linewidth=0.8, label="gap to mean confidence")
    ax.plot([0, 1], [0, 1], color="black", linestyle="--", linewidth=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("confidence (top-1 probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability diagram, ECE {100 * ece:.2f}%", fontsize=10)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, frameon=False)
    hist.hist(confidences, bins=edges, color="tab:grey")
    hist.set_xlim(0, 1)
    hist.set_xlabel("confidence")
    hist.set_ylabel("images")
    hist.set_title("confidence histogram (images per bin)", fontsize=10)
    return png_bytes(fig)


def embedding_map(points: np.ndarray, labels: np.ndarray, correct: np.ndarray, names: Sequence[str], title: str) -> bytes:
    """2-D points coloured by true class; misclassified images drawn as crosses."""
    from matplotlib import colormaps

    n_classes = len(names)
    cmap = colormaps["tab10" if n_classes <= 10 else "tab20" if n_classes <= 20 else "turbo"]
    colors = cmap(labels / max(n_classes - 1, 1)) if n_classes > 20 else cmap(labels % cmap.N)
    legend = n_classes <= 25
    fig = _figure(10.0 if legend else 8.0, 7.0)
    ax = fig.add_subplot()
    ax.scatter(points[correct, 0], points[correct, 1], c=colors[correct], s=18, marker="o", linewidths=0)
    if (~correct).any():
        ax.scatter(points[~correct, 0], points[~correct, 1], c=colors[~correct], s=40, marker="x", linewidths=1.5)
    if legend:
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], marker="o", linestyle="", color=cmap(i / max(n_classes - 1, 1)) if n_classes > 20
                          else cmap(i % cmap.N), label=name) for i, name in enumerate(names)]
        handles.append(Line2D([], [], marker="x", linestyle="", color="black", label="misclassified"))
        ax.legend(handles=handles, fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title)
    return png_bytes(fig)
