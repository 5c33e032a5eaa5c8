"""A student checkpoint as Ultralytics writes it for a plain model: the distillation wrapper taken out."""

from __future__ import annotations

from pathlib import Path

import torch

from softlabel import trust
from softlabel.distill.model import DistillModel


def plain_checkpoint(path: str | Path) -> bool:
    """Rewrite a checkpoint whose model is a DistillModel so that it holds the student alone; True if it did.

    The file is replaced whole (written beside it, then renamed), so a crash leaves the old or the new one."""
    from ultralytics.nn.tasks import torch_safe_load

    path = Path(path)
    # as every checkpoint is read: safe unless the user trusts their files (a student may hold their own classes).
    # Nothing silences stdout here: that is process-wide, and a cohort's other students print from their threads.
    ckpt, _ = torch_safe_load(str(path), safe_only=not trust.trusted())
    changed = False
    for key in ("model", "ema"):
        if isinstance(ckpt.get(key), DistillModel):
            ckpt[key] = ckpt[key].student_model
            changed = True
    if changed:
        tmp = path.with_name(path.name + ".tmp")
        torch.save(ckpt, tmp)
        tmp.replace(path)
    return changed
