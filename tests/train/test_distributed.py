"""Distributed data parallel (torchrun + gloo on CPU) and the sharding of an epoch's order."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from finegrain.train.distributed import World, shard
from finegrain.train.run import fit

from ..conftest import make_image_folder, tiny_config

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("n,size", [(18, 2), (17, 2), (10, 3), (5, 4)])
def test_shard_covers_the_order_with_equal_shares(n, size):
    order = list(range(100, 100 + n))
    shares = [shard(order, World(r, size)) for r in range(size)]
    assert len({len(s) for s in shares}) == 1  # equal lengths keep the ranks in step
    assert set().union(*map(set, shares)) == set(order)
    assert sum(map(len, shares)) - n < size  # at most N - 1 repeats


@pytest.mark.parametrize("head_epochs", [0, 1])
def test_torchrun_two_gloo_processes_match_one_process(tmp_path, head_epochs):
    """2 CPU ranks x batch 4 == 1 process x batch 8: same images per step, same averaged gradient;
    with --head-epochs too (the head stage leaves the backbone without gradients on every rank)."""
    data = make_image_folder(tmp_path / "img", n_train=8)  # 24 images, 18 after the validation split
    common = ["--data", str(data), "--backbone", "test_vit", "--pretrained", "none", "--img-size", "32",
              "--epochs", "2", "--workers", "0", "--val-fraction", "0.25", "--device", "cpu", "--lr", "3e-3",
              "--warmup-epochs", "0", "--no-amp", "--out", str(tmp_path / "runs"), "--seed", "0", "--head-epochs", str(head_epochs)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "finegrain", "train", *common, "--batch-size", "4", "--name", "ddp"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    cfg = tiny_config(data, tmp_path / "runs", epochs=2, name="single", head_epochs=head_epochs)
    cfg.model.backbone, cfg.train.amp = "test_vit", False  # fp32: an exact comparison
    single = fit(cfg)

    from finegrain.checkpoint import load

    a, _ = load(single.run_dir / "last.safetensors")
    b, meta = load(tmp_path / "runs" / "ddp" / "last.safetensors")
    assert meta["epoch"] == 2 and meta["config"]["data"]["batch_size"] == 4
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst < 1e-4, worst
    rows_a = [json.loads(l) for l in (single.run_dir / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(l) for l in (tmp_path / "runs" / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows_b) == 2  # rank 0 alone logs
    for ra, rb in zip(rows_a, rows_b):
        assert abs(ra["train_loss"] - rb["train_loss"]) < 1e-4
        assert ra["val_top1"] == rb["val_top1"] and abs(ra["val_loss"] - rb["val_loss"]) < 1e-4
    assert rows_a[0]["train_loss"] != rows_a[1]["train_loss"]  # it trained: the match is not trivial
