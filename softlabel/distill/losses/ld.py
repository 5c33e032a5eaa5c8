"""Localization distillation of DFL bin distributions."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .common import _check_pair, _check_temperature, _weighted_mean
from .registry import register


@register("ld", box_form="bins")
class LDLoss(nn.Module):
    """Localization Distillation on DFL bin distributions (Zheng et al., CVPR 2022)."""

    target = "box"

    def __init__(self, temperature: float = 10.0, confidence_weighted: bool = False) -> None:
        # T = 10 is the value the LD paper uses for its GFL heads, which share the DFL parametrisation.
        super().__init__()
        self.temperature = _check_temperature(temperature)
        self.confidence_weighted = confidence_weighted

    def forward(self, student: Tensor, teacher: Tensor, weight: Tensor | None = None) -> Tensor:
        _check_pair(student, teacher, 3, "ld")
        if self.confidence_weighted and weight is None:
            # Box distributions carry no class score, so the confidence must come from the caller.
            raise ValueError("ld(confidence_weighted=True) needs weight=[B, A] teacher confidence")
        b, c, a = student.shape
        if c % 4:
            raise ValueError(f"ld: channel dim {c} is not 4 * reg_max")
        t = self.temperature
        log_q = F.log_softmax(student.float().view(b, 4, c // 4, a) / t, dim=2)
        log_p = F.log_softmax(teacher.detach().float().view(b, 4, c // 4, a) / t, dim=2)
        per_anchor = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(2).mean(1)
        return _weighted_mean(per_anchor, weight) * t * t
