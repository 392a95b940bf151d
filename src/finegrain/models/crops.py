"""Differentiable crops and part localisation on image batches.

Boxes are ``[B, 4]`` ``(x0, y0, x1, y1)`` in [0, 1] image coordinates (``x = column / width``
measured at pixel edges, so pixel ``j`` covers ``[j / W, (j + 1) / W]``). The boxcar mask is the
one of RA-CNN ("Look Closer to See Better", Fu, Zheng and Mei, CVPR 2017); the zoom is a
bilinear resampling through ``affine_grid``/``grid_sample`` (spatial transformer style), so a
loss on the crop back-propagates into the box.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def square_boxes(centers: torch.Tensor, sides: torch.Tensor) -> torch.Tensor:
    """Boxes ``[B(, K), 4]`` of side ``sides`` (fraction of the image) around ``centers [B(, K), 2]``."""
    half = (sides / 2).unsqueeze(-1)
    return torch.cat([centers - half, centers + half], -1)


def boxcar_mask(boxes: torch.Tensor, height: int, width: int, sharpness: float = 10.0) -> torch.Tensor:
    """RA-CNN's soft box mask ``[h(x - x0) - h(x - x1)] [h(y - y0) - h(y - y1)]``, ``h(z) = sigmoid(k z)``.

    Args:
        boxes: ``[B, 4]`` in [0, 1] coordinates.
        sharpness: ``k`` per pixel (the paper's 10: a step about one pixel wide).

    Returns:
        ``[B, 1, height, width]``, evaluated at pixel centres.
    """
    px = (torch.arange(width, device=boxes.device, dtype=boxes.dtype) + 0.5)[None]  # pixel centres, in pixels
    py = (torch.arange(height, device=boxes.device, dtype=boxes.dtype) + 0.5)[None]
    x0, y0, x1, y1 = (boxes[:, i : i + 1] * s for i, s in enumerate((width, height, width, height)))
    mx = torch.sigmoid(sharpness * (px - x0)) - torch.sigmoid(sharpness * (px - x1))
    my = torch.sigmoid(sharpness * (py - y0)) - torch.sigmoid(sharpness * (py - y1))
    return (my[:, :, None] * mx[:, None, :])[:, None]


def zoom(images: torch.Tensor, boxes: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Bilinear crop-and-resize of each image's box to ``size`` (zeros outside the image).

    Args:
        images: ``[B, C, H, W]``.
        boxes: ``[B, 4]`` in [0, 1] coordinates (a box may extend past the image).
        size: output ``(h, w)`` or side.
    """
    h, w = (size, size) if isinstance(size, int) else size
    b = images.shape[0]
    boxes = boxes.to(images.dtype)
    theta = torch.zeros(b, 2, 3, device=images.device, dtype=images.dtype)
    # grid_sample's [-1, 1] spans the outer pixel edges (align_corners=False): u = 2x - 1
    theta[:, 0, 0] = boxes[:, 2] - boxes[:, 0]
    theta[:, 0, 2] = boxes[:, 0] + boxes[:, 2] - 1
    theta[:, 1, 1] = boxes[:, 3] - boxes[:, 1]
    theta[:, 1, 2] = boxes[:, 1] + boxes[:, 3] - 1
    grid = F.affine_grid(theta, [b, images.shape[1], h, w], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def masked_zoom(images: torch.Tensor, boxes: torch.Tensor, size: int | tuple[int, int], sharpness: float = 10.0) -> torch.Tensor:
    """RA-CNN's attention crop: ``zoom(images * boxcar_mask(boxes), boxes, size)``.

    The gradient reaches the box both through the mask edges and through the sampling grid.
    """
    mask = boxcar_mask(boxes.float(), images.shape[-2], images.shape[-1], sharpness).to(images.dtype)
    return zoom(images * mask, boxes, size)


def soft_argmax(heatmaps: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Expected location under ``softmax(heatmap / temperature)`` over positions.

    Args:
        heatmaps: ``[B, K, h, w]`` logits.

    Returns:
        ``[B, K, 2]`` ``(x, y)`` in [0, 1] coordinates of cell centres (``(j + 0.5) / w``).
    """
    b, k, h, w = heatmaps.shape
    prob = torch.softmax(heatmaps.float().reshape(b, k, h * w) / temperature, -1).reshape(b, k, h, w)
    xs = (torch.arange(w, device=heatmaps.device, dtype=prob.dtype) + 0.5) / w
    ys = (torch.arange(h, device=heatmaps.device, dtype=prob.dtype) + 0.5) / h
    return torch.stack([(prob.sum(2) * xs).sum(-1), (prob.sum(3) * ys).sum(-1)], -1)
