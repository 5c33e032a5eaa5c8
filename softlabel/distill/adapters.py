"""Per-level projections from student feature channels to teacher feature channels."""

from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FeatureAdapters", "ADAPTERS"]

ADAPTERS = ("conv", "mlp", "mlp_narrow")


def _projector(kind: str, cs: int, ct: int) -> nn.Module:
    if kind == "conv":
        return nn.Conv2d(cs, ct, 1)
    # Two 1x1 layers with a ReLU between (the projector of Ultralytics' own distillation): a nonlinear
    # map can match the teacher without bending the student's own features as hard. "mlp" is as wide
    # as the teacher, (cs + ct) / cs times the cost of "conv"; "mlp_narrow" as wide as the student,
    # (cs + ct) / ct times, which matters when a small student learns from a wide teacher.
    hidden = ct if kind == "mlp" else cs
    return nn.Sequential(nn.Conv2d(cs, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, ct, 1))


class FeatureAdapters(nn.Module):
    """1x1 adapters (FitNets-style regressors) mapping student to teacher channels per level.

    ``kind`` is ``"conv"`` (one 1x1 convolution), ``"mlp"`` (1x1, ReLU, 1x1 with a hidden width of the
    teacher's channels) or ``"mlp_narrow"`` (the same with the student's channels).
    """

    def __init__(self, student_channels: Sequence[int], teacher_channels: Sequence[int], kind: str = "conv") -> None:
        super().__init__()
        if kind not in ADAPTERS:
            raise ValueError(f"adapter must be one of {list(ADAPTERS)}, got {kind!r}")
        self.kind = kind
        student_channels, teacher_channels = list(student_channels), list(teacher_channels)
        if len(student_channels) != len(teacher_channels):
            raise ValueError(
                f"student has {len(student_channels)} feature levels {student_channels}, "
                f"teacher has {len(teacher_channels)} {teacher_channels}"
            )
        if not student_channels or min(student_channels + teacher_channels) <= 0:
            raise ValueError(f"channels must be positive and non-empty, got {student_channels} -> {teacher_channels}")
        self.student_channels = student_channels
        self.teacher_channels = teacher_channels
        # Plain conv with bias: the losses compare against raw teacher maps, so the adapter needs an
        # offset, and BN statistics would drift between the small distillation batches and eval.
        self.convs = nn.ModuleList(_projector(kind, cs, ct) for cs, ct in zip(student_channels, teacher_channels))

    def forward(self, feats: Sequence[Tensor], teacher_feats: Sequence[Tensor] | None = None) -> list[Tensor]:
        """Project student ``feats``; when ``teacher_feats`` is given, check the shapes line up with it."""
        if len(feats) != len(self.convs):
            raise ValueError(f"expected {len(self.convs)} feature levels, got {len(feats)}")
        if teacher_feats is not None and len(teacher_feats) != len(feats):
            raise ValueError(f"student gave {len(feats)} feature levels, teacher {len(teacher_feats)}")
        out = []
        for level, (conv, f) in enumerate(zip(self.convs, feats)):
            cin = self.student_channels[level]
            if f.ndim != 4 or f.shape[1] != cin:
                raise ValueError(f"level {level}: expected student map [B, {cin}, H, W], got {tuple(f.shape)}")
            if teacher_feats is not None:
                self.check_teacher(level, f, teacher_feats[level])
            out.append(conv(f))
        return out

    def check_teacher(self, level: int, student_map: Tensor, teacher_map: Tensor) -> None:
        """Raise unless the teacher's map has the student map's batch and spatial size and the adapter's output channels."""
        f, t, cout = student_map, teacher_map, self.teacher_channels[level]
        if t.ndim != 4 or t.shape[0] != f.shape[0] or t.shape[2:] != f.shape[2:]:
            raise ValueError(
                f"level {level}: student map {tuple(f.shape)} and teacher map {tuple(t.shape)} differ in batch or spatial size"
            )
        if t.shape[1] != cout:
            raise ValueError(f"level {level}: adapter outputs {cout} channels, teacher map {tuple(t.shape)} has {t.shape[1]}")

    def rows(self, level: int, x: Tensor) -> Tensor:
        """Project student feature vectors ``x`` ``[N, C_student]`` (positions gathered from level
        ``level``) to ``[N, C_teacher]``: the same layers as ``forward``, as matrix products."""
        cin = self.student_channels[level]
        if x.ndim != 2 or x.shape[1] != cin:
            raise ValueError(f"level {level}: expected student rows [N, {cin}], got {tuple(x.shape)}")
        projector = self.convs[level]
        for layer in projector if isinstance(projector, nn.Sequential) else [projector]:
            # a 1x1 convolution is a linear map over channels; F.linear skips the convolution path,
            # which on CPU is several times slower for these shapes
            x = F.linear(x, layer.weight.flatten(1), layer.bias) if isinstance(layer, nn.Conv2d) else layer(x)
        return x
