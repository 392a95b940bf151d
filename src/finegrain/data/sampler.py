"""Training orders that depend only on (seed, epoch), and per-item augmentation seeds.

Both make a run reproducible from its seed alone: a run resumed part-way through an epoch, or
split across ranks, sees the same images in the same order with the same augmentation as one
uninterrupted process.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from finegrain.train.distributed import World, shard


class EpochSampler(Sampler[int]):
    """A shuffled order that depends only on (seed, epoch), optionally starting part-way in.

    With ``weights`` (one per image) the order is drawn with replacement in proportion to them
    (the class-balanced sampler); in a distributed run each rank takes its share of the order
    (:func:`finegrain.train.distributed.shard`), and ``start`` counts global positions.
    """

    def __init__(self, n: int, seed: int, epoch: int, start: int = 0, *, world: World = World(),
                 weights: torch.Tensor | None = None):
        self.n, self.seed, self.epoch, self.start, self.world, self.weights = n, seed, epoch, start, world, weights

    def order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.weights is not None:
            full = torch.multinomial(self.weights, self.n, replacement=True, generator=g)
        else:
            full = torch.randperm(self.n, generator=g)
        return shard(full[self.start :].tolist(), self.world)

    def __iter__(self):
        return iter(self.order())

    def __len__(self) -> int:
        return len(shard(list(range(self.n - self.start)), self.world))


class SeededItems(Dataset):
    """Each item's random augmentation is drawn from its own seed ``(seed, epoch, index)``.

    The augmented batch then depends neither on the number of loader workers nor on how the
    images are split between ranks, which makes distributed runs match single-process ones and
    resumed runs match uninterrupted ones.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((self.seed * 1_000_003 + self.epoch) * 10_000_019 + i) % 2**62)
            return self.dataset[i]


def epoch_batches(dataset: Dataset, *, seed: int, batch_size: int, workers: int, collate_fn: Callable,
                  world: World = World(), weights: torch.Tensor | None = None, pin_memory: bool = False,
                  wrap: Callable | None = None):
    """Loaders for a trainer: ``(batches(epoch, start_step), epoch_images(epoch, start_step), seeded dataset)``.

    Each epoch's order is an :class:`EpochSampler` (this rank's share, from ``start_step`` on) and
    each item's augmentation is seeded by :class:`SeededItems` (set its ``epoch`` before drawing),
    so the batches of a resumed run are those of an uninterrupted one. ``wrap`` turns the
    DataLoader into what the loop reads (the device prefetcher).
    """
    seeded, n = SeededItems(dataset, seed), len(dataset)

    def sampler(epoch: int, start_step: int) -> EpochSampler:
        return EpochSampler(n, seed, epoch, min(start_step * batch_size * world.size, n), world=world, weights=weights)

    def batches(epoch: int, start_step: int):
        s = sampler(epoch, start_step)
        loader = DataLoader(seeded, batch_size=batch_size, sampler=s, num_workers=workers, collate_fn=collate_fn,
                            pin_memory=pin_memory, drop_last=len(s) > batch_size,
                            generator=torch.Generator().manual_seed(seed * 31 + epoch))
        return wrap(loader) if wrap is not None else loader

    return batches, lambda epoch, start_step: len(sampler(epoch, start_step)), seeded
