"""Epoch-wise multiplier for the distillation loss."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["DistillSchedule", "WEIGHT_KINDS"]

WEIGHT_KINDS = ("constant", "cosine")


@dataclass
class DistillSchedule:
    """Warm-up, decay and close-mosaic gating of the distillation weight.

    ``epoch`` is 0-based. During the first ``warmup_epochs`` epochs the factor is 0 so the student's
    head settles on ground truth before it is pulled towards the teacher. With ``weight="cosine"`` the
    factor falls from 1 at the first post-warm-up epoch to ``final_ratio`` at the last epoch
    (``epochs - 1``). ``off_when_closed`` switches distillation off during the close-mosaic epochs,
    where the teacher's cached predictions were made on differently augmented images.
    """

    warmup_epochs: int = 0
    weight: str = "constant"
    final_ratio: float = 0.0
    off_when_closed: bool = False

    def __post_init__(self) -> None:
        if self.weight not in WEIGHT_KINDS:
            raise ValueError(f"unknown distillation weight schedule {self.weight!r}; valid: {list(WEIGHT_KINDS)}")
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if self.final_ratio < 0:
            raise ValueError(f"final_ratio must be >= 0, got {self.final_ratio}")

    def factor(self, epoch: int, epochs: int, closing: bool) -> float:
        """Multiplier for the distillation loss at 0-based ``epoch`` of ``epochs``."""
        if self.weight not in WEIGHT_KINDS:  # the dataclass is mutable, so re-check
            raise ValueError(f"unknown distillation weight schedule {self.weight!r}; valid: {list(WEIGHT_KINDS)}")
        if epochs <= 0:
            raise ValueError(f"epochs must be > 0, got {epochs}")
        if epoch < self.warmup_epochs or (closing and self.off_when_closed):
            return 0.0
        if self.weight == "constant":
            return 1.0
        span = epochs - 1 - self.warmup_epochs
        progress = 1.0 if span <= 0 else min(max((epoch - self.warmup_epochs) / span, 0.0), 1.0)
        return self.final_ratio + (1.0 - self.final_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
