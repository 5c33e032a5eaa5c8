"""Channel-wise distillation of feature maps."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .common import _check_pair, _check_temperature
from .registry import register


@register("cwd")
class CWDLoss(nn.Module):
    """Channel-wise Knowledge Distillation for dense prediction (Shu et al., ICCV 2021)."""

    target = "feat"

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        self.temperature = _check_temperature(temperature)

    def forward(self, student: Tensor, teacher: Tensor, weight: Tensor | None = None) -> Tensor:
        _check_pair(student, teacher, 4, "cwd")
        if weight is not None:
            # Each channel is one distribution over all positions; masking positions would no longer
            # compare normalised distributions.
            raise ValueError("cwd normalises over all spatial positions and does not accept a weight")
        t = self.temperature
        log_q = F.log_softmax(student.float().flatten(2) / t, dim=2)
        log_p = F.log_softmax(teacher.detach().float().flatten(2) / t, dim=2)
        per_channel = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(2)
        return per_channel.mean() * t * t
