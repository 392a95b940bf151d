"""Tiled detection: windows cover the image, objects cut by tile edges are reported once, at their true place."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import box_iou

from finegrain.detect.tiling import merge_detections, predict_tiled, tile_windows

ndimage = pytest.importorskip("scipy.ndimage")


# ---------------------------------------------------------------- windows

@pytest.mark.parametrize("height, width, tile, overlap", [
    (700, 1000, 256, 64),    # the detection test's image
    (100, 80, 256, 64),      # smaller than a tile
    (512, 768, 256, 0),      # exact multiples, no overlap
    (512, 512, 256, 64),     # exact multiple with overlap
    (257, 300, 256, 255),    # one pixel past a tile; largest overlap allowed
    (3000, 4000, 1024, 128),  # a camera photo
    (1, 9, 1, 0),
])
def test_windows_cover_the_image_inside_its_edges(height, width, tile, overlap):
    windows = tile_windows(height, width, tile, overlap)
    covered = np.zeros((height, width), np.int32)
    for x0, y0, x1, y1 in windows:
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height, (x0, y0, x1, y1)
        assert x1 - x0 == min(tile, width) and y1 - y0 == min(tile, height)  # full-size windows, no slivers
        covered[y0:y1, x0:x1] += 1
    assert covered.min() >= 1, "some pixels are in no window"
    for axis in (0, 1):  # along each side: starts at 0, ends at the edge, neighbours share >= overlap pixels
        spans = sorted({(w[axis], w[axis + 2]) for w in windows})
        size = width if axis == 0 else height
        assert spans[0][0] == 0 and spans[-1][1] == size
        for (a0, a1), (b0, _) in zip(spans, spans[1:]):
            assert a0 < b0 and a1 - b0 >= overlap
    assert len(windows) == len({(w[0], w[1]) for w in windows}), "duplicate windows"


def test_windows_are_as_few_as_the_overlap_allows():
    assert tile_windows(100, 80, 256, 64) == [(0, 0, 80, 100)]
    assert len(tile_windows(512, 768, 256, 0)) == 2 * 3
    # 1000 px: 4 windows of 256 can share at most (4*256 - 1000) / 3 = 8 px, so 5 are needed for 64
    xs = sorted({w[0] for w in tile_windows(700, 1000, 256, 64)})
    assert xs == [0, 186, 372, 558, 744]
    assert len(tile_windows(700, 1000, 256, 64)) == 4 * 5
    assert len(tile_windows(700, 1000, 256, 8)) == 3 * 4


@pytest.mark.parametrize("tile, overlap, flag", [(0, 0, "--tile"), (-5, 0, "--tile"), (256, -1, "--tile-overlap"),
                                                 (256, 256, "--tile-overlap"), (256, 300, "--tile-overlap"),
                                                 (256.0, 0, "--tile")])
def test_bad_tile_arguments_name_the_flag(tile, overlap, flag):
    with pytest.raises(ValueError, match=flag):
        tile_windows(500, 500, tile, overlap)
    with pytest.raises(ValueError, match=flag):
        predict_tiled(WhiteSquares(), torch.zeros(3, 50, 50, dtype=torch.uint8), tile=tile, overlap=overlap)


def test_other_bad_arguments():
    img = torch.zeros(3, 50, 50, dtype=torch.uint8)
    with pytest.raises(ValueError, match="--batch-size"):
        predict_tiled(WhiteSquares(), img, batch_size=0)
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        predict_tiled(WhiteSquares(), torch.zeros(50, 50, dtype=torch.uint8))
    with pytest.raises(TypeError, match="uint8"):
        predict_tiled(WhiteSquares(), torch.zeros(3, 50, 50, dtype=torch.int32))
    with pytest.raises(TypeError, match="PIL image or a path"):
        predict_tiled(WhiteSquares(), [[0]])
    with pytest.raises(FileNotFoundError, match="missing.png"):
        predict_tiled(WhiteSquares(), "missing.png")
    with pytest.raises(ValueError, match="one dict per tile"):
        predict_tiled(lambda tiles: [], img)
    with pytest.raises(ValueError, match="--iou"):
        merge_detections([], iou=1.5)


# ---------------------------------------------------------------- a detector of white squares

class WhiteSquares:
    """Finds white squares on black (connected components); records the tiles it was given.

    ``score="size"`` scores a box by its area (whole views win); ``"small"`` the other way round,
    so a truncated view outscores the whole one and only the geometry can tell them apart.
    """

    def __init__(self, score: str = "size", masks: bool = False):
        self.score, self.masks, self.calls = score, masks, []

    def __call__(self, tiles):
        self.calls.append([(t.dtype, tuple(t.shape), float(t.min()), float(t.max())) for t in tiles])
        return [self._one(t) for t in tiles]

    def _one(self, t):
        on = (t.mean(0) > 0.5).numpy()
        lab, n = ndimage.label(on)
        boxes = [[s[1].start, s[0].start, s[1].stop, s[0].stop] for s in ndimage.find_objects(lab)]
        boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        scores = (area / 2000).clamp(max=1.0) if self.score == "size" else 1.0 - area / 4000
        out = {"boxes": boxes, "scores": scores, "labels": torch.zeros(n, dtype=torch.int64)}
        if self.masks:
            out["masks"] = torch.from_numpy(np.stack([lab == i + 1 for i in range(n)])[:, None]).float() if n else \
                torch.zeros(0, 1, *on.shape)
        return out


def plant_squares(height=700, width=1000, n=20, tile=256, overlap=64, seed=0):
    """A black uint8 image with ``n`` white squares of 10..40 px, half of them across internal window edges."""
    rng = np.random.default_rng(seed)
    windows = tile_windows(height, width, tile, overlap)
    x_edges = sorted({w[0] for w in windows if w[0] > 0} | {w[2] for w in windows if w[2] < width})
    y_edges = sorted({w[1] for w in windows if w[1] > 0} | {w[3] for w in windows if w[3] < height})
    squares: list[tuple[int, int, int, int]] = []
    while len(squares) < n:
        s = int(rng.integers(10, 41))
        x0, y0 = int(rng.integers(0, width - s + 1)), int(rng.integers(0, height - s + 1))
        kind = len(squares) % 4  # 0: across a vertical edge, 1: a horizontal one, 2: a corner, 3: anywhere
        cut = [1, s - 1, int(rng.integers(1, s))][len(squares) % 3]  # slivers of 1 px and nearly whole ones too
        if kind in (0, 2) and x_edges:
            x0 = int(rng.choice(x_edges)) - cut
        if kind in (1, 2) and y_edges:
            y0 = int(rng.choice(y_edges)) - cut
        box = (x0, y0, x0 + s, y0 + s)
        if x0 < 0 or y0 < 0 or box[2] > width or box[3] > height:
            continue
        if any(box[0] < b[2] + 4 and b[0] < box[2] + 4 and box[1] < b[3] + 4 and b[1] < box[3] + 4 for b in squares):
            continue  # keep a gap so that squares stay separate components
        squares.append(box)
    img = torch.zeros(3, height, width, dtype=torch.uint8)
    for x0, y0, x1, y1 in squares:
        img[:, y0:y1, x0:x1] = 255
    return img, torch.tensor(squares, dtype=torch.float32)


def assert_one_box_per_square(out, truth, min_iou=0.9):
    assert len(out["boxes"]) == len(truth), f"{len(out['boxes'])} boxes for {len(truth)} squares"
    iou = box_iou(truth, out["boxes"])
    assert ((iou > 0.3).sum(1) == 1).all(), "a square was reported twice, or missed"
    assert (iou.max(1).values > min_iou).all(), iou.max(1).values
    assert len(set(iou.argmax(1).tolist())) == len(truth)


def cut_somewhere(truth, windows):
    """How many squares some window sees only in part."""
    n = 0
    for x0, y0, x1, y1 in truth.tolist():
        n += any(x0 < wx1 and wx0 < x1 and y0 < wy1 and wy0 < y1 and not (wx0 <= x0 and x1 <= wx1 and wy0 <= y0 and y1 <= wy1)
                 for wx0, wy0, wx1, wy1 in windows)
    return n


@pytest.mark.parametrize("score", ["size", "small"])
def test_tiled_prediction_finds_each_square_once_at_its_place(score):
    img, truth = plant_squares()
    assert cut_somewhere(truth, tile_windows(700, 1000, 256, 64)) >= 10  # the test is about cut objects
    detect = WhiteSquares(score)
    out = predict_tiled(detect, img, tile=256, overlap=64, batch_size=3)
    assert out["tiles"] == 20
    assert_one_box_per_square(out, truth, min_iou=0.99)  # the fake detector is exact, so are the shifted boxes
    assert (out["labels"] == 0).all() and (out["scores"][:-1] >= out["scores"][1:]).all()


def test_every_tile_is_at_most_tile_sized_float_and_batched():
    img, _ = plant_squares()
    detect = WhiteSquares()
    predict_tiled(detect, img, tile=256, overlap=64, batch_size=3)
    assert [len(c) for c in detect.calls] == [3] * 6 + [2]
    for dtype, shape, lo, hi in (t for c in detect.calls for t in c):
        assert dtype == torch.float32 and shape[0] == 3 and max(shape[1:]) <= 256
        assert 0.0 <= lo and hi <= 1.0


def test_a_single_window_equals_the_untiled_call():
    img, truth = plant_squares(height=180, width=240, n=6, tile=256)
    whole = WhiteSquares()([img.float() / 255])[0]
    detect = WhiteSquares()
    out = predict_tiled(detect, img, tile=256, overlap=64)
    assert out["tiles"] == 1 and len(detect.calls) == 1 and detect.calls[0][0][1] == (3, 180, 240)
    order = whole["scores"].argsort(descending=True, stable=True)
    assert torch.equal(out["boxes"], whole["boxes"][order]) and torch.equal(out["scores"], whole["scores"][order])
    assert_one_box_per_square(out, truth, min_iou=0.99)


def test_paths_and_pil_images_give_the_tensor_result(tmp_path):
    img, truth = plant_squares(n=8)
    path = tmp_path / "big.png"
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(path)
    ref = predict_tiled(WhiteSquares(), img, tile=256, overlap=64)
    for source in (path, str(path), Image.open(path)):
        out = predict_tiled(WhiteSquares(), source, tile=256, overlap=64)
        assert torch.equal(out["boxes"], ref["boxes"])
    assert_one_box_per_square(ref, truth)


def test_score_threshold_drops_low_scores_before_the_merge():
    img, truth = plant_squares()
    out = predict_tiled(WhiteSquares("size"), img, tile=256, overlap=64, score_threshold=0.5)
    big = (truth[:, 2] - truth[:, 0]) ** 2 / 2000 >= 0.5
    assert 0 < big.sum() < len(truth)
    assert_one_box_per_square(out, truth[big])


def test_masks_follow_their_boxes_cropped():
    img, truth = plant_squares(n=8)
    out = predict_tiled(WhiteSquares(masks=True), img, tile=256, overlap=64)
    assert_one_box_per_square(out, truth, min_iou=0.99)
    assert len(out["masks"]) == len(out["boxes"])
    for m, (x0, y0, x1, y1) in zip(out["masks"], out["boxes"].tolist()):
        assert m.shape == (1, y1 - y0, x1 - x0) and bool((m == 1).all())  # a square fills its box


def test_objects_larger_than_the_overlap_need_the_whole_image_pass():
    img = torch.zeros(3, 768, 1024, dtype=torch.uint8)
    img[:, 200:600, 400:800] = 255  # 400 px, larger than a tile: every window sees a fragment
    truth = torch.tensor([[400.0, 200, 800, 600]])
    assert len(predict_tiled(WhiteSquares(), img, tile=256, overlap=64)["boxes"]) > 1  # the limitation
    out = predict_tiled(WhiteSquares(), img, tile=256, overlap=64, whole=True)
    assert_one_box_per_square(out, truth)
    assert out["tiles"] == len(tile_windows(768, 1024, 256, 64))


# ---------------------------------------------------------------- the merge, on hand-made parts

A, B = (0, 0, 256, 256), (186, 0, 442, 256)  # neighbours sharing x in [186, 256); the image is 442 x 256


def part(boxes, scores, labels=None):
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    return {"boxes": boxes, "scores": torch.tensor(scores, dtype=torch.float32),
            "labels": torch.tensor(labels if labels is not None else [0] * len(boxes), dtype=torch.int64)}


@pytest.mark.parametrize("sliver_score", [0.3, 0.99])
def test_a_sliver_at_a_tile_edge_is_merged_into_the_whole_box(sliver_score):
    sliver = part([[250, 100, 256, 130]], [sliver_score])  # A's view: 6 of 30 px, IoU 0.2 with the whole
    whole = part([[250, 100, 280, 130]], [0.6])
    out = merge_detections([sliver, whole], windows=[A, B])
    assert out["boxes"].tolist() == [[250, 100, 280, 130]] and out["scores"].tolist() == pytest.approx([0.6])
    assert len(merge_detections([sliver, whole])["boxes"]) == 2  # plain NMS would keep both


def test_a_truncated_view_overlapping_a_lot_loses_the_nms_to_the_whole_one():
    trunc = part([[226, 100, 256, 130]], [0.95])  # 30 of 40 px: IoU 0.75
    whole = part([[226, 100, 266, 130]], [0.5])
    out = merge_detections([trunc, whole], windows=[A, B])
    assert out["boxes"].tolist() == [[226, 100, 266, 130]]


def test_what_the_edge_rule_leaves_alone():
    # a box inside a larger one of its window (it cannot reach across its own window's edge)
    nested = part([[240, 100, 256, 120], [200, 90, 256, 140]], [0.9, 0.8])
    assert len(merge_detections([nested, part([], [])], windows=[A, B])["boxes"]) == 2
    # another class
    out = merge_detections([part([[250, 100, 256, 130]], [0.9], [1]), part([[250, 100, 280, 130]], [0.6], [0])], windows=[A, B])
    assert sorted(out["labels"].tolist()) == [0, 1]
    # not at an internal edge: a small object beside a big one across the tile border stays
    out = merge_detections([part([[230, 100, 240, 110]], [0.9]), part([[200, 90, 300, 160]], [0.6])], windows=[A, B])
    assert len(out["boxes"]) == 2
    # at the image's own edge (A's left side) nothing is cut
    out = merge_detections([part([[0, 100, 5, 110]], [0.9]), part([[0, 90, 60, 160]], [0.6])], windows=[A, A])
    assert len(out["boxes"]) == 2


def test_merge_of_nothing_and_of_masks():
    out = merge_detections([part([], []), part([], [])], windows=[A, B])
    assert out["boxes"].shape == (0, 4) and out["labels"].dtype == torch.int64
    p1, p2 = part([[250, 100, 256, 130]], [0.9]), part([[250, 100, 280, 130], [300, 10, 320, 30]], [0.6, 0.7])
    p1["masks"], p2["masks"] = torch.full((1, 1, 4, 4), 1.0), torch.stack([torch.full((1, 4, 4), 2.0), torch.full((1, 4, 4), 3.0)])
    out = merge_detections([p1, p2], windows=[A, B])
    assert out["scores"].tolist() == pytest.approx([0.7, 0.6]) and out["masks"][:, 0, 0, 0].tolist() == [3.0, 2.0]
