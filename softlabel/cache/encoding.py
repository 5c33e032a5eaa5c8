"""Stored arrays back into one sample's teacher arrays, on the host. Pure numpy.

Encoding happens on the teacher's device (softlabel.select). A sample's stored arrays are read
in a DataLoader worker and kept as stored: int8 values and rows with their scales, anchor
indices, background logits. Precisions: float16, bfloat16 (stored as its raw 16 bits), or int8
with a symmetric per-sample, per-channel scale.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PRECISIONS = ("float16", "bfloat16", "int8", "float32")
_STORED_DTYPE = {"float16": "float16", "bfloat16": "uint16", "int8": "int8", "float32": "float32"}


def stored_dtype(precision: str) -> str:
    return _STORED_DTYPE[precision]


# precision ------------------------------------------------------------------------------------


def _to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bfloat16, kept as its 16 raw bits."""
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    return ((bits + rounding) >> 16).astype(np.uint16)


def _from_bf16_bits(b: np.ndarray) -> np.ndarray:
    return (b.astype(np.uint32) << 16).view(np.float32)


def quantise(x: np.ndarray, precision: str, channel_axis: int) -> tuple[np.ndarray, np.ndarray | None]:
    """x [S, ...] with channels on channel_axis -> (stored values, int8 scale [S, C] or None).

    int8 is symmetric with one scale per sample and channel: the channel's largest |value| maps to 127."""
    if precision in ("float16", "float32"):
        return x.astype(precision), None
    if precision == "bfloat16":
        return _to_bf16_bits(x), None
    x = x.astype(np.float32)
    reduce = tuple(a for a in range(1, x.ndim) if a != channel_axis)
    amax = np.abs(x).max(axis=reduce, keepdims=True)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(x / scale), -127, 127).astype(np.int8)
    return q, scale.reshape(x.shape[0], x.shape[channel_axis])


def dequantise(q: np.ndarray, precision: str, scale: np.ndarray | None, channel_axis: int) -> np.ndarray:
    """One sample's stored values -> float (float16 stays float16); channel_axis counts without the sample axis."""
    if precision in ("float16", "float32"):
        return q
    if precision == "bfloat16":
        return _from_bf16_bits(q)
    shape = [1] * q.ndim
    shape[channel_axis] = -1
    return q.astype(np.float32) * scale.reshape(shape)


# one sample as stored ----------------------------------------------------------------------------


@dataclass
class TeacherSample:
    """One sample-view's teacher arrays as the store holds them: a sparse store's arrays stay sparse
    and int8 (the student's device expands what a loss needs); a dense store's head is float."""

    fingerprint: bytes
    index: np.ndarray | None = None  # sparse head: [K] int32 anchors, -1 for an unused slot
    values: np.ndarray | None = None  # [K, 4*reg_max + nc]: int8 (with values_scale), float16 or float32; [K, nc] with boxes apart
    values_scale: np.ndarray | None = None  # [4*reg_max + nc] float32 ([nc] with boxes apart)
    boxes: np.ndarray | None = None  # a store with box outputs apart (Layout.box_precision): [K, 4*reg_max]
    boxes_scale: np.ndarray | None = None  # [4*reg_max] float32, int8 boxes
    background: np.ndarray | None = None  # [nc] float16: the class logit of every other anchor
    floor: float = 0.0  # sparse head: the score every kept anchor passed, on the teacher's outputs before rounding
    head: np.ndarray | None = None  # dense head: [4*reg_max + nc, A] float, levels concatenated
    rows: np.ndarray | None = None  # sparse features: [F, Cmax], the feature vector of index[j] at its level, j < F <= K
    rows_scale: np.ndarray | None = None  # [L, Cmax] float32, per stored feature level
    row_levels: tuple[str, ...] = ()  # the stored feature levels, in rows_scale's order
    feat: dict[str, np.ndarray] = field(default_factory=dict)  # dense features: level -> [C, H, W]
    feat_scale: dict[str, np.ndarray] | None = None  # int8 dense features: level -> [C]

    @property
    def sparse(self) -> bool:
        return self.index is not None

    def head_values(self) -> np.ndarray:
        """The kept anchors' box outputs and class logits [K, C] as float32."""
        v = _scaled(self.values, self.values_scale)
        return v if self.boxes is None else np.concatenate([_scaled(self.boxes, self.boxes_scale), v], 1)

    def row_values(self, row_level: np.ndarray) -> np.ndarray:
        """The feature rows [F, Cmax] as float32; row_level [F]: each row's stored feature level (its row of rows_scale), -1 for none."""
        r = self.rows.astype(np.float32)
        if self.rows_scale is None:
            return r
        scale = np.where((row_level >= 0)[:, None], self.rows_scale[np.maximum(row_level, 0)], 0)
        return r * scale

    def feat_map(self, level: str) -> np.ndarray:
        """A dense feature map [C, H, W] as float32."""
        f = self.feat[level].astype(np.float32)
        return f if not self.feat_scale else f * self.feat_scale[level][:, None, None]


def _scaled(values: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    v = values.astype(np.float32)
    return v if scale is None else v * scale[None]


def decode_sample(stored: dict[str, np.ndarray], layout, fingerprint: bytes) -> TeacherSample:
    """One sample's stored arrays (Layout.stored names without the view and sample axis) -> a TeacherSample
    (softlabel.teacherformat owns the format)."""
    from softlabel.teacherformat import HeadFormat

    return HeadFormat.of(layout).decode(stored, fingerprint)
