"""Enrollment: add a class to a trained checkpoint from a few images, and remove it again."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finegrain.checkpoint import read_meta
from finegrain.fewshot.enroll import enroll_class, imprint_row, unenroll_class
from finegrain.predict import Predictor


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def yellow(tmp_path) -> Path:
    d = tmp_path / "yellow"
    d.mkdir()
    rng = np.random.default_rng(1)
    for i in range(4):
        arr = np.clip(np.array((235, 225, 20)) + rng.normal(0, 20, (40, 40, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(d / f"y{i}.jpg")
    return d


def test_imprint_row_is_the_normalised_prototype_at_the_mean_norm():
    weight = torch.tensor([[3.0, 4.0], [0.0, 1.0]])  # row norms 5 and 1
    emb = torch.tensor([[2.0, 0.0], [0.0, 10.0]])
    row = imprint_row(emb, weight)
    assert torch.allclose(row, torch.tensor([1.0, 1.0]) / 2**0.5 * 3.0)


def test_enroll_round_trip(trained_run, yellow, tmp_path, capsys):
    from finegrain.cli import main

    result, data = trained_run
    src = result.best_checkpoint
    before = _sha(src)
    old = Predictor.from_checkpoint(src, device="cpu")
    test_images = sorted((data / "test").rglob("*.jpg"))
    (yellow / "broken.jpg").write_bytes(b"not an image")

    new = tmp_path / "with_yellow.safetensors"
    assert main(["enroll", str(src), "--class", "yellow", str(yellow), "--out", str(new)]) == 0
    assert "broken.jpg" in capsys.readouterr().out  # the unreadable file is listed
    assert _sha(src) == before  # the source checkpoint is never modified
    meta = read_meta(new)
    assert meta["classes"] == old.classes + ["yellow"] and meta["num_classes"] == len(old.classes) + 1
    p = Predictor.from_checkpoint(new, device="cpu")
    preds = [r["topk"][0]["class"] for r in p.predict([yellow]) if "topk" in r]
    assert preds == ["yellow"] * 4
    # the old rows are untouched: old-class logits are the same (up to matmul rounding)
    x = torch.stack([old.transform(Image.open(f).convert("RGB")) for f in test_images])
    assert torch.allclose(p.logits(x)[:, :-1], old.logits(x), atol=1e-6)

    # an existing name is refused without --replace; with it the row is re-imprinted in place
    assert main(["enroll", str(new), "--class", "yellow", str(yellow), "--out", str(tmp_path / "again.safetensors")]) == 2
    assert "already in" in " ".join(capsys.readouterr().err.split())  # rich wraps lines
    assert main(["enroll", str(new), "--class", "yellow", str(yellow), "--out", str(tmp_path / "again.safetensors"), "--replace"]) == 0
    assert read_meta(tmp_path / "again.safetensors")["classes"] == meta["classes"]

    back = tmp_path / "back.safetensors"
    assert main(["unenroll", str(new), "--class", "yellow", "--out", str(back)]) == 0
    restored = Predictor.from_checkpoint(back, device="cpu")
    assert restored.classes == old.classes
    assert torch.allclose(restored.logits(x), old.logits(x), atol=1e-6)
    assert [r["topk"] for r in restored.predict(test_images)] == [r["topk"] for r in old.predict(test_images)]


def test_enroll_errors(trained_run, yellow, tmp_path):
    result, _ = trained_run
    src = result.best_checkpoint
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"0 readable images, --min-images is 1. Unreadable: .*x.jpg"):
        enroll_class(src, "junk", [tmp_path / "bad"], tmp_path / "o.safetensors")
    with pytest.raises(ValueError, match="--min-images is 5"):
        enroll_class(src, "yellow", [yellow], tmp_path / "o.safetensors", min_images=5)
    with pytest.raises(ValueError, match="source checkpoint"):
        enroll_class(src, "yellow", [yellow], src)
    with pytest.raises(ValueError, match="not in"):
        unenroll_class(src, "purple", tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


def test_enroll_reports_old_class_accuracy(trained_run, yellow, tmp_path, capsys):
    import json

    from finegrain.cli import main

    result, data = trained_run
    assert main(["enroll", str(result.best_checkpoint), "--class", "yellow", str(yellow), "--out",
                 str(tmp_path / "n.safetensors"), "--report-data", str(data)]) == 0
    report = json.loads(capsys.readouterr().out)["old_class_top1"]
    assert report["images"] == 9 and 0 <= report["after"] <= 100 and 0 <= report["before"] <= 100


def test_enroll_mean_bias_is_the_mean_of_the_old_biases(trained_run, yellow, tmp_path):
    from safetensors.torch import load_file

    result, _ = trained_run
    src = result.best_checkpoint
    out = enroll_class(src, "yellow", [yellow], tmp_path / "n.safetensors", bias="mean")
    old_sd, new_sd = load_file(str(src)), load_file(out["out"])
    bkey = [k for k in new_sd if new_sd[k].ndim == 1 and k in old_sd and new_sd[k].shape[0] == old_sd[k].shape[0] + 1][0]
    assert torch.allclose(new_sd[bkey][-1], old_sd[bkey].mean())


def test_calibrated_bias_behaves_as_documented(trained_run, yellow, tmp_path):
    """Outcomes, not the formula: a wider margin never loses enrollment images to the old classes and
    never wins old images back; old rows are untouched, so an old image's prediction only ever moves
    to the new class; with margin 2 std every enrollment image is the new class."""
    result, data = trained_run
    src = result.best_checkpoint
    before = Predictor.from_checkpoint(src, device="cpu")
    old_files = sorted((data / "test").rglob("*.jpg"))
    old_pred = [r["topk"][0]["index"] for r in before.predict(old_files, topk=1)]
    new_files = sorted(yellow.glob("*.jpg"))
    wins_new, wins_old = [], []
    for m in (-3.0, 0.0, 2.0, 6.0):
        p = Predictor.from_checkpoint(enroll_class(src, "yellow", [yellow], tmp_path / f"n{m}.safetensors",
                                                   margin_std=m)["out"], device="cpu")
        new_idx = len(p.classes) - 1
        wins_new.append(sum(r["topk"][0]["index"] == new_idx for r in p.predict(new_files, topk=1)))
        after = [r["topk"][0]["index"] for r in p.predict(old_files, topk=1)]
        assert all(a == b or a == new_idx for a, b in zip(after, old_pred))
        wins_old.append(sum(a == new_idx for a in after))
    assert wins_new == sorted(wins_new) and wins_old == sorted(wins_old)
    assert wins_new[2] == len(new_files)
    assert wins_new[0] < len(new_files)  # 3 std below the best old logit: the margin really moves the bias
