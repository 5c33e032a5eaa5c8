"""Softmax-over-classes KL distillation of class logits."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .common import _check_pair, _check_temperature, _weighted_mean
from .registry import register


@register("kl_cls")
class KLClassDistill(nn.Module):
    """Softmax-over-classes KL distillation (Hinton et al., 2015)."""

    target = "cls"

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = _check_temperature(temperature)

    def forward(self, student: Tensor, teacher: Tensor, weight: Tensor | None = None) -> Tensor:
        _check_pair(student, teacher, 3, "kl_cls")
        t = self.temperature
        log_q = F.log_softmax(student.float() / t, dim=1)
        log_p = F.log_softmax(teacher.detach().float() / t, dim=1)
        per_anchor = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(1)
        return _weighted_mean(per_anchor, weight) * t * t
