"""finegrain.predict: the Predictor's Python API."""

from __future__ import annotations


def test_predictor_python_api_matches_cli_classes(trained_run):
    from PIL import Image

    from finegrain import Predictor

    result, data = trained_run
    p = Predictor.from_checkpoint(result.best_checkpoint, device="cpu")
    assert p.classes == ["blue", "green", "red"]
    img = Image.open(next((data / "test" / "red").iterdir()))
    out = p.predict([img], topk=10)
    assert len(out[0]["topk"]) == 3  # capped at the class count
    assert abs(sum(t["score"] for t in out[0]["topk"]) - 1.0) < 1e-4
