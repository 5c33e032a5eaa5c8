"""Direct reads of one sample from a local sharded array, by the zarr v3 sharding spec.

zarr-python routes every read through its event-loop thread and a file thread pool: about 2 ms
per array per sample, most of it thread hand-offs, which is the whole budget of a student step
on a small model. Our arrays have one fixed layout (one sample per inner chunk, index at the end
of the shard, checksummed chunks), so reading a chunk is: look its offset up in the shard index
(cached per shard), read those bytes, check the CRC32C, decompress. Anything else falls back to
zarr.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
from crc32c import crc32c
from numcodecs import Blosc, Zstd

from softlabel.cache.presence import EMPTY, CorruptChunk, index_nbytes, parse_index, shard_key

def _decoder(codecs: list[dict]):
    """The bytes-to-bytes chain after 'bytes': optional compressor, then crc32c. None if unexpected."""
    names = [c["name"] for c in codecs]
    if names[0] != "bytes" or names[-1] != "crc32c" or codecs[0].get("configuration", {}).get("endian", "little") != "little":
        return None
    middle = names[1:-1]
    if middle == []:
        return lambda b: b
    if middle == ["blosc"]:
        return Blosc().decode
    if middle == ["zstd"]:
        return Zstd().decode
    return None


class ShardedSampleReader:
    """Reads sample i of one array written by softlabel (inner chunk = 1 sample, index at the end)."""

    def __init__(self, array_dir: Path):
        meta = json.loads((array_dir / "zarr.json").read_text())
        codec = meta["codecs"][0]
        if codec["name"] != "sharding_indexed":
            raise ValueError("not sharded")
        conf = codec["configuration"]
        index_names = [c["name"] for c in conf["index_codecs"]]
        if conf.get("index_location", "end") != "end" or index_names != ["bytes", "crc32c"] or conf["chunk_shape"][0] != 1:
            raise ValueError("unexpected shard layout")
        self.decode = _decoder(conf["codecs"])
        if self.decode is None:
            raise ValueError("unexpected codecs")
        if meta["chunk_key_encoding"]["name"] != "default" or meta["chunk_key_encoding"]["configuration"].get("separator", "/") != "/":
            raise ValueError("unexpected chunk keys")
        self.dir = array_dir
        self.dtype = np.dtype(meta["data_type"]).newbyteorder("<")
        self.sample_shape = tuple(conf["chunk_shape"][1:])
        self.shard = meta["chunk_grid"]["configuration"]["chunk_shape"][0]
        self.ndim = len(meta["shape"])
        self._index: dict[int, np.ndarray] = {}

    def _shard_path(self, shard: int) -> Path:
        return Path(shard_key(self.dir.as_posix(), shard, self.ndim))

    def _shard_index(self, shard: int, fd: int, size: int) -> np.ndarray:
        if shard not in self._index:
            if len(self._index) >= 4096:  # bound the memory a long-lived worker holds
                self._index.clear()
            nbytes = index_nbytes(self.shard)
            self._index[shard] = parse_index(os.pread(fd, nbytes, max(0, size - nbytes)), self.shard)
        return self._index[shard]

    def read(self, i: int) -> np.ndarray:
        shard, row = divmod(i, self.shard)
        path = self._shard_path(shard)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise CorruptChunk("shard missing") from None
        try:
            size = os.fstat(fd).st_size
            offset, nbytes = (int(v) for v in self._shard_index(shard, fd, size)[row])
            if offset == EMPTY:
                raise CorruptChunk("chunk never written")
            raw = os.pread(fd, nbytes, offset)
        finally:
            os.close(fd)
        payload, (crc,) = raw[:-4], struct.unpack("<I", raw[-4:])
        if len(raw) != nbytes or crc32c(payload) != crc:
            raise CorruptChunk("chunk checksum mismatch")
        # a writable copy: torch.from_numpy downstream must not share a read-only buffer
        return np.frombuffer(self.decode(payload), self.dtype).reshape(self.sample_shape).copy()


def open_fast(root: Path, path: str) -> ShardedSampleReader | None:
    try:
        return ShardedSampleReader(root / path)
    except (ValueError, KeyError, OSError, TypeError):
        return None

