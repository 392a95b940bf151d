"""Differentiable crops and zooms, and the soft argmax."""

from __future__ import annotations

import torch

from finegrain.models.crops import boxcar_mask, masked_zoom, soft_argmax, zoom


def test_masked_zoom_matches_index_crop_at_a_hard_mask():
    images = torch.randn(2, 3, 8, 8)
    box = torch.tensor([[2 / 8, 1 / 8, 6 / 8, 5 / 8], [0.0, 4 / 8, 4 / 8, 1.0]])  # 4x4 squares on pixel edges
    out = masked_zoom(images, box, 4, sharpness=1e4)
    torch.testing.assert_close(out[0], images[0, :, 1:5, 2:6])
    torch.testing.assert_close(out[1], images[1, :, 4:8, 0:4])
    torch.testing.assert_close(zoom(images, torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2), 8), images)  # identity box


def test_boxcar_mask_is_one_inside_and_zero_outside():
    mask = boxcar_mask(torch.tensor([[0.25, 0.5, 0.75, 1.0]]), 8, 8, sharpness=1e4)[0, 0]
    expected = torch.zeros(8, 8)
    expected[4:8, 2:6] = 1
    torch.testing.assert_close(mask, expected)


def test_masked_zoom_sends_a_gradient_to_the_box():
    images = torch.randn(1, 3, 16, 16)
    box = torch.tensor([[0.2, 0.3, 0.7, 0.8]], requires_grad=True)
    masked_zoom(images, box, 8).pow(2).sum().backward()
    assert box.grad is not None and (box.grad.abs() > 0).all()


def test_soft_argmax_on_known_heatmaps():
    heat = torch.full((1, 3, 4, 5), -1e4)
    heat[0, 0, 1, 3] = 0.0  # a single peak at row 1, column 3
    heat[0, 1] = 0.0  # uniform: the centre
    heat[0, 2, 0, 0] = heat[0, 2, 3, 4] = 0.0  # two equal peaks: their midpoint
    xy = soft_argmax(heat)
    torch.testing.assert_close(xy[0, 0], torch.tensor([3.5 / 5, 1.5 / 4]))
    torch.testing.assert_close(xy[0, 1], torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(xy[0, 2], torch.tensor([0.5, 0.5]))
