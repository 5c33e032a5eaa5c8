"""Distillation losses, feature adapters and loss-weight schedules."""

from .adapters import FeatureAdapters
from .losses import LOSSES, TARGETS, build_loss, register
from .schedule import DistillSchedule

__all__ = ["LOSSES", "TARGETS", "build_loss", "register", "FeatureAdapters", "DistillSchedule"]
