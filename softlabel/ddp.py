"""Keeping modules that live outside Ultralytics' DDP wrapper (the feature adapters) identical on every rank.

Two collectives, each issued by every rank at the same point of the training loop whatever its data:
one broadcast of the parameters from rank 0 after they are built or loaded, and one all-reduce of
all their gradients per optimizer step. A parameter that took no part in this rank's backward (a
feature level with no chosen position in its batch) joins the all-reduce with a zero gradient, so
no rank ever waits on a collective another rank skipped, and the average stays over all ranks.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn


def broadcast_parameters(module: nn.Module, src: int = 0) -> None:
    """Copy rank `src`'s parameters and buffers into every rank's `module`, as one collective."""
    tensors = [t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]
    if not tensors:
        return
    with torch.no_grad():
        flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
        dist.broadcast(flat, src=src)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def average_gradients(params: Sequence[nn.Parameter], world: int) -> None:
    """Replace every gradient by its mean over the ranks, as one all-reduce; a missing gradient counts as zero.

    Ultralytics scales each rank's loss by the world size and DDP averages; the mean here treats
    these parameters exactly as DDP treats the student's. A parameter no rank gave a gradient keeps
    none, so the optimizer skips it (no decay, no momentum step) as it would in a single process.
    """
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    present = torch.tensor([float(p.grad is not None) for p in params], device=grads[0].device)
    flat = torch.cat([*(g.reshape(-1).float() for g in grads), present])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for k, p in enumerate(params):
        mean = flat[offset : offset + p.numel()].view_as(p).to(p.dtype)
        offset += p.numel()
        if flat[-len(params) + k] == 0:
            p.grad = None
        elif p.grad is None:
            p.grad = mean
        else:
            p.grad.copy_(mean)
