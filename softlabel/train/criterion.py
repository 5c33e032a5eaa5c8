"""The student's criterion: Ultralytics' detection loss plus the distillation terms."""

from __future__ import annotations

import torch
from ultralytics.utils.loss import v8DetectionLoss

from softlabel.distill.distiller import Distiller


class DistillLoss(v8DetectionLoss):
    """Ultralytics' detection loss plus the distillation terms, each its own loss item."""

    def __init__(self, model, distiller: Distiller, student_levels: list[str]):
        super().__init__(model)
        self.distiller = distiller
        self.student_levels = student_levels

    def loss(self, preds, batch):
        bs = preds["boxes"].shape[0]
        det, items = self.get_assigned_targets_and_loss(preds, batch)[1:]
        if "teacher" in batch:
            terms = self.distiller(preds, batch["teacher"], self.student_levels)
        else:  # a batch without teacher tensors (validation): the terms read zero
            terms = {k: det.new_zeros(()) for k in self.distiller.item_names}
        loss = torch.cat([det, *(v.reshape(1) for v in terms.values())])
        items.update({k: v.detach() for k, v in terms.items()})
        return loss * bs, items
