"""One distillation term each: a registered loss, the tensors it reads, and how it reads them.

A term takes the student's training output of one branch and the teacher's batch, laid out on the
student's device, and returns its weighted value. What a term may read is declared on its loss's
registry entry (`target`: cls, box or feat; `sparse_teacher`; `accepts_rows`; `box_form`), never
found by trying. The teacher's shared, expensive views (its dense class logits, its confidence)
are computed once per batch by `TeacherView` and only when a term asks.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor, nn

from softlabel.anchors import level_ranges, map_sizes, rank, split_levels
from softlabel.distill.adapters import FeatureAdapters
from softlabel.distill.losses import LOSSES, build_loss, init_args
from softlabel.distill.teacherbatch import TeacherBatch
from softlabel.errors import UserError
from softlabel.heads import HeadSpec, anchor_norm, distances


class TeacherView:
    """A laid-out teacher batch and the views of it the terms share, each computed at most once."""

    def __init__(self, teacher: TeacherBatch, spec: HeadSpec, anchors: int):
        self.batch = teacher.unpacked()  # a packed batch is laid out here, on the student's device
        self.spec = spec
        self.anchors = anchors
        self.box_channels = spec.box_channels

    @functools.cached_property
    def scores(self) -> Tensor:
        """The class logits [B, nc, A]: the dense head's, or the background broadcast with the kept anchors in."""
        return self.batch.class_logits(self.box_channels, self.anchors)

    @functools.cached_property
    def confidence(self) -> Tensor:
        """The best class probability per anchor [B, A]."""
        return self.scores.sigmoid().amax(1)


class Term(nn.Module):
    """The base of every term: its name, weight and loss."""

    def __init__(self, name: str, weight: float, loss: nn.Module):
        super().__init__()
        self.name = name
        self.weight = float(weight)
        self.loss = loss

    @property
    def item(self) -> str:
        return f"kd_{self.name}"


class ClassTerm(Term):
    """A class-logit term: student scores [B, nc, A] against the teacher's."""

    def forward(self, student: dict[str, Tensor], teacher: TeacherView) -> Tensor:
        loss, t = self.loss, teacher.batch
        if t.sparse and loss.sparse_teacher and not loss.confidence_weighted:
            kept = t.head_values()[:, :, teacher.box_channels :]
            return self.weight * loss.forward_sparse(student["scores"], t.index, kept, t.background)
        return self.weight * loss(student["scores"], teacher.scores)


class BoxTerm(Term):
    """A box term: on DFL bins when both heads have the same bins, or on ltrb distances decoded from either form."""

    def __init__(self, name: str, weight: float, loss: nn.Module, student: HeadSpec, teacher: HeadSpec,
                 min_confidence: float = 0.0):
        super().__init__(name, weight, loss)
        self.form = loss.box_form
        self.student_spec, self.teacher_spec = student, teacher
        self.min_confidence = float(min_confidence)

    def forward(self, student: dict[str, Tensor], teacher: TeacherView) -> Tensor:
        t, loss = teacher.batch, self.loss
        weighted = getattr(loss, "confidence_weighted", False)
        tb = teacher.box_channels
        if t.sparse:
            # the teacher's box outputs exist at the kept anchors only: the term runs on them, gathered as one [1, C, N] batch
            b, j = (t.index >= 0).nonzero(as_tuple=True)
            a = t.index[b, j].long()
            s_boxes = student["boxes"][b, :, a].T[None]
            kept = t.head_values()[b, j]
            t_boxes = kept[:, :tb].T[None]
            # a kept anchor's confidence is its own logits' (what the expanded dense teacher holds there)
            confidence = kept[:, tb:].sigmoid().amax(1)[None] if weighted or self.min_confidence else None
        else:
            a = None
            s_boxes, t_boxes = student["boxes"], t.head[:, :tb].float()
            confidence = teacher.confidence if weighted or self.min_confidence else None
        weight = confidence if weighted else None
        # below the floor an anchor is background on both sides: a store keeps no box there, and the live teacher's
        # low-confidence boxes would otherwise carry weight a store cannot reproduce. A store's kept anchors passed its
        # own floor on the unrounded scores, so at or below it nothing is masked again: a rounded stored logit could
        # put an anchor the dump kept just under the floor.
        if self.min_confidence > (t.floor if t.sparse else 0.0):
            above = (confidence >= self.min_confidence).to(confidence.dtype)
            weight = above if weight is None else weight * above
        if s_boxes.shape[2] == 0:  # no kept anchor in the batch: nothing to distil, and no NaN from an empty mean
            return student["boxes"].sum() * 0.0
        if self.form == "bins":
            return self.weight * loss(s_boxes, t_boxes, weight)
        s_dist = distances(s_boxes, self.student_spec.reg_max)
        t_dist = distances(t_boxes, self.teacher_spec.reg_max)
        norm = anchor_norm(student["feats"], self.student_spec.strides)
        norm = norm[:, :, a] if a is not None else norm  # [1, 4, N] at the kept anchors, or [1, 4, A]
        return self.weight * loss(s_dist, t_dist, weight, norm)


class FeatureTerm(Term):
    """A neck-feature term through adapters from student to teacher channels, on whole maps or at chosen anchors."""

    def __init__(self, name: str, weight: float, spec: Any, config_source: str, student: HeadSpec,
                 teacher_levels: list[str], teacher_channels: list[int]):
        loss_name = spec.loss
        if not teacher_levels:
            raise UserError(
                f"{config_source}: the '{name}' term needs teacher features, but the cache holds no features "
                "(dumped with --no-features); use a config without feature terms, e.g. --distill logits_only"
            )
        wanted = list(spec.levels or teacher_levels)
        s_levels = list(student.levels)
        missing = [lvl for lvl in wanted if lvl not in teacher_levels or lvl not in s_levels]
        if missing:
            raise UserError(
                f"{config_source}: '{name}': feature level(s) {', '.join(missing)} not available: the cache holds "
                f"{', '.join(teacher_levels) or 'no features'}, the student has {', '.join(s_levels)}"
            )
        t_ch = [teacher_channels[teacher_levels.index(lvl)] for lvl in wanted]
        s_ch = [student.channels[s_levels.index(lvl)] for lvl in wanted]
        # one loss module per level: a generative loss (MGD) owns per-level parameters
        needs_channels = "channels" in init_args(loss_name)
        losses = [_build(config_source, name, loss_name, spec.options, **({"channels": c} if needs_channels else {})) for c in t_ch]
        super().__init__(name, weight, nn.ModuleList(losses))
        self.levels = wanted
        self.student_levels = s_levels
        self.adapters = FeatureAdapters(s_ch, t_ch, spec.adapter)
        self.level_balance = spec.level_balance
        self.positions = spec.positions
        self.weighted = bool(getattr(losses[0], "confidence_weighted", False))

    def forward(self, student: dict[str, Tensor], teacher: TeacherView) -> Tensor:
        feats = student["feats"]
        s_feats = [feats[self.student_levels.index(lvl)] for lvl in self.levels]
        t = teacher.batch
        if self.positions is not None and t.rows is not None:
            terms, mass = self._stored_rows(s_feats, teacher, feats)
        else:
            needs_conf = self.weighted or self.level_balance == "confidence" or self.positions is not None
            conf = self._per_level(teacher.confidence, feats) if needs_conf else None
            if self.positions is None:
                terms, mass = self._maps(s_feats, t, conf)
            else:
                terms, mass = self._rows(s_feats, t, teacher.scores.amax(1), conf, feats)
        if mass is not None and self.level_balance == "confidence":
            share = mass / mass.sum().clamp_min(1e-12)
        else:
            share = torch.full_like(terms, 1.0 / len(terms))
        return self.weight * (share * terms).sum()

    def _maps(self, s_feats: list[Tensor], teacher: TeacherBatch, conf: list[Tensor] | None) -> tuple[Tensor, Tensor | None]:
        """Per-level feature losses over every position, and each level's confidence mass."""
        t_feats = [teacher.feat(lvl) for lvl in self.levels]
        projected = self.adapters(s_feats, t_feats)
        weights: list[Tensor | None] = conf if self.weighted else [None] * len(s_feats)
        terms = torch.stack([fn(s.float(), t, w) for fn, s, t, w in zip(self.loss, projected, t_feats, weights)])
        return terms, (torch.stack([c.sum() for c in conf]) if conf is not None else None)

    def _rows(self, s_feats: list[Tensor], teacher: TeacherBatch, t_best: Tensor, conf: list[Tensor],
              all_feats: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Per-level feature losses over each image's `positions` anchors the teacher is most confident in, and
        each level's confidence mass over them. Only those positions are gathered and projected, so the term
        costs the same whatever the image size; elsewhere a confidence weight is near zero anyway."""
        k = min(self.positions, t_best.shape[1])
        top = rank(t_best, k)  # ranked as the dump ranks the anchors it keeps
        chosen = torch.zeros_like(t_best, dtype=torch.bool).scatter_(1, top, True)
        chosen = self._per_level(chosen, all_feats)
        terms, mass = [], []
        for level, (lvl, fn, s, keep, c) in enumerate(zip(self.levels, self.loss, s_feats, chosen, conf)):
            t = teacher.feats[lvl]
            self.adapters.check_teacher(level, s, t)
            b, p = keep.nonzero(as_tuple=True)
            w = c[b, p]
            mass.append(w.sum())
            if len(b) == 0:  # no chosen anchor on this level in this batch
                terms.append(s.new_zeros((), dtype=torch.float32))
                continue
            s_rows = self.adapters.rows(level, s.flatten(2)[b, :, p].float())
            terms.append(fn(s_rows, teacher.feat_rows(lvl, b, p), w if self.weighted else None))
        return torch.stack(terms), torch.stack(mass)

    def _stored_rows(self, s_feats: list[Tensor], teacher: TeacherView, all_feats: list[Tensor]) -> tuple[Tensor, Tensor]:
        """As _rows, from a sparse store's rows: each image's `positions` kept anchors the teacher is most confident
        in, their stored rows used as they are (row j is slot j's)."""
        t = teacher.batch
        # the dump stored the kept anchors in the teacher's rank order: the first `positions` slots are its top ones;
        # rows cover the first F slots, and a collated batch may be cut to fewer (then all of them are read)
        k = min(self.positions, t.index.shape[1], t.rows.shape[1])
        conf = t.head_values()[:, :k, teacher.box_channels :].amax(2).sigmoid()
        anchor = t.index[:, :k].long()
        chosen = anchor >= 0
        slot = torch.arange(k, device=anchor.device).expand_as(anchor)
        ranges = dict(zip(self.student_levels, level_ranges(map_sizes(all_feats))))  # one anchor per feature position
        terms, mass = [], []
        for level, (lvl, fn, s) in enumerate(zip(self.levels, self.loss, s_feats)):
            start, end = ranges[lvl]
            b, q = (chosen & (anchor >= start) & (anchor < end)).nonzero(as_tuple=True)
            w = conf[b, q]
            mass.append(w.sum())
            if len(b) == 0:  # no chosen anchor on this level in this batch
                terms.append(s.new_zeros((), dtype=torch.float32))
                continue
            s_rows = self.adapters.rows(level, s.flatten(2)[b, :, anchor[b, q] - start].float())
            t_rows = t.stored_rows(lvl, b, slot[b, q], self.adapters.teacher_channels[level])
            terms.append(fn(s_rows, t_rows, w if self.weighted else None))
        return torch.stack(terms), torch.stack(mass)

    def _per_level(self, per_anchor: Tensor, feats: list[Tensor]) -> list[Tensor]:
        """A per-anchor tensor [B, A] (the teacher's confidence, or any anchor flag) cut into the levels' [B, H*W] slices."""
        per_level = dict(zip(self.student_levels, split_levels(per_anchor, map_sizes(feats))))
        return [per_level[lvl] for lvl in self.levels]


def build_term(name: str, spec: Any, config_source: str, student: HeadSpec, teacher: HeadSpec,
               teacher_levels: list[str], teacher_channels: list[int]) -> Term:
    """The term a config entry describes, for this student and teacher; one clear error when they cannot meet."""
    entry = LOSSES[spec.loss]
    if entry.target == "feat":
        return FeatureTerm(name, spec.weight, spec, config_source, student, teacher_levels, teacher_channels)
    loss = _build(config_source, name, spec.loss, spec.options)
    if entry.target == "cls":
        return ClassTerm(name, spec.weight, loss)
    if entry.box_form == "bins" and not (student.reg_max == teacher.reg_max > 1):
        alternatives = ", ".join(sorted(k for k, v in LOSSES.items() if v.target == "box" and v.box_form == "distances"))
        raise UserError(
            f"{config_source}: '{name}': loss '{spec.loss}' compares DFL bins, but the teacher has reg_max "
            f"{teacher.reg_max} and the student reg_max {student.reg_max}; a box loss on decoded distances "
            f"({alternatives}) teaches across box forms"
        )
    return BoxTerm(name, spec.weight, loss, student, teacher, spec.min_confidence)


def _build(source: str, name: str, loss: str, options: dict, **extra: Any) -> nn.Module:
    try:
        return build_loss(loss, **options, **extra)
    except ValueError as e:
        raise UserError(f"{source}: '{name}': {e}") from None

