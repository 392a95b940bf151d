"""Tests for finegrain.eval.metrics: hand-computed cases, sklearn parity, streaming, exports."""

from __future__ import annotations

import csv
import json
import warnings

import numpy as np
import pytest
import torch

from finegrain.eval.metrics import (
    MetricAccumulator,
    accuracy,
    classification_metrics,
    expected_calibration_error,
    metrics_from_counts,
    reliability_bins,
    save_confusion_matrix_png,
    write_confusion_csv,
    write_per_class_csv,
)

NAMES3 = ["cat", "dog", "fox"]

# 3 classes, 6 samples. Predictions (argmax) are [0, 1, 1, 1, 2, 0].
# Rank of the true class in each row: 0, 1, 0, 0, 0, 2.
HAND_LOGITS = torch.tensor(
    [
        [0.7, 0.2, 0.1],  # true cat, predicted cat
        [0.3, 0.6, 0.1],  # true cat, predicted dog (cat second)
        [0.1, 0.8, 0.1],  # true dog, predicted dog
        [0.2, 0.5, 0.3],  # true dog, predicted dog
        [0.1, 0.2, 0.7],  # true fox, predicted fox
        [0.5, 0.4, 0.1],  # true fox, predicted cat (fox third)
    ]
)
HAND_TARGETS = torch.tensor([0, 0, 1, 1, 2, 2])


def test_hand_computed_three_classes():
    m = classification_metrics(HAND_LOGITS, HAND_TARGETS, NAMES3, topk=(1, 2, 5))
    # Confusion matrix (rows true, cols predicted):
    #   cat: 1 1 0   dog: 0 2 0   fox: 1 0 1
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["n"] == 6
    assert m["top1"] == pytest.approx(400 / 6)  # 4 of 6 on the diagonal
    assert m["top2"] == pytest.approx(500 / 6)  # all but the last row
    assert m["top5"] == 100.0  # k > C
    # support [2, 2, 2], predicted [2, 3, 1], correct [1, 2, 1]
    # precision [1/2, 2/3, 1/1], recall [1/2, 2/2, 1/2], F1 = 2tp/(support+predicted) = [2/4, 4/5, 2/3]
    assert m["mean_per_class_acc"] == pytest.approx(200 / 3)
    assert m["macro_precision"] == pytest.approx((50 + 200 / 3 + 100) / 3)
    assert m["macro_recall"] == pytest.approx(200 / 3)
    assert m["macro_f1"] == pytest.approx((50 + 80 + 200 / 3) / 3)
    assert m["classes_without_samples"] == []
    dog = m["per_class"][1]
    assert dog == {
        "class": "dog",
        "index": 1,
        "support": 2,
        "correct": 2,
        "accuracy": 100.0,
        "precision": pytest.approx(200 / 3),
        "recall": 100.0,
        "f1": pytest.approx(80.0),
    }
    assert [r["support"] for r in m["per_class"]] == [2, 2, 2]
    assert [r["correct"] for r in m["per_class"]] == [1, 2, 1]
    # Two mistakes of one sample each; ties ordered by (true, predicted) index.
    assert m["most_confused"] == [
        {"true": "cat", "predicted": "dog", "count": 1, "rate": 50.0},
        {"true": "fox", "predicted": "cat", "count": 1, "rate": 50.0},
    ]
    json.dumps(m, allow_nan=False)  # JSON-serialisable, no NaN


def test_hand_computed_absent_classes():
    # 4 classes; targets only use 0 and 1, predictions use 0, 1 and 2; class 3 never appears.
    targets = np.array([0, 0, 1, 1])
    preds = np.array([0, 2, 1, 1])
    logits = np.eye(4)[preds] * 5.0
    names = ["a", "b", "c", "d"]
    m = classification_metrics(logits, targets, names, topk=(1,))
    # support [2, 2, 0, 0], predicted [1, 2, 1, 0], correct [1, 2, 0, 0]
    # precision [100, 100, 0, 0], recall [50, 100, 0, 0], F1 [2/3, 1, 0, 0] * 100
    assert m["top1"] == 75.0
    assert "top5" not in m
    assert m["mean_per_class_acc"] == 75.0  # over a and b only
    assert m["classes_without_samples"] == ["c", "d"]
    # Macro over classes in targets or predictions: a, b, c (not d).
    assert m["macro_precision"] == pytest.approx(200 / 3)
    assert m["macro_recall"] == pytest.approx(50.0)
    assert m["macro_f1"] == pytest.approx((200 / 3 + 100) / 3)
    assert m["per_class"][2]["accuracy"] is None
    assert m["per_class"][2]["recall"] == 0.0
    assert m["per_class"][2]["precision"] == 0.0
    assert m["most_confused"] == [{"true": "a", "predicted": "c", "count": 1, "rate": 50.0}]
    json.dumps(m, allow_nan=False)


def test_ties_break_towards_lower_index_consistently():
    # All scores equal: argmax is class 0 for every row; ranks of targets 0, 1, 2, 0 are 0, 1, 2, 0.
    m = classification_metrics(torch.zeros(4, 3), torch.tensor([0, 1, 2, 0]), NAMES3, topk=(1, 2))
    assert m["confusion_matrix"] == [[2, 0, 0], [1, 0, 0], [1, 0, 0]]
    assert m["top1"] == 50.0
    assert m["top2"] == 75.0


def test_topk_with_fewer_classes_than_k():
    logits = torch.randn(10, 3, generator=torch.Generator().manual_seed(0))
    targets = torch.arange(10) % 3
    m = classification_metrics(logits, targets, NAMES3)
    assert m["top5"] == 100.0
    m = classification_metrics(logits, targets, NAMES3, topk=(3, 10))
    assert m["top3"] == 100.0 and m["top10"] == 100.0


def test_most_confused_sorted_and_limited():
    # true 0 -> pred 1 three times, true 2 -> pred 0 twice, true 1 -> pred 2 once.
    targets = [0, 0, 0, 2, 2, 1, 1]
    preds = [1, 1, 1, 0, 0, 2, 1]
    m = classification_metrics(np.eye(3)[preds], targets, NAMES3, n_confused=2)
    assert [(p["true"], p["predicted"], p["count"]) for p in m["most_confused"]] == [
        ("cat", "dog", 3),
        ("fox", "cat", 2),
    ]
    assert m["most_confused"][0]["rate"] == 100.0
    assert classification_metrics(np.eye(3)[preds], targets, NAMES3, n_confused=0)["most_confused"] == []


def test_accuracy_helper():
    assert accuracy(HAND_LOGITS, HAND_TARGETS) == pytest.approx(400 / 6)
    assert isinstance(accuracy(HAND_LOGITS, HAND_TARGETS), float)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sklearn_parity(seed):
    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    n, c = 300, 7
    targets = rng.integers(0, 6, size=n)  # class 6 never present
    logits = rng.normal(size=(n, c)).astype(np.float32)
    logits[np.arange(n), targets] += 1.0  # better than chance
    logits[:, 3] = -1e9  # class 3 present but never predicted
    preds = logits.argmax(1)
    assert 6 in preds and 3 not in preds and 3 in targets and 6 not in targets
    names = [f"class_{i}" for i in range(c)]
    m = classification_metrics(torch.from_numpy(logits), targets, names, topk=(1, 3, 5))

    np.testing.assert_array_equal(m["confusion_matrix"], skm.confusion_matrix(targets, preds, labels=range(c)))
    p, r, f, s = skm.precision_recall_fscore_support(targets, preds, labels=range(c), zero_division=0)
    np.testing.assert_allclose([x["precision"] for x in m["per_class"]], 100 * p)
    np.testing.assert_allclose([x["recall"] for x in m["per_class"]], 100 * r)
    np.testing.assert_allclose([x["f1"] for x in m["per_class"]], 100 * f)
    np.testing.assert_array_equal([x["support"] for x in m["per_class"]], s)
    mp, mr, mf, _ = skm.precision_recall_fscore_support(targets, preds, average="macro", zero_division=0)
    assert m["macro_precision"] == pytest.approx(100 * mp)
    assert m["macro_recall"] == pytest.approx(100 * mr)
    assert m["macro_f1"] == pytest.approx(100 * mf)
    assert m["top1"] == pytest.approx(100 * skm.accuracy_score(targets, preds))
    for k in (3, 5):
        ref = skm.top_k_accuracy_score(targets, logits, k=k, labels=range(c))
        assert m[f"top{k}"] == pytest.approx(100 * ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true"
        assert m["mean_per_class_acc"] == pytest.approx(100 * skm.balanced_accuracy_score(targets, preds))
    assert m["classes_without_samples"] == ["class_6"]


def test_accumulator_matches_one_shot():
    g = torch.Generator().manual_seed(0)
    n, c = 103, 6
    logits = torch.randn(n, c, generator=g)
    targets = torch.randint(0, c - 1, (n,), generator=g)  # last class absent
    names = [f"c{i}" for i in range(c)]
    expected = classification_metrics(logits, targets, names, topk=(1, 2, 5))

    acc = MetricAccumulator(topk=(5, 1, 2))
    for lo, hi in [(0, 10), (10, 10), (10, 47), (47, 48), (48, 103)]:  # includes an empty batch
        acc.update(logits[lo:hi], targets[lo:hi])
    assert acc.compute(names) == expected
    assert acc.confusion_matrix.tolist() == expected["confusion_matrix"]

    acc.reset()
    acc.update(logits.numpy(), targets.numpy())  # arrays work too
    assert acc.compute(names) == expected


def test_accumulator_rejects_bad_batch_and_keeps_state():
    acc = MetricAccumulator(3)
    acc.update(HAND_LOGITS, HAND_TARGETS)
    with pytest.raises(ValueError, match="out of range"):
        acc.update(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="expected 3"):
        acc.update(torch.zeros(2, 4), torch.tensor([0, 1]))
    assert acc.compute(NAMES3) == classification_metrics(HAND_LOGITS, HAND_TARGETS, NAMES3)


def test_accumulator_errors():
    with pytest.raises(ValueError, match="no batches"):
        MetricAccumulator().compute(NAMES3)
    acc = MetricAccumulator()
    acc.update(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="N=0"):
        acc.compute(NAMES3)
    with pytest.raises(ValueError, match="topk"):
        MetricAccumulator(topk=(0, 1))


def test_metrics_from_counts_direct():
    m = metrics_from_counts([[1, 1, 0], [0, 2, 0], [1, 0, 1]], {1: 4, 2: 5}, NAMES3)
    assert m == classification_metrics(HAND_LOGITS, HAND_TARGETS, NAMES3, topk=(1, 2))
    with pytest.raises(ValueError, match="outside"):
        metrics_from_counts([[1, 0], [0, 1]], {1: 3}, ["a", "b"])
    with pytest.raises(ValueError, match="square"):
        metrics_from_counts([[1, 0, 0], [0, 1, 0]], {1: 2}, ["a", "b"])


@pytest.mark.parametrize(
    "logits, targets, names, match",
    [
        (torch.zeros(4), torch.zeros(4, dtype=torch.long), NAMES3, r"shape \[N, C\]"),
        (torch.zeros(4, 3), torch.zeros(4, 3, dtype=torch.long), NAMES3, r"shape \[N\]"),
        (torch.zeros(4, 3), torch.zeros(5, dtype=torch.long), NAMES3, "4 rows but targets has 5"),
        (torch.zeros(2, 3), torch.tensor([0, 3]), NAMES3, r"in \[0, 3\)"),
        (torch.zeros(2, 3), torch.tensor([-1, 0]), NAMES3, "out of range"),
        (torch.zeros(2, 3), torch.tensor([0.0, 1.0]), NAMES3, "integer class indices"),
        (torch.zeros(2, 3), torch.tensor([0, 1]), ["a", "b"], "2 entries but logits has 3"),
        (torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), NAMES3, "N=0"),
        (torch.tensor([[float("nan"), 0.0, 0.0]]), torch.tensor([0]), NAMES3, "NaN"),
    ],
)
def test_classification_metrics_errors(logits, targets, names, match):
    with pytest.raises(ValueError, match=match):
        classification_metrics(logits, targets, names)


def test_other_argument_errors():
    with pytest.raises(ValueError, match="n_confused"):
        classification_metrics(HAND_LOGITS, HAND_TARGETS, NAMES3, n_confused=-1)
    with pytest.raises(ValueError, match="N=0"):
        accuracy(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="out of range"):
        accuracy(torch.zeros(1, 3), torch.tensor([5]))


# --------------------------------------------------------------------------- calibration


def test_ece_perfectly_calibrated():
    # 4 samples at confidence 0.75 with 3 correct; 2 samples at confidence 0.5 with 1 correct.
    probs = np.array(
        [[0.75, 0.15, 0.10]] * 4 + [[0.5, 0.3, 0.2]] * 2,
        dtype=np.float64,
    )
    targets = np.array([0, 0, 0, 1, 0, 2])
    assert expected_calibration_error(probs, targets, n_bins=10) == pytest.approx(0.0, abs=1e-12)


def test_ece_hand_computed_miscalibrated():
    # Bins of width 0.2. Confidence / correct per sample:
    #   0.9 yes, 0.9 no       -> bin (0.8, 1.0]: acc 0.5, conf 0.9, weight 2/5
    #   0.7 yes, 0.7 no       -> bin (0.6, 0.8]: acc 0.5, conf 0.7, weight 2/5
    #   0.55 yes              -> bin (0.4, 0.6]: acc 1.0, conf 0.55, weight 1/5
    # ECE = 0.4 * 0.4 + 0.4 * 0.2 + 0.2 * 0.45 = 0.33
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.3, 0.7], [0.7, 0.3], [0.45, 0.55]])
    targets = np.array([0, 1, 1, 1, 1])
    assert expected_calibration_error(probs, targets, n_bins=5) == pytest.approx(0.33)
    bins = reliability_bins(torch.from_numpy(probs), torch.from_numpy(targets), n_bins=5)
    assert bins["edges"] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert bins["count"] == [0, 0, 1, 2, 2]
    assert bins["accuracy"][:2] == [None, None]
    assert bins["accuracy"][2:] == pytest.approx([1.0, 0.5, 0.5])
    assert bins["confidence"][2:] == pytest.approx([0.55, 0.7, 0.9])
    json.dumps(bins, allow_nan=False)


def test_ece_errors():
    with pytest.raises(ValueError, match="softmax"):
        expected_calibration_error(torch.tensor([[2.0, -1.0]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="n_bins"):
        expected_calibration_error(torch.tensor([[0.6, 0.4]]), torch.tensor([0]), n_bins=0)
    with pytest.raises(ValueError, match="N=0"):
        reliability_bins(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))


# --------------------------------------------------------------------------- exports


@pytest.mark.parametrize("num_classes, normalize", [(5, True), (5, False), (80, True)])
def test_confusion_png(tmp_path, num_classes, normalize):
    image_mod = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    cm = rng.integers(0, 20, size=(num_classes, num_classes))
    cm[-1] = 0  # a class without samples must not break normalisation
    names = [f"species {i}" for i in range(num_classes)]
    out = save_confusion_matrix_png(torch.from_numpy(cm), names, tmp_path / "sub" / "cm.png", normalize=normalize)
    assert out == tmp_path / "sub" / "cm.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with image_mod.open(out) as im:
        im.verify()
    with image_mod.open(out) as im:
        w, h = im.size
    assert 400 <= w <= 3000 and 400 <= h <= 3000


def test_csv_exports(tmp_path):
    m = classification_metrics(np.eye(4)[[0, 2, 1, 1]] * 5.0, [0, 0, 1, 1], ["a", "b", "c", "d"])
    path = write_per_class_csv(m, tmp_path / "per_class.csv")
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["class", "index", "support", "correct", "accuracy", "precision", "recall", "f1"]
    assert [r["class"] for r in rows] == ["a", "b", "c", "d"]
    assert rows[0]["support"] == "2" and float(rows[0]["f1"]) == pytest.approx(66.6667)
    assert rows[2]["accuracy"] == ""  # no samples

    path = write_confusion_csv(m["confusion_matrix"], ["a", "b", "c", "d"], tmp_path / "cm.csv")
    with path.open(newline="", encoding="utf-8") as f:
        table = list(csv.reader(f))
    assert table[0][1:] == ["a", "b", "c", "d"]
    assert [[int(v) for v in row[1:]] for row in table[1:]] == m["confusion_matrix"]

    with pytest.raises(ValueError, match="per_class"):
        write_per_class_csv({"top1": 1.0}, tmp_path / "x.csv")
    with pytest.raises(ValueError, match="class_names"):
        write_confusion_csv(m["confusion_matrix"], ["a"], tmp_path / "y.csv")


def test_exports_keep_the_old_file_when_a_write_crashes(tmp_path, monkeypatch):
    """Each export goes through the atomic writer: a crash mid-write leaves the previous file whole."""
    import finegrain.checkpoint as ckpt

    m = classification_metrics(np.eye(3)[[0, 2, 1]] * 5.0, [0, 1, 1], ["a", "b", "c"])
    writers = {
        "per_class.csv": lambda p: write_per_class_csv(m, p),
        "cm.csv": lambda p: write_confusion_csv(m["confusion_matrix"], ["a", "b", "c"], p),
        "cm.png": lambda p: save_confusion_matrix_png(m["confusion_matrix"], ["a", "b", "c"], p),
    }
    real = ckpt.atomic_write

    def crashing(path, write):
        def half(tmp):
            write(tmp)
            raise KeyboardInterrupt  # killed after the bytes are written, before the rename
        return real(path, half)

    for name, write in writers.items():
        path = tmp_path / name
        path.write_bytes(b"previous")
        monkeypatch.setattr(ckpt, "atomic_write", crashing)
        with pytest.raises(KeyboardInterrupt):
            write(path)
        monkeypatch.undo()
        assert path.read_bytes() == b"previous" and not list(tmp_path.glob(".*.tmp")), name
        write(path)
        assert path.read_bytes() != b"previous", name


@pytest.mark.gpu
def test_accumulator_update_does_not_sync_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    logits = torch.randn(64, 10, device="cuda")
    targets = torch.randint(0, 10, (64,), device="cuda")
    acc = MetricAccumulator(topk=(1, 5))
    acc.update(logits[:8], targets[:8])  # first call allocates the state
    torch.cuda.set_sync_debug_mode("error")
    try:
        acc.update(logits[8:], targets[8:])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert acc.compute([str(i) for i in range(10)]) == classification_metrics(
        logits.cpu(), targets.cpu(), [str(i) for i in range(10)]
    )
