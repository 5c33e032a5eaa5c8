"""One stream of training batches shared by the students of a cohort.

The students train in threads, each in its own Ultralytics trainer; each trainer's train loader is a
`StreamView` of one `SharedStream`. The stream draws every batch once from one DataLoader (so the
replay, the image decode and the cache read are paid once) and hands the same collated batch to every
view, together with a `BatchSlot` in which the first student to preprocess the batch leaves its device
copy (and, online, the live teacher's outputs) for the others.

A view follows its trainer's epochs as the trainer's own loader would: its `sampler` is an
`EpochCursor` with the EpochSampler's next_epoch / set_epoch. The stream's batches run epoch after
epoch from where the cohort starts; a view whose trainer asks for an epoch the stream is not at for
it (NaN recovery running an epoch again, an out-of-memory retry, a resume that stopped elsewhere)
leaves the stream and reads the same epochs from a private DataLoader of its own, so it trains
exactly as alone, only without sharing. A view that stops (early stopping, an error, the end)
leaves the stream, which then never waits for it.

Students keep at most `max_lag` batches apart: a student that runs ahead waits for the slowest, so
the batches held at once stay bounded whatever the speeds.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Iterator

LoaderFactory = Callable[[], Any]  # () -> an InfiniteDataLoader over the training set, with an EpochSampler


class BatchSlot:
    """What the students share of one batch beyond the batch itself: values computed once, by the first who asks."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, Any] = {}

    def once(self, key: str, make: Callable[[], Any]) -> Any:
        with self._lock:
            if key not in self._values:
                self._values[key] = make()
            return self._values[key]


class EpochCursor:
    """A view's sampler: which epoch the trainer wants next (EpochSampler's interface, without an order)."""

    def __init__(self, length: int, epoch: int = 0) -> None:
        self.length = length
        self.next_epoch = epoch
        self.started: int | None = None

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        if self.started != epoch:
            self.next_epoch = epoch


class SharedStream:
    """The cohort's single DataLoader and the batches of it that some student has still to take.

    `members` names every student up front: until a member's trainer first asks for an epoch, it
    counts as waiting at the stream's start, so no batch it needs is dropped while it is set up."""

    def __init__(self, members: list[str], max_lag: int = 4) -> None:
        if max_lag < 1:
            raise ValueError(f"max_lag must be >= 1, got {max_lag}")
        if len(set(members)) != len(members):
            raise ValueError(f"member names must be distinct: {members}")
        self.max_lag = max_lag
        self._cond = threading.Condition()
        self._loader = None
        self._iterator: Iterator | None = None
        self._start: int | None = None  # the epoch the stream starts at
        self._batches: dict[int, tuple[dict, BatchSlot]] = {}  # global index -> (collated batch, slot)
        self._drawn = 0  # batches drawn from the loader so far
        self._positions: dict[str, int | None] = dict.fromkeys(members)  # the global index each takes next; None: not arrived
        self._left: set[str] = set()
        self._fetching = False

    def view(self, member: str, factory: LoaderFactory) -> "StreamView":
        """A member's train loader. The first view's factory builds the stream's loader."""
        with self._cond:
            if member not in self._positions and member not in self._left:
                raise ValueError(f"'{member}' is not a member of this stream")
            if self._loader is None:
                self._loader = factory()
            return StreamView(self, member, factory, self._loader)

    def _nb(self) -> int:
        return len(self._loader)

    def _endless(self) -> Iterator[dict]:
        while True:  # an InfiniteDataLoader yields one epoch per pass over its persistent iterator
            yield from self._loader

    def join(self, member: str, epoch: int) -> bool:
        """Place a member at the start of `epoch`; False when the stream cannot serve it there (it then reads alone)."""
        with self._cond:
            if member in self._left or member not in self._positions:
                return False
            if self._start is None:  # the first epoch asked for starts the stream
                self._start = epoch
                self._loader.sampler.next_epoch = epoch
                self._loader.reset()  # workers may have drawn ahead from another epoch
                self._iterator = self._endless()
            g = (epoch - self._start) * self._nb()
            position = self._positions[member]
            if position is None:  # arriving: at the start, where it has been counted so far
                position = 0
            if position != g:
                return False
            self._positions[member] = g
            return True

    def leave(self, member: str) -> None:
        """The member reads no more from the stream (it trains alone, stopped, failed or finished)."""
        with self._cond:
            if member in self._positions:
                del self._positions[member]
                self._left.add(member)
                self._drop_taken()
                self._cond.notify_all()

    def _slowest(self) -> int:
        return min((0 if p is None else p for p in self._positions.values()), default=self._drawn)

    def take(self, member: str) -> tuple[dict, BatchSlot]:
        """The member's next batch (a shallow copy of the shared one) and its slot."""
        with self._cond:
            g = self._positions[member]
            while g not in self._batches:
                if g < self._drawn:
                    raise RuntimeError(f"batch {g} was dropped before '{member}' took it")
                if self._fetching or g - self._slowest() >= self.max_lag:
                    self._cond.wait()
                    continue
                self._fetching = True
                self._cond.release()  # replay, read and collate outside the lock: the others keep training
                try:
                    batch = next(self._iterator)
                finally:
                    self._cond.acquire()
                    self._fetching = False
                    self._cond.notify_all()
                self._batches[self._drawn] = (batch, BatchSlot())
                self._drawn += 1
            batch, slot = self._batches[g]
            self._positions[member] = g + 1
            self._drop_taken()
            self._cond.notify_all()
            return dict(batch), slot

    def _drop_taken(self) -> None:
        lowest = self._slowest()
        for g in [g for g in self._batches if g < lowest]:
            del self._batches[g]

    def close(self) -> None:
        with self._cond:
            self._batches.clear()
            if self._loader is not None and hasattr(self._loader, "close"):
                self._loader.close()


class StreamView:
    """What a member's trainer sees as its train loader: its epochs, from the shared stream or, once it
    has left it, from a private DataLoader over the same dataset."""

    def __init__(self, stream: SharedStream, member: str, factory: LoaderFactory, loader) -> None:
        self.stream, self.member, self.factory = stream, member, factory
        self.length = len(loader)
        self.sampler = EpochCursor(len(loader.sampler))
        self.dataset = loader.dataset
        self.batch_size = loader.batch_size
        self.num_workers = loader.num_workers
        self.drop_last = loader.drop_last
        self.private = None  # the loader of a view that has left the stream
        self._private_next: int | None = None  # the epoch the private loader yields next
        self.shared_epochs = 0  # epochs read from the stream
        self.alone_epochs = 0  # epochs read from the private loader

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[dict]:
        # a generator: the epoch is decided at the first batch, as a DataLoader's sampler decides it. Ultralytics
        # makes an iterator it never starts before the one it reads (enumerate twice), which must not count.
        epoch = self.sampler.next_epoch
        self.sampler.started, self.sampler.next_epoch = epoch, epoch + 1
        if self.private is None and self.stream.join(self.member, epoch):
            self.shared_epochs += 1
            for _ in range(self.length):
                batch, slot = self.stream.take(self.member)
                batch["cohort_slot"] = slot
                yield batch
        else:
            self.alone_epochs += 1
            yield from self._alone(epoch)

    def _alone(self, epoch: int) -> Iterator[dict]:
        if self.private is None:
            self.stream.leave(self.member)
            self.private = self.factory()
        if self._private_next != epoch:  # first use, or the trainer runs an epoch again
            self.private.sampler.next_epoch = epoch
            self.private.reset()
        self._private_next = epoch + 1
        yield from self.private

    def reset(self) -> None:
        """Ultralytics resets a loader to start an epoch afresh; the next __iter__ decides where it reads."""

    def close(self) -> None:
        self.stream.leave(self.member)
        if self.private is not None and hasattr(self.private, "close"):
            self.private.close()
