"""A thin DetectionTrainer subclass that trains a student against the cache (or a live teacher).

What stays Ultralytics': the model, the detection loss and its assignment (the student's own
criterion), optimizer, schedule, EMA, AMP, validation, checkpoints, resume and NaN recovery. What is
ours: the training dataset (replayed samples plus teacher tensors), the epoch-carrying sampler, and
the distillation terms, which a DistillModel wraps with the student so that DDP, the EMA, last.pt,
resume and NaN recovery treat them as part of the model. best.pt holds the plain student.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from ultralytics.data.build import InfiniteDataLoader
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.utils import LOGGER, RANK
from ultralytics.utils.torch_utils import unwrap_model

from softlabel.augment import load_augment
from softlabel.cache.lock import ReadLock
from softlabel.cache.reader import CacheReader
from softlabel.data import build_index, load_data_yaml
from softlabel.distill.config import load_distill
from softlabel.distill.distiller import Distiller, TeacherBatch, split_head
from softlabel.distill.model import DistillModel
from softlabel.errors import UserError
from softlabel.heads import head_spec
from softlabel.prune import pruned_model_or_none
from softlabel.replay import Replay
from softlabel.teacher import Teacher
from softlabel.train.cachecheck import check_cache_matches, check_config_fits_cache, check_epoch, check_student_fits
from softlabel.train.checkpoint import plain_checkpoint
from softlabel.train.dataset import DistillDataset
from softlabel.train.plan import ViewPlan, views_advice
from softlabel.train.sampler import EpochSampler
from softlabel.views import DEFAULT_VIEWS

class DistillTrainer(DetectionTrainer):
    """Settings arrive as class attributes (Ultralytics refuses unknown training arguments), see make_trainer."""

    cache: str | None = None
    teacher_path: str | None = None
    distill_config: str | None = None
    replay_seed: int = 0  # online mode; a cache carries its own
    augment_config: str | None = None  # online mode
    views: int = DEFAULT_VIEWS  # online mode, as a dump's default
    close_views: int = 1  # online mode
    teacher_half: bool | None = None  # online mode: float16 teacher on CUDA; None follows the student's amp
    # a cohort (softlabel.train.cohort): the batch stream its students share, this student's name in it, what
    # they share once (the live teacher), and the turn that sets the students up one at a time
    cohort: Any = None
    cohort_member: str | None = None
    cohort_shared: Any = None
    cohort_turn: Any = None

    def _teacher_half(self) -> bool:
        if self.teacher_half is not None:
            return bool(self.teacher_half)
        return self.args.amp not in (False, "fp32", "False")

    def get_model(self, cfg=None, weights=None, verbose=True):
        if isinstance(weights, DistillModel):  # resuming: the student is rebuilt here, its terms once it is wrapped
            self._resumed_projector = weights.projector
            weights = weights.student_model
        # a pruned student keeps its own narrower layers: Ultralytics would rebuild it from its yaml at full width
        pruned = pruned_model_or_none(weights, self.data["nc"])
        return pruned if pruned is not None else super().get_model(cfg, weights, verbose)

    def train(self):
        # the whole run, every rank alike (shared locks coexist): no dump may write or remove the cache under it
        with ReadLock(self.cache) if self.cache else nullcontext():
            return super().train()

    # -- data ------------------------------------------------------------------------------

    def _open_sources(self) -> None:
        if getattr(self, "_sources_open", False):
            return
        self._sources_open = True
        spec = load_data_yaml(self.args.data)
        index = build_index(spec, "train", check_images=False)
        self.reader = None
        self.live_teacher = None
        imgsz = int(self.args.imgsz)
        if self.cache:
            reader = CacheReader(self.cache)
            desc = reader.description
            check_cache_matches(desc, spec, index, imgsz, self.cache)
            reader.require_complete()
            self.replay = Replay(index, desc.augment.config, imgsz, desc.augment.seed)
            self.teacher_levels = list(desc.storage.levels)
            self.teacher_channels = [desc.teacher.channels(lvl) for lvl in self.teacher_levels]
            self.teacher_head = desc.teacher
            views, close_views = desc.augment.views, desc.augment.close_views
            self.reader = reader
        else:
            load = lambda: Teacher.load(self.teacher_path, device=self.device, amp=self._teacher_half())  # noqa: E731
            teacher = self.cohort_shared.once("teacher", load) if self.cohort_shared is not None else load()
            if teacher.info.nc != spec.nc:
                raise UserError(f"{self.teacher_path}: teacher predicts {teacher.info.nc} classes but {spec.yaml_path} has nc={spec.nc}")
            self.live_teacher = teacher
            self.replay = Replay(index, load_augment(self.augment_config), imgsz, self.replay_seed)
            self.teacher_levels = list(teacher.info.levels)
            self.teacher_channels = list(teacher.info.feature_channels)
            self.teacher_head = teacher.info
            views, close_views = self.views, self.close_views
        if self.args.close_mosaic and close_views < 1:
            raise UserError(
                f"close_mosaic={self.args.close_mosaic} needs closing views, but the cache has none "
                "(dump with --close-views 1 or more, or train with --close-mosaic 0)"
            )
        self.plan = ViewPlan(self.epochs, int(self.args.close_mosaic), views, close_views)
        advice = views_advice(self.plan)
        if advice and RANK in {-1, 0}:
            LOGGER.warning(f"{self.cache or self.teacher_path}: {advice}")

    def build_dataset(self, img_path, mode="train", batch=None):
        if mode != "train":
            return super().build_dataset(img_path, mode, batch)
        if self.args.rect or self.args.multi_scale:
            raise UserError("rect and multi_scale training change image shapes after replay; they cannot use a cache")
        self._open_sources()
        return DistillDataset(self.replay, self.plan, self.reader)

    def _check_student(self) -> None:
        # as built for this data: the same head checks as before training starts (runner), and the classes
        model = unwrap_model(self.model)
        nc, t, where = head_spec(model).nc, self.teacher_head, self.cache or self.teacher_path
        if nc != t.nc:
            raise UserError(f"{where}: the student has classes {nc} but the teacher has classes {t.nc}")
        check_student_fits(str(self.args.model), model, t, where)

    def get_dataloader(self, dataset_path, batch_size=16, rank=0, mode="train"):
        if mode != "train":
            return super().get_dataloader(dataset_path, batch_size, rank, mode)
        build = lambda: self._train_loader(dataset_path, batch_size, rank)  # noqa: E731
        if self.cohort is not None:
            if self.world_size > 1:
                raise UserError("a cohort trains in one process; DDP (several devices) is not supported with --cohort")
            view = self.cohort.view(self.cohort_member, build)
            if view.batch_size == batch_size:
                self.epoch_sampler = view.sampler
                return view
            view.close()  # a batch other than the cohort's (an out-of-memory retry halved it): this student reads alone
        loader = build()
        self.epoch_sampler = loader.sampler
        return loader

    def _train_loader(self, dataset_path, batch_size: int, rank: int) -> InfiniteDataLoader:
        dataset = self.build_dataset(dataset_path, "train", batch_size)
        world = max(self.world_size, 1)
        workers = min(self.args.workers, batch_size)  # Ultralytics has set 0 on a CPU already
        sampler = EpochSampler(len(dataset), int(self.args.seed), rank=max(rank, 0), world=world,
                               groups=dataset.epoch_groups, batch=batch_size, workers=workers)
        return InfiniteDataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=workers,
            collate_fn=DistillDataset.collate_fn,
            pin_memory=self.device.type == "cuda",
            drop_last=False,
        )

    def preprocess_batch(self, batch: dict) -> dict:
        slot = batch.pop("cohort_slot", None)
        check_epoch(batch, self.epoch)
        if slot is None:
            return self._to_device(batch)
        # a cohort's batch: the first student to get here moves it to the device (and runs the live teacher on it)
        # once for all; each gets its own dict of the shared tensors, which nothing downstream writes into
        return dict(slot.once("batch", lambda: self._to_device(batch)))

    def _to_device(self, batch: dict) -> dict:
        batch = super().preprocess_batch(batch)
        if self.live_teacher is not None:
            out = self.live_teacher(batch["img"])
            batch["teacher"] = TeacherBatch(head=split_head(out.head), feats=dict(zip(self.teacher_levels, out.feat)))
        elif "teacher" in batch:  # the cache's arrays, as stored, go to the student's device; the distiller expands them there
            batch["teacher"] = batch["teacher"].to(self.device, non_blocking=True)
        return batch

    def _close_dataloader_mosaic(self):
        super()._close_dataloader_mosaic()
        # the old iterator may have drawn ahead; the new one starts at this epoch
        self.epoch_sampler.next_epoch = self.epoch

    def label_loss_items(self, loss_items=None, prefix="train"):
        # validation batches carry no teacher tensors, so a val/kd_* column would only ever hold zeros
        out = super().label_loss_items(loss_items, prefix)
        if prefix != "val":
            return out
        kd = lambda key: key.split("/", 1)[-1].startswith("kd_")  # noqa: E731
        return [k for k in out if not kd(k)] if isinstance(out, list) else {k: v for k, v in out.items() if not kd(k)}

    # -- the distillation model ----------------------------------------------------------------

    def set_model_attributes(self):
        """Ultralytics sets the student's classes and arguments here, just before compile, DDP and the EMA wrap
        the model: the student is checked against the teacher and wrapped with its distillation terms then."""
        super().set_model_attributes()
        if isinstance(self.model, DistillModel):
            return
        if self.args.compile:
            # as for Ultralytics' own distillation: a compiled DDP model is a static graph, and the feature terms leave
            # different adapters unused from step to step
            LOGGER.warning("'compile' is not supported with distillation and is disabled")
            self.args.compile = False
        self._open_sources()
        self._check_student()
        student = head_spec(self.model)
        config = load_distill(self.distill_config, student.reg_max, self.teacher_head.reg_max)
        if self.reader is not None:
            check_config_fits_cache(config, self.reader.description, self.cache)
        # Built from the training seed alone: Ultralytics seeds every rank differently (seed + 1 + RANK), and a
        # single-process run and each DDP rank must start from the same adapters (DDP also broadcasts rank 0's).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self.args.seed))
            projector = Distiller(
                config, student.reg_max, list(student.levels), list(student.channels), self.teacher_levels,
                self.teacher_channels, teacher_reg_max=self.teacher_head.reg_max,
                student_strides=list(student.strides), student_branches=student.branches, nc=student.nc,
            )
        resumed = getattr(self, "_resumed_projector", None)
        if resumed is not None:
            projector.load_state_dict(resumed.float().state_dict())
        self.model = DistillModel(self.model, projector.to(self.device))

    @property
    def distiller(self) -> Distiller:
        model = unwrap_model(self.model)
        if not isinstance(model, DistillModel):
            raise RuntimeError("the distillation terms exist once the trainer has set the model up (set_model_attributes)")
        return model.projector

    def _setup_train(self):
        super()._setup_train()
        self.epoch_sampler.next_epoch = self.start_epoch
        self.train_loader.reset()
        self.add_callback("on_train_epoch_start", _set_schedule_factor)
        self.add_callback("on_train_epoch_start", _replay_an_epoch_begun_again)
        if self.cohort_turn is not None:  # set up: the next student's turn, and training once every student is set up
            self.cohort_turn.done()

    def save_model(self):
        result = super().save_model()
        if self.best_fitness == self.fitness and self.best.is_file():  # Ultralytics has just written best.pt
            plain_checkpoint(self.best)
        return result

    def final_eval(self):
        # training is over: last.pt is no longer resumed, so it too becomes a plain student checkpoint
        # (best.pt became one each time it was written, in save_model)
        if RANK in {-1, 0} and self.last.is_file():
            plain_checkpoint(self.last)
        return super().final_eval()


def _replay_an_epoch_begun_again(trainer: DistillTrainer) -> None:
    """Ultralytics runs an epoch again after NaN recovery or an out-of-memory retry; the sampler has
    moved on (its workers may have drawn ahead), so it restarts at that epoch with a fresh iterator."""
    if trainer.epoch == getattr(trainer, "_epoch_begun", None):
        trainer.epoch_sampler.next_epoch = trainer.epoch
        trainer.train_loader.reset()
    trainer._epoch_begun = trainer.epoch


def _set_schedule_factor(trainer: DistillTrainer) -> None:
    distiller = trainer.distiller
    distiller.factor = distiller.config.schedule.factor(
        trainer.epoch, trainer.epochs, trainer.plan.closing(trainer.epoch)
    )


def make_trainer(**settings: Any) -> type[DistillTrainer]:
    """A DistillTrainer subclass carrying the settings (it survives DDP's pickling of the trainer class)."""
    return type("SoftlabelTrainer", (DistillTrainer,), dict(settings))
