import hashlib

import pytest
import torch

pytest.importorskip("torch_pruning")

from finegrain.checkpoint import load_task
from finegrain.compress.prune import prune_checkpoint, prune_task  # noqa: E402
from finegrain.predict import Predictor  # noqa: E402


def test_prune_fine_tune_and_reload(trained_run, tmp_path):
    result, data = trained_run
    src = result.best_checkpoint
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    out = tmp_path / "pruned.safetensors"
    summary = prune_checkpoint(src, out, ratio=0.5, data=str(data), epochs=1, batch_size=8, workers=0, device="cpu")
    assert summary["params_after"] < 0.6 * summary["params_before"]
    assert hashlib.sha256(src.read_bytes()).hexdigest() == digest  # the original is untouched
    task, meta = load_task(out, "cpu")
    assert meta["pruning"]["ratio"] == 0.5 and sum(p.numel() for p in task.parameters()) == summary["params_after"]
    preds = Predictor.from_checkpoint(out, device="cpu").predict([data / "test" / "red"], topk=2)
    assert len(preds) == 3 and all(len(p["topk"]) == 2 for p in preds)


def test_reloaded_pruned_model_gives_the_same_outputs(trained_run, tmp_path):
    result, _ = trained_run
    out = tmp_path / "p.safetensors"
    prune_checkpoint(result.best_checkpoint, out, ratio=0.3, epochs=0, device="cpu")
    task, _ = load_task(result.best_checkpoint, "cpu")
    prune_task(task, 0.3, img_size=32)
    task.eval()
    reloaded, _ = load_task(out, "cpu")
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(task.predict(x), reloaded.predict(x), atol=1e-5)


def test_bad_ratio_and_same_output_path(trained_run):
    result, _ = trained_run
    with pytest.raises(ValueError, match="--ratio"):
        prune_checkpoint(result.best_checkpoint, result.run_dir / "x.safetensors", ratio=1.5, device="cpu")
    with pytest.raises(ValueError, match="never overwritten"):
        prune_checkpoint(result.best_checkpoint, result.best_checkpoint, ratio=0.5, device="cpu")
