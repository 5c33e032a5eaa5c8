"""Phase two: train students against the cache (or a live teacher).

plan (which view an epoch replays), sampler (the epoch-carrying order), dataset (replayed samples
plus teacher tensors, and their collate), trainer (the DetectionTrainer subclass that wraps the
student with its distillation terms), checkpoint (best.pt as a plain student), cachecheck (what a
trainer refuses), runner (several students in turn, one table), stream (one batch stream that several
trainers read), members (a cohort's students and sweeps), turns (their set-up one at a time), cohortfile
(the cohort folder and its manifest) and cohort (the members trained at once on one stream).
"""

from softlabel.student import resolve_student
from softlabel.train.cachecheck import check_cache_matches, check_config_fits_cache, check_epoch
from softlabel.train.dataset import DistillDataset, stack_teacher
from softlabel.train.plan import ViewPlan
from softlabel.train.runner import StudentResult, render_table, train_students
from softlabel.train.sampler import EpochSampler
from softlabel.train.trainer import DistillTrainer, _replay_an_epoch_begun_again, make_trainer

__all__ = [
    "DistillDataset",
    "DistillTrainer",
    "EpochSampler",
    "StudentResult",
    "ViewPlan",
    "check_cache_matches",
    "check_config_fits_cache",
    "check_epoch",
    "make_trainer",
    "render_table",
    "resolve_student",
    "stack_teacher",
    "train_students",
]
