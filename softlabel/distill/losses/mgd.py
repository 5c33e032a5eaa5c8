"""Masked generative distillation of feature maps."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .common import _check_pair, _position_weight, _weighted_mean
from .registry import register


@register("mgd")
class MGDLoss(nn.Module):
    """Masked Generative Distillation (Yang et al., ECCV 2022)."""

    target = "feat"

    def __init__(self, channels: int, lambda_mgd: float = 0.65, seed: int | None = None) -> None:
        super().__init__()
        if not 0.0 <= lambda_mgd < 1.0:
            raise ValueError(f"lambda_mgd must be in [0, 1), got {lambda_mgd}")
        self.channels = int(channels)
        self.lambda_mgd = float(lambda_mgd)
        self.generation = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1),
        )
        # A private generator makes the mask sequence reproducible without touching global RNG state.
        self._rng: torch.Generator | None = None
        if seed is not None:
            self._rng = torch.Generator().manual_seed(seed)

    def forward(self, student: Tensor, teacher: Tensor, weight: Tensor | None = None) -> Tensor:
        _check_pair(student, teacher, 4, "mgd")
        b, c, h, w = student.shape
        if c != self.channels:
            raise ValueError(f"mgd was built for {self.channels} channels, got {c}")
        # Drawn on CPU so the same seed gives the same mask on any device.
        rand = torch.rand((b, 1, h, w), generator=self._rng)
        keep = (rand >= self.lambda_mgd).to(device=student.device, dtype=student.dtype)
        recon = self.generation(student * keep)
        per_pos = (recon.float() - teacher.detach().float()).pow(2).mean(1).flatten(1)
        return _weighted_mean(per_pos, _position_weight(weight, student))
