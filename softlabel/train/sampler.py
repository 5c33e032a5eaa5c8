"""The training sampler: one shuffled order per epoch from the seed, shared out between ranks.

It has the semantics of the sampler Ultralytics' DDP uses (torch's DistributedSampler): one
permutation per epoch drawn from the seed alone, padded by repeating its start so every rank gets
the same number of indices, rank r taking every world-th index from position r; `set_epoch` is
called by the trainer at the start of each epoch. In addition every index travels with its epoch,
so a persistent DataLoader worker never has to be told which epoch it is replaying.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler):
    """Yields (index, epoch). Counts epochs itself, one per pass, and follows `set_epoch`.

    Ultralytics' InfiniteDataLoader repeats the sampler forever, and with workers the next pass can
    start (prefetch) before the trainer calls `set_epoch` for that epoch; that pass already carries
    the right epoch, so `set_epoch` changes only a pass that has not started yet.
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in a world of {world}")
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.next_epoch = 0  # the epoch of the next pass
        self.started: int | None = None  # the epoch of the pass most recently begun

    def __len__(self) -> int:
        return math.ceil(self.n / self.world)

    def set_epoch(self, epoch: int) -> None:
        if self.started != epoch:
            self.next_epoch = epoch

    def order(self, epoch: int) -> list[int]:
        """The whole epoch's order, every rank's share interleaved: a global batch of B*world is
        order[k*B*world : (k+1)*B*world] whichever the world size."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        return order + order[: len(self) * self.world - self.n]  # equal share per rank

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.next_epoch
        self.started, self.next_epoch = epoch, epoch + 1
        for i in self.order(epoch)[self.rank :: self.world]:
            yield i, epoch
