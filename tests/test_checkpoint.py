import json

import pytest
import torch

from finegrain import checkpoint as ckpt
from finegrain.models.backbone import create_backbone
from finegrain.tasks import build_task

PREP = {"img_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3, "crop_pct": 0.875, "interpolation": "bilinear"}


def _state():
    torch.manual_seed(0)
    return {"w": torch.randn(3, 4), "b": torch.zeros(3)}


def _meta(**kw):
    base = dict(task="supervised", num_classes=2, classes=["a", "b"], preprocessing=PREP,
                model={"backbone": "test_resnet", "pretrained": "none", "task": "supervised"})
    return ckpt.CheckpointMeta(**{**base, **kw})


def test_round_trip_weights_and_metadata(tmp_path):
    sd = _state()
    path = ckpt.save(tmp_path / "m.safetensors", sd, _meta())
    loaded, meta = ckpt.load(path)
    assert all(torch.equal(sd[k], loaded[k]) for k in sd)
    assert meta.classes == ["a", "b"] and meta["classes"] == ["a", "b"] and meta.format_version == ckpt.FORMAT_VERSION
    assert {"torch", "timm", "finegrain"} <= set(meta.versions)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_save_wants_typed_metadata(tmp_path):
    with pytest.raises(TypeError, match="CheckpointMeta"):
        ckpt.save(tmp_path / "m.safetensors", _state(), {"classes": ["a"]})


def test_metadata_with_fewer_class_names_than_outputs_is_refused():
    with pytest.raises(ValueError, match="1 classes for 2 outputs"):
        _meta(classes=["a"])


def test_run_folder_resolves_to_best(tmp_path):
    ckpt.save(tmp_path / "last.safetensors", _state(), _meta(epoch=2))
    assert ckpt.read_meta(tmp_path).epoch == 2
    ckpt.save(tmp_path / "best.safetensors", _state(), _meta(epoch=1))
    assert ckpt.read_meta(tmp_path).epoch == 1


def test_truncated_checkpoint_is_refused(tmp_path):
    path = ckpt.save(tmp_path / "m.safetensors", _state(), _meta())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        ckpt.load(path)


def test_newer_format_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "future.safetensors"
    save_file(_state(), str(path), metadata={"finegrain": json.dumps({"format_version": 99, "versions": {"finegrain": "9.0"}})})
    with pytest.raises(ValueError, match="format 99.*upgrade"):
        ckpt.load(path)


def test_plain_safetensors_is_not_a_checkpoint(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file(_state(), str(path))
    with pytest.raises(ValueError, match="without finegrain metadata"):
        ckpt.read_meta(path)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError):
        ckpt.load(tmp_path / "nope.safetensors")


def test_format_1_checkpoint_still_loads(tmp_path):
    """A checkpoint as the code before the checkpoint layer wrote it: flat task options, source_checkpoint."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    task = build_task("wsdan", create_backbone("test_resnet", num_classes=3), 3, num_parts=4)
    flat_model = {"backbone": "test_resnet", "pretrained": "none", "task": "wsdan", "drop_rate": 0.0, "drop_path_rate": 0.0,
                  "teacher": None, "kd_temperature": 4.0, "attention": "none", "pooling": "avg", "loss": "ce",
                  "wsdan_parts": 4, "racnn_scales": 3, "parts_pool": "concat"}
    old = {"format_version": 1, "versions": {"finegrain": "0.1.0"}, "task": "wsdan", "task_args": task.task_args(),
           "model": flat_model, "num_classes": 3, "classes": ["r", "g", "b"], "preprocessing": PREP, "epoch": 3,
           "metrics": {"val_top1": 50.0}, "pruning": {"ratio": 0.5}, "source_checkpoint": "runs/x/best.safetensors"}
    path = tmp_path / "old.safetensors"
    save_file({k: v.contiguous() for k, v in task.state_dict().items()}, str(path), metadata={"finegrain": json.dumps(old)})
    loaded, meta = ckpt.load_task(path)
    assert meta.model["options"] == {"num_parts": 4}  # the one flat option that said something
    assert meta.lineage == [{"kind": "pruned", "source": "runs/x/best.safetensors"}]
    x = torch.randn(2, 3, 32, 32)
    task.eval()
    torch.testing.assert_close(loaded.predict(x), task.predict(x))


def test_derive_records_lineage_and_resets_metrics():
    meta = _meta(metrics={"val_top1": 90.0}, epoch=5)
    d1 = ckpt.derive(meta, "pruned", "a.safetensors", details={"ratio": 0.5}, pruning={"ratio": 0.5})
    d2 = ckpt.derive(d1, "enrolled", "b.safetensors")
    assert [e["kind"] for e in d2.lineage] == ["pruned", "enrolled"] and d2.lineage[0]["ratio"] == 0.5
    assert d2.lineage[1]["source"] == "b.safetensors" and d1.metrics == {} and d1.epoch is None
    assert meta.lineage == [] and meta.metrics == {"val_top1": 90.0}  # the source is untouched


def test_checkpoint_of_changed_layers_names_what_differs(tmp_path):
    """A checkpoint whose weights are not the layers its task builds now (saved before a layer change) says which, and the fix."""
    torch.manual_seed(0)
    task = build_task("fgvc", create_backbone("test_resnet", num_classes=3), 3, attention="se")
    sd = dict(task.state_dict())
    renamed = sorted(k for k in sd if k.startswith("attn") or ".attn" in k or "attention" in k)[0]
    sd["old_layer.weight"] = sd.pop(renamed)
    head = next(k for k in sd if k.endswith("weight") and sd[k].ndim == 2)
    sd[head] = torch.zeros(sd[head].shape[0] + 1, sd[head].shape[1])
    meta = _meta(task="fgvc", num_classes=3, classes=["r", "g", "b"], task_args=task.task_args(),
                 model={"backbone": "test_resnet", "pretrained": "none", "task": "fgvc"})
    ckpt.save(tmp_path / "old.safetensors", sd, meta)
    with pytest.raises(ValueError) as e:
        ckpt.load_task(tmp_path / "old.safetensors")
    msg = str(e.value)
    assert f"missing {renamed}" in msg and "not in the model old_layer.weight" in msg and f"other shape {head}" in msg
    assert "train it again" in msg


def test_write_text_atomic_keeps_newlines_and_the_old_file_on_a_crash(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "rows.csv"
    assert ckpt.write_text_atomic(path, "a,b\r\nc,d\r\n") == path
    assert path.read_bytes() == b"a,b\r\nc,d\r\n"  # the CSV's own line ends, untranslated
    import os

    def killed(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        ckpt.write_text_atomic(path, "new")
    assert path.read_bytes() == b"a,b\r\nc,d\r\n" and [p.name for p in path.parent.iterdir()] == ["rows.csv"]
