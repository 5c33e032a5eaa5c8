"""L1 distillation of decoded box distances."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .common import _check_distances, _weighted_mean
from .registry import register


@register("dist_l1", box_form="distances")
class DistanceL1Distill(nn.Module):
    """L1 on ltrb distances, the regression term of Ultralytics' BboxLoss for reg_max 1 heads, teacher as target."""

    target = "box"

    def __init__(self, confidence_weighted: bool = False) -> None:
        super().__init__()
        self.confidence_weighted = confidence_weighted

    def forward(self, student: Tensor, teacher: Tensor, weight: Tensor | None = None,
                norm: Tensor | None = None) -> Tensor:
        """Mean over the sides l, t, r, b of ``|norm * (student - teacher)|`` per anchor, then the mean over
        anchors, weighted by ``weight`` ``[B, A]`` when given.

        ``student``, ``teacher``: ltrb distances ``[B, 4, A]`` in grid units. ``norm``: a factor broadcastable
        to ``[B, 4, A]`` that multiplies both first; stride / image width for l and r and stride / image
        height for t and b give the image-relative distances Ultralytics compares."""
        _check_distances(student, teacher, "dist_l1")
        if self.confidence_weighted and weight is None:
            raise ValueError("dist_l1(confidence_weighted=True) needs weight=[B, A] teacher confidence")
        s, t = student.float(), teacher.detach().float()
        if norm is not None:
            try:
                fits = torch.broadcast_shapes(norm.shape, s.shape) == s.shape
            except RuntimeError:
                fits = False
            if not fits:
                raise ValueError(f"dist_l1: norm shape {tuple(norm.shape)} does not broadcast to {tuple(s.shape)}")
            norm = norm.to(device=s.device, dtype=s.dtype)
            s, t = s * norm, t * norm
        per_anchor = (s - t).abs().mean(1)
        return _weighted_mean(per_anchor, weight)
