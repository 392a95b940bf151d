"""fit: run folders, resume, the test split never read, corrupt images, refused flag combinations."""

import json

import pytest
import torch

from finegrain.train.run import fit

from ..conftest import tiny_config


def test_resume_equals_uninterrupted_run(image_folder, tmp_path):
    full = fit(tiny_config(image_folder, tmp_path / "a", epochs=2))
    cfg = tiny_config(image_folder, tmp_path / "b", epochs=2)
    first = fit(cfg, max_epochs=1)
    assert first.epochs_run == 1
    cfg.train.resume = str(first.run_dir)
    resumed = fit(cfg)
    assert resumed.epochs_run == 2
    from finegrain.checkpoint import load

    a, _ = load(full.run_dir / "last.safetensors")
    b, meta = load(resumed.run_dir / "last.safetensors")
    assert meta["epoch"] == 2
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows_a = [json.loads(l) for l in (full.run_dir / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(l) for l in (resumed.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_loss"] for r in rows_a] == [r["train_loss"] for r in rows_b]


def test_run_folder_contents_and_split_is_saved(trained_run):
    result, data = trained_run
    names = {p.name for p in result.run_dir.iterdir()}
    assert {"config.yaml", "split.json", "metrics.jsonl", "best.safetensors", "last.safetensors", "last.state.pt"} <= names
    split = json.loads((result.run_dir / "split.json").read_text())
    assert split["fraction"] == 0.25 and not set(split["train"]) & set(split["val"])
    # 8 train images per class, 25% -> 2 per class in val
    assert len(split["val"]) == 6 and len(split["train"]) == 18
    assert not any("/test/" in p for p in split["train"] + split["val"])


def test_fit_never_reads_the_test_split(image_folder, tmp_path, monkeypatch):
    import finegrain.train.run as run

    seen = []
    real = run.open_dataset

    def spy(data, split="train", **kw):
        seen.append(split)
        return real(data, split, **kw)

    monkeypatch.setattr(run, "open_dataset", spy)
    fit(tiny_config(image_folder, tmp_path))
    assert seen == ["train"]


def test_corrupt_training_image_is_skipped_and_listed(image_folder, tmp_path):
    bad = image_folder / "train" / "green" / "zz_corrupt.jpg"
    bad.write_bytes(b"garbage")
    cfg = tiny_config(image_folder, tmp_path)
    cfg.data.val_fraction = 0.0
    result = fit(cfg)
    listed = (result.run_dir / "skipped_images.txt").read_text()
    assert str(bad.resolve()) in listed
    row = json.loads((result.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert row["skipped_images"] == 1


def test_existing_run_folder_is_not_overwritten(trained_run):
    result, data = trained_run
    cfg = tiny_config(data, result.run_dir.parent)
    with pytest.raises(FileExistsError, match="--resume"):
        fit(cfg)


def test_invalid_flag_combination(image_folder, tmp_path):
    cfg = tiny_config(image_folder, tmp_path, patience=2)
    cfg.data.val_fraction = 0.0
    with pytest.raises(ValueError, match="--patience"):
        fit(cfg)


def test_a_one_class_data_set_is_refused_before_training(tmp_path, capsys):
    from finegrain.cli import main

    from ..conftest import make_image_folder

    data = make_image_folder(tmp_path / "d")
    for name in ("green", "blue"):
        for f in (data / "train" / name).iterdir():
            f.unlink()
        (data / "train" / name).rmdir()
    rc = main(["train", "--data", str(data / "train"), "--backbone", "test_resnet", "--pretrained", "none", "--epochs", "1",
               "--out", str(tmp_path / "runs"), "--device", "cpu", "--workers", "0"])
    assert rc == 2 and "at least two" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("*.safetensors"))
