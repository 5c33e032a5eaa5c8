"""The detection heads softlabel reads as teacher and trains as student, described once.

Every Ultralytics detector ends in a Detect head whose training output is `{boxes, scores, feats}`
per branch: `boxes` [B, 4 * reg_max, A] (sides l, t, r, b), `scores` [B, nc, A] (class logits),
`feats` the neck maps entering the head, anchors P3..P5 row-major. Heads differ in two ways only:

- the box form: DFL bins (`reg_max` > 1: YOLOv8, v9, v10, 11, 12) or four distances (`reg_max` 1: YOLO26);
- the branches: one (most families), or two end-to-end branches, `one2many` and `one2one`
  (YOLO26, YOLOv10), the one2one branch on detached neck features.

A head spec holds both, so every rule that depends on them (which branch a cache keeps, how bins
become distances, which levels line up) reads them here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from softlabel.errors import UserError

BRANCHES = ("one2many", "one2one")
# what an end-to-end teacher's cache may keep: one branch, or "mean": one2many's boxes with the mean of the two
# branches' class logits, the teacher score Ultralytics' own distillation weights its feature term by
TEACHER_BRANCHES = (*BRANCHES, "mean")
# the branch an end-to-end teacher's cache keeps unless told otherwise: the dense, many-positives branch that
# Ultralytics trains on the backbone's own features, whose soft scores carry the most per anchor
DEFAULT_BRANCH = "one2many"
HEAD_CLASSES = ("Detect", "v10Detect")  # detection heads with the train-mode output above
FAMILIES = "YOLOv8, YOLOv9, YOLOv10, YOLO11, YOLO12 and YOLO26 detectors"


def level_name(stride: int) -> str:
    return f"p{int(round(math.log2(stride)))}"


@dataclass(frozen=True)
class HeadSpec:
    """What the distillation needs to know of one Detect head."""

    nc: int
    reg_max: int
    strides: tuple[int, ...]
    channels: tuple[int, ...]  # neck channels entering the head, per level
    branches: tuple[str, ...] = ()  # () for a one-branch head; BRANCHES for an end-to-end one

    @property
    def levels(self) -> tuple[str, ...]:
        return tuple(level_name(s) for s in self.strides)

    @property
    def box_channels(self) -> int:
        return 4 * self.reg_max

    @property
    def box_form(self) -> str:
        """'bins' (DFL, reg_max > 1) or 'distances' (reg_max 1)."""
        return "bins" if self.reg_max > 1 else "distances"

    @property
    def end2end(self) -> bool:
        return bool(self.branches)


def detect_head(model) -> torch.nn.Module | None:
    inner = getattr(model, "student_model", model)  # a distillation wrapper around a student
    layers = getattr(inner, "model", None)
    try:
        return layers[-1] if layers is not None else None
    except (TypeError, IndexError):
        return None


def head_spec(model, where: str = "") -> HeadSpec:
    """The spec of a built detection model's head; one clear error for anything else."""
    head = detect_head(model)
    prefix = f"{where}: " if where else ""
    task = getattr(model, "task", None)
    name = type(head).__name__ if head is not None else type(model).__name__
    if task not in (None, "detect") or name not in HEAD_CLASSES:
        what = f"a {task} model" if task and task != "detect" else f"a model with a {name} head"
        raise UserError(f"{prefix}{what} is not supported; softlabel distils {FAMILIES}")
    strides = tuple(int(s) for s in head.stride.tolist())
    if not strides or min(strides) <= 0:
        raise UserError(f"{prefix}the model has no strides; is it a built detection model?")
    end2end = getattr(head, "one2one_cv2", None) is not None
    return HeadSpec(
        nc=int(head.nc),
        reg_max=int(head.reg_max),
        strides=strides,
        channels=tuple(int(seq[0].conv.in_channels) for seq in head.cv2),
        branches=BRANCHES if end2end else (),
    )


def branch_output(preds, branch: str | None) -> dict[str, Tensor]:
    """The `{boxes, scores, feats}` of one branch of a head's training output (an eval-mode `(decoded, raw)`
    pair is unwrapped); a one-branch head's output is its only branch, whatever is asked."""
    raw = preds[1] if isinstance(preds, (tuple, list)) else preds
    if "boxes" in raw:
        return raw
    if branch == "mean":
        many, one = raw["one2many"], raw["one2one"]
        return {**many, "scores": (many["scores"] + one["scores"]) / 2}
    return raw[branch or DEFAULT_BRANCH]


def check_branch(branch: str, where: str) -> str:
    """A teacher branch to keep: one of TEACHER_BRANCHES."""
    if branch not in TEACHER_BRANCHES:
        raise UserError(f"{where}: unknown branch '{branch}'; valid: {', '.join(TEACHER_BRANCHES)}")
    return branch


def distances(boxes: Tensor, reg_max: int, dim: int = 1) -> Tensor:
    """Box outputs [..., 4 * reg_max (on `dim`), ...] -> ltrb distances in grid units [..., 4, ...], as
    Ultralytics' bbox_decode reads them: the expectation over the DFL bins, or the distances themselves."""
    if reg_max <= 1:
        return boxes.float()
    shape = list(boxes.shape)
    split = shape[:dim] + [4, reg_max] + shape[dim + 1 :]
    probs = boxes.float().reshape(split).softmax(dim + 1)
    bins = torch.arange(reg_max, dtype=probs.dtype, device=probs.device)
    view = [1] * probs.ndim
    view[dim + 1] = reg_max
    return (probs * bins.view(view)).sum(dim + 1)


def anchor_norm(feats: list[Tensor], strides: tuple[int, ...]) -> Tensor:
    """[1, 4, A]: per anchor and side, stride / image width (l, r) or stride / image height (t, b), the scale at
    which Ultralytics' BboxLoss compares distances of a reg_max 1 head."""
    h = feats[0].shape[2] * strides[0]
    w = feats[0].shape[3] * strides[0]
    per_anchor = torch.cat([torch.full((f.shape[2] * f.shape[3],), float(s), device=f.device) for f, s in zip(feats, strides)])
    side = torch.tensor([1.0 / w, 1.0 / h, 1.0 / w, 1.0 / h], device=per_anchor.device)
    return (side[:, None] * per_anchor[None, :])[None]
