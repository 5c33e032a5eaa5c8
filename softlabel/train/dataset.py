"""The training dataset: replayed samples in Ultralytics' batch format plus the cached teacher tensors, and its collate."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from ultralytics.data.dataset import YOLODataset

from softlabel.cache.reader import CacheReader
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
            # int8 feature maps stay int8 here: the distiller dequantises only the positions it uses
            cached = self.reader.read(view.key, i, dequantise_feat=False)
            if cached.fingerprint != s.fingerprint:
                raise UserError(
                    f"sample {i} ({self.index.images[i].name}), view {view.key}: the replayed image differs from the "
                    f"teacher's input (fingerprint {s.fingerprint.hex()} != cached {cached.fingerprint.hex()}); "
                    "seed, augmentation settings, the image file or the OpenCV/albumentations build changed since the dump"
                )
            out["teacher_head"] = torch.from_numpy(np.concatenate([h.reshape(h.shape[0], -1) for h in cached.head.values()], 1))
            if cached.mask is not None:  # a sparse head: the box loss skips reconstructed anchors
                out["teacher_mask"] = torch.from_numpy(np.concatenate([m.reshape(-1) for m in cached.mask.values()]).astype(np.float32))
            for lvl, f in cached.feat.items():
                out[f"teacher_feat_{lvl}"] = torch.from_numpy(f)
            for lvl, scale in (cached.feat_scale or {}).items():
                out[f"teacher_scale_{lvl}"] = torch.from_numpy(scale)
        return out

    @staticmethod
    def collate_fn(batch: list[dict[str, Any]]) -> dict[str, Any]:
        extra = {k: torch.stack([b.pop(k) for b in batch]) for k in list(batch[0]) if k.startswith("teacher_")}
        epochs = torch.tensor([b.pop("epoch") for b in batch])
        samples = torch.tensor([b.pop("sample") for b in batch])
        out = YOLODataset.collate_fn(batch)
        out.update(extra, epoch=epochs, sample=samples)
        return out
