"""The training dataset: replayed samples in Ultralytics' batch format plus the cached teacher tensors, and its collate."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from ultralytics.data.dataset import YOLODataset

from softlabel.cache.encoding import TeacherSample
from softlabel.cache.reader import CacheReader
from softlabel.distill.teacherbatch import TeacherBatch
from softlabel.errors import UserError
from softlabel.replay import Replay
from softlabel.train.plan import ViewPlan


class DistillDataset(Dataset):
    """Replayed samples in Ultralytics' batch format, with the cached teacher tensors when a cache is given."""

    def __init__(self, replay: Replay, plan: ViewPlan, reader: CacheReader | None = None):
        self.replay = replay
        self.plan = plan
        self.reader = reader
        self.index = replay.index
        # what Ultralytics reads of a train dataset (label plots, class weights, max_det checks)
        self.labels = [{"cls": lab[:, :1].copy(), "bboxes": lab[:, 1:].copy(), "im_file": str(p)} for lab, p in zip(self.index.labels, self.index.images)]
        self.im_files = [str(p) for p in self.index.images]

    def __len__(self) -> int:
        return len(self.index)

    def epoch_groups(self, epoch: int) -> list[np.ndarray] | None:
        """The partner groups of the view an epoch replays (None for a closing view): EpochSampler's `groups`."""
        view = self.plan.view(epoch)
        return self.replay.groups(view).all() if view.kind == "v" else None

    def __getitem__(self, item: tuple[int, int]) -> dict[str, Any]:
        i, epoch = item
        view = self.plan.view(epoch)
        s = self.replay(i, view)
        n = len(s.labels)
        out: dict[str, Any] = {
            "im_file": str(self.index.images[i]),
            "ori_shape": self.index.sizes[i] if self.index.sizes else s.image.shape[:2],
            "resized_shape": s.image.shape[:2],
            "ratio_pad": ((1.0, 1.0), (0.0, 0.0)),
            "img": torch.from_numpy(np.ascontiguousarray(s.image[..., ::-1].transpose(2, 0, 1))),  # RGB CHW
            "cls": torch.from_numpy(s.labels[:, :1].copy()),
            "bboxes": torch.from_numpy(s.labels[:, 1:].copy()),
            "batch_idx": torch.zeros(n),
            "epoch": epoch,
            "sample": i,
        }
        if self.reader is not None:
            cached = self.reader.read(view.key, i)  # as stored: a sparse store stays sparse and int8
            if cached.fingerprint != s.fingerprint:
                raise UserError(
                    f"sample {i} ({self.index.images[i].name}), view {view.key}: the replayed image differs from the "
                    f"teacher's input (fingerprint {s.fingerprint.hex()} != cached {cached.fingerprint.hex()}); "
                    "seed, augmentation settings, the image file or the OpenCV/albumentations build changed since the dump"
                )
            out["teacher"] = cached
        return out

    @staticmethod
    def collate_fn(batch: list[dict[str, Any]]) -> dict[str, Any]:
        teacher = [b.pop("teacher") for b in batch] if "teacher" in batch[0] else None
        epochs = torch.tensor([b.pop("epoch") for b in batch])
        samples = torch.tensor([b.pop("sample") for b in batch])
        out = YOLODataset.collate_fn(batch)
        out.update(epoch=epochs, sample=samples)
        if teacher is not None:
            out["teacher"] = stack_teacher(teacher)
        return out


def _stack(arrays: list[np.ndarray | None]) -> torch.Tensor | None:
    return None if arrays[0] is None else torch.from_numpy(np.stack(arrays))


def kept_count(index: np.ndarray) -> int:
    """Slots a sparse sample keeps: kept anchors are a prefix of the slots, unused ones are -1."""
    unused = np.flatnonzero(index < 0)
    return int(unused[0]) if len(unused) else len(index)


def stack_teacher(samples: list[TeacherSample]) -> TeacherBatch:
    """One batch's teacher arrays as stored: whole maps stacked for a dense store; for a sparse one
    packed, the kept slots of each sample one after another (rows: of its first F slots) with their
    counts, so that a batch carries the anchors its images kept and no padding."""
    first = samples[0]
    # whole feature maps (a dense store, or a sparse head with --features dense) are stacked as they are
    maps = dict(
        feats={lvl: _stack([s.feat[lvl] for s in samples]) for lvl in first.feat},
        feat_scale={lvl: _stack([s.feat_scale[lvl] for s in samples]) for lvl in first.feat_scale} if first.feat_scale else None,
    )
    if not first.sparse:
        return TeacherBatch(head=_stack([s.head for s in samples]), **maps)
    counts = [kept_count(s.index) for s in samples]
    row_slots = 0 if first.rows is None else len(first.rows)

    def pack(arrays: list[np.ndarray], limit: int) -> torch.Tensor:
        return torch.from_numpy(np.concatenate([a[: min(n, limit)] for a, n in zip(arrays, counts)]))

    return TeacherBatch(
        index=pack([s.index for s in samples], len(first.index)),
        values=pack([s.values for s in samples], len(first.index)),
        values_scale=_stack([s.values_scale for s in samples]),
        background=_stack([s.background for s in samples]),
        rows=pack([s.rows for s in samples], row_slots) if row_slots else None,
        rows_scale=_stack([s.rows_scale for s in samples]),
        row_levels=first.row_levels,
        counts=torch.tensor(counts, dtype=torch.int32),
        slots=max(1, *counts),
        row_slots=row_slots,
        **maps,
    )
