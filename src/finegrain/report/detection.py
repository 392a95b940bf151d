"""The HTML report of a detector run: COCO AP, training curves, precision-recall curves, per-class AP, examples.

:func:`finegrain.report.build.build_report` hands a detector checkpoint here; the numbers and
figures are those of :func:`finegrain.detect.evaluate.evaluate_detection` (its eval folder is
kept beside the report).
"""

from __future__ import annotations

import time
from pathlib import Path

from finegrain.report.html import esc, img_tag, table

_KEYS = (("map", "mAP@[.5:.95]"), ("map_50", "AP50"), ("map_75", "AP75"), ("map_small", "AP small"), ("map_medium", "AP medium"),
         ("map_large", "AP large"), ("mar_100", "AR@100"))


def build_detection_report(ckpt_path: Path, *, data: str | Path, split: str, dataset: str | None, out: Path | None,
                           n_examples: int, workers: int, device: str) -> Path:
    """Evaluate a detector checkpoint on ``split`` of ``data`` and write its report (``report-<split>.html`` by default)."""
    from finegrain.detect.evaluate import evaluate_detection
    from finegrain.report.build import _config, _curves, _read_config, write_page

    run_dir = ckpt_path.parent
    t0 = time.perf_counter()
    m = evaluate_detection(ckpt_path, data, split=split, dataset=dataset, out_dir=run_dir / f"eval-{split}", workers=workers,
                           device=device, examples=max(n_examples, 1))
    from finegrain.checkpoint import read_meta

    meta = read_meta(ckpt_path)
    ev = Path(m["out_dir"])
    sections = [
        ("summary", "Summary", _summary(m, meta)),
        ("curves", "Training curves", _curves(run_dir, meta)),
        ("pr", "Precision-recall (IoU 0.5)", img_tag((ev / "pr_curves.png").read_bytes(), "precision-recall curves")),
        ("per-class", "Per-class AP", _per_class(m)),
        ("examples", "Examples", img_tag((ev / "examples.png").read_bytes(), "predicted and true boxes")
         + '<p class="note">Predicted boxes (and masks) with score at least 0.3 in colour with their class and score; true '
           "boxes in white.</p>"),
        ("config", "Configuration", _config(_read_config(run_dir) or (meta.config or {}).get("detect", {}), meta)),
    ]
    title = f"finegrain detection report: {run_dir.name}"
    subtitle = (f"checkpoint <code>{esc(str(ckpt_path))}</code> on the <b>{esc(split)}</b> split of <code>{esc(str(data))}</code> "
                f"({m['images']} images, {m['objects']} objects) on {time.strftime('%Y-%m-%d %H:%M')}")
    return write_page(Path(out) if out else run_dir / f"report-{split}.html", title, subtitle, sections, started=t0)


def _summary(m: dict, meta) -> str:
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    rows = [[name, fmt(m.get(key)), fmt(m.get(f"mask_{key}")) if "mask_map" in m else ""] for key, name in _KEYS]
    info = meta.detection or {}
    note = (f'<p class="note">COCO metrics (pycocotools through torchmetrics), in percent. {meta.task_args.get("detector", "")} on '
            f"{esc(meta.backbone)}, labels: {esc(info.get('labels', 'species'))}; {m['boxes_clipped']} boxes clipped to their image and "
            f"{m['boxes_dropped']} dropped (zero area or inverted) while reading the data; {len(m['skipped'])} unreadable images; "
            f"{m['images_per_s']:.1f} images/s.</p>")
    return table(["metric", "box", "mask"], rows, numeric=[False, True, True]) + note


def _per_class(m: dict) -> str:
    masks = m.get("mask_per_class_ap") or {}
    fmt = lambda v: "" if v is None else f"{v:.2f}"  # noqa: E731
    rows = [[name, fmt(ap), fmt(masks.get(name))] for name, ap in m["per_class_ap"].items()]
    return '<div class="scroll">' + table(["class", "box AP", "mask AP"], rows, sortable=True, numeric=[False, True, True]) + "</div>"
