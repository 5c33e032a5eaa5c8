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
from softlabel.teacherformat import HeadFormat
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


def stack_teacher(samples: list[TeacherSample]) -> TeacherBatch:
    """One batch's teacher arrays as stored, packed for the DataLoader (softlabel.teacherformat owns the format)."""
    return HeadFormat.pack(samples)
