"""Detection metrics against pycocotools' COCOeval run directly on hand-built COCO dicts, and hand-computed APs."""

import contextlib
import io

import numpy as np
import pytest
import torch

pytest.importorskip("torchmetrics")
pytest.importorskip("pycocotools")

from pycocotools import mask as mask_utils  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

from finegrain.detect.metrics import DetectionMetrics, plot_pr_curves, pr_curves  # noqa: E402

KEYS = ["map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_1", "mar_10", "mar_100"]  # COCOeval.stats[0:9]
CLASSES = ["cat", "dog", "bird", "fish", "eel"]  # fish: nowhere; eel: only a false positive


def _pred(boxes, scores, labels, masks=None):
    d = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "scores": torch.tensor(scores, dtype=torch.float32),
         "labels": torch.tensor(labels, dtype=torch.int64)}
    if masks is not None:
        d["masks"] = masks
    return d


def _target(boxes, labels, masks=None):
    d = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "labels": torch.tensor(labels, dtype=torch.int64)}
    if masks is not None:
        d["masks"] = masks
    return d


def _box_fixture():
    """Five 480x640 images: large/medium/small objects, near misses, a duplicate, missed objects, images without GT."""
    targets = [
        _target([[10, 10, 310, 250], [400, 50, 460, 110], [500, 300, 520, 318]], [0, 1, 2]),  # large cat, medium dog, small bird
        _target([], []),  # no GT, only false positives
        _target([[100, 100, 160, 150], [300, 100, 600, 400], [20, 20, 40, 40]], [0, 1, 2]),  # the large dog is missed
        _target([], []),  # nothing at all
        _target([[50, 50, 150, 150], [200, 200, 260, 260], [600, 400, 610, 410]], [1, 1, 0]),  # the small cat is missed
    ]
    preds = [
        _pred([[10, 10, 310, 250], [405, 55, 465, 115], [100, 400, 118, 420], [503, 302, 523, 320]], [0.9, 0.8, 0.3, 0.6], [0, 1, 2, 2]),
        _pred([[200, 200, 300, 300], [0, 0, 50, 50], [10, 300, 40, 330]], [0.95, 0.2, 0.5], [0, 1, 4]),
        _pred([[104, 100, 164, 150], [20, 20, 40, 40], [300, 100, 420, 220]], [0.5, 0.7, 0.4], [0, 2, 1]),
        _pred([], [], []),
        _pred([[50, 50, 150, 150], [52, 52, 152, 152], [200, 200, 262, 262]], [0.85, 0.84, 0.3], [1, 1, 1]),
    ]
    return preds, targets, [(480, 640)] * len(targets)


def _xywh(b):
    x0, y0, x1, y1 = (float(v) for v in b)
    return [x0, y0, x1 - x0, y1 - y0]


def _rle(m):
    return mask_utils.encode(np.asfortranarray(np.asarray(m, dtype=np.uint8)))


def _binary(m):
    """Our masks as [N, H, W] 0/1 numpy (the test's own reading of the [N, 1, H, W] probabilities)."""
    m = np.asarray(m)
    if m.ndim == 4:
        m = m[:, 0]
    return (m > 0.5).astype(np.uint8) if m.dtype.kind == "f" else (m != 0).astype(np.uint8)


def _cocoeval(preds, targets, sizes, iou_type="bbox"):
    """COCOeval built from scratch; category ids are label + 1 so nothing depends on ids matching. Returns (eval, gt COCO)."""
    images, gts, dts = [], [], []
    for i, (p, t, (h, w)) in enumerate(zip(preds, targets, sizes)):
        images.append({"id": i + 1, "height": h, "width": w})
        tm = _binary(t["masks"]) if "masks" in t else None
        for j, (b, l) in enumerate(zip(t["boxes"].tolist(), t["labels"].tolist())):
            box = _xywh(b)
            # COCO's GT area is the segmentation's when there is one (for box and mask AP alike), else the box's
            area = float(mask_utils.area(_rle(tm[j]))) if tm is not None else box[2] * box[3]
            ann = {"id": len(gts) + 1, "image_id": i + 1, "category_id": l + 1, "bbox": box, "area": area, "iscrowd": 0}
            if tm is not None:
                ann["segmentation"] = _rle(tm[j])
            gts.append(ann)
        pm = _binary(p["masks"]) if "masks" in p else None
        for j, (b, s, l) in enumerate(zip(p["boxes"].tolist(), p["scores"].tolist(), p["labels"].tolist())):
            det = {"image_id": i + 1, "category_id": l + 1, "score": s}
            if iou_type == "segm":
                det["segmentation"] = _rle(pm[j])  # loadRes sets area and bbox from the mask
            else:
                det["bbox"] = _xywh(b)  # loadRes sets area = w * h
            dts.append(det)
    gt = COCO()
    gt.dataset = {"images": images, "annotations": gts, "categories": [{"id": k + 1, "name": c} for k, c in enumerate(CLASSES)]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        dt = gt.loadRes(dts)
        e = COCOeval(gt, dt, iouType=iou_type)
        e.evaluate()
        e.accumulate()
        e.summarize()
    return e, gt, dt


def _per_class_direct(e, iou_type):
    """Each class's AP from its own COCOeval run restricted to that category (as summarize() would print it)."""
    out = {}
    for k, name in enumerate(CLASSES):
        one = COCOeval(e.cocoGt, e.cocoDt, iouType=iou_type)
        one.params.catIds = [k + 1]
        with contextlib.redirect_stdout(io.StringIO()):
            one.evaluate()
            one.accumulate()
            one.summarize()
        out[name] = None if one.stats[0] < 0 else 100.0 * one.stats[0]
    return out


def _check_against(ours, e, per_class, prefix=""):
    for i, key in enumerate(KEYS):
        expected = None if e.stats[i] < 0 else 100.0 * e.stats[i]
        got = ours[prefix + key]
        if expected is None:
            assert got is None, (prefix + key, got)
        else:
            assert got == pytest.approx(expected, abs=1e-3), (prefix + key, got, expected)
    for name, expected in per_class.items():
        got = ours[prefix + "per_class_ap"][name]
        assert (got is None) if expected is None else got == pytest.approx(expected, abs=1e-3), (name, got, expected)


def test_box_metrics_match_pycocotools_run_directly():
    preds, targets, sizes = _box_fixture()
    m = DetectionMetrics(CLASSES)
    m.update(preds[:2], targets[:2])  # accumulated over batches
    m.update(preds[2:], targets[2:])
    ours = m.compute()
    e, _, _ = _cocoeval(preds, targets, sizes)
    per_class = _per_class_direct(e, "bbox")
    # the fixture exercises every size bucket and is neither perfect nor empty
    assert all(e.stats[i] > 0 for i in range(6)) and e.stats[0] < 0.9
    _check_against(ours, e, per_class)
    assert set(ours) == set(KEYS) | {"per_class_ap"}
    assert list(ours["per_class_ap"]) == CLASSES
    assert ours["per_class_ap"]["fish"] is None and ours["per_class_ap"]["eel"] is None  # no GT: COCO's -1
    assert all(isinstance(v, float) for k, v in ours.items() if k != "per_class_ap" and v is not None)


def test_hand_computed_aps():
    classes = ["a", "b", "c"]
    targets = [_target([[0, 0, 100, 100], [200, 0, 300, 100], [0, 200, 100, 300]], [0, 1, 2])]
    preds = [_pred([[0, 0, 100, 100],  # a: exact -> AP 100
                    [200, 0, 300, 62],  # b: IoU 0.62 -> matched at 0.50, 0.55, 0.60 only: AP 30, AP50 100, AP75 0
                    [400, 400, 450, 450], [0, 200, 100, 300]],  # c: a false positive outranks the exact box: precision 1/2
                   [0.9, 0.8, 0.9, 0.8], [0, 1, 2, 2])]
    m = DetectionMetrics(classes)
    m.update(preds, targets)
    r = m.compute()
    assert r["per_class_ap"] == pytest.approx({"a": 100.0, "b": 30.0, "c": 50.0})
    assert r["map"] == pytest.approx(60.0)
    assert r["map_50"] == pytest.approx((100 + 100 + 50) / 3, abs=1e-3)
    assert r["map_75"] == pytest.approx((100 + 0 + 50) / 3, abs=1e-3)
    assert r["mar_100"] == pytest.approx((100 + 30 + 100) / 3, abs=1e-3)  # b is found at 3 of the 10 thresholds
    assert r["mar_1"] == pytest.approx((100 + 30 + 0) / 3, abs=1e-3)  # one detection per image: c's best is the false positive
    curves = m.pr_curves()
    assert curves["per_class"]["a"] == [1.0] * 101 and curves["per_class"]["b"] == [1.0] * 101
    assert curves["per_class"]["c"] == [0.5] * 101
    assert curves["mean"] == pytest.approx([2.5 / 3] * 101)
    assert m.pr_curves(iou=0.75)["per_class"]["b"] == [0.0] * 101


def test_values_on_a_threshold_count_as_in_cocoeval():
    """COCO's thresholds are float64 and compared with >=: IoU 0.55 matches at 0.55, a recall of 0.6 reaches 0.6."""
    m = DetectionMetrics(["a"])
    m.update([_pred([[0, 0, 100, 55]], [0.9], [0])], [_target([[0, 0, 100, 100]], [0])])  # IoU 5500 / 10000
    assert m.compute()["map"] == pytest.approx(20.0)  # matched at 0.50 and 0.55

    gts = [[100 * i, 0, 100 * i + 50, 50] for i in range(5)]
    m = DetectionMetrics(["a"])  # ranked: 3 hits, a miss, 2 hits -> precision 1 up to recall 0.6, then 5/6 up to recall 1
    m.update([_pred([*gts[:3], [0, 200, 50, 250], *gts[3:]], [0.9, 0.85, 0.8, 0.7, 0.6, 0.5], [0] * 6)], [_target(gts, [0] * 5)])
    assert m.compute()["map"] == pytest.approx(100 * (61 * 1 + 40 * 5 / 6) / 101, abs=1e-3)  # recall points 0.00..0.60 at 1


def test_all_exact_is_100_and_no_predictions_is_0():
    _, targets, _ = _box_fixture()
    preds = [_pred(t["boxes"].tolist(), [0.9 - 0.01 * j for j in range(len(t["labels"]))], t["labels"].tolist()) for t in targets]
    m = DetectionMetrics(CLASSES)
    m.update(preds, targets)
    r = m.compute()
    assert all(r[k] == pytest.approx(100.0) for k in KEYS if k != "mar_1"), r
    # one detection per image and class: the image with two dogs finds one, so dogs 3 of 4, cats and birds all
    assert r["mar_1"] == pytest.approx(100 * (1 + 3 / 4 + 1) / 3, abs=1e-3)
    assert r["per_class_ap"] == {"cat": 100.0, "dog": 100.0, "bird": 100.0, "fish": None, "eel": None}

    m = DetectionMetrics(CLASSES)
    m.update([_pred([], [], []) for _ in targets], targets)
    r = m.compute()
    assert all(r[k] == 0.0 for k in KEYS)  # ground truth but nothing found: 0, not undefined
    assert r["per_class_ap"] == {"cat": 0.0, "dog": 0.0, "bird": 0.0, "fish": None, "eel": None}


def test_undefined_is_none_everywhere():
    m = DetectionMetrics(["a", "b"])
    r = m.compute()  # nothing accumulated
    assert all(r[k] is None for k in KEYS) and r["per_class_ap"] == {"a": None, "b": None}
    c = m.pr_curves()
    assert c["mean"] is None and c["per_class"] == {"a": None, "b": None} and len(c["recall"]) == 101

    m.update([_pred([[0, 0, 10, 10]], [0.5], [1])], [_target([], [])])  # predictions but no ground truth anywhere
    r = m.compute()
    assert all(r[k] is None for k in KEYS) and r["per_class_ap"] == {"a": None, "b": None}
    m.reset()
    m.update([_pred([[0, 0, 10, 10]], [0.5], [1])], [_target([[0, 0, 10, 10]], [1])])
    assert m.compute()["per_class_ap"] == {"a": None, "b": 100.0}


def test_pr_curves_match_cocoeval_precision():
    preds, targets, sizes = _box_fixture()
    m = DetectionMetrics(CLASSES)
    m.update(preds, targets)
    curves = m.pr_curves()
    e, _, _ = _cocoeval(preds, targets, sizes)
    assert curves["recall"] == pytest.approx(np.linspace(0, 1, 101).tolist()) and len(curves["recall"]) == 101
    assert curves["iou"] == 0.5
    defined = []
    for k, name in enumerate(CLASSES):
        direct = e.eval["precision"][0, :, k, 0, 2]  # IoU 0.5, area all, maxDets 100
        if (direct < 0).all():
            assert curves["per_class"][name] is None, name
            continue
        got = np.asarray(curves["per_class"][name])
        assert got.shape == (101,)
        np.testing.assert_allclose(got, direct, atol=1e-6)
        assert (np.diff(got) <= 1e-12).all(), name  # COCO's interpolation: non-increasing
        defined.append(direct)
    assert len(defined) == 3 and any(len(set(d)) > 2 for d in defined)  # the curves are not trivial steps
    np.testing.assert_allclose(curves["mean"], np.mean(defined, axis=0), atol=1e-6)
    # the curve's mean is COCO's AP50 for the class
    one = COCOeval(e.cocoGt, e.cocoDt, iouType="bbox")
    one.params.catIds = [2]
    with contextlib.redirect_stdout(io.StringIO()):
        one.evaluate()
        one.accumulate()
        one.summarize()
    assert 100 * np.mean(curves["per_class"]["dog"]) == pytest.approx(100 * one.stats[1], abs=1e-3)
    with pytest.raises(ValueError, match="thresholds"):
        m.pr_curves(iou=0.52)


def _mask_fixture():
    h = w = 128
    rect = lambda r0, r1, c0, c1: _fill(h, w, r0, r1, c0, c1)  # noqa: E731
    rr, cc = np.mgrid[:h, :w]
    tri = ((cc >= 60) & (cc < 100) & (rr >= 60) & (rr < 100) & (cc - 60 <= rr - 60)).astype(np.uint8)  # box 1600 px (medium), mask 820 (small)
    tri_shift = np.roll(tri, 5, axis=1)
    blob = rect(110, 118, 5, 15)

    def box(m):
        ys, xs = np.nonzero(m)
        return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]

    def probs(ms):  # a torchvision Mask R-CNN's output: [N, 1, H, W] probabilities
        if not ms:
            return torch.zeros((0, 1, h, w))
        return torch.tensor(np.stack(ms)[:, None] * 0.7 + 0.2, dtype=torch.float32)

    def gt(ms):
        return torch.tensor(np.stack(ms), dtype=torch.bool) if ms else torch.zeros((0, h, w), dtype=torch.bool)

    t_masks = [[rect(10, 40, 10, 40), tri], [rect(10, 120, 10, 100)], [], [rect(50, 80, 50, 90)]]
    t_labels = [[0, 1], [0], [], [1]]
    p_masks = [[rect(10, 40, 10, 40), tri_shift], [rect(15, 125, 10, 100), blob], [rect(60, 70, 60, 70)], []]
    p_scores = [[0.9, 0.8], [0.7, 0.85], [0.95], []]
    p_labels = [[0, 1], [0, 1], [0], []]
    targets = [_target([box(m) for m in ms], ls, gt(ms)) for ms, ls in zip(t_masks, t_labels)]
    preds = [_pred([box(m) for m in ms], s, ls, probs(ms)) for ms, s, ls in zip(p_masks, p_scores, p_labels)]
    return preds, targets, [(h, w)] * len(targets)


def _fill(h, w, r0, r1, c0, c1):
    m = np.zeros((h, w), dtype=np.uint8)
    m[r0:r1, c0:c1] = 1
    return m


def test_mask_metrics_match_pycocotools_segm_run_directly():
    preds, targets, sizes = _mask_fixture()
    m = DetectionMetrics(CLASSES, masks=True)
    m.update(preds, targets)
    ours = m.compute()
    assert set(ours) == {p + k for p in ("", "mask_") for k in [*KEYS, "per_class_ap"]}
    es, _, _ = _cocoeval(preds, targets, sizes, iou_type="segm")
    eb, _, _ = _cocoeval(preds, targets, sizes, iou_type="bbox")
    assert 0 < es.stats[0] < 0.9 and es.stats[3] > 0 and es.stats[5] > 0
    assert abs(es.stats[0] - eb.stats[0]) > 1e-3  # shifted masks and their boxes do not score alike
    _check_against(ours, es, _per_class_direct(es, "segm"), prefix="mask_")
    _check_against(ours, eb, _per_class_direct(eb, "bbox"))
    curves = m.pr_curves(masks=True)
    np.testing.assert_allclose(curves["per_class"]["dog"], es.eval["precision"][0, :, 1, 0, 2], atol=1e-6)

    exact = DetectionMetrics(CLASSES, masks=True)  # predicted masks equal to the ground truth
    exact.update([_pred(t["boxes"].tolist(), [0.9] * len(t["labels"]), t["labels"].tolist(), t["masks"].to(torch.uint8))
                  for t in targets], targets)
    r = exact.compute()
    assert r["mask_map"] == pytest.approx(100.0) and r["mask_per_class_ap"]["cat"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="masks=True"):
        DetectionMetrics(CLASSES).pr_curves(masks=True)


def test_bad_input_is_a_value_error():
    m = DetectionMetrics(["a", "b"])
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\)"):
        m.update([_pred([[0, 0, 5, 5]], [0.5], [2])], [_target([], [])])
    with pytest.raises(ValueError, match="1 predictions for 2 targets"):
        m.update([_pred([], [], [])], [_target([], []), _target([], [])])
    with pytest.raises(ValueError, match="scores"):
        m.update([{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}], [_target([], [])])
    mm = DetectionMetrics(["a"], masks=True)
    with pytest.raises(ValueError, match="no masks"):
        mm.update([_pred([[0, 0, 5, 5]], [0.5], [0])], [_target([], [], torch.zeros(0, 8, 8))])
    with pytest.raises(ValueError, match="resize"):
        mm.update([_pred([[0, 0, 5, 5]], [0.5], [0], torch.ones(1, 1, 8, 8))], [_target([[0, 0, 5, 5]], [0], torch.ones(1, 9, 9))])


def test_pr_curves_from_an_array_checks_its_shape():
    p = -np.ones((10, 101, 2, 4, 3))
    p[:, :, 1] = np.linspace(1, 0, 101)[None, :, None, None]
    c = pr_curves(p, [0, 2], ["x", "y", "z"])
    assert c["per_class"]["x"] is None and c["per_class"]["y"] is None and c["mean"] == c["per_class"]["z"]
    with pytest.raises(ValueError, match="precision must be"):
        pr_curves(p, [0], ["x", "y", "z"])


def test_plot_pr_curves_writes_a_png(tmp_path):
    rng = np.random.default_rng(0)
    per_class = {f"class {k}": np.sort(rng.uniform(0, 1, 101))[::-1].tolist() for k in range(25)}
    per_class["absent"] = None
    curves = {"iou": 0.5, "recall": np.linspace(0, 1, 101).tolist(), "per_class": per_class,
              "mean": np.mean([c for c in per_class.values() if c], axis=0).tolist()}
    out = plot_pr_curves(curves, tmp_path / "plots" / "pr.png", top=5)
    assert out == tmp_path / "plots" / "pr.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    assert sorted(p.name for p in out.parent.iterdir()) == ["pr.png"]  # no temporary file left behind

    empty = DetectionMetrics(["a"]).pr_curves()
    assert plot_pr_curves(empty, tmp_path / "empty.png").read_bytes()[:4] == b"\x89PNG"
