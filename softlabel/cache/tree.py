"""Every path a store of this schema can hold, so removing a store never removes anything else.

A store is zarr v3 on disk: group and array folders, each with its `zarr.json`, and an array's
chunk objects under `c/` named by integers. Which groups and arrays exist follows
softlabel.cache.schema; this grammar accepts any store of the schema (every view, level, head and
feature form) without reading its attributes, so a store whose creation or attributes were cut short
can still be removed, and a user's file or folder anywhere inside a store is found before anything is
deleted. zarr's local store writes through `<name>.<uuid>.partial` files and renames them; one left
by a kill is part of the store too. Symbolic links and special files are never part of a store.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_PARTIAL = r"\.[0-9a-f]{32}\.partial"
_META = re.compile(rf"zarr(\.json|{_PARTIAL})")
_CHUNK_DIR = re.compile(r"\d+")
_CHUNK_FILE = re.compile(rf"\d+({_PARTIAL})?")
_LEVEL = r"p\d+"
_ARRAY = "array"

# group -> {child name pattern: child group or _ARRAY}
_VIEW = {
    "fingerprint": _ARRAY,
    "digest": _ARRAY,
    "done": _ARRAY,
    "head": {rf"index|values|scale|background|{_LEVEL}": _ARRAY},
    "feat": {rf"rows|scale|{_LEVEL}": _ARRAY},
    "head_scale": {_LEVEL: _ARRAY},
    "feat_scale": {_LEVEL: _ARRAY},
}
_ROOT = {"samples": {"path": _ARRAY}, r"[vc]\d+": _VIEW}


def _child(group: dict, name: str):
    for pattern, node in group.items():
        if re.fullmatch(pattern, name):
            return node
    return None


def allowed(relative: str, is_dir: bool) -> bool:
    """Whether a path inside a store (POSIX, relative to its root) is one a store can hold."""
    parts = [p for p in relative.split("/") if p]
    node = _ROOT
    for k, name in enumerate(parts):
        last = k == len(parts) - 1
        if _META.fullmatch(name):
            return last and not is_dir
        if node is _ARRAY:
            rest = parts[k:]
            if rest[0] != "c" or (len(rest) == 1 and not is_dir):
                return False
            inner, leaf = rest[1:-1], rest[-1]
            if len(rest) == 1:
                return True
            leaf_ok = _CHUNK_DIR.fullmatch(leaf) if is_dir else _CHUNK_FILE.fullmatch(leaf)
            return bool(leaf_ok) and all(_CHUNK_DIR.fullmatch(p) for p in inner)
        node = _child(node, name)
        if node is None:
            return False
    return is_dir


def foreign_entries(root: Path) -> list[str]:
    """Paths under `root` (relative, POSIX) that no store holds: a user's files and folders, links,
    FIFOs and devices. Links are listed, never followed."""
    out: list[str] = []
    stack = [("", root)]
    while stack:
        rel, folder = stack.pop()
        with os.scandir(folder) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                name = f"{rel}/{entry.name}" if rel else entry.name
                if entry.is_symlink():
                    out.append(name)
                elif entry.is_dir(follow_symlinks=False):
                    if allowed(name, True):
                        stack.append((name, Path(entry.path)))
                    else:
                        out.append(name + "/")
                elif not entry.is_file(follow_symlinks=False) or not allowed(name, False):
                    out.append(name)
    return sorted(out)
