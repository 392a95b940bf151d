"""A malicious pickle planted in any file finegrain reads is refused with exit 2 and a message; its code never runs.

The planted object's ``__reduce__`` asks the unpickler to call ``open(marker, "w")``: if any loader
unpickled arbitrary globals, the marker file would exist afterwards.
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch

from finegrain.cli import main

from .helpers import make_checkpoint


class _Planted:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(path: Path, marker: Path, fmt: str) -> Path:
    """Write a pickle that would create ``marker`` when unpickled: torch's zip format or a raw pickle."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"model": {"w": torch.zeros(1)}, "x": _Planted(marker)}
    if fmt == "torch":  # zip archive with data.pkl
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    return path


def _resume(tmp, trained_run, evil):
    result, _ = trained_run
    run = tmp / "run"
    shutil.copytree(result.run_dir, run)
    shutil.copy(evil, run / "last.state.pt")
    return ["train", "--resume", str(run)]


def _pretrained(suffix):
    def args(tmp, trained_run, evil):
        _, data = trained_run
        weights = evil.rename(evil.with_suffix(suffix))
        return ["train", "--data", str(data), "--backbone", "test_resnet", "--pretrained", str(weights), "--epochs", "1",
                "--img-size", "32", "--batch-size", "8", "--workers", "0", "--device", "cpu", "--out", str(tmp / "runs")]
    return args


def _as_checkpoint(build):
    def args(tmp, trained_run, evil):
        return build(tmp, trained_run, str(evil.rename(evil.with_name("best.safetensors"))))
    return args


def _teacher(tmp, trained_run, ckpt):
    _, data = trained_run
    return ["distill", "--teacher", ckpt, "--data", str(data), "--student", "test_resnet", "--pretrained", "none",
            "--epochs", "1", "--img-size", "32", "--batch-size", "8", "--workers", "0", "--device", "cpu",
            "--out", str(tmp / "runs")]


def _fewshot(tmp, trained_run, ckpt):
    _, data = trained_run
    return ["fewshot", "eval", "--data", str(data), "--checkpoint", ckpt, "--device", "cpu"]


def _command(*words):
    def build(tmp, trained_run, ckpt):
        _, data = trained_run
        image = str(next((data / "test" / "red").iterdir()))
        fill = {"CKPT": ckpt, "DATA": str(data), "IMG": image, "OUT": str(tmp / "out")}
        return [fill.get(w, w) for w in words]
    return build


CASES = {
    "resume state": _resume,
    "--pretrained .pth": _pretrained(".pth"),
    "--pretrained .bin": _pretrained(".bin"),
    "--pretrained .pt": _pretrained(".pt"),
    "distill --teacher": _as_checkpoint(_teacher),
    "fewshot eval --checkpoint": _as_checkpoint(_fewshot),
    "eval": _as_checkpoint(_command("eval", "CKPT", "--data", "DATA", "--device", "cpu", "--workers", "0")),
    "predict": _as_checkpoint(_command("predict", "CKPT", "IMG", "--device", "cpu")),
    "explain": _as_checkpoint(_command("explain", "CKPT", "IMG", "--out", "OUT", "--device", "cpu")),
    "export": _as_checkpoint(_command("export", "CKPT", "--out", "OUT")),
    "enroll": _as_checkpoint(_command("enroll", "CKPT", "IMG", "--class", "x", "--out", "OUT")),
}


@pytest.mark.parametrize("fmt", ["torch", "raw"])
@pytest.mark.parametrize("case", list(CASES))
def test_a_planted_pickle_is_refused_and_never_runs(case, fmt, tmp_path, trained_run, capsys):
    marker = tmp_path / "PWNED"
    evil = plant(tmp_path / "evil.pkl", marker, fmt)
    argv = CASES[case](tmp_path, trained_run, evil)
    assert main(argv) == 2, f"{case}: {argv}"
    err = capsys.readouterr().err
    assert not marker.exists(), f"{case}: the planted pickle's code ran"
    assert "Traceback" not in err and len(err.strip()) > 20, err
    assert any(w in err for w in ("nothing in it ran", "not a readable", "truncated or corrupt")), err


@pytest.mark.parametrize("fmt", ["torch", "raw"])
@pytest.mark.parametrize("suffix", [".onnx", ".pt"])
def test_an_exported_model_that_is_a_planted_pickle_is_refused(suffix, fmt, tmp_path):
    from finegrain.deploy import read_export_metadata

    marker = tmp_path / "PWNED"
    evil = plant(tmp_path / f"model{suffix}", marker, fmt)
    with pytest.raises(ValueError, match="not a readable exported model"):
        read_export_metadata(evil)
    assert not marker.exists()


def test_the_served_app_refuses_a_planted_checkpoint(tmp_path):
    from finegrain.serve.app import create_app

    marker = tmp_path / "PWNED"
    evil = plant(tmp_path / "best.safetensors", marker, "torch")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        create_app(evil, device="cpu")
    assert not marker.exists()


def test_the_planted_pickle_would_run_if_unpickled(tmp_path):
    """The fixture is live: plain ``pickle.load`` does create the marker (so the tests above can fail)."""
    marker = tmp_path / "PWNED"
    pickle.loads(plant(tmp_path / "evil.pkl", marker, "raw").read_bytes())
    assert marker.exists()


def test_a_real_checkpoint_still_loads(tmp_path):
    """The loaders that refuse the planted files still read finegrain's own ones."""
    from finegrain.checkpoint import load_task
    from finegrain.models.backbone import read_state_dict

    task, meta = load_task(make_checkpoint(tmp_path / "m.safetensors"))
    torch.save({"state_dict": task.model.state_dict()}, tmp_path / "w.pth")
    assert set(read_state_dict(tmp_path / "w.pth")) == set(task.model.state_dict())
