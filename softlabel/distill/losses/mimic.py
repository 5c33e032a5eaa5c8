"""Feature imitation with an MSE hint loss."""

from __future__ import annotations

from torch import Tensor, nn

from .common import _check_pair, _position_weight, _weighted_mean
from .registry import register


@register("mimic")
class MimicLoss(nn.Module):
    """Feature imitation with an MSE hint loss (FitNets, Romero et al., ICLR 2015)."""

    target = "feat"

    NORMALIZE = ("channel", "global", "none")
    # Also takes rows: student and teacher [N, C], the feature vectors at N gathered positions, and
    # a weight [N]. The Distiller passes rows when the feature term keeps only some positions.
    accepts_rows = True

    def __init__(self, eps: float = 1e-5, confidence_weighted: bool = False, normalize: str = "channel") -> None:
        super().__init__()
        if normalize not in self.NORMALIZE:
            raise ValueError(f"normalize must be one of {list(self.NORMALIZE)}, got {normalize!r}")
        self.eps = eps
        # Positions weighted by the teacher's best class score (the caller passes it as ``weight``):
        # the features worth copying are where the teacher sees an object, not the empty background.
        self.confidence_weighted = confidence_weighted
        self.normalize = normalize

    def forward(self, student: Tensor, teacher: Tensor, weight: Tensor | None = None) -> Tensor:
        rows = student.ndim == 2
        _check_pair(student, teacher, 2 if rows else 4, "mimic")
        if self.confidence_weighted and weight is None:
            raise ValueError("mimic(confidence_weighted=True) needs weight=[B, H*W] (or [N] for rows) teacher confidence")
        teacher = teacher.detach().float()
        diff = student.float() - teacher
        pooled = (0,) if rows else (0, 2, 3)
        # Dividing by the *teacher's* spread removes the arbitrary magnitude of the tapped layer while
        # staying one shared map, so the loss is zero only when the maps are equal. "channel" gives
        # every channel the same say, near-constant ones included; "global" keeps the teacher's own
        # balance between channels, as the plain MSE ("none") does. Statistics pool batch and space
        # so a tiny P5 map (even 1x1) still gives a usable scale; rows pool the gathered positions.
        if self.normalize == "channel":
            diff = diff / (teacher.std(pooled, keepdim=True, unbiased=False) + self.eps)
        elif self.normalize == "global":
            diff = diff / (teacher.std(unbiased=False) + self.eps)
        if rows:
            return _weighted_mean(diff.pow(2).mean(1), weight)
        per_pos = diff.pow(2).mean(1).flatten(1)
        return _weighted_mean(per_pos, _position_weight(weight, student))
