"""Distillation: losses (one registry, one file each), named terms over them, feature adapters, schedules, the
distiller that sums the terms, and the model that wraps a student with them."""

from .adapters import FeatureAdapters
from .losses import LOSSES, TARGETS, build_loss, register
from .schedule import DistillSchedule

__all__ = ["LOSSES", "TARGETS", "build_loss", "register", "FeatureAdapters", "DistillSchedule"]
