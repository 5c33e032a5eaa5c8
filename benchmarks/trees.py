"""Aerial tree crowns as an Ultralytics dataset, cut from the annotated images the deepforest wheel ships.

deepforest 2.1.0 (MIT licence) bundles four RGB orthophotos from NEON sites with Pascal VOC box annotations
in deepforest/data (its other images, an unannotated SOAP_031 and a drone photo of birds, are not used).
Only those files are read: install the package data-only with
`pip install --no-deps deepforest==2.1.0`; deepforest itself is never imported (it needs heavy dependencies).

Tiles: each image is cut into TILE x TILE tiles on a grid from its top-left corner, stride TILE, no overlap;
the strips at the right and bottom narrower than a tile are left out (a whole tile at the model's input size
needs no letterboxing, and no box is seen twice). A box crossing a tile edge is clipped to the tile and kept
when at least MIN_VISIBLE of its area lies inside; a smaller sliver is dropped, since what shows of that
crown is too little to recognise. Tiles without a box are kept: every image is fully annotated, so an empty
tile is real background (meadow, road), and Ultralytics trains on background images.

The split is by source image, never by tile, so no part of a validation image was trained on (SOURCES).
Train: a Yellowstone plot (NEON site YELL, 1 km tile 528000E 4978000N), plus one Florida (OSBS) and one
California (SOAP) image; val: another Yellowstone plot, 13 km east (541000E 4977000N), denser forest along a
road. The two YELL plots share a site, so val is held out by place, not by forest type; the two 400 px images
of other sites hold too few tiles to make a val split alone (and most of each is an edge strip).
Counts (TILE 256, MIN_VISIBLE 0.4):
  train  74 tiles, 518 boxes: YELL 528000 72 tiles / 481 boxes (12 background tiles), OSBS 1 / 24, SOAP 1 / 13
  val    16 tiles, 244 boxes: YELL 541000 16 tiles / 244 boxes (no background tile)

The build is deterministic and written once: a manifest beside data.yaml records the settings and the
sources' version, and a later call with the same ones reuses the folder.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np
import yaml

VERSION = "2.1.0"  # the deepforest release whose images and annotations the counts above describe
TILE = 256
MIN_VISIBLE = 0.4  # share of a box's area that must lie inside a tile for the box to be kept
MANIFEST = "trees.json"
FORMAT = 1  # bump when the tiling changes, so old folders are rebuilt rather than reused
INSTALL = f"pip install --no-deps deepforest=={VERSION}"

# source image (deepforest/data/<stem>.png with <stem>.xml) -> split, and where it was taken
SOURCES = {
    "2019_YELL_2_528000_4978000_image_crop2": ("train", "Yellowstone, Wyoming (NEON YELL), 528000E 4978000N"),
    "OSBS_029": ("train", "Ordway-Swisher, Florida (NEON OSBS)"),
    "SOAP_061": ("train", "Soaproot Saddle, California (NEON SOAP)"),
    "2019_YELL_2_541000_4977000_image_crop": ("val", "Yellowstone, Wyoming (NEON YELL), 541000E 4977000N"),
}


class TreesUnavailable(RuntimeError):
    """deepforest's data folder is not installed, or not the release this dataset is built from."""


def data_folder() -> Path:
    """deepforest/data of the installed package, found without importing deepforest."""
    spec = importlib.util.find_spec("deepforest")
    if spec is None or not spec.submodule_search_locations:
        raise TreesUnavailable(f"the trees dataset reads deepforest's bundled images: {INSTALL}")
    try:
        version = importlib.metadata.version("deepforest")
    except importlib.metadata.PackageNotFoundError:  # a source tree on the path, not an installed release
        version = "unknown"
    if version != VERSION:  # other releases may change the images, and with them every count
        raise TreesUnavailable(f"the trees dataset is built from deepforest {VERSION}, found {version}: {INSTALL}")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def read_boxes(xml_path: Path) -> np.ndarray:
    """The annotation's boxes as float [n, 4] xmin, ymin, xmax, ymax in pixels; every label counts as a tree
    (SOAP_061 labels its crowns Alive or Dead)."""
    root = ET.parse(xml_path).getroot()
    rows = [[float(obj.find(f"bndbox/{k}").text) for k in ("xmin", "ymin", "xmax", "ymax")] for obj in root.iter("object")]
    return np.array(rows, np.float64).reshape(-1, 4)


def tile_boxes(boxes: np.ndarray, x0: int, y0: int, tile: int = TILE, min_visible: float = MIN_VISIBLE) -> np.ndarray:
    """The boxes of the tile at (x0, y0), clipped to it and in its pixel frame; those with less than
    `min_visible` of their area inside are dropped."""
    clipped = np.clip(boxes - [x0, y0, x0, y0], 0, tile)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    inside = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
    return clipped[(area > 0) & (inside >= min_visible * area)]


def label_text(boxes: np.ndarray, tile: int = TILE) -> str:
    """YOLO label lines, class 0, centre and size normalised to the tile."""
    rows = [((x0 + x1) / 2 / tile, (y0 + y1) / 2 / tile, (x1 - x0) / tile, (y1 - y0) / tile) for x0, y0, x1, y1 in boxes]
    return "".join(f"0 {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}\n" for cx, cy, w, h in rows)


def tiles_of(stem: str, folder: Path, tile: int, min_visible: float) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """The tiles of one source image in row-major order: (name, BGR pixels, boxes in the tile's frame)."""
    img = cv2.imread(str(folder / f"{stem}.png"), cv2.IMREAD_COLOR)
    if img is None:
        raise TreesUnavailable(f"{folder / stem}.png is missing or unreadable: reinstall with {INSTALL}")
    boxes = read_boxes(folder / f"{stem}.xml")
    h, w = img.shape[:2]
    return [(f"{stem}_{y0:04d}_{x0:04d}", img[y0:y0 + tile, x0:x0 + tile], tile_boxes(boxes, x0, y0, tile, min_visible))
            for y0 in range(0, h - tile + 1, tile) for x0 in range(0, w - tile + 1, tile)]


def pick(n: int, k: int) -> list[int]:
    """k of n indices spread evenly from the first (all n when k is 0 or at least n), so a smaller split
    still draws on every part of the images."""
    return list(range(n)) if k <= 0 or k >= n else [i * n // k for i in range(k)]


def settings(tile: int = TILE, min_visible: float = MIN_VISIBLE, max_train: int = 0, max_val: int = 0) -> dict:
    """What identifies a build: a folder built with the same settings is reused. max_train / max_val: at
    most that many tiles per split (0: all), for smoke tests."""
    return {"format": FORMAT, "deepforest": VERSION, "tile": tile, "min_visible": min_visible,
            "sources": {stem: split for stem, (split, _) in SOURCES.items()}, "max_tiles": {"train": max_train, "val": max_val}}


def write_split(root: Path, split: str, folder: Path, tile: int, min_visible: float, max_tiles: int) -> dict:
    """Write one split's tiles and labels; returns its tiles and boxes, in all and per source."""
    images, labels = root / "images" / split, root / "labels" / split
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    stems = [stem for stem, (s, _) in SOURCES.items() if s == split]
    tiles = [(stem, *t) for stem in stems for t in tiles_of(stem, folder, tile, min_visible)]
    entry = {"tiles": 0, "boxes": 0, "sources": {stem: {"where": SOURCES[stem][1], "tiles": 0, "boxes": 0} for stem in stems}}
    for i in pick(len(tiles), max_tiles):
        stem, name, pixels, boxes = tiles[i]
        cv2.imwrite(str(images / f"{name}.png"), pixels)
        if len(boxes):  # no label file: a background tile, as Ultralytics reads it
            (labels / f"{name}.txt").write_text(label_text(boxes, tile))
        for counts in (entry, entry["sources"][stem]):
            counts["tiles"] += 1
            counts["boxes"] += len(boxes)
    return entry


def build_trees(root: str | Path, tile: int = TILE, min_visible: float = MIN_VISIBLE, max_train: int = 0,
                max_val: int = 0) -> tuple[Path, dict]:
    """Write the tiles and data.yaml under root (replacing what is there); returns the data.yaml path and
    the manifest, whose `splits` holds tiles and boxes per split and source."""
    folder = data_folder()
    root = Path(root)
    if root.exists():
        shutil.rmtree(root)
    splits = {split: write_split(root, split, folder, tile, min_visible, k) for split, k in (("train", max_train), ("val", max_val))}
    # no 'path' key: Ultralytics and softlabel then both read the splits beside data.yaml, wherever the folder moves
    data = {"train": "images/train", "val": "images/val", "names": {0: "tree"}}
    yaml_path = root / "data.yaml"
    yaml_path.write_text(yaml.safe_dump(data, sort_keys=False))
    manifest = {**settings(tile, min_visible, max_train, max_val), "splits": splits}
    # the manifest goes last: a folder without it was interrupted and is rebuilt
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return yaml_path, manifest


def ensure_trees(root: str | Path, tile: int = TILE, min_visible: float = MIN_VISIBLE, max_train: int = 0,
                 max_val: int = 0) -> tuple[Path, dict, bool]:
    """The data.yaml of a trees dataset built with these settings, its manifest, and whether an existing
    folder was reused."""
    root = Path(root)
    wanted = settings(tile, min_visible, max_train, max_val)
    manifest_path, yaml_path = root / MANIFEST, root / "data.yaml"
    if manifest_path.is_file() and yaml_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError:
            manifest = None  # a damaged manifest: rebuild
        if isinstance(manifest, dict) and {k: manifest.get(k) for k in wanted} == wanted:
            return yaml_path, manifest, True
    return *build_trees(root, tile, min_visible, max_train, max_val), False


def describe(manifest: dict) -> str:
    """One line per split and source: tiles and boxes."""
    lines = []
    for split, entry in manifest["splits"].items():
        lines.append(f"{split}: {entry['tiles']} tiles, {entry['boxes']} boxes")
        lines += [f"  {stem}: {s['tiles']} tiles, {s['boxes']} boxes ({s['where']})" for stem, s in entry["sources"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    data_yaml, manifest, reused = ensure_trees(sys.argv[1] if len(sys.argv) > 1 else "runs/trees-data")
    print(f"{'reused' if reused else 'built'} {data_yaml}")
    print(describe(manifest))
