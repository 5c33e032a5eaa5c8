"""Ultralytics-format datasets: data.yaml, the ordered image list, and validated YOLO labels."""

from __future__ import annotations

import hashlib
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from softlabel.errors import UserError
from softlabel.yamlfile import read_mapping

# The suffixes Ultralytics reads as images.
IMAGE_SUFFIXES = frozenset(
    {"avif", "bmp", "dng", "heic", "heif", "jp2", "jpeg", "jpg", "mpo", "png", "tif", "tiff", "webp", "pfm"}
)


@dataclass(frozen=True)
class DataSpec:
    """What data.yaml says: where the images of each split are and what the classes are called."""

    yaml_path: Path
    root: Path
    names: tuple[str, ...]
    splits: dict[str, list[str]] = field(default_factory=dict)

    @property
    def nc(self) -> int:
        return len(self.names)


def _as_names(raw: object, yaml_path: Path) -> tuple[str, ...]:
    if isinstance(raw, dict):
        try:
            keys = sorted(int(k) for k in raw)
        except (TypeError, ValueError):
            raise UserError(f"{yaml_path}: 'names' keys must be integer class ids") from None
        if keys != list(range(len(keys))):
            raise UserError(f"{yaml_path}: 'names' must number classes 0..{len(keys) - 1} without gaps")
        return tuple(str(raw[k] if k in raw else raw[str(k)]) for k in keys)
    if isinstance(raw, (list, tuple)):
        return tuple(str(n) for n in raw)
    raise UserError(f"{yaml_path}: 'names' must be a list or a mapping of class id to name")


def load_data_yaml(path: str | os.PathLike) -> DataSpec:
    """Parse an Ultralytics data.yaml; relative paths are taken from the yaml's own folder."""
    yaml_path = Path(path)
    raw = read_mapping(yaml_path, "data.yaml")
    for key in ("train", "names"):
        if key not in raw or raw[key] in (None, ""):
            raise UserError(f"{yaml_path}: missing key '{key}'")
    names = _as_names(raw["names"], yaml_path)
    if "nc" in raw and int(raw["nc"]) != len(names):
        raise UserError(f"{yaml_path}: 'nc' is {raw['nc']} but 'names' lists {len(names)} classes")
    root = Path(raw.get("path") or ".")
    if not root.is_absolute():
        root = (yaml_path.parent / root).resolve()
    splits = {}
    for split in ("train", "val", "test"):
        value = raw.get(split)
        if value:
            splits[split] = [value] if isinstance(value, str) else [str(v) for v in value]
    return DataSpec(yaml_path=yaml_path.resolve(), root=root, names=names, splits=splits)


def _images_in(entry: Path) -> list[Path]:
    if entry.is_dir():
        return [p for p in entry.rglob("*") if p.suffix[1:].lower() in IMAGE_SUFFIXES and p.is_file()]
    if entry.is_file() and entry.suffix == ".txt":
        out = []
        for line in entry.read_text().splitlines():
            line = line.strip()
            if line:
                p = Path(line)
                out.append(p if p.is_absolute() else (entry.parent / p))
        return out
    raise UserError(f"{entry}: image folder or list not found")


def label_path_for(image: Path) -> Path:
    """Ultralytics' convention: the last 'images' folder becomes 'labels', the suffix becomes .txt."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def parse_label_file(path: Path, nc: int) -> np.ndarray:
    """Read YOLO labels as float32 [n, 5] (class, cx, cy, w, h, normalised); polygons become their box."""
    if not path.is_file():
        return np.zeros((0, 5), np.float32)  # a background image
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}:{lineno}"
        if len(fields) < 5 or (len(fields) > 5 and len(fields) % 2 == 0):
            raise UserError(f"{where}: malformed label line {line.strip()!r} (expected 'class x y w h')")
        try:
            values = [float(v) for v in fields]
        except ValueError:
            raise UserError(f"{where}: malformed label line {line.strip()!r} (not numbers)") from None
        cls = values[0]
        if not cls.is_integer() or cls < 0:
            raise UserError(f"{where}: class id {fields[0]!r} is not a non-negative integer")
        if cls >= nc:
            raise UserError(f"{where}: class id {int(cls)} is out of range for nc={nc}")
        coords = values[1:]
        if not all(math.isfinite(v) for v in coords) or min(coords) < -0.01 or max(coords) > 1.01:
            raise UserError(f"{where}: coordinates must be normalised to [0, 1], got {line.strip()!r}")
        if len(coords) == 4:
            box = coords
        else:  # a segment polygon: keep its bounding box
            xs, ys = coords[0::2], coords[1::2]
            x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
            box = [(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0]
        rows.append([cls, *box])
    return np.asarray(rows, np.float32).reshape(-1, 5)


@dataclass(frozen=True)
class DatasetIndex:
    """The ordered images of one split with their labels; index i always means the same image."""

    root: Path
    images: tuple[Path, ...]
    labels: tuple[np.ndarray, ...]
    names: tuple[str, ...]
    sizes: tuple[tuple[int, int], ...] = ()  # (height, width) per image, from its header

    def __len__(self) -> int:
        return len(self.images)

    @property
    def nc(self) -> int:
        return len(self.names)

    def relative_paths(self) -> list[str]:
        out = []
        for p in self.images:
            try:
                out.append(p.relative_to(self.root).as_posix())
            except ValueError:
                out.append(p.as_posix())
        return out

    def list_hash(self) -> str:
        """Identifies the ordered image list and labels, so a cache can tell it belongs to this data."""
        h = hashlib.sha256()
        for rel, lab in zip(self.relative_paths(), self.labels):
            h.update(rel.encode())
            h.update(b"\0")
            h.update(np.ascontiguousarray(lab, np.float32).tobytes())
        return h.hexdigest()


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            w, h = im.size
            im.load()  # verify() does not decode; a truncated file only fails here
    except Exception as e:  # PIL raises many types for bad files
        raise UserError(f"{path}: unreadable or corrupt image ({type(e).__name__}: {e})") from None
    return h, w


def build_index(spec: DataSpec, split: str = "train", check_images: bool = True) -> DatasetIndex:
    """List a split's images in a stable order and read and validate every label file."""
    if split not in spec.splits:
        raise UserError(f"{spec.yaml_path}: no '{split}' split")
    images: list[Path] = []
    for entry in spec.splits[split]:
        p = Path(entry)
        images.extend(_images_in(p if p.is_absolute() else spec.root / p))
    images = sorted({p.resolve() for p in images})
    if not images:
        raise UserError(f"{spec.yaml_path}: split '{split}' has no images ({', '.join(spec.splits[split])})")
    labels = tuple(parse_label_file(label_path_for(p), spec.nc) for p in images)
    sizes: tuple[tuple[int, int], ...] = ()
    if check_images:
        with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
            sizes = tuple(pool.map(_image_size, images))
    return DatasetIndex(root=spec.root, images=tuple(images), labels=labels, names=spec.names, sizes=sizes)
