"""Read cached teacher tensors per (view, sample); safe to use inside DataLoader workers."""

from __future__ import annotations

from typing import Any

import numpy as np

from softlabel.cache import store
from softlabel.cache.fastread import ShardedSampleReader, open_fast
from softlabel.cache.description import CacheDescription
from softlabel.cache.digest import record_digest
from softlabel.cache.encoding import TeacherSample, decode_sample
from softlabel.cache.schema import Layout, digest_path, fingerprint_path
from softlabel.errors import UserError


class MisplacedRecord(UserError):
    """A record whose seal names another view or sample, or other tensors, than the ones it was read as."""


class CacheReader:
    def __init__(self, location: str):
        self.location = str(location)
        self.attrs: dict[str, Any] = store.read_attrs(self.location)
        self.description = CacheDescription.from_attrs(self.attrs, self.location)
        self.layout = Layout.from_description(self.description)
        self._group = None
        self._arrays: dict[str, Any] = {}
        self._fast_readers: dict[str, ShardedSampleReader | None] = {}
        self._stored_names: dict[str, list[tuple[str, str]]] = {}

    # zarr handles are opened lazily per process: a forked or spawned worker opens its own
    def __getstate__(self):
        state = self.__dict__.copy()
        state["_group"], state["_arrays"], state["_fast_readers"] = None, {}, {}
        return state

    def _array(self, path: str):
        if path not in self._arrays:
            if self._group is None:
                self._group = store.open_group(self.location, mode="r")
            self._arrays[path] = store.open_array(self._group, path, self.location)
        return self._arrays[path]

    @property
    def levels(self) -> list[str]:
        return list(self.description.teacher.levels)

    @property
    def feature_levels(self) -> list[str]:
        return list(self.layout.feat)

    def done(self) -> dict[str, np.ndarray]:
        return store.done_flags(store.open_group(self.location, mode="r"), self.layout, self.location)

    def missing(self) -> dict[str, int]:
        """Per view, how many shards are not done."""
        return {v: int((~d).sum()) for v, d in self.done().items() if (~d).any()}

    def require_complete(self) -> None:
        missing = self.missing()
        if missing:
            total = self.layout.n_shards
            parts = ", ".join(f"{v}: {n}/{total} shards missing" for v, n in missing.items())
            raise UserError(
                f"{self.location}: the cache is incomplete ({parts}); resume it by running the same "
                "'softlabel dump' command again"
            )

    def fingerprint(self, view: str, index: int) -> bytes:
        return self._sample(fingerprint_path(view), index).tobytes()

    def read(self, view: str, index: int) -> TeacherSample:
        """One sample-view's teacher arrays as stored (a sparse store stays sparse and int8)."""
        if view not in self.layout.views:
            raise UserError(f"{self.location}: no view '{view}' (views: {', '.join(self.layout.views)})")
        if view not in self._stored_names:  # the hot path: work the names out once per view
            self._stored_names[view] = [(name, name[len(view) + 1 :]) for name in self.layout.stored(view)]
        stored = {short: self._sample(name, index) for name, short in self._stored_names[view]}
        fingerprint = self._sample(fingerprint_path(view), index).tobytes()
        why = self.seal_error(view, index, stored, fingerprint)
        if why:
            raise MisplacedRecord(why)
        return decode_sample(stored, self.layout, fingerprint)

    def seal_error(self, view: str, index: int, stored: dict[str, np.ndarray], fingerprint: bytes,
                   digest: bytes | None = None) -> str | None:
        """Why a record read for (view, index) is not the one the dump wrote there, or None when it is.
        `digest`: the stored digest when the caller has read it already."""
        if digest is None:
            digest = self._sample(digest_path(view), index).tobytes()
        if digest == record_digest(view, index, fingerprint, stored):
            return None
        return (f"{self.location}: view {view}, {self.sample_name(index)}, shard {index // self.layout.shard_size}: "
                "the teacher record is not the one written for this view and sample (moved, swapped or stale data; "
                "its digest does not match); run 'softlabel verify' and re-dump the store")

    def sample_name(self, index: int) -> str:
        """'sample i (relative/image/path)' for messages; the path is read only when a message needs it."""
        try:
            return f"sample {index} ({self._array('samples/path')[index]})"
        except Exception:  # a message about damage must not fail on more damage
            return f"sample {index}"

    def anchor_levels(self) -> np.ndarray:
        """[A]: the stored feature level (position in feature_levels) of every head anchor, -1 where none is stored."""
        out, levels = [], self.feature_levels
        for lvl, (_, h, w) in self.layout.head.items():
            out.append(np.full(h * w, levels.index(lvl) if lvl in levels else -1, np.int64))
        return np.concatenate(out)

    def _fast(self, path: str) -> ShardedSampleReader | None:
        if path not in self._fast_readers:
            root = store.local_path(self.location)
            self._fast_readers[path] = open_fast(root, path) if root is not None else None
        return self._fast_readers[path]

    def _sample(self, path: str, index: int) -> np.ndarray:
        try:
            fast = self._fast(path)
            return fast.read(index) if fast is not None else np.asarray(self._array(path)[index])
        except Exception as e:  # a checksum or codec failure: never train on the bytes
            reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
            raise UserError(f"{self.location}: {path} sample {index} cannot be read ({reason}); the store is damaged, "
                            "run 'softlabel verify' and re-dump it") from None
