"""``build_report``: one self-contained HTML page about a training run and its best checkpoint.

The page holds the training curves, the confusion matrix, the most confused pairs with example
images, per-class accuracy, calibration, a t-SNE map of the pooled features and Grad-CAM (or
attention rollout) overlays, plus the run's configuration. The checkpoint is evaluated once, with
the same loader and loop as ``finegrain eval``; every image is inlined as a base64 PNG, so the
file can be mailed or archived on its own.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image, ImageOps
from torch.utils.data import DataLoader

from finegrain.checkpoint import resolve_checkpoint, write_text_atomic
from finegrain.data.base import ImageList
from finegrain.data.dataset import ImageDataset, collate, load_rgb
from finegrain.data.split import open_run_split
from finegrain.eval.evaluate import eval_images
from finegrain.eval.metrics import (
    classification_metrics,
    expected_calibration_error,
    reliability_bins,
    save_confusion_matrix_png,
)
from finegrain.predict import Predictor, logits_and_features
from finegrain.report import plots
from finegrain.report.html import esc, img_tag, page, pil_png, table
from finegrain.tasks.base import Task
from finegrain.train.logger import read_rows
from finegrain.train.loop import predict_loader
from finegrain.utils import console, progress_bar

SPLITS = ("test", "val", "train")


@dataclass
class _Evaluation:
    """One pass of the checkpoint over the split: rows follow ``positions`` into ``images``."""

    images: ImageList
    positions: np.ndarray
    logits: torch.Tensor
    labels: np.ndarray
    features: torch.Tensor
    skipped: list
    temperature: float = 1.0

    @property
    def probs(self) -> torch.Tensor:
        """The probabilities the checkpoint reports: the softmax of its temperature-scaled logits."""
        return (self.logits / self.temperature).softmax(1)

    @property
    def n_bins(self) -> int:
        """Calibration bins: 15 as usual, 10 for small splits so that bins are not mostly empty."""
        return 15 if len(self.labels) >= 150 else 10

    @property
    def predicted(self) -> np.ndarray:
        return self.logits.argmax(1).numpy()

    def path(self, row: int) -> str:
        return self.images.paths[int(self.positions[row])]


def build_report(
    run_dir: str | Path,
    *,
    data: str | Path | None = None,
    split: str = "test",
    dataset: str | None = None,
    out: str | Path | None = None,
    method: str | None = None,
    n_examples: int = 6,
    n_pairs: int = 6,
    max_points: int = 2000,
    batch_size: int = 64,
    workers: int = 2,
    device: str = "auto",
) -> Path:
    """Evaluate a run's best checkpoint on one split and write the HTML report.

    Args:
        run_dir: the run folder (``best.safetensors``, ``metrics.jsonl``, ``config.yaml``), or a
            checkpoint file inside one.
        data: the data set; default: the ``--data`` the run was trained on.
        split: "test" (default), "val" (the run's held-out validation images, from ``split.json``)
            or "train". The page names the split it used.
        dataset: reader name; default: the run's, else guessed from ``data``.
        out: the HTML file to write; default: ``report-<split>.html`` in the run folder.
        method: explanation method ("gradcam", "gradcampp", "rollout"); default: rollout for
            ViTs, Grad-CAM otherwise.
        n_examples: how many correct and how many misclassified images to explain.
        n_pairs: how many of the most confused class pairs to show with images.
        max_points: at most this many images go into the t-SNE map (a seeded random subset).
        batch_size, workers, device: evaluation loader and device.

    Returns:
        The path of the HTML file.

    Raises:
        FileNotFoundError: no checkpoint in ``run_dir``, or the data is missing.
        ValueError: an unknown split, or data whose classes differ from the checkpoint's.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    for name, value in (("n_examples", n_examples), ("n_pairs", n_pairs), ("max_points", max_points)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    t0 = time.perf_counter()
    ckpt_path = resolve_checkpoint(run_dir)
    run_dir = ckpt_path.parent
    detect_cfg = _detector_config(ckpt_path)
    if detect_cfg is not None:  # box and mask AP, PR curves and examples instead
        from finegrain.report.detection import build_detection_report

        if split == "val":
            raise ValueError("a detector's report evaluates the train or test split (its validation images are not listed apart)")
        return build_detection_report(ckpt_path, data=data or detect_cfg.get("data"), split=split, dataset=dataset, out=out,
                                      n_examples=n_examples, workers=workers, device=device)
    config = _read_config(run_dir)
    data = data or config.get("data", {}).get("data")
    if not data:
        raise ValueError(f"{run_dir} has no config.yaml naming the data; pass --data")
    if not Path(data).exists():
        raise FileNotFoundError(f"data {data} does not exist; pass --data with the data set the run was trained on")
    dataset = dataset or config.get("data", {}).get("dataset")

    predictor = Predictor.from_checkpoint(ckpt_path, device=device)
    images, _ = eval_images(open_run_split(run_dir, data, split, dataset), predictor.classes, data)
    ev = _evaluate(predictor, images, split, batch_size=batch_size, workers=workers)
    metrics = classification_metrics(ev.logits, torch.as_tensor(ev.labels), images.classes)
    split_text = {"test": "test split", "val": "validation split (held out of train, split.json)",
                  "train": "training split"}[split]

    console.print("report: drawing figures, t-SNE and explanations")
    sections = [
        ("summary", "Summary", _summary(run_dir, ckpt_path, predictor.meta, metrics, ev, data, split_text)),
        ("curves", "Training curves", _curves(run_dir, predictor.meta)),
        ("confusion", "Confusion matrix", _confusion(metrics, images.classes, split_text)),
        ("confused-pairs", "Most confused pairs", _confused_pairs(metrics, ev, n_pairs)),
        ("per-class", "Per-class accuracy", _per_class(metrics)),
        ("calibration", "Calibration", _calibration(ev)),
        ("embedding", "Embedding map (t-SNE)", _embedding(ev, max_points, split_text)),
        ("explanations", "Explanations", _explanations(predictor, ev, method, n_examples)),
        ("config", "Configuration", _config(config, predictor.meta)),
    ]
    title = f"finegrain report: {run_dir.name}"
    subtitle = (f"checkpoint <code>{esc(str(ckpt_path))}</code> evaluated on the <b>{esc(split_text)}</b> of "
                f"<code>{esc(str(data))}</code> ({metrics['n']} images) on {time.strftime('%Y-%m-%d %H:%M')}")
    return write_page(Path(out) if out else run_dir / f"report-{split}.html", title, subtitle, sections, started=t0)


def write_page(out: Path, title: str, subtitle: str, sections, *, started: float) -> Path:
    """Write the report page atomically and say where it is, how big and how long it took."""
    write_text_atomic(out, page(title, subtitle, sections))  # makes the folder
    console.print(f"report: {out} ({out.stat().st_size / 1e6:.1f} MB, {time.perf_counter() - started:.0f} s)")
    return out


# ---------------------------------------------------------------- data and the one evaluation pass


def _detector_config(ckpt_path: Path) -> dict | None:
    """The ``detect`` config of a detector checkpoint, or None for any other task."""
    from finegrain.checkpoint import read_meta
    from finegrain.tasks import TASKS

    meta = read_meta(ckpt_path)
    return (meta.config or {}).get("detect", {}) if TASKS.get(meta.task).outputs == "detections" else None


def _read_config(run_dir: Path) -> dict:
    path = run_dir / "config.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def _logits_and_features(task: Task) -> Callable[[torch.Tensor], torch.Tensor]:
    """``images -> [logits | pooled features]`` (see :func:`finegrain.predict.logits_and_features`)."""
    both = logits_and_features(task)
    return lambda images: torch.cat(both(images), 1)


def _evaluate(predictor: Predictor, images: ImageList, split: str, *, batch_size: int, workers: int) -> _Evaluation:
    loader = DataLoader(ImageDataset(images, predictor.transform), batch_size=batch_size, num_workers=workers,
                        collate_fn=collate)
    with progress_bar(f"report: eval {split}", total=len(images)) as bar:
        out, labels, skipped = predict_loader(_logits_and_features(predictor.task), loader, device=predictor.device,
                                              on_batch=bar.advance)
    c = len(predictor.classes)
    # The loader is sequential, so rows are the readable images in order.
    bad = {p for p, _ in skipped}
    positions = np.array([i for i, p in enumerate(images.paths) if p not in bad], dtype=np.int64)
    return _Evaluation(images, positions, out[:, :c], labels.numpy(), out[:, c:], skipped, predictor.temperature)


# ---------------------------------------------------------------- sections


def _kpi(value: str, label: str) -> str:
    return f'<div class="kpi"><b>{esc(value)}</b><span>{esc(label)}</span></div>'


def _summary(run_dir, ckpt_path, meta, metrics, ev: _Evaluation, data, split_text) -> str:
    ece = expected_calibration_error(ev.probs, torch.as_tensor(ev.labels), n_bins=ev.n_bins)
    kpis = [
        _kpi(f"{metrics['top1']:.2f}%", "top-1"),
        _kpi(f"{metrics.get('top5', float('nan')):.2f}%", "top-5"),
        _kpi(f"{metrics['mean_per_class_acc']:.2f}%", "mean per-class accuracy"),
        _kpi(f"{metrics['macro_f1']:.2f}%", "macro F1"),
        _kpi(f"{100 * ece:.2f}%", f"calibration error (ECE, {ev.n_bins} bins)"),
        _kpi(str(metrics["n"]), f"images ({split_text})"),
        _kpi(str(len(ev.images.classes)), "classes"),
    ]
    val = (meta.get("metrics") or {}).get("val_top1")
    lines = [
        f"<p>Run folder <code>{esc(str(run_dir))}</code>; backbone <b>{esc(str(meta['model'].get('backbone')))}</b>, "
        f"task <b>{esc(str(meta.get('trained_as', meta.get('task'))))}</b>, input {meta['preprocessing']['img_size']} px. "
        f"Best checkpoint from epoch {meta.get('epoch', '?')}"
        + (f" (validation top-1 {val:.2f}%)" if isinstance(val, (int, float)) else "") + ".</p>",
        f"<p>All numbers and figures below come from one evaluation of that checkpoint on the <b>{esc(split_text)}</b> "
        f"of <code>{esc(str(data))}</code> (center crop, no test-time augmentation).</p>",
    ]
    if ev.skipped:
        lines.append(f'<p class="no">{len(ev.skipped)} unreadable images were skipped, e.g. '
                     f"<code>{esc(ev.skipped[0][0])}</code>.</p>")
    return "\n".join(lines) + f'<div class="cards">{"".join(kpis)}</div>'


def _curves(run_dir: Path, meta: dict) -> str:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return f'<p class="note">No {esc(str(path))}: this run has no training log.</p>'
    by_epoch: dict[int, dict] = {}
    for row in read_rows(path):
        if "epoch" in row:
            by_epoch[int(row["epoch"])] = row  # a resumed run may repeat an epoch: keep the last
    rows = [by_epoch[e] for e in sorted(by_epoch)]
    if not rows:
        return f'<p class="note">{esc(str(path))} is empty.</p>'
    png = plots.training_curves(rows, best_epoch=meta.get("epoch"))
    cols = [("train_loss", "train loss", "{:.4f}"), ("train_acc", "train acc %", "{:.2f}"), ("val_loss", "val loss", "{:.4f}"),
            ("val_top1", "val top-1 %", "{:.2f}"), ("val_map", "val mAP", "{:.2f}"), ("val_mask_map", "val mask mAP", "{:.2f}"),
            ("lr", "lr", "{:.3g}"), ("images_per_s", "img/s", "{:.1f}"),
            ("epoch_seconds", "seconds", "{:.0f}")]
    cols = [c for c in cols if any(isinstance(r.get(c[0]), (int, float)) for r in rows)]
    body = [[r["epoch"]] + [fmt.format(r[k]) if isinstance(r.get(k), (int, float)) else "" for k, _, fmt in cols] for r in rows]
    tbl = table(["epoch"] + [c[1] for c in cols], body, numeric=[True] * (len(cols) + 1))
    note = ('<p class="note">Train accuracy is measured on augmented (and possibly mixed) batches while the weights '
            "change; the learning rate is the head's, at the end of each epoch. The dashed line marks the best "
            "checkpoint's epoch.</p>")
    return img_tag(png, "training curves") + note + f'<div class="scroll">{tbl}</div>'


def _confusion(metrics: dict, classes: list[str], split_text: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        png = save_confusion_matrix_png(metrics["confusion_matrix"], classes, Path(tmp) / "cm.png").read_bytes()
    return (f'<p class="note">Rows are true classes, columns predicted classes, each row as a fraction of its '
            f"images ({esc(split_text)}).</p>" + img_tag(png, "confusion matrix"))


def _thumb(path: str, size: int = 104) -> str | None:
    try:
        img = ImageOps.fit(load_rgb(path), (size, size), Image.BICUBIC)
    except Exception:  # noqa: BLE001  (an unreadable image is reported in the summary)
        return None
    return img_tag(pil_png(img), Path(path).name)


def _confused_pairs(metrics: dict, ev: _Evaluation, n_pairs: int, per_side: int = 4) -> str:
    pairs = metrics["most_confused"][:n_pairs]
    if not pairs:
        return '<p class="ok">No mistakes on this split: nothing is confused.</p>'
    index = {c: i for i, c in enumerate(ev.images.classes)}
    pred, conf = ev.predicted, ev.probs.max(1).values.numpy()
    rows = [[p["true"], p["predicted"], p["count"], (f"{p['rate']:.1f}%", p["rate"])] for p in metrics["most_confused"]]
    out = [table(["true class", "predicted as", "images", "% of true class"], rows, numeric=[False, False, True, True]),
           '<p class="note">Left: images of the true class that the model gave to the other class (most confident '
           "mistakes first). Right: images of the other class that it recognised correctly, for comparison.</p>"]
    for p in pairs:
        t, q = index[p["true"]], index[p["predicted"]]
        wrong = np.flatnonzero((ev.labels == t) & (pred == q))
        wrong = wrong[np.argsort(-conf[wrong])][:per_side]
        other = np.flatnonzero((ev.labels == q) & (pred == q))
        if not len(other):
            other = np.flatnonzero(ev.labels == q)
        other = other[np.argsort(-conf[other])][:per_side]
        left = "".join(filter(None, (_thumb(ev.path(i)) for i in wrong)))
        right = "".join(filter(None, (_thumb(ev.path(i)) for i in other)))
        out.append(
            f'<div class="pair"><div class="side"><h3>{esc(p["true"])} predicted as {esc(p["predicted"])} '
            f'({p["count"]}, {p["rate"]:.1f}%)</h3><div class="thumbs bad">{left}</div></div>'
            f'<div class="side"><h3>{esc(p["predicted"])} (correctly recognised)</h3><div class="thumbs">{right}</div></div></div>'
        )
    return "\n".join(out)


def _per_class(metrics: dict) -> str:
    rows = [r for r in metrics["per_class"] if r["accuracy"] is not None]
    rows.sort(key=lambda r: (r["accuracy"], r["class"]))
    png = plots.per_class_bars([r["class"] for r in rows], [r["accuracy"] for r in rows], metrics["mean_per_class_acc"])
    body = [[r["class"], r["support"], r["correct"], (f"{r['accuracy']:.1f}", r["accuracy"]),
             (f"{r['precision']:.1f}", r["precision"]), (f"{r['recall']:.1f}", r["recall"]), (f"{r['f1']:.1f}", r["f1"])]
            for r in rows]
    tbl = table(["class", "images", "correct", "accuracy %", "precision %", "recall %", "F1 %"], body, sortable=True,
                numeric=[False] + [True] * 6)
    missing = metrics.get("classes_without_samples") or []
    note = '<p class="note">Worst classes first; click a column header to sort.'
    note += f" Classes without images in this split: {esc(', '.join(missing[:20]))}.</p>" if missing else "</p>"
    return note + f'<div class="columns"><div><div class="scroll">{tbl}</div></div><div>{img_tag(png, "per-class accuracy")}</div></div>'


def _calibration(ev: _Evaluation) -> str:
    """The reliability diagram of the reported probabilities; with a fitted temperature, also the one before it."""
    if ev.temperature == 1.0:
        return _reliability(ev.probs, ev)
    before = ev.logits.softmax(1)
    return (f"<p>The checkpoint divides its logits by a temperature of <b>{ev.temperature:.3f}</b>, fitted on the "
            "validation split (Guo et al. 2017). Before it:</p>" + _reliability(before, ev)
            + "<p>After it (the probabilities predict, serve and the exports report):</p>" + _reliability(ev.probs, ev))


def _reliability(probs: torch.Tensor, ev: _Evaluation) -> str:
    labels = torch.as_tensor(ev.labels)
    n_bins = ev.n_bins
    ece = expected_calibration_error(probs, labels, n_bins=n_bins)
    bins = reliability_bins(probs, labels, n_bins=n_bins)
    conf = probs.max(1).values.numpy()
    acc = float((ev.predicted == ev.labels).mean())
    mean_conf = float(conf.mean())
    verdict = "over-confident" if mean_conf > acc + 0.01 else "under-confident" if mean_conf < acc - 0.01 else "well calibrated on average"
    png = plots.reliability_diagram(bins, ece, conf)
    text = (f"<p>Expected calibration error <b>{100 * ece:.2f}%</b> ({n_bins} equal-width bins); mean confidence "
            f"{100 * mean_conf:.1f}% against accuracy {100 * acc:.1f}%: the model is <b>{verdict}</b>. "
            "Bars below the diagonal are confidence bins where the model is right less often than it claims.</p>")
    return text + img_tag(png, "reliability diagram")


def _embedding(ev: _Evaluation, max_points: int, split_text: str) -> str:
    n = len(ev.labels)
    if min(n, max_points) < 5:
        return f'<p class="note">Too few images ({min(n, max_points)}) for a t-SNE map.</p>'
    try:
        from sklearn.decomposition import PCA
        from sklearn.manifold import TSNE
    except ImportError as e:
        raise ImportError("the report's embedding map needs scikit-learn: pip install scikit-learn") from e
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(n, size=max_points, replace=False)) if n > max_points else np.arange(n)
    feats = torch.nn.functional.normalize(ev.features[rows], dim=1).numpy().astype(np.float64)
    if feats.shape[1] > 50 and len(rows) > 50:  # the usual t-SNE recipe: PCA to 50 dimensions first
        feats = PCA(n_components=50, random_state=0).fit_transform(feats)
    perplexity = float(min(30.0, max(2.0, (len(rows) - 1) / 3)))
    points = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=0).fit_transform(feats)
    correct = ev.predicted[rows] == ev.labels[rows]
    png = plots.embedding_map(points, ev.labels[rows], correct, ev.images.classes,
                              f"t-SNE of pooled features, {len(rows)} images ({split_text})")
    return (f'<p class="note">Each point is an image, placed by t-SNE (perplexity {perplexity:.0f}, cosine-normalised '
            f"pooled pre-logit features, {ev.features.shape[1]} dimensions) and coloured by its true class; crosses are "
            "misclassified images. Distances between clusters are not meaningful in t-SNE, only neighbourhoods.</p>"
            + img_tag(png, "t-SNE embedding map"))


def _explanations(predictor: Predictor, ev: _Evaluation, method: str | None, n_examples: int) -> str:
    from finegrain.explain.cam import default_method, display_crop, explain, overlay

    method = method or default_method(predictor.task.model)
    pred, conf = ev.predicted, ev.probs.max(1).values.numpy()
    right = np.flatnonzero(pred == ev.labels)
    wrong = np.flatnonzero(pred != ev.labels)
    chosen = [(i, True) for i in _spread(right[np.argsort(-conf[right])], ev.labels, n_examples)]
    chosen += [(i, False) for i in wrong[np.argsort(-conf[wrong])][:n_examples]]
    if not chosen:
        return '<p class="note">No images to explain.</p>'
    pil, keep = [], []
    for i, ok in chosen:
        try:
            pil.append(load_rgb(ev.path(i)))
            keep.append((i, ok))
        except Exception:  # noqa: BLE001  (unreadable images are reported in the summary)
            continue
    class_specific = method != "rollout"
    try:
        maps_pred = explain(predictor, pil, method=method)
        maps_true = (explain(predictor, [pil[k] for k, (_, ok) in enumerate(keep) if not ok], method=method,
                             target=[int(ev.labels[i]) for i, ok in keep if not ok]) if class_specific else [])
    except ValueError as e:  # a model the method cannot handle: the rest of the report still stands
        return f'<p class="no">No {esc(method)} explanations for this model: {esc(str(e))}</p>'
    classes, prep = predictor.classes, predictor.meta["preprocessing"]
    figs, w = [], 0
    for k, ((i, ok), (heat, _)) in enumerate(zip(keep, maps_pred)):
        crop = display_crop(pil[k], prep)
        panels = [crop, overlay(crop, heat)]
        if not ok and class_specific:
            panels.append(overlay(crop, maps_true[w][0]))
            w += 1
        side = int(np.clip(crop.width, 128, 200))  # small crops are scaled up to stay readable
        canvas = Image.new("RGB", (side * len(panels) + 4 * (len(panels) - 1), side), "white")
        for j, im in enumerate(panels):
            canvas.paste(im.resize((side, side), Image.BICUBIC), (j * (side + 4), 0))
        t, p = classes[int(ev.labels[i])], classes[int(pred[i])]
        verdict = '<span class="ok">correct</span>' if ok else '<span class="no">wrong</span>'
        caption = f"{verdict} true <b>{esc(t)}</b>, predicted <b>{esc(p)}</b> ({100 * conf[i]:.0f}%)<br>"
        caption += "image | map for the predicted class" + ("" if ok or not class_specific else " | map for the true class")
        caption += f'<br><span class="muted">{esc(Path(ev.path(i)).name)}</span>'
        figs.append(f'<figure class="{"right" if ok else "wrong"}">{img_tag(pil_png(canvas), f"{method} overlay")}'
                    f"<figcaption>{caption}</figcaption></figure>")
    name = {"gradcam": "Grad-CAM", "gradcampp": "Grad-CAM++", "rollout": "attention rollout"}.get(method, method)
    note = (f'<p class="note">{esc(name)} overlays on the eval crop the model saw: the {sum(ok for _, ok in keep)} most '
            f"confident correct predictions (from different classes where possible) and the {sum(not ok for _, ok in keep)} "
            "most confident mistakes. Red is where the evidence for the class is strongest.</p>")
    return note + f'<div class="explain">{"".join(figs)}</div>'


def _spread(order: np.ndarray, labels: np.ndarray, n: int) -> list[int]:
    """The first ``n`` of ``order``, taking one per class before any class repeats."""
    picked, seen = [], set()
    for i in order:
        if labels[i] not in seen:
            picked.append(int(i))
            seen.add(labels[i])
        if len(picked) == n:
            return picked
    rest = [int(i) for i in order if int(i) not in set(picked)]
    return picked + rest[: n - len(picked)]


def _config(config: dict, meta: dict) -> str:
    ckpt = {k: meta.get(k) for k in ("task", "trained_as", "task_args", "num_classes", "preprocessing", "epoch",
                                     "metrics", "versions") if meta.get(k) is not None}
    parts = []
    if config:
        parts.append("<h3>config.yaml</h3><p class=\"note\">Train again with <code>finegrain train --config config.yaml --name NEW_NAME</code>."
                     f"</p><pre>{esc(_yaml(config))}</pre>")
    parts.append(f"<h3>checkpoint metadata</h3><pre>{esc(_yaml(ckpt))}</pre>")
    return "\n".join(parts)


class _Dumper(yaml.SafeDumper):
    """Block-style YAML with short lists (mean, std) kept on one line."""


_Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


def _yaml(d: dict) -> str:
    return yaml.dump(d, Dumper=_Dumper, sort_keys=False, default_flow_style=False)
