"""The teacher-output format, one owner: a class per form of the stored head that encodes on the teacher's
device, declares its arrays to the schema, decodes a sample on the host and packs a batch for collate.

A head of any kind (DFL bins or distances, one branch or the kept branch of an end-to-end head) is
`4 * reg_max` box channels then `nc` class logits per anchor, so the forms below serve every kind;
what differs between kinds (box form, branches) is data, softlabel.heads.HeadSpec.

- SparseHead (default): each image's top-K anchors (softlabel.anchors.rank) above a score floor keep
  their box outputs and class logits; every other anchor is one background logit per class and image.
  The box outputs are kept beside the logits, or apart at a precision of their own (`box_precision`).
  Features are rows at the first F kept anchors, or whole maps.
- DenseHead (`--head-topk 0`): whole head maps per level; features as whole maps.

Precision (float16, bfloat16 as raw bits, int8 with one scale per sample and channel) is applied the
same way by both. The distiller lays a packed batch out on the student's device (TeacherBatch.unpacked).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from softlabel.anchors import level_ranges, map_sizes
from softlabel.cache.encoding import TeacherSample, dequantise, stored_dtype
from softlabel.cache.schema import ArraySpec, Layout, feat_path, head_path
from softlabel.distill.teacherbatch import TeacherBatch
from softlabel.select import gather_rows, quantise, select_topk


class HeadFormat:
    """What the two forms share: precision, and whole feature maps."""

    def __init__(self, layout: Layout):
        self.layout = layout
        self.int8 = layout.precision == "int8"
        self.dtype = stored_dtype(layout.precision)

    @staticmethod
    def of(layout: Layout) -> "HeadFormat":
        return SparseHead(layout) if layout.sparse else DenseHead(layout)

    # declare ---------------------------------------------------------------------------------------

    def arrays(self, view: str) -> dict[str, ArraySpec]:
        """Every per-sample array of a view as it is on disk."""
        out = self._head_arrays(view)
        if self.layout.feature_rows:
            out[f"{view}/feat/rows"] = ArraySpec((self.layout.row_count, self.layout.row_width), self.dtype, "feat")
            if self.int8:
                out[f"{view}/feat/scale"] = ArraySpec((len(self.layout.feat), self.layout.row_width), "float32", "raw")
            return out
        for lvl, shape in self.layout.feat.items():
            out[feat_path(view, lvl)] = ArraySpec(shape, self.dtype, "feat")
            if self.int8:
                out[f"{view}/feat_scale/{lvl}"] = ArraySpec(shape[:1], "float32", "raw")
        return out

    def _head_arrays(self, view: str) -> dict[str, ArraySpec]:
        raise NotImplementedError

    def row_spans(self, head: list[Tensor]) -> list[tuple[int, int, int]] | None:
        """(first anchor, end anchor, channels) of each level of the head maps `encode` took, for to_host: a feature
        row of a level carries that level's channels (0 where the store keeps none of it) and zeros up to the
        widest. None without rows. The anchors are counted on the maps themselves, as `encode` counts them."""
        if not self.layout.feature_rows:
            return None
        return [(start, end, self.layout.feat[lvl][0] if lvl in self.layout.feat else 0)
                for lvl, (start, end) in zip(self.layout.head, level_ranges(map_sizes(head)))]

    # encode, on the teacher's device ----------------------------------------------------------------

    def encode(self, head: list[Tensor], feat: list[Tensor]) -> dict[str, Tensor]:
        """One batch of teacher outputs (per head level [B, C, H, W]) -> the stored arrays, keyed as `arrays`
        names without the view ('head/index', 'feat/rows', ...), each [B, ...], on the teacher's device."""
        out = self._encode_head(head)
        if self.layout.feat and self.layout.feature_rows:
            out.update(self._encode_rows(head, feat, out["head/index"]))
        else:
            for lvl, f in zip(self.layout.head, feat):
                if lvl in self.layout.feat:
                    out[f"feat/{lvl}"], scale = quantise(f, self.layout.precision, reduce=(2, 3))
                    if scale is not None:
                        out[f"feat_scale/{lvl}"] = scale[:, :, 0, 0]
        return out

    def _encode_head(self, head: list[Tensor]) -> dict[str, Tensor]:
        raise NotImplementedError

    def _encode_rows(self, head: list[Tensor], feat: list[Tensor], index: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError(f"{type(self).__name__} keeps whole feature maps")

    # decode, on the host ------------------------------------------------------------------------------

    def decode(self, stored: dict[str, np.ndarray], fingerprint: bytes) -> TeacherSample:
        """One sample's stored arrays (`arrays` names without the view and sample axis) -> a TeacherSample."""
        out = TeacherSample(fingerprint=fingerprint)
        self._decode_head(stored, out)
        if self.layout.feature_rows:
            out.rows, out.rows_scale, out.row_levels = self._values(stored["feat/rows"]), stored.get("feat/scale"), tuple(self.layout.feat)
        elif self.layout.feat:
            out.feat = {lvl: self._values(stored[f"feat/{lvl}"]) for lvl in self.layout.feat}
            if self.int8:
                out.feat_scale = {lvl: stored[f"feat_scale/{lvl}"] for lvl in self.layout.feat}
        return out

    def _values(self, a: np.ndarray, precision: str | None = None) -> np.ndarray:
        """Stored at `precision` (default: the layout's): int8 stays int8 (its scale travels beside it); bfloat16 bits
        become float32."""
        precision = precision or self.layout.precision
        return dequantise(a, precision, None, 0) if precision == "bfloat16" else a

    def _decode_head(self, stored: dict[str, np.ndarray], out: TeacherSample) -> None:
        raise NotImplementedError

    # pack, for collate ----------------------------------------------------------------------------------

    @staticmethod
    def pack(samples: list[TeacherSample]) -> TeacherBatch:
        """One batch's teacher arrays as stored, by the form the samples have."""
        return (SparseHead if samples[0].sparse else DenseHead)._pack(samples)

    @staticmethod
    def _maps(samples: list[TeacherSample]) -> dict:
        first = samples[0]
        return dict(
            feats={lvl: _stack([s.feat[lvl] for s in samples]) for lvl in first.feat},
            feat_scale={lvl: _stack([s.feat_scale[lvl] for s in samples]) for lvl in first.feat_scale} if first.feat_scale else None,
        )


class DenseHead(HeadFormat):
    """Whole head maps per level, [4 * reg_max + nc, H, W]."""

    def _head_arrays(self, view: str) -> dict[str, ArraySpec]:
        out = {}
        for lvl, shape in self.layout.head.items():
            out[head_path(view, lvl)] = ArraySpec(shape, self.dtype, "head")
            if self.int8:
                out[f"{view}/head_scale/{lvl}"] = ArraySpec(shape[:1], "float32", "raw")
        return out

    def _encode_head(self, head: list[Tensor]) -> dict[str, Tensor]:
        out = {}
        for lvl, h in zip(self.layout.head, head):
            out[f"head/{lvl}"], scale = quantise(h, self.layout.precision, reduce=(2, 3))
            if scale is not None:
                out[f"head_scale/{lvl}"] = scale[:, :, 0, 0]
        return out

    def _decode_head(self, stored: dict[str, np.ndarray], out: TeacherSample) -> None:
        p = self.layout.precision
        out.head = np.concatenate(
            [dequantise(stored[f"head/{lvl}"], p, stored.get(f"head_scale/{lvl}"), 0).reshape(shape[0], -1)
             for lvl, shape in self.layout.head.items()], 1)

    @staticmethod
    def _pack(samples: list[TeacherSample]) -> TeacherBatch:
        return TeacherBatch(head=_stack([s.head for s in samples]), **HeadFormat._maps(samples))


class SparseHead(HeadFormat):
    """Each image's top-K anchors by the teacher's best class logit, above a floor, best first; -1 in unused slots."""

    @property
    def boxes_apart(self) -> bool:
        return self.layout.box_precision is not None

    def _head_arrays(self, view: str) -> dict[str, ArraySpec]:
        layout = self.layout
        k, boxes, nc = layout.sparse["topk"], 4 * layout.reg_max, layout.nc
        c = nc if self.boxes_apart else boxes + nc
        out = {
            f"{view}/head/index": ArraySpec((k,), "int32", "head"),
            f"{view}/head/values": ArraySpec((k, c), self.dtype, "head"),
            f"{view}/head/background": ArraySpec((nc,), "float16", "head"),
        }
        if self.int8:
            out[f"{view}/head/scale"] = ArraySpec((c,), "float32", "raw")
        if self.boxes_apart:
            out[f"{view}/head/boxes"] = ArraySpec((k, boxes), stored_dtype(layout.box_precision), "head")
            if layout.box_precision == "int8":
                out[f"{view}/head/box_scale"] = ArraySpec((boxes,), "float32", "raw")
        return out

    def _encode_head(self, head: list[Tensor]) -> dict[str, Tensor]:
        flat = torch.cat([h.flatten(2) for h in head], 2)
        sparse = self.layout.sparse
        index, values, background = select_topk(flat, self.layout.reg_max, sparse["topk"], sparse["floor"])
        out = {"head/index": index, "head/background": background.to(torch.float16)}
        if self.boxes_apart:
            boxes, values = values.split([4 * self.layout.reg_max, self.layout.nc], 2)
            out["head/boxes"], scale = quantise(boxes, self.layout.box_precision, reduce=(1,))
            if scale is not None:
                out["head/box_scale"] = scale[:, 0]
        out["head/values"], scale = quantise(values, self.layout.precision, reduce=(1,))
        if scale is not None:
            out["head/scale"] = scale[:, 0]
        return out

    def _encode_rows(self, head: list[Tensor], feat: list[Tensor], index: Tensor) -> dict[str, Tensor]:
        layout, levels = self.layout, list(self.layout.head)
        stored = [f if lvl in layout.feat else None for lvl, f in zip(levels, feat)]
        # kept anchors are a prefix of the slots, best first: the first F slots are the most confident ones
        rows, level = gather_rows(stored, map_sizes(head), index[:, : layout.row_count], layout.row_width)
        if not self.int8:
            return {"feat/rows": quantise(rows, layout.precision, reduce=(1,))[0]}
        scales, q = [], torch.zeros(rows.shape, dtype=torch.int8, device=rows.device)
        for lvl in layout.feat:  # each stored level scaled over its own rows
            inside = (level == levels.index(lvl))[:, :, None]
            part, scale = quantise(torch.where(inside, rows, rows.new_zeros(())), layout.precision, reduce=(1,))
            q = torch.where(inside, part, q)
            scales.append(scale[:, 0])
        return {"feat/rows": q, "feat/scale": torch.stack(scales, 1)}

    def _decode_head(self, stored: dict[str, np.ndarray], out: TeacherSample) -> None:
        out.index, out.background, out.floor = stored["head/index"], stored["head/background"], float(self.layout.sparse["floor"])
        out.values, out.values_scale = self._values(stored["head/values"]), stored.get("head/scale")
        if self.boxes_apart:
            out.boxes, out.boxes_scale = self._values(stored["head/boxes"], self.layout.box_precision), stored.get("head/box_scale")

    @staticmethod
    def _pack(samples: list[TeacherSample]) -> TeacherBatch:
        """Packed: the kept slots of each sample one after another (rows: of its first F slots) with their counts,
        so that a batch carries the anchors its images kept and no padding."""
        first = samples[0]
        counts = [kept_count(s.index) for s in samples]
        row_slots = 0 if first.rows is None else len(first.rows)

        def pack(arrays: list[np.ndarray], limit: int) -> torch.Tensor:
            return torch.from_numpy(np.concatenate([a[: min(n, limit)] for a, n in zip(arrays, counts)]))

        return TeacherBatch(
            index=pack([s.index for s in samples], len(first.index)),
            values=pack([s.values for s in samples], len(first.index)),
            values_scale=_stack([s.values_scale for s in samples]),
            boxes=pack([s.boxes for s in samples], len(first.index)) if first.boxes is not None else None,
            boxes_scale=_stack([s.boxes_scale for s in samples]),
            background=_stack([s.background for s in samples]),
            floor=first.floor,
            rows=pack([s.rows for s in samples], row_slots) if row_slots else None,
            rows_scale=_stack([s.rows_scale for s in samples]),
            row_levels=first.row_levels,
            counts=torch.tensor(counts, dtype=torch.int32),
            slots=max(1, *counts),
            row_slots=row_slots,
            **HeadFormat._maps(samples),
        )


def kept_count(index: np.ndarray) -> int:
    """Slots a sparse sample keeps: kept anchors are a prefix of the slots, unused ones are -1."""
    unused = np.flatnonzero(index < 0)
    return int(unused[0]) if len(unused) else len(index)


def _stack(arrays: list[np.ndarray | None]) -> torch.Tensor | None:
    return None if arrays[0] is None else torch.from_numpy(np.stack(arrays))
