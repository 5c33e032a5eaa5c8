"""Student names as Ultralytics reads them: `yolov8n` is the pretrained yolov8n.pt, `yolov8n.yaml` starts from scratch."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from softlabel.errors import UserError


def _warn(line: str) -> None:
    print(f"softlabel: warning: {line}", file=sys.stderr)


def _known_yaml(cfg: str) -> bool:
    from ultralytics.nn.tasks import yaml_model_load

    try:
        yaml_model_load(cfg)
    except Exception:  # Ultralytics raises several kinds for a name it does not know
        return False
    return True


def _pretrained(name: str) -> str | None:
    """The checkpoint for a model name, found where Ultralytics looks (the working folder, its
    weights folder) or fetched as Ultralytics fetches it; None with the reason when it cannot be had."""
    from ultralytics.utils.downloads import GITHUB_ASSETS_NAMES, attempt_download_asset

    file = f"{name}.pt"
    local = Path(file).is_file()
    if not local and file not in GITHUB_ASSETS_NAMES:
        return None
    try:
        found = attempt_download_asset(file)
    except Exception as e:  # offline, a proxy, a partial download: all mean "not available now"
        raise FileNotFoundError(" ".join(str(e).replace("❌", "").split()) or type(e).__name__) from None
    if not Path(found).is_file():
        raise FileNotFoundError("not found locally and not downloaded")
    return found


def resolve_student(student: str, warn: Callable[[str], None] | None = _warn):
    """An Ultralytics YOLO model for a student given as Ultralytics names it.

    - `yolov8n` (a name): the pretrained `yolov8n.pt`, found locally or fetched the way Ultralytics
      fetches it; where it cannot be had (no network), one warning line and `yolov8n.yaml` from scratch.
    - `yolov8n.yaml` or a model yaml path: random initial weights.
    - `path/to/model.pt`: that checkpoint (an Ultralytics asset name like `yolov8n.pt` is fetched if absent).
    """
    from ultralytics import YOLO

    path = Path(student)
    if path.suffix == ".pt":
        if not path.is_file():
            try:
                found = _pretrained(path.stem) if path.name == student else None
            except FileNotFoundError as e:
                raise UserError(f"{student}: student checkpoint not found and not downloadable ({e})") from None
            if found is None:
                raise UserError(f"{student}: student checkpoint not found")
            return YOLO(found)
        return YOLO(str(path))
    if path.suffix in (".yaml", ".yml"):
        if not _known_yaml(student):
            raise UserError(f"unknown student '{student}': not an Ultralytics model yaml")
        return YOLO(student, task="detect")
    cfg = f"{student}.yaml"
    try:
        found = _pretrained(student)
    except FileNotFoundError as e:
        found = None
        if _known_yaml(cfg) and warn is not None:
            warn(f"{student}: pretrained {student}.pt cannot be had ({e}); training {cfg} from random weights")
    if found is not None:
        return YOLO(found)
    if not _known_yaml(cfg):
        raise UserError(f"unknown student '{student}': not an Ultralytics model name (e.g. yolov8n, yolo11s), a .yaml or a .pt")
    return YOLO(cfg, task="detect")


def check_student(student: str) -> None:
    """A student must be a detector softlabel trains: a classification or corrupt checkpoint is refused before training."""
    path = Path(student)
    if path.suffix == ".pt":
        from softlabel.heads import head_spec
        from softlabel.teacher import read_checkpoint

        model, _ = read_checkpoint(path, "student")
        head_spec(model, str(path))
        return
    if path.suffix in (".yaml", ".yml") or not path.suffix:
        from ultralytics.nn.tasks import guess_model_task, yaml_model_load

        cfg = student if path.suffix else f"{student}.yaml"
        try:
            task = guess_model_task(yaml_model_load(cfg))
        except Exception:
            return  # an unknown name is reported where the student is built, with the names it accepts
        if task != "detect":
            what = f"a {task} model" if task else "not a model yaml Ultralytics can tell the task of"
            raise UserError(f"{student}: {what}; softlabel trains detection students (e.g. yolov8n, yolo11s)")
        return
    raise UserError(f"{student}: a student is a model name (yolov8n), a model .yaml or a .pt checkpoint")

