"""The teacher's side of a training batch, one typed object from collate to the distiller.

From a sparse store it holds what the store holds, packed: the kept slots of every sample one
after another (anchor indices, int8 head values, feature rows) with one count per sample, and the
per-sample scales and background logits. A batch's bytes follow the anchors its images kept, not the
widest image. Nothing dense exists until the distiller lays it out and expands it on the student's
device. From a dense store or a live teacher it holds whole maps.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch
from torch import Tensor


@dataclass
class TeacherBatch:
    head: Tensor | None = None  # dense: [B, 4*reg_max + nc, A], box outputs then class logits, anchors P3..P5 row-major
    feats: dict[str, Tensor] = field(default_factory=dict)  # dense features: level -> [B, C, H, W]
    feat_scale: dict[str, Tensor] | None = None  # int8 dense features: level -> [B, C]; feats hold the int8 values
    # a sparse batch's slot width K is any width (collate cuts it to the batch's kept anchors); rows cover the first F <= K
    index: Tensor | None = None  # sparse head: [B, K] int32 kept anchors, -1 for an unused slot
    values: Tensor | None = None  # [B, K, 4*reg_max + nc]: int8 with values_scale, or float
    values_scale: Tensor | None = None  # [B, 4*reg_max + nc]
    # a store with box outputs apart (Layout.box_precision): values hold the class logits [B, K, nc] and boxes the
    # box outputs [B, K, 4*reg_max] (packed: [T, ...] as values), int8 with boxes_scale [B, 4*reg_max]
    boxes: Tensor | None = None
    boxes_scale: Tensor | None = None
    background: Tensor | None = None  # [B, nc]: the class logit of every anchor not kept
    floor: float = 0.0  # sparse: the score every kept anchor passed when dumped (on the unrounded outputs)
    rows: Tensor | None = None  # sparse features: [B, F, Cmax], the feature vector of index[:, j] at its level, j < F
    rows_scale: Tensor | None = None  # [B, L, Cmax], per level of row_levels
    row_levels: tuple[str, ...] = ()  # the levels rows hold, in rows_scale's order
    # packed (as collated): index [T], values [T, C] and rows [R, Cmax] hold the kept slots of sample 0, then 1, ...;
    # counts [B] int32 how many each kept; unpacked() lays them out [B, slots, ...]
    counts: Tensor | None = None
    slots: int = 0  # the laid-out slot width: the batch's largest kept count, at least 1
    row_slots: int = 0  # the store's F: rows exist for the first F slots of each sample

    @property
    def sparse(self) -> bool:
        return self.index is not None

    @property
    def packed(self) -> bool:
        return self.counts is not None

    def unpacked(self) -> "TeacherBatch":
        """A packed batch laid out [B, slots, ...] where it lies (index -1 and zeros in unused slots); others as they are."""
        if self.counts is None:
            return self
        b, k = self.counts.shape[0], self.slots
        kept = torch.arange(k, device=self.counts.device)[None, :] < self.counts.long()[:, None]

        def spread(packed: Tensor, width: int, fill: int) -> Tensor:
            out = packed.new_full((b, width, *packed.shape[1:]), fill)
            out[kept[:, :width]] = packed
            return out

        rows = None if self.rows is None else spread(self.rows, min(self.row_slots, k), 0)
        boxes = None if self.boxes is None else spread(self.boxes, k, 0)
        return replace(self, index=spread(self.index, k, -1), values=spread(self.values, k, 0), boxes=boxes, rows=rows,
                       counts=None, slots=0, row_slots=0)

    def _map(self, fn) -> "TeacherBatch":
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                v = fn(v)
            elif isinstance(v, dict):
                v = {k: fn(t) for k, t in v.items()}
            out[f.name] = v
        return TeacherBatch(**out)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "TeacherBatch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "TeacherBatch":
        """Called by a DataLoader with pin_memory=True, so that `.to(cuda, non_blocking=True)` overlaps."""
        return self._map(lambda t: t.pin_memory())

    def tensors(self) -> dict[str, Tensor]:
        """Every tensor it holds, by name (dict fields as name/level)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                out[f.name] = v
            elif isinstance(v, dict):
                out.update({f"{f.name}/{k}": t for k, t in v.items()})
        return out

    def head_values(self) -> Tensor:
        """Sparse, laid out: the kept anchors' box outputs and class logits [B, K, C] as float32 (zero in unused slots)."""
        v = _scaled(self.values, self.values_scale)
        return v if self.boxes is None else torch.cat([_scaled(self.boxes, self.boxes_scale), v], 2)

    def class_logits(self, box_channels: int, anchors: int) -> Tensor:
        """[B, nc, A] float32: the dense head's logits, or the background broadcast with the kept anchors scattered in."""
        if not self.sparse:
            return self.head[:, box_channels:].float()
        kept = self.head_values()[:, :, box_channels:].transpose(1, 2)  # [B, nc, K]
        b, nc, k = kept.shape
        # unused slots (-1) land in one extra column that is cut off afterwards
        idx = torch.where(self.index >= 0, self.index.long(), torch.full_like(self.index, anchors, dtype=torch.long))
        out = self.background.float()[:, :, None].expand(b, nc, anchors + 1).clone()
        out.scatter_(2, idx[:, None, :].expand(b, nc, k), kept)
        return out[:, :, :anchors]

    def feat(self, level: str) -> Tensor:
        """One level's dense feature map [B, C, H, W] as float32."""
        f = self.feats[level].float()
        scale = (self.feat_scale or {}).get(level)
        return f if scale is None else f * scale.float()[:, :, None, None]

    def feat_rows(self, level: str, b: Tensor, p: Tensor) -> Tensor:
        """Dense maps: the feature vectors [N, C] at (image b[n], flattened position p[n]) as float32;
        an int8 map is dequantised at those positions only."""
        rows = self.feats[level].flatten(2)[b, :, p].float()
        scale = (self.feat_scale or {}).get(level)
        return rows if scale is None else rows * scale[b].float()

    def stored_rows(self, level: str, b: Tensor, slot: Tensor, channels: int) -> Tensor:
        """Sparse features: the rows [N, channels] of (image b[n], slot slot[n]), all on `level`, as float32."""
        rows = self.rows[b, slot, :channels].float()
        if self.rows_scale is None:
            return rows
        return rows * self.rows_scale[b, self.row_levels.index(level), :channels].float()


def _scaled(values: Tensor, scale: Tensor | None) -> Tensor:
    """[B, K, C] stored values as float32, an int8 one times its per-sample, per-channel scale [B, C]."""
    v = values.float()
    return v if scale is None else v * scale.float()[:, None, :]
