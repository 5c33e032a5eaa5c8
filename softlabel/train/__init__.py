"""Phase two: train students against the cache (or a live teacher).

plan (which view an epoch replays), sampler (the epoch-carrying order), dataset (replayed samples
plus teacher tensors, and their collate), criterion (detection loss plus distillation terms),
trainer (the DetectionTrainer subclass), cachecheck (what a trainer refuses), runner (several
students, one table).
"""

from softlabel.student import resolve_student
from softlabel.train.cachecheck import check_cache_matches, check_config_fits_cache, check_epoch
from softlabel.train.criterion import DistillLoss
from softlabel.train.dataset import DistillDataset, stack_teacher
from softlabel.train.plan import ViewPlan
from softlabel.train.runner import StudentResult, render_table, train_students
from softlabel.train.sampler import EpochSampler
from softlabel.train.trainer import (
    DISTILL_STATE,
    DistillTrainer,
    _replay_an_epoch_begun_again,
    add_param_groups,
    make_trainer,
    student_levels,
)

__all__ = [
    "DISTILL_STATE",
    "DistillDataset",
    "DistillLoss",
    "DistillTrainer",
    "EpochSampler",
    "StudentResult",
    "ViewPlan",
    "add_param_groups",
    "check_cache_matches",
    "check_config_fits_cache",
    "check_epoch",
    "make_trainer",
    "render_table",
    "resolve_student",
    "stack_teacher",
    "student_levels",
    "train_students",
]
