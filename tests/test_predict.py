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


def test_a_checkpoint_with_too_few_class_names_is_refused_clearly(tmp_path, capsys):
    """A header edited by hand (classes shorter than the outputs) gives exit 2 and a message, not an IndexError."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from finegrain.checkpoint import META_KEY
    from finegrain.cli import main

    from .helpers import make_checkpoint

    src = make_checkpoint(tmp_path / "m.safetensors")
    with safe_open(str(src), framework="pt") as f:
        header = dict(f.metadata())
    meta = json.loads(header[META_KEY])
    meta["classes"] = meta["classes"][:2]
    save_file(load_file(str(src)), str(tmp_path / "short.safetensors"), metadata={**header, META_KEY: json.dumps(meta)})
    img = tmp_path / "a.jpg"
    from PIL import Image

    Image.new("RGB", (40, 40), (200, 40, 40)).save(img)
    assert main(["predict", str(tmp_path / "short.safetensors"), str(img), "--device", "cpu"]) == 2
    assert "names 2 classes for 3 outputs" in capsys.readouterr().err


def test_a_url_given_to_predict_says_urls_are_not_read(trained_run, capsys):
    from finegrain.cli import main

    result, _ = trained_run
    rc = main(["predict", str(result.best_checkpoint), "https://example.org/bird.jpg", "--device", "cpu"])
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 2 and "is a URL" in err and "curl -O" in err
