"""Regression of class logits."""

from __future__ import annotations

from torch import Tensor, nn

from .common import _check_pair, _weighted_mean
from .registry import register


@register("mse_logits")
class MSELogitsDistill(nn.Module):
    """Logit regression (Ba & Caruana, "Do Deep Nets Really Need to be Deep?", 2014)."""

    target = "cls"

    def forward(self, student: Tensor, teacher: Tensor, weight: Tensor | None = None) -> Tensor:
        _check_pair(student, teacher, 3, "mse_logits")
        per_anchor = (student.float() - teacher.detach().float()).pow(2).mean(1)
        return _weighted_mean(per_anchor, weight)
