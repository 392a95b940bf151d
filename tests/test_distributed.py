"""Distributed data parallel (torchrun + gloo on CPU), the sampler's sharding, class balancing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from finegrain.tasks.supervised import soft_cross_entropy
from finegrain.train.distributed import World, shard
from finegrain.train.run import EpochSampler, SeededItems, class_weights, fit
from tests.conftest import make_image_folder, tiny_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("n,size", [(18, 2), (17, 2), (10, 3), (5, 4)])
def test_shard_covers_the_order_with_equal_shares(n, size):
    order = list(range(100, 100 + n))
    shares = [shard(order, World(r, size)) for r in range(size)]
    assert len({len(s) for s in shares}) == 1  # equal lengths keep the ranks in step
    assert set().union(*map(set, shares)) == set(order)
    assert sum(map(len, shares)) - n < size  # at most N - 1 repeats


def test_ranks_together_see_the_single_process_batches():
    """Step i of N ranks with batch B covers exactly step i of one process with batch N x B."""
    n, world, b = 24, 2, 4
    single = EpochSampler(n, seed=3, epoch=1).order()
    per_rank = [EpochSampler(n, seed=3, epoch=1, world=World(r, world)).order() for r in range(world)]
    for step in range(n // (world * b)):
        together = sorted(i for r in range(world) for i in per_rank[r][step * b:(step + 1) * b])
        assert together == sorted(single[step * world * b:(step + 1) * world * b])
    # a resumed epoch starts at a global position
    resumed = [EpochSampler(n, seed=3, epoch=1, start=8, world=World(r, world)).order() for r in range(world)]
    assert sorted(resumed[0] + resumed[1]) == sorted(single[8:])


def test_balanced_sampler_draws_classes_equally():
    labels = torch.tensor([0] * 90 + [1] * 9 + [2] * 1)
    counts = torch.bincount(labels).double()
    order = EpochSampler(len(labels), seed=0, epoch=0, weights=(1.0 / counts)[labels]).order()
    freq = torch.bincount(labels[order], minlength=3).double() / len(order)
    assert len(order) == len(labels)
    # 100 draws per epoch: check over several epochs for a tight estimate
    draws = torch.cat([labels[EpochSampler(len(labels), 0, e, weights=(1.0 / counts)[labels]).order()] for e in range(50)])
    freq = torch.bincount(draws, minlength=3).double() / len(draws)
    assert torch.allclose(freq, torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.03), freq


def test_class_weights_formulas():
    counts = torch.tensor([100.0, 10.0, 1.0])
    inv = class_weights(counts, "inverse")
    ref = 1 / counts
    assert torch.allclose(inv, (ref / ref.mean()).float())
    eff = class_weights(counts, "effective", beta=0.99)
    ref = (1 - 0.99) / (1 - 0.99 ** counts)
    assert torch.allclose(eff, (ref / ref.mean()).float())
    assert eff[2] / eff[0] < inv[2] / inv[0]  # effective numbers re-weight less than 1/n
    with pytest.raises(ValueError, match="effective, inverse"):
        class_weights(counts, "sqrt")


def test_weighted_cross_entropy_matches_torch_and_a_naive_loop():
    torch.manual_seed(0)
    logits, target = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 1, 1])
    w = torch.tensor([0.5, 2.0, 1.0, 3.0])
    assert torch.allclose(soft_cross_entropy(logits, target, 0.0, w), F.cross_entropy(logits, target, weight=w))
    soft = torch.softmax(torch.randn(6, 4), 1)
    num = den = 0.0
    for i in range(6):  # naive: per image and class
        for c in range(4):
            t = soft[i, c] * 0.9 + 0.1 / 4
            num -= w[c] * t * torch.log_softmax(logits[i], 0)[c]
            den += w[c] * t
    assert torch.allclose(soft_cross_entropy(logits, soft, 0.1, w), num / den, atol=1e-6)
    assert torch.allclose(soft_cross_entropy(logits, soft, 0.1, torch.ones(4)), soft_cross_entropy(logits, soft, 0.1))


def test_seeded_items_do_not_depend_on_order_or_worker():
    class Noisy(torch.utils.data.Dataset):
        def __len__(self):
            return 5

        def __getitem__(self, i):
            return torch.rand(3)

    ds = SeededItems(Noisy(), seed=1)
    ds.epoch = 2
    forward = [ds[i] for i in range(5)]
    backward = [ds[i] for i in reversed(range(5))][::-1]
    assert all(torch.equal(a, b) for a, b in zip(forward, backward))
    ds.epoch = 3
    assert not torch.equal(ds[0], forward[0])
    before = torch.get_rng_state()
    ds[1]
    assert torch.equal(before, torch.get_rng_state())  # the caller's random stream is untouched


def test_balanced_sampler_and_class_weights_train(tmp_path):
    data = make_image_folder(tmp_path / "img", n_train=6)
    cfg = tiny_config(data, tmp_path / "runs", class_weights="effective")
    cfg.data.sampler = "balanced"
    assert fit(cfg).best_checkpoint.is_file()
    cfg = tiny_config(data, tmp_path / "runs2", class_weights="inverse")
    cfg.model.task = "wsdan"
    with pytest.raises(ValueError, match="--class-weights is not supported by --task wsdan"):
        fit(cfg)


def test_torchrun_two_gloo_processes_match_one_process(tmp_path):
    """2 CPU ranks x batch 4 == 1 process x batch 8: same images per step, same averaged gradient."""
    data = make_image_folder(tmp_path / "img", n_train=8)  # 24 images, 18 after the validation split
    common = ["--data", str(data), "--backbone", "test_vit", "--pretrained", "none", "--img-size", "32",
              "--epochs", "2", "--workers", "0", "--val-fraction", "0.25", "--device", "cpu", "--lr", "3e-3",
              "--warmup-epochs", "0", "--no-amp", "--out", str(tmp_path / "runs"), "--seed", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "finegrain", "train", *common, "--batch-size", "4", "--name", "ddp"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    cfg = tiny_config(data, tmp_path / "runs", epochs=2, name="single")
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
