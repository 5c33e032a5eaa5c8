"""Open, create and inspect a cache store at a local path or any fsspec URL zarr supports."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from softlabel.cache import tree as store_tree
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


def resolve_link(location: str) -> str:
    """A local --out that is a symbolic link, as the folder it points to: the store, its lock and its
    removal then all concern that one folder, never the link."""
    path = local_path(location)
    return str(path.resolve()) if path is not None and path.is_symlink() else str(location)


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
    """Delete a softlabel store, and only that: a location holding anything a store of this schema
    cannot contain, at any depth, is refused whole and left untouched."""
    target = probe(location)
    if target.kind in ("absent", "empty"):
        return
    if target.kind != "store":
        raise UserError(f"{location}: not a softlabel cache ({target.detail or target.kind}); refusing to remove it")
    path = local_path(location)
    if path is not None:
        _remove_tree(path, str(location))
    else:
        fs, root = fsspec.core.url_to_fs(str(location))
        root = root.rstrip("/")
        listed = fs.find(root, withdirs=True, detail=True)
        foreign = [rel for rel, is_dir in ((k[len(root) + 1 :], v.get("type") == "directory") for k, v in listed.items())
                   if rel and not store_tree.allowed(rel, is_dir)]
        if foreign:
            raise UserError(_foreign_message(str(location), foreign))
        fs.rm(root, recursive=True)


def _foreign_message(location: str, foreign: list[str]) -> str:
    more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
    return (f"{location}: the cache folder also holds {foreign[0]!r}{more}, which is not part of a cache; nothing was "
            "removed; move it out, then run again")


def _remove_tree(path: Path, location: str) -> None:
    foreign = store_tree.foreign_entries(path)
    if foreign:
        raise UserError(_foreign_message(location, foreign))
    shutil.rmtree(path)


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
    """Make the group and every array, the full attributes last.

    A local store is built in a hidden sibling folder and renamed into place once whole, so a dump
    that fails or is killed at any moment of creation leaves either nothing at --out or a whole
    store; the next run clears the leftover sibling. An object store has no atomic rename: it is born
    with its format attribute and a 'creating' flag, and a store still flagged is started over."""
    require_writable(location)
    path = local_path(location)
    if path is None:
        group = zarr.open_group(location, mode="w-", attributes={"format": FORMAT, "schema_version": SCHEMA_VERSION, "creating": True})
        _fill(group, attrs, layout, sample_paths)
        return group
    staging = staging_path(path)
    try:
        if staging.exists() or staging.is_symlink():
            _remove_tree(staging, str(staging))  # left by a creation that was killed; the dump lock makes it ours
        _fill(zarr.open_group(str(staging), mode="w-", attributes={"format": FORMAT, "schema_version": SCHEMA_VERSION}),
              attrs, layout, sample_paths)
        os.rename(staging, path)  # atomic; onto an absent name or an empty folder
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise UserError(f"{location}: creating the store failed ({e.strerror or e}); nothing was left at --out; "
                        "fix that and run the same command again") from None
    return zarr.open_group(str(path), mode="r+")


def staging_path(path: Path) -> Path:
    """Where a local store is built before it is renamed to `path`."""
    return path.with_name(f".{path.name}.creating")


def _fill(group: zarr.Group, attrs: dict[str, Any], layout: Layout, sample_paths: list[str]) -> None:
    ensure_arrays(group, attrs, layout)
    group["samples/path"][:] = np.asarray(sample_paths, dtype=str)
    group.attrs.put(attrs)


def ensure_arrays(group: zarr.Group, attrs: dict[str, Any], layout: Layout) -> None:
    from softlabel.cache.description import CacheDescription

    codec = CacheDescription.from_attrs(attrs).storage.codec
    chains = {group_name: compressors(spec) for group_name, spec in codec.items()}
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


def open_array(group: zarr.Group, path: str, location: str):
    """An array of the store, or one line saying which is missing or damaged (a deleted folder, a
    truncated or edited zarr.json) instead of the KeyError or JSONDecodeError zarr raises."""
    try:
        node = group[path]
    except KeyError:
        raise UserError(f"{location}: {path} is missing from the store; the store is damaged, re-dump it "
                        "(--overwrite starts over)") from None
    except Exception as e:  # zarr parses the metadata here: JSON, unknown codecs, bad shapes
        reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise UserError(f"{location}: {path}/zarr.json cannot be read ({reason}); the store is damaged, re-dump it "
                        "(--overwrite starts over)") from None
    if not isinstance(node, zarr.Array):
        raise UserError(f"{location}: {path} is not an array; the store is damaged, re-dump it (--overwrite starts over)")
    return node


def done_flags(group: zarr.Group, layout: Layout, location: str = "") -> dict[str, np.ndarray]:
    where = location or str(group.store)
    return {view: np.asarray(open_array(group, done_path(view), where)[:]).astype(bool) for view in layout.views}


def stored_bytes(group: zarr.Group) -> dict[str, int]:
    """Bytes on disk per array path (compressed, with shard indexes and checksums)."""
    out: dict[str, int] = {}
    for name, arr in group.arrays():
        out[name] = int(arr.nbytes_stored())
    for name, sub in group.groups():
        out.update({f"{name}/{k}": v for k, v in stored_bytes(sub).items()})
    return out
