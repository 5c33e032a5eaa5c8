"""Bounds on what a dataset can make softlabel, and the Ultralytics functions it calls, read or hold.

Each sits in front of Ultralytics' own dataset rules (softlabel.data) and refuses hostile or broken
input with one line instead of hanging or reading gigabytes; none changes which images Ultralytics
keeps.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from softlabel.errors import UserError


# Ultralytics' assigner allocates [batch, most boxes in any image of the batch, anchors] several times over:
# measured here on CPU about 19 bytes per (image, box, anchor) for small boxes, about 130 for boxes covering the
# image. At 640 px (8,400 anchors) and batch 16 that is about 2.5 MB per box row of the densest image, so
# 2,000 rows cost about 5 GB: that fits beside a model, while a label file of 10**6 rows asks for terabytes.
# Real datasets stay far below: COCO's densest image has under 100 boxes, SKU-110K's (packed shelves) under 800.
MAX_LABEL_ROWS = 2000

# A label file is read whole by Ultralytics (and split into a Python string per number), so its size is checked
# before anything reads it. A box row takes about 50 bytes and a polygon row about 9 per coordinate: 16 MiB holds
# MAX_LABEL_ROWS polygons of ~460 points each. Ultralytics' parse of such a file took 0.6 s and 150 MB here.
MAX_LABEL_BYTES = 16 << 20

# Ultralytics' image-speed check reads sampled images whole, and replay decodes them whole. PIL, which Ultralytics
# verifies images with, refuses more than 2 * 89,478,485 pixels; even uncompressed at 16 bits and 4 channels that
# is 1.43 GB, so a file over 2 GiB is no image Ultralytics would train on.
MAX_IMAGE_BYTES = 2 << 30

# A text file listing a split's images is read whole by Ultralytics. The largest public detection sets have
# under 2 million training images (Objects365, Open Images), about 150 MB of paths.
MAX_LIST_BYTES = 256 << 20

# Ultralytics lists a split folder with glob('**/*.*'), which walks every file and folder below it. The largest
# public detection sets have under 2 million training images; 10 million entries leaves room for labels and
# other files listed beside them; at the ~5 us an entry measured here, reaching it takes under a minute.
MAX_FOLDER_ENTRIES = 10_000_000


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} bytes"


def _over(n: int, limit: int) -> str:
    return f"{_size(n)} ({n:,} bytes) is over the {_size(limit)} ({limit:,}-byte) limit"


def _is_image_name(name: str) -> bool:
    from ultralytics.data.utils import IMG_FORMATS

    return name.rpartition(".")[-1].lower() in IMG_FORMATS  # the test get_img_files applies


def check_image_file(path: str) -> None:
    """Refuse, before anything opens it, an image that would block a reader (a pipe, a device, a socket) or is
    too large to be read whole. A missing file or a folder named like an image is left to Ultralytics, which
    skips it with a reason."""
    try:
        st = os.stat(path)  # follows symlinks, opens nothing
    except OSError:
        return
    if stat.S_ISDIR(st.st_mode):
        return
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{path}: listed as an image but not a regular file (a pipe, socket or device); reading it could block forever")
    if st.st_size > MAX_IMAGE_BYTES:
        raise UserError(f"{path}: image file of {_over(st.st_size, MAX_IMAGE_BYTES)} for one image")


# The line breaks str.splitlines() splits at, as Ultralytics splits a label file; a row is a line with a non-space.
_ROW = re.compile(r"\S[^\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]*")


def check_label_file(path: str) -> None:
    """Refuse, before Ultralytics reads it whole, a label file that is not a regular file (Ultralytics would take
    it for a missing label and train the image as background), is larger than MAX_LABEL_BYTES, or has more
    than MAX_LABEL_ROWS rows."""
    try:
        st = os.stat(path)
    except OSError:
        return  # no label file: a background image, as Ultralytics has it
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{path}: label file is not a regular file (a folder, pipe, socket or device)")
    if st.st_size > MAX_LABEL_BYTES:
        raise UserError(f"{path}: label file of {_over(st.st_size, MAX_LABEL_BYTES)} for one label file")
    if st.st_size < 2 * MAX_LABEL_ROWS:  # a row takes at least a character and a line break
        return
    with open(path, "rb") as f:
        text = f.read(MAX_LABEL_BYTES + 1).decode("utf-8-sig", errors="replace")
    rows = sum(1 for _ in _ROW.finditer(text))
    if rows > MAX_LABEL_ROWS:
        raise UserError(f"{path}: {rows:,} label rows, over the limit of {MAX_LABEL_ROWS:,} boxes per image")


def _check_folder(folder: Path) -> None:
    """Walk what Ultralytics' glob('**/*.*') will walk, with os.scandir, before it does: refuse a filesystem root,
    a folder symlink that leads back into its own walk, and more than MAX_FOLDER_ENTRIES entries; check every
    file named like an image. Like glob, names starting with '.' are left out and symlinked folders followed."""
    real = Path(os.path.realpath(folder))
    if real.parent == real:
        raise UserError(
            f"{folder}: an image folder that is the filesystem root ({real}) would list every file on the machine; "
            "point data.yaml's 'path' and split at the dataset's own folders"
        )
    seen = 0
    stack: list[tuple[str, tuple[str, ...]]] = [(str(folder), (str(real),))]  # (folder, real paths walked into)
    while stack:
        here, chain = stack.pop()
        try:
            with os.scandir(here) as entries:
                for entry in entries:
                    if entry.name.startswith("."):
                        continue
                    seen += 1
                    if seen > MAX_FOLDER_ENTRIES:
                        raise UserError(
                            f"{folder}: more than {MAX_FOLDER_ENTRIES:,} files and folders below this image folder, the limit; "
                            "is data.yaml's 'path' or split the dataset's own folder?"
                        )
                    try:
                        is_dir = entry.is_dir()  # follows a symlink, as glob does
                    except OSError:
                        continue
                    if not is_dir:
                        if _is_image_name(entry.name):
                            check_image_file(entry.path)
                        continue
                    if not entry.is_symlink():
                        stack.append((entry.path, (*chain[:-1], os.path.join(chain[-1], entry.name))))
                        continue
                    target = os.path.realpath(entry.path)
                    if any(c == target or c.startswith(target.rstrip(os.sep) + os.sep) for c in chain):
                        raise UserError(
                            f"{entry.path}: a folder symlink that leads back into its own folders ({target}); "
                            "Ultralytics would list the same images again under ever longer paths"
                        )
                    stack.append((entry.path, (*chain, target)))
        except OSError:
            continue  # unreadable, or too deep for the OS: glob passes over it the same way


def _check_list_file(file: Path) -> None:
    """A text file of image paths: bounded before Ultralytics reads it whole, and every image it names checked
    (paths starting with './' are relative to the file, as Ultralytics reads them)."""
    size = file.stat().st_size
    if size > MAX_LIST_BYTES:
        raise UserError(f"{file}: image list of {_over(size, MAX_LIST_BYTES)} for a list file")
    parent = str(file.parent) + os.sep
    with open(file, encoding="utf-8-sig", errors="replace") as f:
        for line in f.read(MAX_LIST_BYTES + 1).strip().splitlines():
            name = line.replace("./", parent, 1) if line.startswith("./") else line
            if _is_image_name(name):
                check_image_file(name)


def check_split_sources(paths: list[str]) -> None:
    """Everything `get_img_files` will walk or read for these paths, bounded before it does: it reads sampled
    images whole in its speed check, so a pipe or a huge file must be refused before the listing starts."""
    for p in paths:
        path = Path(p)
        if path.is_dir():
            _check_folder(path)
        elif path.is_file():
            _check_list_file(path)
