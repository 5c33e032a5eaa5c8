"""Which chunks a store holds, read from the shard indexes (zarr v3 sharding, index at the end).

zarr reads a chunk that is not there as its fill value, so reading data never notices a deleted
shard file or a shard whose index says a sample was never written. Our writer writes every chunk,
all-zero ones included, so here an absent chunk only ever means loss or damage.
"""

from __future__ import annotations

import struct

import numpy as np
from crc32c import crc32c

EMPTY = 2**64 - 1  # the sharding spec's marker for an inner chunk that was never written


class CorruptChunk(Exception):
    pass


def index_nbytes(chunks_per_shard: int) -> int:
    """A shard index: (offset, nbytes) as two uint64 per inner chunk, then its CRC32C."""
    return chunks_per_shard * 16 + 4


def parse_index(raw: bytes, chunks_per_shard: int) -> np.ndarray:
    """The [chunks, 2] (offset, nbytes) table from a shard's last bytes; CorruptChunk if it fails its checksum."""
    if len(raw) != index_nbytes(chunks_per_shard):
        raise CorruptChunk("shard shorter than its index")
    body, (crc,) = raw[:-4], struct.unpack("<I", raw[-4:])
    if crc32c(body) != crc:
        raise CorruptChunk("shard index checksum mismatch")
    return np.frombuffer(body, "<u8").reshape(chunks_per_shard, 2)


def shard_key(array_path: str, shard: int, ndim: int) -> str:
    """Key of shard `shard` along the sample axis; our arrays have one shard across every other axis."""
    return "/".join([array_path, "c", str(shard), *(["0"] * (ndim - 1))])


def check_shard(fs, key: str, rows: int, chunks_per_shard: int) -> str | None:
    """Why the first `rows` inner chunks of a shard object are not all present and in bounds, or None."""
    try:
        size = fs.size(key)
    except FileNotFoundError:
        return "shard file missing"
    need = index_nbytes(chunks_per_shard)
    if size < need:
        return f"shard file truncated ({size} bytes)"
    try:
        table = parse_index(fs.cat_file(key, start=size - need, end=size), chunks_per_shard)
    except CorruptChunk as e:
        return f"{e} (truncated or overwritten)"
    for row in range(rows):
        offset, nbytes = (int(v) for v in table[row])
        if offset == EMPTY:
            return f"chunk of row {row} never written"
        if offset + nbytes > size - need:
            return f"chunk of row {row} lies past the end of the shard file (truncated)"
    return None
