"""Export a detector checkpoint to ONNX: one image of any size in, its detections out, checked against eager.

The graph takes ``image``, one ``[3, H, W]`` float RGB image in ``[0, 1]`` with dynamic ``H`` and
``W``, and holds the detector's own resize and normalisation, so that it is fed images as they
are, like :meth:`DetectionTask.predict`. It returns ``boxes`` ``[N, 4]`` (``x0, y0, x1, y1`` in the
input image's pixels), ``scores`` ``[N]``, ``labels`` ``[N]`` in finegrain's ``0..C-1`` (the
background shift is undone in the graph) and, for Mask R-CNN, ``masks`` ``[N, 1, H, W]``
(probabilities; threshold at 0.5). The detector's score threshold, NMS and detections-per-image
limit are baked in. Class names, the detector and the output layout travel in ``metadata_props``.

torchvision's detectors export with the TorchScript-based exporter (``dynamo=False``), which traces
them with their ONNX-specific code paths. One of those is not exact: torchvision sizes the resized
image with float32 arithmetic, one pixel short of eager PyTorch's float64 size for some input sizes
(a 220 px short side to 128 px becomes 127), so the export traces a resize that sizes in float64
like eager. Every export is then run with ONNX Runtime next to the eager model on real images of
several sizes and refused when the detections differ.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import random
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

INPUT_NAME = "image"
OUTPUTS = ("boxes", "scores", "labels")
SYNTHETIC_SIZES = ((220, 333), (330, 209))
"""(H, W) of the synthetic images every export is also checked on: a landscape and a portrait image whose
short sides do not scale to ``img_size`` exactly in float32 (they catch a fixed or mis-sized resize)."""


@dataclasses.dataclass
class Tolerance:
    """How close the exported model's detections must be to eager ones.

    Attributes:
        score_threshold: detections scoring at least this in one model must be found in the other.
        box_px: largest box coordinate difference, in pixels of the input image ...
        box_rel: ... or this fraction of the image's longer side, whichever is larger.
        score: largest score difference.
        mask_iou: smallest IoU of the two binarised (> 0.5) masks of a matched detection (Mask R-CNN).
    """

    score_threshold: float = 0.05
    box_px: float = 1.0
    box_rel: float = 2e-3
    score: float = 2e-3
    mask_iou: float = 0.9


def _require_onnx():
    try:
        import onnx
        import onnxruntime
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"ONNX export needs the 'export' extra: pip install 'finegrain[export]' ({e})") from e
    return onnx, onnxruntime


def _exact_resize_transform(transform: nn.Module) -> nn.Module:
    """``transform`` (a ``GeneralizedRCNNTransform``) whose traced resize sizes the image in float64, as eager does."""
    import torch.nn.functional as F
    import torchvision
    from torch.onnx.operators import shape_as_tensor

    base = type(transform)

    class _ExactResize(base):
        def resize(self, image, target=None):
            if target is not None or self.training or self.fixed_size is not None or not torchvision._is_tracing():
                return super().resize(image, target)
            # eager: scale = min(min_size / short, max_size / long) and floor(side * scale), all in float64. 1-D
            # tensors, because the exporter turns the division of 0-d float64 tensors into a float32 one.
            hw = shape_as_tensor(image)[-2:].to(torch.float64)
            sides = torch.stack([hw.min(), hw.max()]).reshape(2)
            limits = torch.tensor([float(self.min_size[-1]), float(self.max_size)], dtype=torch.float64)
            scale = (limits / sides).min(0, keepdim=True).values
            size = torch.floor(hw * scale).to(torch.int64)
            resized = F.interpolate(image[None], size=(size[0], size[1]), mode="bilinear", align_corners=False)[0]
            return resized, None

    out = copy.copy(transform)
    out.__class__ = _ExactResize
    return out


class _OneImage(nn.Module):
    """``image [3, H, W] -> boxes, scores, labels (0..C-1)[, masks]`` through a copy of a torchvision detector."""

    def __init__(self, detector: nn.Module, masks: bool, label_offset: int = 1):
        super().__init__()
        self.detector = copy.deepcopy(detector).eval()
        self.detector.transform = _exact_resize_transform(self.detector.transform)
        self.masks, self.label_offset = masks, label_offset

    def forward(self, image: torch.Tensor):
        out = self.detector([image])[0]
        result = (out["boxes"], out["scores"], out["labels"] - self.label_offset)  # the R-CNN family's 0 is the background
        return (*result, out["masks"]) if self.masks else result


def output_names(masks: bool) -> list[str]:
    return [*OUTPUTS, "masks"] if masks else list(OUTPUTS)


def detector_metadata(meta, source: str | Path | None = None) -> dict[str, str]:
    """``metadata_props`` of an exported detector: the classifier export's keys plus the detector and the I/O layout."""
    from finegrain.deploy.onnx import export_metadata

    info = dataclasses.asdict(meta) if dataclasses.is_dataclass(meta) else dict(meta)
    args = info.get("task_args") or {}
    masks = args.get("detector") == "mask_rcnn"
    props = export_metadata(info, source)
    props.update({
        "detector": str(args.get("detector", "")),
        "outputs": ",".join(output_names(masks)),
        "input": "image: one [3, H, W] float32 RGB image in [0, 1], any H and W (resized and normalised inside)",
        "boxes": "x0, y0, x1, y1 in the input image's pixels",
        "labels": "0..C-1, indices into classes",
        "detection": json.dumps(info.get("detection") or {}),
    })
    if masks:
        props["masks"] = "[N, 1, H, W] probabilities in the input image's pixels (threshold at 0.5)"
    return props


def set_limits(detector: nn.Module, *, score_thresh: float | None = None, max_detections: int | None = None) -> dict[str, Any]:
    """Set a torchvision detector's score threshold and detections-per-image limit (those given); return both as set."""
    owner = getattr(detector, "roi_heads", detector)  # the R-CNN family keeps them in its RoI heads
    if score_thresh is not None:
        if not 0 <= score_thresh < 1:
            raise ValueError(f"score_thresh must be in [0, 1), got {score_thresh}")
        owner.score_thresh = float(score_thresh)
    if max_detections is not None:
        if max_detections < 1:
            raise ValueError(f"max_detections must be at least 1, got {max_detections}")
        owner.detections_per_img = int(max_detections)
    return {"score_thresh": float(owner.score_thresh), "max_detections": int(owner.detections_per_img)}


def _trace(module: _OneImage, example: torch.Tensor, opset: int, masks: bool) -> bytes:
    names = output_names(masks)
    dynamic = {INPUT_NAME: {1: "height", 2: "width"}, **{n: {0: "detections"} for n in names}}
    if masks:
        dynamic["masks"] = {0: "detections", 2: "height", 3: "width"}
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        # the tracer warns about every shape-dependent Python value in torchvision; verification is what tells
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), buf, dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
                          output_names=names, dynamic_axes=dynamic, do_constant_folding=True)
    return buf.getvalue()


def synthetic_image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A smooth random ``[3, H, W]`` image in [0, 1] (blobs and edges, so that a detector fires on something)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, max(2, height // 24), max(2, width // 24), generator=g)
    image = torch.nn.functional.interpolate(low, size=(height, width), mode="bicubic", align_corners=False)[0]
    return (image + 0.05 * torch.rand(3, height, width, generator=g)).clamp(0, 1)


def load_image(path: str | Path) -> torch.Tensor:
    """An image file as the detector takes it: ``[3, H, W]`` float RGB in [0, 1] at its own size."""
    from torchvision.transforms.functional import pil_to_tensor

    from finegrain.data.dataset import load_rgb

    return pil_to_tensor(load_rgb(str(path))).float() / 255


def detection_images(data: str | Path, n: int, *, seed: int = 1, labels: str = "species", splits: Sequence[str] = ("test", "train"),
                     fmt: str = "auto", images: str | None = None) -> list[Path]:
    """Up to ``n`` image files of a detection data set (the first of ``splits`` it has), else of a folder of images."""
    from finegrain.deploy.onnx import sample_images
    from finegrain.detect.readers import open_detection

    if not Path(data).exists():
        raise FileNotFoundError(f"--verify-data {data} does not exist")
    for split in splits:
        try:
            files = [Path(p) for p in open_detection(data, split, fmt=fmt, labels=labels, images=images).paths]
        except (ValueError, FileNotFoundError):
            continue
        if files:
            return files if n >= len(files) else sorted(random.Random(seed).sample(files, n))
    return sample_images(data, n, seed=seed)


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt, rb = np.maximum(a[:, None, :2], b[None, :, :2]), np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = lambda x: np.prod(np.clip(x[:, 2:] - x[:, :2], 0, None), axis=1)  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-9)


def _match(ref: dict[str, np.ndarray], other: dict[str, np.ndarray], tol: Tolerance, box_tol: float) -> tuple[list, int]:
    """Greedy one-to-one matching of ``ref``'s detections above the threshold to ``other``'s (same label, closest box
    within ``box_tol``, score within the tolerance, anywhere above ``threshold - score tolerance``).

    Detections tie in score, so their order is not compared: only that each has its counterpart.
    Returns the ``(i, j)`` pairs and how many of ``ref``'s detections above the threshold found none.
    """
    free = np.flatnonzero(other["scores"] >= tol.score_threshold - tol.score)
    pairs, missing = [], 0
    for i in np.flatnonzero(ref["scores"] >= tol.score_threshold):
        if len(free):
            diff = np.abs(other["boxes"][free] - ref["boxes"][i]).max(1)
            ok = (other["labels"][free] == ref["labels"][i]) & (np.abs(other["scores"][free] - ref["scores"][i]) <= tol.score)
            ok &= diff <= box_tol
            if ok.any():
                k = int(np.flatnonzero(ok)[np.argmin(diff[ok])])
                pairs.append((int(i), int(free[k])))
                free = np.delete(free, k)
                continue
        missing += 1
    return pairs, missing


def compare_detections(eager: dict[str, np.ndarray], exported: dict[str, np.ndarray], image_size: tuple[int, int],
                       tol: Tolerance | None = None) -> dict[str, Any]:
    """How the exported model's detections of one image differ from eager ones.

    Returns:
        ``detections`` (eager, above the threshold), ``exported_detections``, ``unmatched`` (above the threshold in
        either model without a counterpart in the other), ``max_box_diff`` (px), ``max_score_diff``, ``labels_equal``
        (of the matched pairs, always true by construction), and for masks ``min_mask_iou`` and ``max_mask_diff``.
    """
    tol = tol or Tolerance()
    box_tol = max(tol.box_px, tol.box_rel * max(image_size))
    pairs, missing = _match(eager, exported, tol, box_tol)
    back, extra = _match(exported, eager, tol, box_tol)
    out: dict[str, Any] = {"size": list(image_size), "detections": int((eager["scores"] >= tol.score_threshold).sum()),
                           "exported_detections": int((exported["scores"] >= tol.score_threshold).sum()),
                           "unmatched": missing + extra, "max_box_diff": 0.0, "max_score_diff": 0.0, "labels_equal": True}
    if pairs:
        i, j = map(np.asarray, zip(*pairs))
        out["max_box_diff"] = float(np.abs(eager["boxes"][i] - exported["boxes"][j]).max())
        out["max_score_diff"] = float(np.abs(eager["scores"][i] - exported["scores"][j]).max())
        out["labels_equal"] = bool((eager["labels"][i] == exported["labels"][j]).all())
        if "masks" in eager:
            a, b = eager["masks"][i].reshape(len(i), -1), exported["masks"][j].reshape(len(j), -1)
            inter, union = ((a > 0.5) & (b > 0.5)).sum(1), ((a > 0.5) | (b > 0.5)).sum(1)
            out["min_mask_iou"] = float(np.where(union > 0, inter / np.maximum(union, 1), 1.0).min())
            out["max_mask_diff"] = float(np.abs(a - b).max())
    out["ok"] = (out["unmatched"] == 0 and out["labels_equal"] and out.get("min_mask_iou", 1.0) >= tol.mask_iou)
    return out


class OnnxDetector:
    """ONNX Runtime session (CPU) of an exported detector: ``detect(image) -> {boxes, scores, labels[, masks]}`` as numpy."""

    def __init__(self, path: str | Path | bytes, *, threads: int | None = None):
        _, ort = _require_onnx()
        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # the traced graph's unused shape nodes make ONNX Runtime warn at every load
        if threads:
            opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        source = path if isinstance(path, bytes) else str(path)
        self.session = ort.InferenceSession(source, sess_options=opts, providers=["CPUExecutionProvider"])
        self.outputs = [o.name for o in self.session.get_outputs()]

    def detect(self, image: torch.Tensor | np.ndarray) -> dict[str, np.ndarray]:
        x = image.numpy() if isinstance(image, torch.Tensor) else image
        values = self.session.run(self.outputs, {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)})
        return dict(zip(self.outputs, values))


def verify_detector(onnx_model: str | Path | bytes, task: nn.Module, images: Sequence[torch.Tensor], *,
                    names: Sequence[str] | None = None, tol: Tolerance | None = None) -> dict[str, Any]:
    """Run the exported detector and ``task.predict`` on each image and compare (see :func:`compare_detections`).

    Returns:
        ``images`` (per-image comparisons, with ``name``), ``max_box_diff``, ``max_score_diff``, ``min_mask_iou`` (masks),
        ``detections`` (eager, above the threshold, all images), ``unmatched``, ``sizes`` and ``ok``.
    """
    tol = tol or Tolerance()
    runner = OnnxDetector(onnx_model)
    per_image = []
    for k, image in enumerate(images):
        with torch.no_grad():
            eager = {key: v.float().numpy() if v.is_floating_point() else v.numpy() for key, v in task.predict([image])[0].items()}
        result = compare_detections(eager, runner.detect(image), tuple(image.shape[-2:]), tol)
        per_image.append({"name": str(names[k]) if names else f"image {k}", **result})
    summary: dict[str, Any] = {
        "images": per_image, "score_threshold": tol.score_threshold,
        "sizes": sorted({tuple(r["size"]) for r in per_image}),
        "detections": sum(r["detections"] for r in per_image), "unmatched": sum(r["unmatched"] for r in per_image),
        "max_box_diff": max((r["max_box_diff"] for r in per_image), default=0.0),
        "max_score_diff": max((r["max_score_diff"] for r in per_image), default=0.0),
        "ok": all(r["ok"] for r in per_image)}
    if any("min_mask_iou" in r for r in per_image):
        summary["min_mask_iou"] = min(r["min_mask_iou"] for r in per_image if "min_mask_iou" in r)
        summary["max_mask_diff"] = max(r["max_mask_diff"] for r in per_image if "max_mask_diff" in r)
    summary["sizes"] = [list(s) for s in summary["sizes"]]
    return summary


def _failure(summary: dict[str, Any], tol: Tolerance) -> str:
    bad = [r for r in summary["images"] if not r["ok"]]
    lines = [f"{r['name']} ({r['size'][0]}x{r['size'][1]}): {r['detections']} eager / {r['exported_detections']} exported "
             f"detections above {tol.score_threshold}, {r['unmatched']} without a counterpart, max box diff "
             f"{r['max_box_diff']:.3g} px" + (f", min mask IoU {r['min_mask_iou']:.3f}" if "min_mask_iou" in r else "")
             for r in bad[:5]]
    return "; ".join(lines)


def export_detector_onnx(checkpoint: str | Path, out: str | Path, *, verify_images: Sequence[str | Path] | None = None,
                         opset: int = 17, tol: Tolerance | None = None, synthetic: bool = True, score_thresh: float | None = None,
                         max_detections: int | None = None) -> dict[str, Any]:
    """Export a detector checkpoint to ONNX (one image of dynamic size in), verified against the eager detector.

    The file is written only when verification passes, atomically (a temporary file renamed onto ``out``).

    Args:
        checkpoint: detector checkpoint file or run folder.
        out: the ``.onnx`` file to write.
        verify_images: image files to compare eager and exported detections on, at their own sizes.
        opset: ONNX opset (torchvision's detectors export at 11 and later; 17 by default).
        tol: what counts as the same detections (:class:`Tolerance`).
        synthetic: also verify on two synthetic images (:data:`SYNTHETIC_SIZES`), so that two different input sizes are
            always checked, whatever the sizes of ``verify_images``.
        score_thresh: the detector's own score threshold baked into the graph (default: the checkpoint's detector's,
            torchvision's 0.05); lower it to filter downstream instead.
        max_detections: the most detections per image the graph returns (default: the detector's, 100).

    Returns:
        A summary: ``path``, ``checkpoint``, ``detector``, ``export_seconds``, ``verify_inputs`` and ``verify``
        (:func:`verify_detector`'s result: max box, score and mask differences, per-image comparisons).

    Raises:
        ValueError: the checkpoint is not a detector, ``out`` is the checkpoint, the export failed, or the exported
            model's detections differ from eager ones (nothing is written then).
    """
    onnx, _ = _require_onnx()
    from finegrain import checkpoint as ckpt
    from finegrain.deploy.onnx import _set_metadata
    from finegrain.detect.evaluate import load_detector

    tol = tol or Tolerance()
    path = ckpt.resolve_checkpoint(checkpoint)
    out = Path(out)
    if out.resolve() == path.resolve():
        raise ValueError(f"output {out} is the checkpoint itself; choose another path")
    task, meta = load_detector(path, "cpu")
    task.eval()
    detector = (meta.task_args or {}).get("detector", "faster_rcnn")
    limits = set_limits(task.model, score_thresh=score_thresh, max_detections=max_detections)
    masks = bool(getattr(task, "masks", False))
    images, names = [], []
    for f in verify_images or []:
        try:
            images.append(load_image(f))
            names.append(str(f))
        except Exception:  # noqa: BLE001  (an unreadable file must not stop an export)
            continue
    if verify_images and not images:
        raise ValueError(f"none of the {len(verify_images)} verification images could be read (first: {verify_images[0]})")
    real = len(images)
    if synthetic or not images:
        for k, (h, w) in enumerate(SYNTHETIC_SIZES):
            images.append(synthetic_image(h, w, seed=k))
            names.append(f"synthetic {h}x{w}")
    size = int(meta.preprocessing.get("img_size", 512))
    start = time.perf_counter()
    try:
        blob = _trace(_OneImage(task.model, masks, task.label_offset), synthetic_image(size, size * 4 // 3, seed=7), opset, masks)
    except Exception as e:  # noqa: BLE001  (the exporter raises many error types)
        what = "Mask R-CNN's mask head" if masks else f"the {detector} detector"
        raise ValueError(f"ONNX export of {path} ({detector}) failed in {what}: {type(e).__name__}: {e}. Try another --opset "
                         "(torchvision needs 11 or later)" + (", or export a faster_rcnn detector" if masks else "")) from e
    model = onnx.load_from_string(blob)
    _set_metadata(model, {**detector_metadata(meta, path), "opset": str(opset), **{k: str(v) for k, v in limits.items()}})
    seconds = time.perf_counter() - start
    blob = model.SerializeToString()
    report = verify_detector(blob, task, images, names=names, tol=tol)
    if not report["ok"]:
        raise ValueError(f"the ONNX export of {path} ({detector}) does not reproduce the eager detections, so nothing was written: "
                         f"{_failure(report, tol)}. Try another --opset, or report this as a bug")
    ckpt.write_bytes_atomic(out, blob)
    inputs = f"{real} real image(s)" + (f" and {len(images) - real} synthetic" if len(images) > real else "")
    summary = {"checkpoint": str(path), "format": "onnx", "path": str(out), "task": meta.task, "detector": detector, "opset": opset,
               **limits, "export_seconds": round(seconds, 2), "verify_inputs": f"{inputs} of {len(report['sizes'])} sizes", "verify": report}
    if report["detections"] == 0:
        summary["warning"] = (f"no detection scored {tol.score_threshold} or more on any verification image, so only empty "
                              "outputs were compared; verify on images of the training data (--verify-data)")
    return summary
