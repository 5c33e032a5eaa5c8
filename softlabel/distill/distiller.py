"""All distillation terms of one student: any number of named terms, each a registered loss with its inputs.

Takes tensors only (the student's train-mode head output and the teacher's batch), so the cache, a
live teacher and the tests all feed it the same way. The teacher's head and the student's may be of
different kinds (DFL bins or distances, one branch or two): each term reads what its loss declares.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from softlabel.distill.config import DistillConfig
from softlabel.distill.teacherbatch import TeacherBatch
from softlabel.distill.terms import FeatureTerm, TeacherView, build_term
from softlabel.heads import BRANCHES, HeadSpec, branch_output

__all__ = ["Distiller", "TeacherBatch", "split_head"]


class Distiller(nn.Module):
    def __init__(
        self,
        config: DistillConfig,
        reg_max: int,
        student_levels: list[str],
        student_channels: list[int],
        teacher_levels: list[str],
        teacher_channels: list[int],
        *,
        teacher_reg_max: int | None = None,
        student_strides: list[int] | None = None,
        student_branches: tuple[str, ...] = (),
        nc: int = 0,
    ):
        """`teacher_levels`/`teacher_channels`: the teacher's feature levels the cache holds; `teacher_reg_max`: its
        box form (default: the student's); `student_strides` default to 2**level; `student_branches`: BRANCHES
        for an end-to-end student."""
        super().__init__()
        self.config = config
        strides = tuple(student_strides or [2 ** int(lvl[1:]) for lvl in student_levels])
        self.student = HeadSpec(nc, int(reg_max), strides, tuple(student_channels), tuple(student_branches))
        # the teacher's head as the terms read it: its box form on the student's anchors; the feature levels the cache
        # holds (possibly fewer than the head's) are passed to the terms beside it
        self.teacher = HeadSpec(nc, int(teacher_reg_max or reg_max), strides, channels=())
        self.terms = nn.ModuleDict(
            {name: build_term(name, spec, config.source, self.student, self.teacher, list(teacher_levels), list(teacher_channels))
             for name, spec in config.terms.items()}
        )
        self._teacher_levels, self._teacher_channels = list(teacher_levels), list(teacher_channels)
        self.factor = 1.0  # the schedule's multiplier for the current epoch

    @property
    def item_names(self) -> list[str]:
        return [term.item for term in self.terms.values()]

    def forward(self, student, teacher: TeacherBatch) -> dict[str, Tensor]:
        """Weighted distillation terms (already multiplied by the schedule factor), keyed by item name.

        `student`: the student's training output, `{boxes, scores, feats}` or, end-to-end, one such dict per branch."""
        main = branch_output(student, BRANCHES[0])
        if self.factor == 0:
            zero = main["scores"].new_zeros(())
            return {term.item: zero for term in self.terms.values()}
        view = TeacherView(teacher, self.teacher, main["scores"].shape[2])
        out: dict[str, Tensor] = {}
        for name, term in self.terms.items():
            if isinstance(term, FeatureTerm):  # the neck features are one2many's (one2one sees them detached)
                out[term.item] = term(main, view)
                continue
            branch = self.config.terms[name].branch
            if not self.student.end2end or branch != "both":
                out[term.item] = term(branch_output(student, branch), view)
            else:
                out[term.item] = sum(term(branch_output(student, b), view) for b in BRANCHES) / len(BRANCHES)
        return {k: v * self.factor for k, v in out.items()}

    def spec(self) -> dict:
        """Everything it is built from, as plain data (a checkpoint stores this and the weights, never the classes)."""
        return {
            "config": self.config.to_dict(),
            "source": self.config.source,
            "reg_max": self.student.reg_max,
            "student_levels": list(self.student.levels),
            "student_channels": list(self.student.channels),
            "student_strides": list(self.student.strides),
            "student_branches": list(self.student.branches),
            "teacher_levels": list(self._teacher_levels),
            "teacher_channels": list(self._teacher_channels),
            "teacher_reg_max": self.teacher.reg_max,
            "nc": self.student.nc,
        }

    @classmethod
    def from_spec(cls, spec: dict) -> "Distiller":
        from softlabel.distill.config import parse_distill

        return cls(parse_distill(spec["config"], spec["source"]), spec["reg_max"], spec["student_levels"], spec["student_channels"],
                   spec["teacher_levels"], spec["teacher_channels"], teacher_reg_max=spec["teacher_reg_max"],
                   student_strides=spec["student_strides"], student_branches=tuple(spec["student_branches"]), nc=spec["nc"])


def split_head(head_levels: list[Tensor]) -> Tensor:
    """Per-level [B, C, H, W] maps -> [B, C, A] in the head's anchor order."""
    return torch.cat([h.flatten(2) for h in head_levels], 2)
