"""Open, create and inspect a cache store at a local path or any fsspec URL zarr supports."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from softlabel.cache.codecs import compressors
from softlabel.cache.schema import (
    FORMAT,
    SCHEMA_VERSION,
    Layout,
    check_format,
    done_path,
)
from softlabel.errors import UserError


def is_url(location: str) -> bool:
    return "://" in str(location) and not str(location).startswith("file://")


def local_path(location: str) -> Path | None:
    s = str(location)
    if s.startswith("file://"):
        return Path(s[len("file://") :])
    return None if is_url(s) else Path(s)


def exists(location: str) -> bool:
    """True where a softlabel store is (a zarr group carrying the softlabel format attribute)."""
    return probe(location).kind == "store"


@dataclass(frozen=True)
class Target:
    """What an output location holds now, so a dump knows whether it may write or remove there.

    kind: "absent" (nothing there), "empty" (an empty folder), "store" (a softlabel store),
    "file" (a regular file) or "foreign" (anything else: never written into, never removed).
    """

    location: str
    kind: str
    detail: str = ""


def _format_of(meta: bytes) -> str | None:
    try:
        return json.loads(meta).get("attributes", {}).get("format")
    except (ValueError, AttributeError):
        return None


def probe(location: str) -> Target:
    path = local_path(location)
    if path is not None:
        if not path.exists() and not path.is_symlink():
            return Target(str(location), "absent")
        if not path.is_dir():
            return Target(str(location), "file", "a file" if path.is_file() else "not a folder")
        entries = sorted(p.name for p in path.iterdir())
        if not entries:
            return Target(str(location), "empty")
        meta = path / "zarr.json"
        if meta.is_file() and _format_of(meta.read_bytes()) == FORMAT:
            return Target(str(location), "store")
        what = "a zarr group that is not a softlabel cache" if meta.is_file() else f"a folder holding {entries[0]!r}"
        return Target(str(location), "foreign", what)
    fs, root = fsspec.core.url_to_fs(str(location))
    try:
        meta = fs.cat_file(f"{root.rstrip('/')}/zarr.json")
    except FileNotFoundError:
        meta = None
    if meta is not None and _format_of(meta) == FORMAT:
        return Target(str(location), "store")
    if meta is not None:
        return Target(str(location), "foreign", "a zarr group that is not a softlabel cache")
    try:
        listed = fs.ls(root, detail=False) if fs.isdir(root) else ([root] if fs.exists(root) else [])
    except FileNotFoundError:
        listed = []
    if not listed:
        return Target(str(location), "absent")
    return Target(str(location), "foreign", f"a location holding {Path(str(listed[0])).name!r}")


def require_writable(location: str, overwrite: bool = False) -> Target:
    """Refuse an output that holds anything but a softlabel store; nothing there is touched."""
    target = probe(location)
    if target.kind == "file":
        raise UserError(f"{location}: --out names {target.detail}; give a new or empty folder, or an existing softlabel cache")
    if target.kind == "foreign":
        raise UserError(
            f"{location}: not a softlabel cache ({target.detail}); refusing to write there"
            + (" or remove it with --overwrite" if overwrite else "")
            + "; give a new or empty folder for --out"
        )
    return target


def open_group(location: str, mode: str = "r") -> zarr.Group:
    path = local_path(location)
    try:
        return zarr.open_group(str(path) if path is not None else location, mode=mode)
    except FileNotFoundError:
        raise UserError(f"{location}: no cache store here") from None


def remove(location: str) -> None:
    """Delete a softlabel store, and only that: anything else at the location is refused untouched."""
    target = probe(location)
    if target.kind in ("absent", "empty"):
        return
    if target.kind != "store":
        raise UserError(f"{location}: not a softlabel cache ({target.detail or target.kind}); refusing to remove it")
    path = local_path(location)
    if path is not None:
        foreign = [p.name for p in path.iterdir() if p.name != "zarr.json" and not (p / "zarr.json").is_file()]
        if foreign:  # a store's folder holds zarr nodes only; a user's file put inside it is never deleted
            raise UserError(f"{location}: the cache folder also holds {foreign[0]!r}, which is not part of the cache; "
                            "move it out, then run again")
        shutil.rmtree(path)
    else:
        fs, root = fsspec.core.url_to_fs(str(location))
        fs.rm(root, recursive=True)


def read_attrs(location: str) -> dict[str, Any]:
    target = probe(location)
    if target.kind in ("absent", "empty"):
        raise UserError(f"{location}: no cache store here")
    if target.kind != "store":
        raise UserError(f"{location}: not a softlabel cache ({target.detail or target.kind})")
    attrs = dict(open_group(location).attrs)
    check_format(attrs, str(location))
    if attrs.get("creating"):
        raise UserError(f"{location}: the dump stopped while creating this store; run the same 'softlabel dump' command again")
    return attrs


def create(location: str, attrs: dict[str, Any], layout: Layout, sample_paths: list[str]) -> zarr.Group:
    """Make the group and every array; until the full attributes are written last, the store says
    it is half-made, so a crash during creation restarts cleanly instead of resuming."""
    require_writable(location)
    path = local_path(location)
    # born with its format attribute, so a crash at any later moment leaves a recognisable store;
    # mode "w-" never clears what a location holds
    group = zarr.open_group(
        str(path) if path is not None else location,
        mode="w-",
        attributes={"format": FORMAT, "schema_version": SCHEMA_VERSION, "creating": True},
    )
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
        for name, spec in layout.per_sample(view).items():
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
