"""Shard-owned background writing: the teacher never waits for compression or disk.

Samples arrive already in their stored form (selected and quantised on the teacher's device,
softlabel.select) and are buffered per (view, shard); a shard is handed to a writer thread, which
compresses it, only when all its samples are in, is written whole (zarr rewrites a shard object whole, so partial writes by two
owners would lose rows), and its done flag is set only after every array of it is stored.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import fsspec
import numpy as np
import zarr

from softlabel.cache.digest import DIGEST_BYTES, record_digest
from softlabel.cache.presence import shard_key
from softlabel.cache.schema import Layout, digest_path, done_path, fingerprint_path
from softlabel.errors import UserError
from softlabel.replay import FINGERPRINT_BYTES


@dataclass
class _ShardBuffer:
    start: int
    stop: int
    arrays: dict[str, np.ndarray]
    fingerprints: np.ndarray
    digests: np.ndarray
    filled: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.filled = np.zeros(self.stop - self.start, bool)


class CacheWriter:
    """Collects per-sample tensors and writes complete shards on a small thread pool."""

    def __init__(self, group: zarr.Group, layout: Layout, location: str, threads: int = 2, max_pending: int = 4):
        self.group = group
        self.location = str(location)  # where the store is, for the size of what was written
        self._fs = self._root = None
        self.layout = layout
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="softlabel-writer")
        self._slots = threading.BoundedSemaphore(max_pending)  # bounds memory held by shards in flight
        self._buffers: dict[tuple[str, int], _ShardBuffer] = {}
        self._futures: list[Future] = []
        self.bytes_written = 0  # stored (uncompressed) bytes handed to the store
        self.disk_bytes = 0  # what the written shard objects take on disk or in the object store (compressed)
        self.shards_written = 0
        self._lock = threading.Lock()

    def _buffer(self, view: str, shard: int) -> _ShardBuffer:
        key = (view, shard)
        if key not in self._buffers:
            start, stop = self.layout.shard_range(shard)
            arrays = {name: np.zeros((stop - start, *spec.shape), spec.dtype) for name, spec in self.layout.stored(view).items()}
            fps = np.zeros((stop - start, FINGERPRINT_BYTES), np.uint8)
            digests = np.zeros((stop - start, DIGEST_BYTES), np.uint8)
            self._buffers[key] = _ShardBuffer(start, stop, arrays, fps, digests)
        return self._buffers[key]

    def add(self, view: str, index: int, tensors: dict[str, np.ndarray], fingerprint: bytes) -> None:
        """tensors: stored array path -> this sample's stored values (e.g. 'v0/head/values' -> [K, C] int8)."""
        self.raise_errors()
        shard = index // self.layout.shard_size
        buf = self._buffer(view, shard)
        row = index - buf.start
        prefix = len(view) + 1
        for name, value in tensors.items():
            buf.arrays[name][row] = value
        # sealed from every array of the record as stored (after the cast into the shard buffer), as the reader sees it
        stored = {name[prefix:]: arr[row] for name, arr in buf.arrays.items()}
        buf.fingerprints[row] = np.frombuffer(fingerprint, np.uint8)
        buf.digests[row] = np.frombuffer(record_digest(view, index, fingerprint, stored), np.uint8)
        buf.filled[row] = True
        if buf.filled.all():
            del self._buffers[(view, shard)]
            self._slots.acquire()
            self._futures.append(self._pool.submit(self._write, view, shard, buf))

    def _write(self, view: str, shard: int, buf: _ShardBuffer) -> None:
        try:
            for name, data in buf.arrays.items():
                # all-zero chunks are written too: a missing chunk must only ever mean damage
                self.group[name].with_config({"write_empty_chunks": True})[buf.start : buf.stop] = data
            for name, data in ((fingerprint_path(view), buf.fingerprints), (digest_path(view), buf.digests)):
                self.group[name].with_config({"write_empty_chunks": True})[buf.start : buf.stop] = data
            # the flag goes last: a shard marked done is a shard whose every byte is stored
            self.group[done_path(view)][shard] = 1
            # every object of the shard, keyed from the layout (opening each array would read its metadata again)
            keys = [shard_key(name, shard, 1 + len(spec.shape)) for name, spec in self.layout.per_sample(view).items()]
            disk = sum(self._object_size(key) for key in [*keys, shard_key(done_path(view), shard, 1)])
            with self._lock:
                self.disk_bytes += disk
                self.bytes_written += sum(a.nbytes for a in buf.arrays.values())
                self.shards_written += 1
        except OSError as e:
            raise UserError(f"writing shard {shard} of view {view} failed: {e.strerror or e}; the store resumes from the last finished shard") from e
        finally:
            self._slots.release()

    def _object_size(self, key: str) -> int:
        """Bytes of one stored object as the store holds it: a local file, or an object at an fsspec URL."""
        if self._fs is None:
            self._fs, self._root = fsspec.core.url_to_fs(self.location)
        return int(self._fs.size(f"{self._root.rstrip('/')}/{key}"))

    def raise_errors(self) -> None:
        """Surface the first failed write in the caller's thread."""
        still = []
        for f in self._futures:
            if f.done():
                f.result()
            else:
                still.append(f)
        self._futures = still

    def abort(self) -> None:
        """After an error elsewhere: let submitted shards finish, drop partial ones, swallow write errors."""
        self._buffers.clear()
        for f in self._futures:
            try:
                f.result()
            except Exception:
                pass
        self._pool.shutdown(wait=True)

    def close(self) -> None:
        """Wait for every submitted shard; raise the first error. Unfinished shards stay not-done."""
        try:
            for f in self._futures:
                f.result()
            if self._buffers:
                missing = ", ".join(f"{v}:{s}" for v, s in sorted(self._buffers))
                raise RuntimeError(f"shards left incomplete: {missing}")
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
