import json
import math

import pytest
import torch

from finegrain.models.backbone import create_backbone, load_pretrained_file
from finegrain.train.optim import param_groups, warmup_cosine
from finegrain.train.run import fit
from tests.conftest import tiny_config


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


def test_unknown_backbone_suggests_close_matches():
    with pytest.raises(ValueError, match="resnet50"):
        create_backbone("resnet5O", num_classes=3)


def test_local_pretrained_drops_old_classifier(tmp_path):
    from safetensors.torch import save_file

    src = create_backbone("test_resnet", num_classes=10)
    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    model = create_backbone("test_resnet", num_classes=3, pretrained=str(tmp_path / "w.safetensors"))
    sd, ref = model.state_dict(), src.state_dict()
    first = next(iter(ref))
    assert torch.equal(sd[first], ref[first])
    assert model.get_classifier().out_features == 3
    assert model.get_classifier().weight.abs().max() < 0.01  # a fresh near-zero head


def test_local_pretrained_wrong_architecture_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file(create_backbone("test_efficientnet", num_classes=3).state_dict(), str(tmp_path / "w.safetensors"))
    with pytest.raises(ValueError, match="do not fit backbone"):
        load_pretrained_file(create_backbone("test_resnet", num_classes=3), tmp_path / "w.safetensors")


def test_pth_with_wrapped_state_dict(tmp_path):
    src = create_backbone("test_resnet", num_classes=3)
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "w.pth")
    model = create_backbone("test_resnet", num_classes=3, pretrained=str(tmp_path / "w.pth"))
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in model.state_dict().items())


def test_param_groups_lr_mult_and_no_decay_on_norms_and_biases():
    from finegrain.tasks import build_task

    task = build_task("supervised", create_backbone("test_resnet", num_classes=3), 3)
    groups = {g["name"]: g for g in param_groups(task, lr=1.0, backbone_lr_mult=0.1, weight_decay=0.05)}
    assert groups["backbone"]["lr"] == pytest.approx(0.1) and groups["backbone"]["weight_decay"] == 0.05
    assert groups["backbone_no_decay"]["weight_decay"] == 0.0
    assert groups["new"]["lr"] == 1.0 and groups["new_no_decay"]["weight_decay"] == 0.0
    head = task.model.get_classifier()
    assert any(p is head.weight for p in groups["new"]["params"])
    assert any(p is head.bias for p in groups["new_no_decay"]["params"])
    n_params = sum(len(g["params"]) for g in groups.values())
    assert n_params == len(list(task.parameters()))


def test_warmup_cosine_schedule_values():
    f = warmup_cosine(total_steps=110, warmup_steps=10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(110) == pytest.approx(0.0, abs=1e-12)


def test_ctrl_c_saves_a_resumable_checkpoint(image_folder, tmp_path, monkeypatch):
    import finegrain.train.trainer as run

    real = run.train_one_epoch
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # Ctrl-C during the second epoch, after two batches
            on_step = kwargs["on_step"]
            on_step(8, {"loss": torch.tensor(1.0), "correct": torch.tensor(1), "seen": 8})
            on_step(8, {"loss": torch.tensor(1.0), "correct": torch.tensor(1), "seen": 8})
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(run, "train_one_epoch", interrupted)
    cfg = tiny_config(image_folder, tmp_path, epochs=3)
    result = fit(cfg)
    assert result.interrupted
    from finegrain.checkpoint import load_train_state, read_meta

    meta = read_meta(result.run_dir / "last.safetensors")
    state = load_train_state(result.run_dir / "last.state.pt")
    assert meta["epoch"] == state["epoch"] == 1 and state["step"] == 2
    monkeypatch.setattr(run, "train_one_epoch", real)
    cfg.train.resume = str(result.run_dir)
    resumed = fit(cfg)
    assert resumed.epochs_run == 3 and not resumed.interrupted
    rows = [json.loads(l) for l in (resumed.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
