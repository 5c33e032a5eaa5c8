"""The student and its distillation terms as one module: what DDP wraps, the EMA averages and last.pt holds.

The student's own criterion (whatever its `init_criterion` returns: `v8DetectionLoss`, `E2ELoss`, ...)
computes the detection loss untouched; the distillation terms are added beside it. Wrapping, as
Ultralytics' own `DistillationModel` does, means DDP averages the adapters' gradients and keeps
them identical on every rank, and resume and NaN recovery restore them with the student: the
attribute names `student_model` and `projector` are the ones Ultralytics' trainer looks for.

A checkpoint holds the terms as plain data (their spec and weights) and rebuilds them on load, so
the only class of ours a checkpoint names is this one, registered with torch's safe unpickler.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from ultralytics.utils.torch_utils import copy_attr

from softlabel.distill.distiller import Distiller


class DistillModel(nn.Module):
    def __init__(self, student_model: nn.Module, projector: Distiller):
        super().__init__()
        self.student_model = student_model
        self.projector = projector
        copy_attr(self, student_model)  # names, stride, yaml, args, task: what trainer and validator read of a model

    def forward(self, x, *args, **kwargs):
        if isinstance(x, dict):  # a training batch: the loss
            return self.loss(x, *args, **kwargs)
        return self.student_model.predict(x, *args, **kwargs)

    def loss(self, batch: dict, preds=None) -> tuple[Tensor, dict[str, Tensor]]:
        """The student's own loss, then each distillation term times the batch size (as the student's criterion
        scales its own); in evaluation, or for a batch without teacher tensors, the student's loss alone."""
        if not self.training or "teacher" not in batch:
            return self.student_model.loss(batch, preds)
        if preds is None:
            preds = self.student_model(batch["img"])
        det, items = self.student_model.loss(batch, preds)
        terms = self.projector(preds, batch["teacher"])
        bs = batch["img"].shape[0]
        items = {**items, **{k: v.detach() for k, v in terms.items()}}
        return torch.cat([det.reshape(-1), *(v.reshape(1) * bs for v in terms.values())]), items

    @property
    def criterion(self):
        return self.student_model.criterion

    @criterion.setter
    def criterion(self, value) -> None:
        self.student_model.criterion = value

    def init_criterion(self):
        return self.student_model.init_criterion()

    @property
    def end2end(self):
        return getattr(self.student_model, "end2end", False)

    @end2end.setter
    def end2end(self, value) -> None:
        self.student_model.end2end = value

    def set_head_attr(self, **kwargs) -> None:
        self.student_model.set_head_attr(**kwargs)

    def fuse(self, *args, **kwargs):
        """The fused student alone: the terms are training-only."""
        return self.student_model.fuse(*args, **kwargs)

    # a checkpoint holds the terms as plain data ------------------------------------------------------------

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        modules = dict(state["_modules"])
        projector = modules.pop("projector")
        state["_modules"] = modules
        state["projector_spec"] = projector.spec()
        state["projector_factor"] = float(projector.factor)
        state["projector_state"] = dict(projector.state_dict())
        return state

    def __setstate__(self, state: dict) -> None:
        spec, factor, weights = state.pop("projector_spec"), state.pop("projector_factor"), state.pop("projector_state")
        self.__dict__.update(state)
        projector = Distiller.from_spec(spec)
        projector.load_state_dict(weights)
        if weights:  # where and in what precision the weights were (a deep copy of a CUDA model stays on CUDA)
            first = next(iter(weights.values()))
            projector.to(device=first.device, dtype=first.dtype)
        projector.factor = factor
        self._modules["projector"] = projector


torch.serialization.add_safe_globals([DistillModel])
