"""On the teacher's device: a batch of teacher outputs -> the arrays a store keeps. Pure torch.

The dump calls this right after the forward pass, so only stored bytes are copied to the host.
The online trainer can call it too, so a live teacher feeds the distiller exactly what a store
would, minus the copy.

- sparse head: each image's top-K anchors by the teacher's best class logit (the best sigmoid),
  of those the ones whose score passes a floor; they keep their box outputs and class logits. Every
  other anchor is background: one logit per class and image, the logit of the mean probability
  of the anchors it replaces. Unused slots have index -1 and zero values.
- sparse features: the neck feature vector at each of the first F kept slots (the teacher's F
  most confident kept anchors), at that anchor's own level, zero-padded to the widest stored
  level; an int8 store scales each (level, channel) over the rows of that level.
- dense head / features: whole maps, per level.
- precision: float16, bfloat16 (its raw 16 bits, as uint16) or int8, symmetric, with one float32
  scale per sample and channel (the channel's largest |value| maps to 127).
"""

from __future__ import annotations

import torch
from torch import Tensor

from softlabel.anchors import level_ranges, rank


def logit(p: Tensor) -> Tensor:
    p = p.clamp(1e-7, 1 - 1e-7)
    return torch.log(p) - torch.log1p(-p)


def select_topk(head: Tensor, reg_max: int, topk: int, floor: float) -> tuple[Tensor, Tensor, Tensor]:
    """head [B, C, A] -> (index [B, K] int32, -1 for unused slots; values [B, K, C] float32;
    background [B, nc] float32)."""
    b, c, a = head.shape
    k = min(topk, a)
    logits = head[:, 4 * reg_max :, :].float()  # [B, nc, A]
    score = logits.amax(1)
    # a stable descending sort keeps the lower anchor first among equal scores
    order = rank(score, k)
    if floor > 0:
        keep = score.gather(1, order) >= logit(torch.tensor(floor, dtype=torch.float32, device=head.device))
    else:
        keep = torch.ones_like(order, dtype=torch.bool)
    values = head.float().gather(2, order[:, None, :].expand(b, c, k)).transpose(1, 2)
    values = torch.where(keep[:, :, None], values, values.new_zeros(()))
    dropped = torch.ones((b, a), dtype=torch.bool, device=head.device)
    dropped.scatter_(1, order, ~keep)  # kept anchors are not background; unkept slots stay dropped
    n = dropped.sum(1).clamp_min(1)[:, None].float()
    probs = logits.sigmoid()
    background = logit((probs * dropped[:, None, :]).sum(2) / n)
    index = torch.where(keep, order, torch.full_like(order, -1)).to(torch.int32)
    if k < topk:  # fewer anchors than slots (a small image): the rest stay unused
        index = torch.cat([index, index.new_full((b, topk - k), -1)], 1)
        values = torch.cat([values, values.new_zeros((b, topk - k, c))], 1)
    return index, values, background


def gather_rows(feats: list[Tensor | None], sizes: list[int], index: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """Feature vectors at the kept anchors.

    feats: per head level, [B, C_l, H, W] or None for a level not stored; sizes: anchors per head
    level. index [B, K] (-1 unused) -> (rows [B, K, width] float32, zero past C_l and in unused
    slots; level [B, K] int64, the head level of each slot, -1 unused)."""
    b, k = index.shape
    idx = index.long()
    rows = torch.zeros((b, k, width), dtype=torch.float32, device=index.device)
    level = torch.full_like(idx, -1)
    for lvl, (f, (start, end)) in enumerate(zip(feats, level_ranges(sizes))):
        n = end - start
        inside = (idx >= start) & (idx < end)
        level = torch.where(inside, torch.full_like(idx, lvl), level)
        if f is not None:
            c = f.shape[1]
            local = (idx - start).clamp(0, n - 1)
            got = f.flatten(2).gather(2, local[:, None, :].expand(b, c, k)).transpose(1, 2).float()
            rows[:, :, :c] = torch.where(inside[:, :, None], got, rows[:, :, :c])
    return rows, level


def quantise(x: Tensor, precision: str, reduce: tuple[int, ...]) -> tuple[Tensor, Tensor | None]:
    """x float -> (stored values, int8 scale with the reduced dims kept as 1, or None)."""
    if precision == "float16":
        return x.to(torch.float16), None
    if precision == "float32":
        return x.float(), None
    if precision == "bfloat16":
        return x.to(torch.bfloat16).view(torch.int16), None  # the raw bits; the host reads them as uint16
    x = x.float()
    amax = x.abs().amax(dim=reduce, keepdim=True)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    return torch.round(x / scale).clamp(-127, 127).to(torch.int8), scale


def encode_batch(head: list[Tensor], feat: list[Tensor], layout) -> dict[str, Tensor]:
    """One batch of teacher outputs -> the stored arrays, on the teacher's device (softlabel.teacherformat owns the format)."""
    from softlabel.teacherformat import HeadFormat

    return HeadFormat.of(layout).encode(head, feat)


# arrays with a slot axis (dim 1) of a sparse store: only their kept slots need to cross to the host
SLOTTED = ("head/index", "head/values", "head/boxes", "feat/rows")


def to_host(arrays: dict[str, Tensor], row_spans: list[tuple[int, int, int]] | None = None) -> tuple[dict, int]:
    """The stored arrays as numpy on the host: the only copy from the teacher's device.

    Of a sparse store's slotted arrays only the kept slots cross (kept anchors are a prefix of the
    slots), with one count per sample; the host rebuilds the padded arrays (index -1, zeros), equal
    to copying them whole. With `row_spans`, (first anchor, end anchor, channels) of each head level
    (HeadFormat.row_spans), a feature row crosses only its own level's channels: past them it is
    zero padding to the widest level. Returns (arrays, bytes copied from the device)."""
    import numpy as np

    def host(t: Tensor):
        a = t.cpu().numpy()
        return a.view(np.uint16) if t.dtype == torch.int16 else a

    out, copied = {}, 0
    kept = None
    if "head/index" in arrays:
        counts = host((arrays["head/index"] >= 0).sum(1).to(torch.int32))
        copied += counts.nbytes
        slots = np.arange(arrays["head/index"].shape[1])
        kept = slots[None, :] < counts[:, None]  # [B, K] on the host
        keep_device = arrays["head/index"] >= 0
    # the index first: the host reads each row's level from it
    for name in sorted(arrays, key=lambda k: k != "head/index"):
        t = arrays[name]
        if kept is None or name not in SLOTTED:
            out[name] = host(t)
            copied += out[name].nbytes
            continue
        n = t.shape[1]
        if name == "feat/rows" and row_spans:
            out[name], nbytes = _rows_to_host(t, arrays["head/index"][:, :n], out["head/index"][:, :n], row_spans, host)
            copied += nbytes
            continue
        packed = host(t[keep_device[:, :n]])  # [kept slots, ...]
        copied += packed.nbytes
        full = np.full(tuple(t.shape), -1 if name == "head/index" else 0, dtype=packed.dtype)
        full[kept[:, :n]] = packed
        out[name] = full
    return out, copied


def _rows_to_host(rows: Tensor, index: Tensor, index_host, spans: list[tuple[int, int, int]], host) -> tuple:
    """Feature rows [B, F, W] -> host, each level's kept rows cut to its channels (unused slots, index -1, are in no
    level). Returns (rows as numpy [B, F, W], bytes copied)."""
    import numpy as np

    full, copied = None, 0
    for start, end, channels in spans:
        if channels == 0:
            continue  # a level whose features the store does not keep: its rows are all zero
        packed = host(rows[(index >= start) & (index < end)][:, :channels])  # [rows of this level, C_l]
        copied += packed.nbytes
        if full is None:
            full = np.zeros(tuple(rows.shape), dtype=packed.dtype)
        full[(index_host >= start) & (index_host < end), :channels] = packed
    if full is None:  # no level keeps features: nothing to copy but the dtype
        full = np.zeros(tuple(rows.shape), dtype=host(rows[:0]).dtype)
    return full, copied
