"""How teacher tensors become stored arrays and back: precision, quantisation, sparse heads. Pure.

A shard's raw tensors (float16, one array per level) are encoded together in a writer thread;
a sample's stored arrays are decoded in a DataLoader worker. Options:

- precision float16 (default), bfloat16 (stored as its raw 16 bits), or int8 with a symmetric
  per-sample, per-channel scale (`head_scale/{level}`, `feat_scale/{level}`).
- sparse head: only the top-k anchors per image by the teacher's best class score, and of those
  only the ones whose score passes a floor, keep their DFL bins and class logits
  (`head/index`, `head/values`). Every other anchor is background: its class logits are one
  stored constant per class and sample (`head/background`, the logit of the mean probability of
  the anchors it replaces), its DFL bins are not kept, and the mask marks it so the box loss skips it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PRECISIONS = ("float16", "bfloat16", "int8")
_STORED_DTYPE = {"float16": "float16", "bfloat16": "uint16", "int8": "int8"}


@dataclass(frozen=True)
class Decoded:
    head: dict[str, np.ndarray]  # level -> [4*reg_max + nc, H, W], float16 or float32
    feat: dict[str, np.ndarray]  # level -> [C, H, W]
    mask: dict[str, np.ndarray] | None  # level -> [H, W] bool, True where the head was kept (sparse only)
    feat_scale: dict[str, np.ndarray] | None = None  # level -> [C]: feat holds int8, not yet dequantised


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
    if precision == "float16":
        return x.astype(np.float16), None
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
    if precision == "float16":
        return q
    if precision == "bfloat16":
        return _from_bf16_bits(q)
    shape = [1] * q.ndim
    shape[channel_axis] = -1
    return q.astype(np.float32) * scale.reshape(shape)


# sparse head ------------------------------------------------------------------------------------


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return np.log(p) - np.log1p(-p)


def sparsify(head: np.ndarray, reg_max: int, topk: int, floor: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """head [B, C, A] -> (index [B, K] int32 with -1 for unused slots, values [B, K, C], background [B, nc])."""
    b, c, a = head.shape
    k = min(topk, a)
    logits = head[:, 4 * reg_max :, :].astype(np.float32)  # [B, nc, A]
    score = logits.max(1)  # the best class logit ranks anchors as the best sigmoid does
    order = np.argsort(-score, axis=1, kind="stable")[:, :k]
    keep = np.take_along_axis(score, order, 1) >= _logit(np.float32(floor)) if floor > 0 else np.ones_like(order, bool)
    index = np.where(keep, order, -1).astype(np.int32)
    values = np.take_along_axis(head, np.maximum(index, 0)[:, None, :], 2).transpose(0, 2, 1)
    values = np.where(keep[:, :, None], values, 0).astype(head.dtype)
    dropped = np.ones((b, a), bool)
    rows = np.repeat(np.arange(b)[:, None], k, 1)
    dropped[rows[keep], index[keep]] = False
    probs = 1 / (1 + np.exp(-logits))
    n = np.maximum(dropped.sum(1), 1)[:, None]
    background = _logit((probs * dropped[:, None, :]).sum(2) / n).astype(np.float16)
    if k < topk:  # fewer anchors than slots (a small image): the rest of the slots stay unused
        index = np.pad(index, ((0, 0), (0, topk - k)), constant_values=-1)
        values = np.pad(values, ((0, 0), (0, topk - k), (0, 0)))
    return index, values, background


def densify(index: np.ndarray, values: np.ndarray, background: np.ndarray, reg_max: int, anchors: int) -> tuple[np.ndarray, np.ndarray]:
    """One sample: (index [K], values [K, C], background [nc]) -> (head [C, A] float32, kept mask [A])."""
    c = values.shape[1]
    head = np.zeros((c, anchors), np.float32)
    head[4 * reg_max :, :] = background.astype(np.float32)[:, None]
    keep = index >= 0
    head[:, index[keep]] = values[keep].T
    mask = np.zeros(anchors, bool)
    mask[index[keep]] = True
    return head, mask


# whole shards and single samples ------------------------------------------------------------


def encode_shard(raw: dict[str, np.ndarray], layout) -> dict[str, np.ndarray]:
    """Raw float16 tensors of S samples ('head/p3': [S, C, H, W], 'feat/p3': ...) -> stored arrays."""
    out: dict[str, np.ndarray] = {}
    p = layout.precision
    if layout.sparse:
        flat = np.concatenate([raw[f"head/{lvl}"].reshape(*raw[f"head/{lvl}"].shape[:2], -1) for lvl in layout.head], 2)
        index, values, background = sparsify(flat, layout.reg_max, layout.sparse["topk"], layout.sparse["floor"])
        out["head/index"], out["head/background"] = index, background
        out["head/values"], scale = quantise(values, p, channel_axis=2)
        if scale is not None:
            out["head/scale"] = scale
    else:
        for lvl in layout.head:
            out[f"head/{lvl}"], scale = quantise(raw[f"head/{lvl}"], p, channel_axis=1)
            if scale is not None:
                out[f"head_scale/{lvl}"] = scale
    for lvl in layout.feat:
        out[f"feat/{lvl}"], scale = quantise(raw[f"feat/{lvl}"], p, channel_axis=1)
        if scale is not None:
            out[f"feat_scale/{lvl}"] = scale
    return out


def decode_sample(stored: dict[str, np.ndarray], layout, dequantise_feat: bool = True) -> Decoded:
    """One sample's stored arrays (keys as encode_shard's, without the sample axis) -> tensors per level.

    With dequantise_feat=False an int8 store's feature maps stay int8 with their scales beside them
    (Decoded.feat_scale): a trainer dequantises a whole batch at once, or only the positions it uses."""
    p = layout.precision
    head: dict[str, np.ndarray] = {}
    mask = None
    if layout.sparse:
        values = dequantise(stored["head/values"], p, stored.get("head/scale"), channel_axis=1)
        dense, kept = densify(stored["head/index"], values, stored["head/background"], layout.reg_max, layout.anchors)
        mask, start = {}, 0
        for lvl, (c, h, w) in layout.head.items():
            head[lvl] = dense[:, start : start + h * w].reshape(c, h, w)
            mask[lvl] = kept[start : start + h * w].reshape(h, w)
            start += h * w
    else:
        for lvl in layout.head:
            head[lvl] = dequantise(stored[f"head/{lvl}"], p, stored.get(f"head_scale/{lvl}"), channel_axis=0)
    if p == "int8" and not dequantise_feat:
        feat = {lvl: stored[f"feat/{lvl}"] for lvl in layout.feat}
        return Decoded(head=head, feat=feat, mask=mask, feat_scale={lvl: stored[f"feat_scale/{lvl}"] for lvl in layout.feat})
    feat = {lvl: dequantise(stored[f"feat/{lvl}"], p, stored.get(f"feat_scale/{lvl}"), channel_axis=0) for lvl in layout.feat}
    return Decoded(head=head, feat=feat, mask=mask)
