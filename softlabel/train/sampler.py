"""The training sampler: one shuffled order per epoch from the seed, shared out between ranks.

It has the semantics of the sampler Ultralytics' DDP uses (torch's DistributedSampler): one
order per epoch drawn from the seed alone, padded by repeating its start so every rank gets the
same number of indices, rank r taking every world-th index from position r; `set_epoch` is
called by the trainer at the start of each epoch. In addition every index travels with its epoch,
so a persistent DataLoader worker never has to be told which epoch it is replaying.

An epoch that replays a mosaic view visits it group by group (softlabel.replay: an image's mosaic
partners are members of its group): the groups in a shuffled order, each one's images shuffled,
cut into one contiguous run per rank and, inside a rank, one contiguous run per DataLoader worker
laid out on the batches that worker receives (a DataLoader hands batch k to worker k mod W). So a
group is read by one worker of one rank, except the at most (ranks x workers - 1) groups that
straddle a cut, and each image is read from disk about once per epoch. That order depends on the
world size, batch and workers. Without groups (closing views), or with a single group, the order
is a plain permutation, the same whatever the world size: a global batch of B*world is
order[k*B*world : (k+1)*B*world].
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

GroupsOf = Callable[[int], "Sequence[np.ndarray] | None"]  # epoch -> the partner groups of its view, or None


class EpochSampler(Sampler):
    """Yields (index, epoch). Counts epochs itself, one per pass, and follows `set_epoch`.

    Ultralytics' InfiniteDataLoader repeats the sampler forever, and with workers the next pass can
    start (prefetch) before the trainer calls `set_epoch` for that epoch; that pass already carries
    the right epoch, so `set_epoch` changes only a pass that has not started yet.

    `groups`, `batch` and `workers` (the DataLoader's) lay a mosaic epoch out group by group; without
    `groups` every epoch is a plain permutation.
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1, groups: GroupsOf | None = None,
                 batch: int = 1, workers: int = 0):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in a world of {world}")
        if batch < 1 or workers < 0:
            raise ValueError(f"batch must be >= 1 and workers >= 0, got {batch} and {workers}")
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.groups, self.batch, self.workers = groups, batch, workers
        self.next_epoch = 0  # the epoch of the next pass
        self.started: int | None = None  # the epoch of the pass most recently begun

    def __len__(self) -> int:
        return math.ceil(self.n / self.world)

    def set_epoch(self, epoch: int) -> None:
        if self.started != epoch:
            self.next_epoch = epoch

    def order(self, epoch: int) -> list[int]:
        """The whole epoch's order, every rank's share interleaved: rank r's is order[r::world]."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        groups = self.groups(epoch) if self.groups is not None else None
        pad = len(self) * self.world - self.n  # equal share per rank
        if groups is None or len(groups) < 2:
            order = torch.randperm(self.n, generator=g).tolist()
            return order + order[:pad]
        # one stream of whole groups, then a contiguous run of it per rank
        stream = np.concatenate([groups[k][torch.randperm(len(groups[k]), generator=g).numpy()]
                                 for k in torch.randperm(len(groups), generator=g).tolist()])
        if len(stream) != self.n:
            raise ValueError(f"the partner groups hold {len(stream)} images, the dataset {self.n}")
        stream = np.concatenate([stream, stream[:pad]])
        share = len(self)
        runs = [by_worker(stream[r * share : (r + 1) * share], self.batch, self.workers) for r in range(self.world)]
        return np.stack(runs, 1).reshape(-1).tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.next_epoch
        self.started, self.next_epoch = epoch, epoch + 1
        for i in self.order(epoch)[self.rank :: self.world]:
            yield i, epoch


def by_worker(run: np.ndarray, batch: int, workers: int) -> np.ndarray:
    """Reorder one rank's run so that its batches, dealt round-robin to `workers` DataLoader workers,
    give each worker a contiguous part of the run: worker w gets the part that fills the batches
    k = w, w + W, ... in order. Only the last batch may be short, as the DataLoader cuts them."""
    w = max(workers, 1)
    if w == 1 or len(run) <= batch:
        return run
    sizes = np.full(math.ceil(len(run) / batch), batch)
    sizes[-1] = len(run) - batch * (len(sizes) - 1)
    owner = np.arange(len(sizes)) % w
    # each worker's part of the run starts where the previous worker's ends
    starts = np.concatenate([[0], np.cumsum([sizes[owner == k].sum() for k in range(w)])])
    out, taken = [], np.zeros(w, np.int64)
    for size, k in zip(sizes, owner):
        at = starts[k] + taken[k]
        out.append(run[at : at + size])
        taken[k] += size
    return np.concatenate(out)
