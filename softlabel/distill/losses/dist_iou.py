"""IoU distillation of decoded box distances."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .common import _check_distances, _weighted_mean
from .registry import register


@register("dist_iou", box_form="distances")
class DistanceIoUDistill(nn.Module):
    """IoU loss of the boxes that ltrb distances span around one point (UnitBox, Yu et al., ACM MM 2016)."""

    target = "box"

    EPS = 1e-7

    def __init__(self, confidence_weighted: bool = False) -> None:
        super().__init__()
        self.confidence_weighted = confidence_weighted

    def forward(self, student: Tensor, teacher: Tensor, weight: Tensor | None = None,
                norm: Tensor | None = None) -> Tensor:
        """``1 - IoU`` per anchor of the student's and the teacher's box around the anchor point, then the mean
        over anchors, weighted by ``weight`` ``[B, A]`` when given.

        ``student``, ``teacher``: ltrb distances ``[B, 4, A]`` in grid units, negative ones read as 0. Both
        boxes share the anchor point, so they overlap by min(l) + min(r) in width and min(t) + min(b) in
        height. ``norm`` is accepted for the same call as the other distance losses and ignored: scaling
        l, r by one factor and t, b by another leaves the IoU unchanged. Two empty boxes count as IoU 0."""
        _check_distances(student, teacher, "dist_iou")
        if self.confidence_weighted and weight is None:
            raise ValueError("dist_iou(confidence_weighted=True) needs weight=[B, A] teacher confidence")
        sl, st, sr, sb = student.float().clamp_min(0).unbind(1)
        tl, tt, tr, tb = teacher.detach().float().clamp_min(0).unbind(1)
        inter_w = (torch.minimum(sl, tl) + torch.minimum(sr, tr)).clamp_min(0)
        inter_h = (torch.minimum(st, tt) + torch.minimum(sb, tb)).clamp_min(0)
        inter = inter_w * inter_h
        union = (sl + sr) * (st + sb) + (tl + tr) * (tt + tb) - inter + self.EPS
        per_anchor = 1 - inter / union
        return _weighted_mean(per_anchor, weight)
