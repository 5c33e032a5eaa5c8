"""Open, create and inspect a cache store at a local path or any fsspec URL zarr supports."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from softlabel.cache.codecs import compressors
from softlabel.cache.schema import (
    FORMAT,
    SCHEMA_VERSION,
    ArraySpec,
    Layout,
    check_format,
    done_path,
    fingerprint_path,
)
from softlabel.errors import UserError
from softlabel.replay import FINGERPRINT_BYTES


def is_url(location: str) -> bool:
    return "://" in str(location) and not str(location).startswith("file://")


def local_path(location: str) -> Path | None:
    s = str(location)
    if s.startswith("file://"):
        return Path(s[len("file://") :])
    return None if is_url(s) else Path(s)


def exists(location: str) -> bool:
    path = local_path(location)
    if path is not None:
        return (path / "zarr.json").is_file()
    try:
        zarr.open_group(location, mode="r")
        return True
    except Exception:  # fsspec backends raise their own not-found types
        return False


def open_group(location: str, mode: str = "r") -> zarr.Group:
    path = local_path(location)
    try:
        return zarr.open_group(str(path) if path is not None else location, mode=mode)
    except FileNotFoundError:
        raise UserError(f"{location}: no cache store here") from None


def remove(location: str) -> None:
    path = local_path(location)
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)
    else:
        zarr.open_group(location, mode="w")  # mode "w" clears what the URL holds


def read_attrs(location: str) -> dict[str, Any]:
    if not exists(location):
        raise UserError(f"{location}: no cache store here")
    attrs = dict(open_group(location).attrs)
    check_format(attrs, str(location))
    return attrs


def create(location: str, attrs: dict[str, Any], layout: Layout, sample_paths: list[str]) -> zarr.Group:
    """Make the group and every array; until the full attributes are written last, the store says
    it is half-made, so a crash during creation restarts cleanly instead of resuming."""
    path = local_path(location)
    group = zarr.open_group(str(path) if path is not None else location, mode="w")
    group.attrs.update({"format": FORMAT, "schema_version": SCHEMA_VERSION, "creating": True})
    ensure_arrays(group, attrs, layout)
    group["samples/path"][:] = np.asarray(sample_paths, dtype=str)
    group.attrs.put(attrs)
    return group


def ensure_arrays(group: zarr.Group, attrs: dict[str, Any], layout: Layout) -> None:
    storage = attrs["storage"]
    chains = {group_name: compressors(spec) for group_name, spec in storage["codec"].items()}
    chains["raw"] = [Crc32cCodec()]
    s, n = layout.shard_size, layout.count
    if "samples/path" not in group:
        group.create_array("samples/path", shape=(n,), chunks=(min(n, 65536),), dtype=str)
    for view in layout.views:
        arrays = dict(layout.stored(view))
        arrays[fingerprint_path(view)] = ArraySpec((FINGERPRINT_BYTES,), "uint8", "raw")
        for name, spec in arrays.items():
            if name not in group:
                group.create_array(
                    name,
                    shape=(n, *spec.shape),
                    chunks=(1, *spec.shape),  # one sample per inner chunk: a sample is one small read
                    shards=(s, *spec.shape),
                    dtype=spec.dtype,
                    compressors=chains[spec.codec],
                    fill_value=0,
                )
        if done_path(view) not in group:
            # one flag per file, so writers of different shards never touch the same object
            group.create_array(done_path(view), shape=(layout.n_shards,), chunks=(1,), dtype="uint8", fill_value=0)


def done_flags(group: zarr.Group, layout: Layout) -> dict[str, np.ndarray]:
    return {view: np.asarray(group[done_path(view)][:]).astype(bool) for view in layout.views}


def stored_bytes(group: zarr.Group) -> dict[str, int]:
    """Bytes on disk per array path (compressed, with shard indexes and checksums)."""
    out: dict[str, int] = {}
    for name, arr in group.arrays():
        out[name] = int(arr.nbytes_stored())
    for name, sub in group.groups():
        out.update({f"{name}/{k}": v for k, v in stored_bytes(sub).items()})
    return out
