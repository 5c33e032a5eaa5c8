"""Distillation losses for Ultralytics YOLO detectors and the registry that builds them.

Every loss is an ``nn.Module`` whose ``forward(student, teacher, weight=None)`` returns a scalar and
whose class attribute ``target`` names the head tensor it consumes:

* ``"cls"``  class logits ``[B, nc, A]`` (independent sigmoids per class),
* ``"box"``  the box regression, in the form the class attribute ``box_form`` names:
  ``"bins"``, box distributions ``[B, 4 * reg_max, A]`` (sides ltrb, bins minor, reg_max > 1), or
  ``"distances"``, the decoded ltrb distances ``[B, 4, A]`` in grid units; a distance loss also takes
  ``norm``, a factor broadcastable to ``[B, 4, A]`` applied to both sides first,
* ``"feat"`` one feature level ``[B, C, H, W]`` with the student already projected to teacher channels.

``weight`` is an optional non-negative anchor weight ``[B, A]``; feature losses take the slice of it
that belongs to their level, ``[B, H * W]`` or ``[B, H, W]``. Weighted losses divide by the weight
sum, so a weight acts like a mask whose scale does not change the loss magnitude.

Each loss lives in its own module of this package, named after the name it registers under; every
module here but ``registry`` and ``common`` is imported below, so adding a loss is adding one file.
"""

from __future__ import annotations

import importlib
import pkgutil

from .registry import LOSSES, TARGETS, build_loss, init_args, register

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("registry", "common"):
        importlib.import_module(f"{__name__}.{_module.name}")
del _module

from .bce import BCEDistill  # noqa: E402
from .cwd import CWDLoss  # noqa: E402
from .dist_iou import DistanceIoUDistill  # noqa: E402
from .dist_l1 import DistanceL1Distill  # noqa: E402
from .kl_cls import KLClassDistill  # noqa: E402
from .ld import LDLoss  # noqa: E402
from .mgd import MGDLoss  # noqa: E402
from .mimic import MimicLoss  # noqa: E402
from .mse_logits import MSELogitsDistill  # noqa: E402

__all__ = [
    "LOSSES",
    "TARGETS",
    "register",
    "build_loss",
    "init_args",
    "BCEDistill",
    "KLClassDistill",
    "MSELogitsDistill",
    "LDLoss",
    "MimicLoss",
    "CWDLoss",
    "MGDLoss",
    "DistanceL1Distill",
    "DistanceIoUDistill",
]
