import json

import pytest
import torch

from finegrain.train import checkpoint as ckpt


def _state():
    torch.manual_seed(0)
    return {"w": torch.randn(3, 4), "b": torch.zeros(3)}


def test_round_trip_weights_and_metadata(tmp_path):
    sd = _state()
    path = ckpt.save_checkpoint(tmp_path / "m.safetensors", sd, {"classes": ["a", "b"], "num_classes": 2})
    loaded, meta = ckpt.load_checkpoint(path)
    assert all(torch.equal(sd[k], loaded[k]) for k in sd)
    assert meta["classes"] == ["a", "b"] and meta["format_version"] == ckpt.FORMAT_VERSION
    assert {"torch", "timm", "finegrain"} <= set(meta["versions"])
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_run_folder_resolves_to_best(tmp_path):
    ckpt.save_checkpoint(tmp_path / "last.safetensors", _state(), {"tag": "last"})
    assert ckpt.read_metadata(tmp_path)["tag"] == "last"
    ckpt.save_checkpoint(tmp_path / "best.safetensors", _state(), {"tag": "best"})
    assert ckpt.read_metadata(tmp_path)["tag"] == "best"


def test_truncated_checkpoint_is_refused(tmp_path):
    path = ckpt.save_checkpoint(tmp_path / "m.safetensors", _state(), {})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        ckpt.load_checkpoint(path)


def test_newer_format_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "future.safetensors"
    save_file(_state(), str(path), metadata={"finegrain": json.dumps({"format_version": 99, "versions": {"finegrain": "9.0"}})})
    with pytest.raises(ValueError, match="format 99.*upgrade"):
        ckpt.load_checkpoint(path)


def test_plain_safetensors_is_not_a_checkpoint(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file(_state(), str(path))
    with pytest.raises(ValueError, match="without finegrain metadata"):
        ckpt.read_metadata(path)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError):
        ckpt.load_checkpoint(tmp_path / "nope.safetensors")
