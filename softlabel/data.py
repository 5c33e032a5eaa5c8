"""Ultralytics-format datasets, resolved by Ultralytics' own rules.

`yolo train` reads a data.yaml with `check_det_dataset`, lists a split's images the way
`BaseDataset.get_img_files` does, finds each label file with `img2label_paths` and checks each
image and label with `verify_image_label`, skipping what fails. softlabel calls those same
functions, so the images a dump replays are exactly the ones `yolo train` trains on, and the ones
it would skip are skipped here too, named and counted. In front of each of those calls sit bounds Ultralytics
does not apply (file types, sizes, label rows, how far a listing walks), so hostile or broken input is refused
with one line instead of hanging, or reading gigabytes.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from dataclasses import dataclass, field
from itertools import repeat
from multiprocessing.pool import ThreadPool
from pathlib import Path
from typing import Callable

import numpy as np
import yaml

from softlabel.databounds import check_image_file, check_label_file, check_split_sources
from softlabel.errors import UserError
from softlabel.yamlfile import check_yaml_text, read_yaml_text

@dataclass(frozen=True)
class DataSpec:
    """What data.yaml says once Ultralytics has resolved it: the split paths and the class names."""

    yaml_path: Path
    root: Path
    names: tuple[str, ...]
    splits: dict[str, list[str]] = field(default_factory=dict)

    @property
    def nc(self) -> int:
        return len(self.names)


def _one_line(error: BaseException) -> str:
    """Ultralytics' messages carry emojis, help links and line breaks; keep the words."""
    text = str(error).replace("❌", " ").replace("⚠️", " ")
    text = " ".join(ln.strip() for ln in text.splitlines() if ln.strip() and "docs.ultralytics.com" not in ln)
    return re.sub(r"\s+", " ", text).strip(" .")


def load_data_yaml(path: str | os.PathLike) -> DataSpec:
    """Resolve a data.yaml with Ultralytics' `check_det_dataset`: its `path:` rules (the working
    folder, then its datasets directory), Roboflow's `../train/images`, `nc:` without `names:`."""
    from ultralytics.data.utils import check_det_dataset

    yaml_path = Path(path)
    if not yaml_path.is_file():
        raise UserError(f"{yaml_path}: data.yaml not found")
    if yaml_path.suffix.lower() in (".yaml", ".yml"):  # Ultralytics also takes a dataset archive, which is not YAML
        # Bounded before Ultralytics parses it, on the text as Ultralytics reads it: undecodable bytes dropped,
        # and characters YAML forbids dropped too (its loader retries without them).
        text = read_yaml_text(yaml_path, "data.yaml", errors="ignore")
        check_yaml_text(yaml.reader.Reader.NON_PRINTABLE.sub("", text), yaml_path)
    try:
        data = check_det_dataset(str(yaml_path), autodownload=False)
    except Exception as e:  # SyntaxError, FileNotFoundError, TypeError... each a user's data problem
        raise UserError(f"{yaml_path}: {_one_line(e)}") from None
    names = data["names"]
    names = tuple(str(names[k]) for k in sorted(names)) if isinstance(names, dict) else tuple(str(n) for n in names)
    splits = {}
    for split in ("train", "val", "test"):
        value = data.get(split)
        if value:
            splits[split] = [str(value)] if isinstance(value, (str, Path)) else [str(v) for v in value]
    root = Path(data["path"]).resolve()
    return DataSpec(yaml_path=Path(data.get("yaml_file", yaml_path)).resolve(), root=root, names=names, splits=splits)


@dataclass(frozen=True)
class DatasetIndex:
    """The ordered images of one split with their labels; index i always means the same image."""

    root: Path
    images: tuple[Path, ...]
    labels: tuple[np.ndarray, ...]
    names: tuple[str, ...]
    sizes: tuple[tuple[int, int], ...] = ()  # (height, width) per image, as Ultralytics reads it (EXIF applied)
    skipped: tuple[tuple[str, str], ...] = ()  # (image, reason) Ultralytics would not train on

    def __len__(self) -> int:
        return len(self.images)

    @property
    def nc(self) -> int:
        return len(self.names)

    def _relative(self, p: Path) -> str:
        try:
            return p.relative_to(self.root).as_posix()
        except ValueError:
            return p.as_posix()

    def relative_paths(self) -> list[str]:
        return [self._relative(p) for p in self.images]

    def skipped_names(self) -> list[str]:
        """The skipped images, relative to the dataset root like the stored sample paths."""
        return [self._relative(Path(p)) for p, _ in self.skipped]

    def list_hash(self) -> str:
        """Identifies the ordered image list and labels, so a cache can tell it belongs to this data."""
        h = hashlib.sha256()
        for rel, lab in zip(self.relative_paths(), self.labels):
            h.update(rel.encode())
            h.update(b"\0")
            h.update(np.ascontiguousarray(lab, np.float32).tobytes())
        return h.hexdigest()


class _ImageLister:
    """Just what `BaseDataset.get_img_files` reads of its dataset: no prefix, the whole split."""

    prefix = ""
    fraction = 1.0

    def __init__(self):
        from ultralytics.data.base import BaseDataset

        self._list = BaseDataset.get_img_files

    def __call__(self, paths: list[str]) -> list[str]:
        return self._list(self, paths)


def list_images(paths: list[str]) -> list[str]:
    """A split's image files as Ultralytics lists them: sorted, hidden files and folders left out,
    symlinks followed but not resolved (their labels sit beside the link, not the target)."""
    check_split_sources(paths)
    try:
        return _ImageLister()(paths)
    except FileNotFoundError as e:
        raise UserError(_one_line(e.__cause__ or e)) from None


def _verify(args: tuple):
    """Ultralytics' `verify_image_label`, after the bounds it does not apply: it opens the image and reads the
    label file whole."""
    from ultralytics.data.utils import verify_image_label

    check_image_file(args[0])
    check_label_file(args[1])
    return verify_image_label(args)


def _warn(line: str) -> None:
    print(f"softlabel: warning: {line}", file=sys.stderr)


def build_index(
    spec: DataSpec,
    split: str = "train",
    check_images: bool = True,
    strict: bool = False,
    warn: Callable[[str], None] | None = _warn,
) -> DatasetIndex:
    """List a split's images and verify every image and label with Ultralytics' `verify_image_label`.

    What Ultralytics would skip (an unreadable image, a class id >= nc, a coordinate beyond 1.01, a
    file mixing polygons and boxes, ...) is skipped with one warning line each and a summary; with
    `strict` it is refused instead, naming each. Duplicate label rows are removed as Ultralytics
    removes them. `check_images` is kept for callers; verification always runs, because it is what
    decides which images Ultralytics trains on.
    """
    from ultralytics.data.utils import img2label_paths
    from ultralytics.utils import NUM_THREADS

    if split not in spec.splits:
        raise UserError(f"{spec.yaml_path}: no '{split}' split")
    files = list_images(spec.splits[split])
    label_files = img2label_paths(files)
    args = zip(files, label_files, repeat(""), repeat(False), repeat(spec.nc), repeat(0), repeat(0), repeat(False))
    images, labels, sizes, skipped, notes = [], [], [], [], []
    found = 0
    with ThreadPool(max(1, min(NUM_THREADS, len(files)))) as pool:
        for file, result in zip(files, pool.imap(_verify, args)):
            im_file, lb, shape, _, _, _, nf, _, _, msg = result
            found += nf
            if im_file is None:
                reason = _one_line(Exception(msg)).split("ignoring corrupt image/label: ", 1)[-1]
                skipped.append((file, reason))
                continue
            if msg:
                notes.append(_one_line(Exception(msg)))
            images.append(Path(im_file))
            labels.append(np.ascontiguousarray(lb, np.float32).reshape(-1, 5))
            sizes.append((int(shape[0]), int(shape[1])))
    index = DatasetIndex(root=spec.root, images=tuple(images), labels=tuple(labels), names=spec.names, sizes=tuple(sizes),
                         skipped=tuple(skipped))
    where = f"{spec.yaml_path} ({split})"
    if skipped and strict:
        named = "; ".join(f"{name}: {reason}" for name, (_, reason) in zip(index.skipped_names(), skipped))
        raise UserError(f"{where}: {len(skipped)} image(s) Ultralytics would skip (--strict refuses them): {named}")
    if warn is not None:
        for line in notes:
            warn(line)
        for name, (_, reason) in zip(index.skipped_names(), skipped):
            warn(f"{name}: skipped, as Ultralytics skips it: {reason}")
        if skipped:
            warn(f"{where}: {len(skipped)} of {len(files)} images skipped, {len(images)} kept")
    if not images:
        raise UserError(f"{where}: no valid images ({len(skipped)} skipped)")
    if not found and split == "train":
        raise UserError(f"{where}: no label files found for any image (Ultralytics looks in {Path(label_files[0]).parent})")
    return index
