"""The epoch sampler (seeded order, sharding across ranks, class balancing) and seeded items."""

from __future__ import annotations

import torch

from finegrain.data.sampler import EpochSampler, SeededItems
from finegrain.train.distributed import World


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
