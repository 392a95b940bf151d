"""Data-parallel training through PyTorch's own engine (``torchrun`` + DistributedDataParallel).

``torchrun --nproc-per-node N -m finegrain train ...`` starts N copies of the same command; each
finds its rank in the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) and :func:`setup`
joins the process group: NCCL when the run is on CUDA, gloo on the CPU. A plain
``finegrain train`` (no ``WORLD_SIZE``) is a world of one and nothing here talks to anyone.

The rules every rank follows (see :func:`finegrain.train.run.fit`):

- ``--batch-size`` is per process; the global batch is ``batch_size x world_size x accum_steps``
  and the learning rate scales linearly with it (``lr x global_batch / 32``).
- Every epoch has one shuffled order (seeded by ``seed`` and ``epoch``); rank ``r`` takes
  positions ``r, r + N, r + 2N, ...`` of it, so step ``i`` of the N ranks together sees exactly the
  images of step ``i`` of a single process whose batch is the global batch.
- Rank 0 alone builds the decoded cache, writes the run folder, logs and saves checkpoints;
  training and validation metrics are summed across ranks before anyone reads them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """Where this process stands: its rank among ``size`` processes (``size == 1``: not distributed)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world_from_env() -> World:
    """The world ``torchrun`` describes in the environment (a world of one without it)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    return World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))


def setup(world: World, device: torch.device) -> torch.device:
    """Join the process group and return this rank's device (``cuda:LOCAL_RANK`` on GPUs)."""
    if not world.distributed:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def teardown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def broadcast_object(world: World, obj):
    """Rank 0's ``obj`` on every rank."""
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sums(world: World, values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of ``values`` over all ranks (float64 on the wire)."""
    if not world.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def all_gather_lists(world: World, items: list) -> list:
    """The concatenation of every rank's ``items`` (picklable), in rank order, on every rank."""
    if not world.distributed:
        return list(items)
    gathered: list = [None] * world.size
    dist.all_gather_object(gathered, items)
    return [x for part in gathered for x in part]


def shard(indices: list[int], world: World) -> list[int]:
    """Rank ``r``'s share ``indices[r::N]`` of an order, padded by wrapping so all ranks get as many.

    Equal shares keep the ranks in step (a rank with one batch fewer would hang the others at
    the gradient all-reduce); the padding repeats at most ``N - 1`` images per epoch.
    """
    if not world.distributed or not indices:
        return list(indices)
    n = len(indices)
    per_rank = -(-n // world.size)
    padded = indices + indices[: per_rank * world.size - n]
    return padded[world.rank :: world.size]
