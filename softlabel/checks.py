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


def _label_folder(folder: Path) -> Path:
    """Ultralytics' rule for a folder: its last 'images' component becomes 'labels'."""
    parts = list(folder.parts)
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            return Path(*parts)
    return folder


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_out_outside_data(out: str, index) -> None:
    """A store written among the images or labels would be listed, and later overwritten, as data."""
    if "://" in str(out) and not str(out).startswith("file://"):
        return
    target = Path(str(out).removeprefix("file://")).expanduser().resolve()
    folders = {p.parent.resolve() for p in index.images}
    folders |= {_label_folder(f) for f in folders}
    for folder in sorted(folders):
        if _inside(target, folder):
            raise UserError(f"{out}: --out is inside the dataset's folder {folder}; write the cache outside the image and label folders")


def check_student(student: str) -> None:
    """A student must be a DFL detector: a classification or corrupt checkpoint is refused before training."""
    path = Path(student)
    if path.suffix == ".pt":
        from softlabel.teacher import describe, read_checkpoint

        model, _ = read_checkpoint(path, "student")
        describe(model, str(path))
        return
    if path.suffix in (".yaml", ".yml") or not path.suffix:
        from ultralytics.nn.tasks import guess_model_task, yaml_model_load

        cfg = student if path.suffix else f"{student}.yaml"
        try:
            task = guess_model_task(yaml_model_load(cfg))
        except Exception:
            return  # an unknown name is reported where the student is built, with the names it accepts
        if task != "detect":
            raise UserError(f"{student}: a {task} model; softlabel trains detection students (e.g. yolov8n, yolo11s)")
        return
    raise UserError(f"{student}: a student is a model name (yolov8n), a model .yaml or a .pt checkpoint")
