"""Checks of user input that more than one command makes: refused with one line, before any file is written."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from softlabel.errors import UserError


def check_class_names(teacher: Sequence[str], data: Sequence[str], teacher_path: str | os.PathLike, yaml_path: str | os.PathLike) -> None:
    """Class order is the meaning of every cached logit: the teacher's classes must be the data's, in order."""
    if len(teacher) != len(data):
        raise UserError(f"{teacher_path}: teacher predicts {len(teacher)} classes but {yaml_path} has nc={len(data)}")
    for i, (mine, theirs) in enumerate(zip(teacher, data)):
        if str(mine) != str(theirs):
            raise UserError(
                f"{teacher_path}: teacher class {i} is {str(mine)!r} but {yaml_path} names class {i} {str(theirs)!r}; "
                "the teacher must be trained on these classes in this order"
            )


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_out_outside_data(out: str, index) -> None:
    """A store written among the images or labels would be listed, and later overwritten, as data."""
    from ultralytics.data.utils import img2label_paths

    from softlabel.cache.store import local_path

    path = local_path(out)
    if path is None:  # an object store holds no dataset folders
        return
    target = path.expanduser().resolve()
    images = [str(p) for p in index.images]
    folders = {Path(p).parent.resolve() for p in [*images, *img2label_paths(images)]}
    for folder in sorted(folders):
        if _inside(target, folder):
            raise UserError(f"{out}: --out is inside the dataset's folder {folder}; write the cache outside the image and label folders")


def check_train_numbers(epochs: int, batch: int, workers: int, imgsz: int | None, close_mosaic: int) -> None:
    """The numbers of a training run, whether they came as options or as key=value arguments."""
    if int(epochs) < 1:
        raise UserError(f"epochs={epochs}: train for at least 1 epoch")
    if batch != -1 and not float(batch) > 0:
        raise UserError(f"batch={batch}: give 1 or more, -1, or a fraction of GPU memory in (0, 1)")
    if int(workers) < 0:
        raise UserError(f"workers={workers}: must be 0 or more")
    if imgsz is not None and (int(imgsz) < 32 or int(imgsz) % 32):
        raise UserError(f"imgsz={imgsz}: must be a positive multiple of 32")
    if int(close_mosaic) < 0:
        raise UserError(f"close_mosaic={close_mosaic}: must be 0 or more")
