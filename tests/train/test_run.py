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


def test_a_retry_after_a_failed_start_draws_its_own_split(image_folder, tmp_path):
    """A start that fails before training (bad --pretrained) leaves config.yaml and split.json; the retry under the
    same name with other data and another validation fraction must train on its own split, not be blocked by them."""
    from ..conftest import make_image_folder

    cfg = tiny_config(image_folder, tmp_path)
    cfg.model.pretrained = str(tmp_path / "broken.pth")
    (tmp_path / "broken.pth").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="truncated or corrupt"):
        fit(cfg)
    run_dir = tmp_path / "run"
    assert (run_dir / "split.json").is_file()  # the failed start's files are there
    other = make_image_folder(tmp_path / "other", n_train=6, seed=1)
    retry = tiny_config(other, tmp_path, epochs=1)
    retry.data.val_fraction = 0.5
    result = fit(retry)
    saved = json.loads((result.run_dir / "split.json").read_text())
    assert result.run_dir == run_dir and len(saved["val"]) == 9 and len(saved["train"]) == 9
    assert all(p.startswith(str(other.resolve())) for p in saved["train"] + saved["val"])


def test_unreadable_images_are_listed_whatever_split_they_fall_in(image_folder, tmp_path, capsys):
    """Corrupt files, a missing file and a broken symlink: every one is in skipped_images.txt (validation ones too),
    and the epoch line and metrics.jsonl count them."""
    import os

    bad = []
    for name in ("red", "green", "blue"):
        for k in range(3):
            p = image_folder / "train" / name / f"zz_bad_{k}.jpg"
            p.write_bytes(b"garbage")
            bad.append(str(p.resolve()))
    link = image_folder / "train" / "red" / "zz_link.jpg"
    os.symlink(tmp_path / "gone.jpg", link)
    bad.append(str(link.absolute()))
    cfg = tiny_config(image_folder, tmp_path, epochs=1)
    result = fit(cfg)
    val = set(json.loads((result.run_dir / "split.json").read_text())["val"])
    assert val & set(bad) and set(bad) - val  # the bad files fell in both splits
    listed = {line.split("\t")[0] for line in (result.run_dir / "skipped_images.txt").read_text().splitlines()}
    assert listed == set(bad)
    row = json.loads((result.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert row["skipped_images"] == len(bad)
    err = " ".join(capsys.readouterr().err.split())
    assert "1 of 34 image files do not exist" in err and f"{len(bad)} images skipped" in err


def test_a_csv_whose_paths_are_all_wrong_is_refused_before_training(tmp_path, capsys):
    from finegrain.cli import main

    csv = tmp_path / "data.csv"
    csv.write_text("path,label\n" + "".join(f"img/{k}.jpg,{'ab'[k % 2]}\n" for k in range(10)))
    rc = main(["train", "--data", str(csv), "--backbone", "test_resnet", "--pretrained", "none", "--epochs", "1",
               "--out", str(tmp_path / "runs"), "--device", "cpu", "--workers", "0"])
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 2 and "none of the 10 image files" in err and "img/0.jpg" in err and "relative to the CSV" in err
    assert not list((tmp_path / "runs").rglob("*.safetensors")) if (tmp_path / "runs").exists() else True
