"""Soft-target sigmoid distillation of class logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common import _check_pair, _check_temperature, _weighted_mean
from .registry import register


@register("bce", sparse_teacher=True)
class BCEDistill(nn.Module):
    """Soft-target sigmoid distillation (Hinton et al., 2015, per-class Bernoulli form used by YOLO heads)."""

    target = "cls"

    def __init__(self, temperature: float = 1.0, confidence_weighted: bool = False) -> None:
        super().__init__()
        self.temperature = _check_temperature(temperature)
        self.confidence_weighted = confidence_weighted

    def forward(self, student: Tensor, teacher: Tensor, weight: Tensor | None = None) -> Tensor:
        _check_pair(student, teacher, 3, "bce")
        teacher = teacher.detach()
        t = self.temperature
        s_logit, t_logit = student.float() / t, teacher.float() / t
        p = torch.sigmoid(t_logit)
        # BCE(s, p) - BCE(t, p) is the Bernoulli KL: it removes the teacher-entropy floor so the loss
        # is exactly 0 at agreement. logsigmoid keeps it finite for saturated logits.
        kl = p * (F.logsigmoid(t_logit) - F.logsigmoid(s_logit)) + (1 - p) * (
            F.logsigmoid(-t_logit) - F.logsigmoid(-s_logit)
        )
        # Summing over classes treats each anchor as one multi-label prediction; a class mean would
        # shrink a single-class disagreement by nc (80 on COCO) and make the scale dataset dependent.
        per_anchor = kl.sum(1)
        if self.confidence_weighted:
            conf = torch.sigmoid(teacher.float()).amax(1)
            weight = conf if weight is None else weight * conf
        # T^2 keeps gradient magnitude comparable across temperatures (Hinton et al.).
        return _weighted_mean(per_anchor, weight) * t * t

    def forward_sparse(self, student: Tensor, index: Tensor, kept: Tensor, background: Tensor) -> Tensor:
        """forward(student, teacher) unweighted, for a teacher that is ``background`` [B, nc] at every anchor but
        the kept ones: ``index`` [B, K] (-1 unused, distinct otherwise) with logits ``kept`` [B, K, nc].

        Per element the KL is softplus(s) - p*s - (softplus(t) - p*t). Summed over a background anchor run, p is
        one number per image and class, so only softplus(s) and the sum of s pass over every anchor; the
        teacher's dense logits never exist. With a 640 px, 80-class student this is one transcendental pass
        over [B, 80, 8400] instead of five."""
        if self.confidence_weighted:
            raise ValueError("bce: forward_sparse computes the unweighted loss only")
        b, nc, a = student.shape
        t = self.temperature
        s = student.float() / t
        used = index >= 0
        bi, j = used.nonzero(as_tuple=True)
        anchor = index[bi, j].long()
        t_bg = background.detach().float() / t  # [B, nc]
        t_kept = kept.detach().float()[bi, j] / t  # [N, nc]
        p_bg, p_kept = torch.sigmoid(t_bg), torch.sigmoid(t_kept)
        s_kept = s[bi, :, anchor]  # [N, nc]
        n_bg = (a - used.sum(1)).float()[:, None]  # [B, 1] background anchors per image
        # per image and class, summed over anchors: softplus(s) - p * s, with p = p_bg except at the kept anchors,
        # less the teacher's own term; grouped per image and class before the total to limit cancellation
        background_part = F.softplus(s).sum(2) - p_bg * s.sum(2) - n_bg * (F.softplus(t_bg) - p_bg * t_bg)
        kept_part = -(p_kept - p_bg[bi]) * s_kept - (F.softplus(t_kept) - p_kept * t_kept)
        return (background_part.sum() + kept_part.sum()) / (b * a) * t * t
