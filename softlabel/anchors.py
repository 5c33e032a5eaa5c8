"""The anchor order every head output follows, and the rule that ranks anchors; written once.

A head's anchors run level by level (P3, then P4, then P5), row-major within each level: anchor a
of level l is position a - start(l) of that level's [H, W] map. Anchors are ranked by the
teacher's best class logit (its best sigmoid), highest first, the lower anchor first among equal
scores: the dump keeps anchors in that order and the feature terms choose positions by it.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def map_sizes(maps: Sequence) -> list[int]:
    """Anchors per level of per-level maps [..., H, W] (tensors or arrays)."""
    return [int(m.shape[-2]) * int(m.shape[-1]) for m in maps]


def level_ranges(sizes: Sequence[int]) -> list[tuple[int, int]]:
    """(start, end) of each level's anchors in the head's order."""
    out, start = [], 0
    for n in sizes:
        out.append((start, start + int(n)))
        start += int(n)
    return out


def split_levels(per_anchor: Tensor, sizes: Sequence[int]) -> list[Tensor]:
    """A tensor with anchors on its last axis cut into the levels' slices."""
    if sum(sizes) != per_anchor.shape[-1]:
        raise ValueError(f"{per_anchor.shape[-1]} anchors, but the levels hold {sum(sizes)} positions")
    return list(torch.split(per_anchor, list(sizes), dim=-1))


def rank(score: Tensor, k: int) -> Tensor:
    """[B, A] scores -> [B, min(k, A)] anchor indices, best first; a stable sort keeps the lower anchor first among equals."""
    return torch.sort(score, dim=1, descending=True, stable=True).indices[:, : min(k, score.shape[1])]
