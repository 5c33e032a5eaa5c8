"""Tensor checks and reductions shared by the losses."""

from __future__ import annotations

from torch import Tensor


def _check_pair(student: Tensor, teacher: Tensor, ndim: int, what: str) -> None:
    if student.shape != teacher.shape:
        raise ValueError(f"{what}: student shape {tuple(student.shape)} != teacher shape {tuple(teacher.shape)}")
    if student.ndim != ndim:
        raise ValueError(f"{what}: expected {ndim}-d tensors, got shape {tuple(student.shape)}")


def _weighted_mean(values: Tensor, weight: Tensor | None) -> Tensor:
    """Mean of ``values`` ``[B, N]``, weighted by ``weight`` ``[B, N]`` when given."""
    if weight is None:
        return values.mean()
    if weight.shape != values.shape:
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match {tuple(values.shape)}")
    weight = weight.to(values.dtype)
    # Clamping keeps an all-zero mask at a loss of exactly 0 instead of NaN.
    return (values * weight).sum() / weight.sum().clamp_min(1e-12)


def _position_weight(weight: Tensor | None, feat: Tensor) -> Tensor | None:
    """Flatten a level's anchor weight to ``[B, H * W]`` to match ``feat`` ``[B, C, H, W]``."""
    if weight is None:
        return None
    b, _, h, w = feat.shape
    if weight.shape not in ((b, h * w), (b, h, w)):
        raise ValueError(f"feature weight must be [B, H*W] or [B, H, W] = {(b, h * w)} or {(b, h, w)}, "
                         f"got {tuple(weight.shape)}")
    return weight.reshape(b, h * w)


def _check_temperature(temperature: float) -> float:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return float(temperature)


def _check_distances(student: Tensor, teacher: Tensor, what: str) -> None:
    """Student and teacher must both be ltrb distances ``[B, 4, A]``."""
    _check_pair(student, teacher, 3, what)
    if student.shape[1] != 4:
        raise ValueError(f"{what}: expected ltrb distances [B, 4, A], got shape {tuple(student.shape)}")
