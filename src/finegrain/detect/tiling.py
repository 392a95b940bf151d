"""Tiled inference: detect small objects in large images without downscaling them.

A 4000x3000 photo, a slide or an aerial image is cut into overlapping windows of at most
``tile`` pixels a side; the detector sees each window at full resolution, a few windows at a
time, so memory is bounded by the tile and not by the image. The boxes are shifted back into
image coordinates and merged across windows. The idea is SAHI's: Akyon, Altinuc and Temizel,
"Slicing Aided Hyper Inference and Fine-tuning for Small Object Detection", ICIP 2022,
arXiv:2202.06934.

An object cut by an internal window edge is seen twice: truncated in one window and whole in
its neighbour (whenever it is smaller than the overlap). The merge (:func:`merge_detections`)
therefore prefers whole views: in the class-wise NMS a box that touches an internal edge of its
window ranks below every box that does not, and a touching box that lies mostly inside a larger
box of its class reaching across that edge is dropped even when their IoU is too low for NMS.
Objects larger than the overlap are truncated in every window; ``predict_tiled(whole=True)``
adds one pass over the image resized to a tile (SAHI's "standard prediction") for them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torchvision.ops import batched_nms, box_area

Window = tuple[int, int, int, int]
"""``(x0, y0, x1, y1)`` of a window in image pixels, ``x1`` and ``y1`` exclusive."""


def tile_windows(height: int, width: int, tile: int, overlap: int) -> list[Window]:
    """Windows of at most ``tile`` pixels a side covering a ``height`` x ``width`` image.

    Along each side the windows are spread evenly from edge to edge (the last row and column end
    at the image's edge, none reaches beyond it), with the fewest windows that let neighbours
    share at least ``overlap`` pixels. A side shorter than ``tile`` gets one window of its length,
    so an image smaller than a tile is one window, the image itself.

    Returns:
        ``(x0, y0, x1, y1)`` windows, row by row.
    """
    if isinstance(tile, bool) or not isinstance(tile, int) or tile <= 0:
        raise ValueError(f"--tile must be a positive number of pixels, got {tile!r}")
    if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0:
        raise ValueError(f"--tile-overlap must be a number of pixels >= 0, got {overlap!r}")
    if overlap >= tile:
        raise ValueError(f"--tile-overlap ({overlap}) must be smaller than --tile ({tile}): windows would not advance; "
                         f"a quarter of the tile ({tile // 4}) is a usual choice")
    if height <= 0 or width <= 0:
        raise ValueError(f"cannot tile an empty image ({height}x{width} pixels)")
    ys, xs = _spans(height, tile, overlap), _spans(width, tile, overlap)
    return [(x0, y0, x1, y1) for y0, y1 in ys for x0, x1 in xs]


def _spans(size: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """``[start, end)`` intervals along one side; consecutive starts differ by at most ``tile - overlap``."""
    if size <= tile:
        return [(0, size)]
    n = math.ceil((size - tile) / (tile - overlap)) + 1
    # integer steps of floor or ceil of (size - tile) / (n - 1), which is <= tile - overlap by the choice of n
    return [(i * (size - tile) // (n - 1), i * (size - tile) // (n - 1) + tile) for i in range(n)]


def _empty(device: torch.device | None = None) -> dict[str, torch.Tensor]:
    return {"boxes": torch.zeros((0, 4), device=device), "scores": torch.zeros(0, device=device),
            "labels": torch.zeros(0, dtype=torch.int64, device=device)}


def _cut_sides(boxes: torch.Tensor, window: Window, extent: tuple[int, int], border: float) -> torch.Tensor:
    """``[N, 4]`` bool: the box comes within ``border`` px of its window's internal left, top, right, bottom edge.

    An edge is internal when it is not the image's own edge (``extent = (width, height)``).
    """
    x0, y0, x1, y1 = window
    inner = torch.tensor([x0 > 0, y0 > 0, x1 < extent[0], y1 < extent[1]], device=boxes.device)
    near = torch.stack([boxes[:, 0] <= x0 + border, boxes[:, 1] <= y0 + border,
                        boxes[:, 2] >= x1 - border, boxes[:, 3] >= y1 - border], 1)
    return near & inner


def merge_detections(parts: Sequence[dict[str, Any]], *, iou: float = 0.5, windows: Sequence[Window] | None = None,
                     contain: float = 0.8, border: float = 2.0) -> dict[str, Any]:
    """Merge per-window detections (already in image coordinates) into one set for the image.

    Class-wise NMS (:func:`torchvision.ops.batched_nms`) at ``iou`` removes the copies that
    overlapping windows found of one object. With ``windows`` (one per part, as from
    :func:`tile_windows`), objects cut by a window edge are also resolved:

    * a box *cut* by its window (within ``border`` px of an edge of the window that is not the
      image's edge) is seen only in part, so in the NMS it ranks below every uncut box: when a
      truncated and a whole view overlap by more than ``iou``, the whole view is kept whatever
      the scores;
    * a cut box whose area lies more than ``contain`` inside a larger kept box of the same class
      that reaches across the edge the cut box touches is the truncated view of that box's object
      and is dropped, also when their IoU is below ``iou`` (a sliver at the edge of a tile).
      Boxes are visited from the largest down and only kept boxes suppress, so of any such chain
      one box stays. Scores do not decide here: a truncated view often scores higher than the
      whole one, and keeping it would report the object twice. A box that does not touch an
      internal edge, or is not smaller, is never dropped this way, so two nearby objects in one
      window stay two.

    Args:
        parts: per window a dict of ``boxes`` (float ``[N, 4]`` xyxy), ``scores`` ``[N]``, ``labels``
            ``[N]`` and optionally ``masks`` (anything indexable by detection, kept in step with
            the boxes: a tensor ``[N, ...]`` or a list).
        iou: NMS threshold.
        windows: the window each part came from; without them only the NMS runs.
        contain: the fraction of a cut box's area that must lie inside the larger box.
        border: how close (px) to an internal window edge a box must come to count as cut.

    Returns:
        ``boxes``, ``scores`` and ``labels`` (and ``masks`` when the parts had them), by score
        from the highest.
    """
    if not 0.0 <= iou <= 1.0:
        raise ValueError(f"--iou must be in [0, 1], got {iou}")
    if not 0.0 < contain <= 1.0:
        raise ValueError(f"the containment threshold must be in (0, 1], got {contain}")
    if windows is not None and len(windows) != len(parts):
        raise ValueError(f"{len(parts)} parts but {len(windows)} windows: give one window per part")
    full = [i for i, p in enumerate(parts) if len(p["boxes"])]
    if not full:
        out = _empty()
        if any("masks" in p for p in parts):
            out["masks"] = []
        return out
    boxes = torch.cat([parts[i]["boxes"].reshape(-1, 4).float() for i in full])
    scores = torch.cat([parts[i]["scores"].reshape(-1).float() for i in full]).to(boxes.device)
    labels = torch.cat([parts[i]["labels"].reshape(-1).long() for i in full]).to(boxes.device)
    cut = torch.zeros((len(boxes), 4), dtype=torch.bool, device=boxes.device)
    win = torch.zeros((len(boxes), 4), device=boxes.device)
    if windows is not None:
        extent = (max(w[2] for w in windows), max(w[3] for w in windows))
        cut = torch.cat([_cut_sides(parts[i]["boxes"].reshape(-1, 4).to(boxes.device), windows[i], extent, border) for i in full])
        win = torch.cat([torch.tensor(windows[i], dtype=torch.float32, device=boxes.device).expand(len(parts[i]["boxes"]), 4)
                         for i in full])
    is_cut = cut.any(1)
    # rank uncut boxes above cut ones in the NMS, by score within each group
    rank = scores + (~is_cut).float() * (scores.max() - scores.min() + 1.0) if is_cut.any() else scores
    keep = batched_nms(boxes, rank, labels, iou)
    if is_cut[keep].any():
        keep = keep[_absorb(boxes[keep], labels[keep], cut[keep], win[keep], contain)]
    keep = keep[scores[keep].argsort(descending=True, stable=True)]
    out = {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}
    if any("masks" in parts[i] for i in full):
        out["masks"] = _take_masks([parts[i] for i in full], keep)
    return out


def _absorb(boxes: torch.Tensor, labels: torch.Tensor, cut: torch.Tensor, win: torch.Tensor, contain: float) -> torch.Tensor:
    """Indices of the boxes to keep after dropping cut boxes that are truncated views of a larger box (see merge)."""
    area = box_area(boxes)
    order = torch.argsort(area, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=order.device)
    alive = torch.ones(len(boxes), dtype=torch.bool, device=boxes.device)
    for j in order[cut[order].any(1)].tolist():
        lt = torch.maximum(boxes[:, :2], boxes[j, :2])
        rb = torch.minimum(boxes[:, 2:], boxes[j, 2:])
        inter = (rb - lt).clamp(min=0).prod(1)
        # the container must reach beyond each edge the box is cut by... any one of them suffices
        beyond = torch.stack([boxes[:, 0] < win[j, 0], boxes[:, 1] < win[j, 1], boxes[:, 2] > win[j, 2], boxes[:, 3] > win[j, 3]], 1)
        crosses = (beyond & cut[j]).any(1)
        absorbers = alive & (rank < rank[j]) & (labels == labels[j]) & crosses & (inter > contain * area[j])
        if absorbers.any():
            alive[j] = False
    return torch.nonzero(alive).flatten()


def _take_masks(parts: Sequence[dict[str, Any]], keep: torch.Tensor) -> Any:
    """The masks of the kept detections: one tensor when every part had a tensor, else a list."""
    masks = [p.get("masks") for p in parts]
    if any(m is None for m in masks):
        raise ValueError("some windows returned masks and some did not: a detector returns masks for every image or none")
    if all(isinstance(m, torch.Tensor) for m in masks) and len({m.shape[1:] for m in masks}) == 1:
        return torch.cat(masks)[keep.to(masks[0].device)]
    flat = [m for ms in masks for m in ms]
    return [flat[i] for i in keep.tolist()]


def _as_uint8_image(image: Any) -> torch.Tensor:
    """A ``[3, H, W]`` tensor from a tensor (uint8 or float in 0..1), a PIL image or a path (EXIF rotation applied)."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"no image file at {path}")
        from PIL import Image, ImageOps

        with Image.open(path) as im:
            image = ImageOps.exif_transpose(im).convert("RGB")
    if not isinstance(image, torch.Tensor):
        if not hasattr(image, "convert"):
            raise TypeError(f"image must be a [3, H, W] tensor, a PIL image or a path, got {type(image).__name__}")
        from torchvision.transforms.functional import pil_to_tensor

        return pil_to_tensor(image.convert("RGB"))
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image tensor must be [3, H, W], got {list(image.shape)}")
    if image.dtype != torch.uint8 and not image.is_floating_point():
        raise TypeError(f"image tensor must be uint8 (0..255) or float (0..1), got {image.dtype}")
    return image


def _float_tile(image: torch.Tensor, window: Window, device: torch.device | str | None) -> torch.Tensor:
    """The window of ``image`` as a new float32 ``[3, h, w]`` tensor in 0..1 (only this tile is converted)."""
    x0, y0, x1, y1 = window
    crop = image[:, y0:y1, x0:x1].to(device)
    return crop.float().div_(255) if crop.dtype == torch.uint8 else crop.to(torch.float32, copy=True)


def _shifted(out: dict[str, Any], window: Window, score_threshold: float) -> dict[str, Any]:
    """One window's detections clipped to it, thresholded and moved to image coordinates (on the CPU)."""
    x0, y0, x1, y1 = window
    boxes = out["boxes"].detach().reshape(-1, 4).float().cpu()
    scores = out["scores"].detach().reshape(-1).float().cpu()
    keep = scores >= score_threshold
    hi = torch.tensor([x1 - x0, y1 - y0, x1 - x0, y1 - y0], dtype=torch.float32)
    boxes = torch.minimum(boxes[keep].clamp(min=0), hi)
    part = {"boxes": boxes + torch.tensor([x0, y0, x0, y0], dtype=torch.float32),
            "scores": scores[keep], "labels": out["labels"].detach().reshape(-1).long().cpu()[keep]}
    if out.get("masks") is not None:
        part["masks"] = _crop_masks(out["masks"], keep, boxes)
    return part


def _crop_masks(masks: torch.Tensor, keep: torch.Tensor, boxes: torch.Tensor) -> list[torch.Tensor]:
    """Each kept mask cropped to its box (tile coordinates) rounded outward, so no mask is image-sized."""
    picked = masks[keep.to(masks.device)] if len(masks) else masks
    out = []
    for m, (bx0, by0, bx1, by1) in zip(picked, boxes.tolist()):
        out.append(m[..., math.floor(by0):math.ceil(by1), math.floor(bx0):math.ceil(bx1)].detach().cpu())
    return out


def predict_tiled(detect: Callable[[list[torch.Tensor]], list[dict[str, torch.Tensor]]], image: Any, *, tile: int = 1024,
                  overlap: int = 128, iou: float = 0.5, batch_size: int = 4, score_threshold: float = 0.0,
                  whole: bool = False, device: torch.device | str | None = None) -> dict[str, Any]:
    """Detect objects in a large image window by window and merge them (see the module docstring).

    Args:
        detect: takes a list of float ``[3, h, w]`` tensors in 0..1 and returns per tensor a dict of
            ``boxes`` (``[N, 4]`` xyxy in that tensor's pixels), ``scores`` and ``labels`` (a
            torchvision detector in eval mode is one); ``masks`` ``[N, 1, h, w]`` are kept too.
        image: a ``[3, H, W]`` tensor (uint8, or float in 0..1), a PIL image or an image path.
        tile: the largest window side in pixels (``--tile``); ``detect`` never sees a larger one.
        overlap: the least overlap of neighbouring windows (``--tile-overlap``); objects up to
            this size are whole in some window.
        iou: NMS threshold of the merge.
        batch_size: windows per ``detect`` call; peak float memory is this many tiles.
        score_threshold: detections scoring below it are dropped before the merge.
        whole: also detect on the image resized to fit one tile, for objects larger than the overlap.
        device: where the tiles are sent (the image stays where it is); None leaves them with the image.

    Returns:
        ``boxes`` (float ``[N, 4]`` xyxy image pixels), ``scores``, ``labels``, on the CPU, by score;
        ``masks`` when the detector returns them, each cropped to its box rounded outward to whole
        pixels (``floor`` of ``x0, y0``, ``ceil`` of ``x1, y1``); and ``tiles``, the number of windows.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch-size must be a positive number of tiles, got {batch_size!r}")
    image = _as_uint8_image(image)
    height, width = image.shape[1:]
    windows = tile_windows(height, width, tile, overlap)
    parts: list[dict[str, Any]] = []
    with torch.no_grad():
        for start in range(0, len(windows), batch_size):
            batch = windows[start:start + batch_size]
            outs = detect([_float_tile(image, w, device) for w in batch])
            if len(outs) != len(batch):
                raise ValueError(f"detect returned {len(outs)} results for {len(batch)} tiles: it must return one dict per tile")
            parts += [_shifted(o, w, score_threshold) for o, w in zip(outs, batch)]
        part_windows = list(windows)
        if whole and len(windows) > 1:
            parts.append(_detect_resized(detect, image, tile, score_threshold, device))
            part_windows.append((0, 0, width, height))
    out = merge_detections(parts, iou=iou, windows=part_windows)
    out["tiles"] = len(windows)
    return out


def _detect_resized(detect: Callable, image: torch.Tensor, tile: int, score_threshold: float,
                    device: torch.device | str | None) -> dict[str, Any]:
    """``detect`` on the image resized so that its longer side is ``tile``, boxes scaled back to image pixels."""
    from torchvision.transforms.v2.functional import resize

    height, width = image.shape[1:]
    scale = tile / max(height, width)
    size = [max(1, round(height * scale)), max(1, round(width * scale))]
    small = resize(image.to(device), size, antialias=True)
    small = small.float().div_(255) if small.dtype == torch.uint8 else small.float()
    (out,) = detect([small])
    part = _shifted(out, (0, 0, size[1], size[0]), score_threshold)
    sx, sy = width / size[1], height / size[0]
    small_boxes = part["boxes"]
    part["boxes"] = (small_boxes * torch.tensor([sx, sy, sx, sy])).clamp(min=0)
    part["boxes"] = torch.minimum(part["boxes"], torch.tensor([width, height, width, height], dtype=torch.float32))
    if "masks" in part:  # each crop brought to the size its box has at full resolution (to within a pixel of the small scale)
        from torch.nn.functional import interpolate

        part["masks"] = [_upsample(m, b, interpolate) for m, b in zip(part["masks"], part["boxes"].tolist())]
    return part


def _upsample(mask: torch.Tensor, box: list[float], interpolate: Callable) -> torch.Tensor:
    """A mask crop resized to the whole-pixel size of ``box`` (rounded outward), bilinearly."""
    h = max(1, math.ceil(box[3]) - math.floor(box[1]))
    w = max(1, math.ceil(box[2]) - math.floor(box[0]))
    if mask.numel() == 0:
        return mask.new_zeros(*mask.shape[:-2], h, w)
    flat = mask.reshape(-1, 1, *mask.shape[-2:]).float()
    out = interpolate(flat, size=(h, w), mode="bilinear", align_corners=False).reshape(*mask.shape[:-2], h, w)
    return out > 0.5 if mask.dtype == torch.bool else out.to(mask.dtype)
