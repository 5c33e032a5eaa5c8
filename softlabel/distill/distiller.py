"""All distillation terms of one student: the configured losses plus the feature adapters.

Takes tensors only (the student's train-mode head dict and the teacher's tensors), so the cache,
a live teacher and the tests all feed it the same way.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from softlabel.distill.adapters import FeatureAdapters
from softlabel.distill.config import DistillConfig
from softlabel.distill.teacherbatch import TeacherBatch
from softlabel.errors import UserError

ITEM = {"cls": "kd_cls", "box": "kd_box", "feat": "kd_feat"}

__all__ = ["Distiller", "TeacherBatch", "split_head", "ITEM"]


class Distiller(nn.Module):
    def __init__(
        self,
        config: DistillConfig,
        reg_max: int,
        student_levels: list[str],
        student_channels: list[int],
        teacher_levels: list[str],
        teacher_channels: list[int],
    ):
        super().__init__()
        self.config = config
        self.reg_max = reg_max
        self.weights = {name: term.weight for name, term in config.terms.items()}
        self.losses = nn.ModuleDict()
        for name in ("cls", "box"):
            if name in config.terms:
                self.losses[name] = config.build(name)
        self.feat_levels: list[str] = []
        if "feat" in config.terms:
            if not teacher_levels:
                raise UserError(
                    f"{config.source}: the 'feat' term needs teacher features, but the cache holds no features "
                    "(dumped with --no-features); use a config without 'feat', e.g. --distill logits_only"
                )
            wanted = list(config.terms["feat"].levels or teacher_levels)
            missing = [lvl for lvl in wanted if lvl not in teacher_levels or lvl not in student_levels]
            if missing:
                raise UserError(
                    f"{config.source}: feature level(s) {', '.join(missing)} not available: the cache holds "
                    f"{', '.join(teacher_levels) or 'no features'}, the student has {', '.join(student_levels)}"
                )
            self.feat_levels = wanted
            s_ch = [student_channels[student_levels.index(lvl)] for lvl in wanted]
            t_ch = [teacher_channels[teacher_levels.index(lvl)] for lvl in wanted]
            self.adapters = FeatureAdapters(s_ch, t_ch, config.terms["feat"].adapter)
            self.level_balance = config.terms["feat"].level_balance
            self.positions = config.terms["feat"].positions
            extra = {"channels": None} if config.terms["feat"].loss == "mgd" else {}
            # one loss module per level: a generative loss (MGD) owns per-level parameters
            self.feat_losses = nn.ModuleList(
                config.build("feat", **({"channels": c} if extra else {})) for c in t_ch
            )
        self.factor = 1.0  # the schedule's multiplier for the current epoch
        self.feat_weighted = bool(self.feat_levels) and getattr(self.feat_losses[0], "confidence_weighted", False)
        feat_balanced = bool(self.feat_levels) and self.level_balance == "confidence"
        box_weighted = "box" in self.losses and getattr(self.losses["box"], "confidence_weighted", False)
        feat_selected = bool(self.feat_levels) and self.positions is not None
        # the teacher's best class probability per anchor: computed once per batch for every term that uses it
        self.needs_confidence = box_weighted or self.feat_weighted or feat_balanced or feat_selected

    @property
    def item_names(self) -> list[str]:
        return [ITEM[name] for name in ("cls", "box", "feat") if name in self.config.terms]

    def forward(self, student: dict, teacher: TeacherBatch, student_levels: list[str]) -> dict[str, Tensor]:
        """Weighted distillation terms (already multiplied by the schedule factor), keyed by item name."""
        box_ch = 4 * self.reg_max
        out: dict[str, Tensor] = {}
        zero = student["scores"].new_zeros(())
        if self.factor == 0:
            return {name: zero for name in self.item_names}
        # a packed teacher is laid out here, on the student's device; its dense class logits (background everywhere,
        # the kept anchors scattered in) are expanded only for a term that cannot use the kept anchors as they are
        teacher = teacher.unpacked()
        anchors = student["scores"].shape[2]

        @functools.cache
        def t_scores() -> Tensor:  # the teacher's class logits [B, nc, A], expanded once and only when a term needs them
            return teacher.class_logits(box_ch, anchors)

        @functools.cache
        def t_conf() -> Tensor:  # its best class probability per anchor [B, A]
            return t_scores().sigmoid().amax(1)

        if "cls" in self.losses:
            loss = self.losses["cls"]
            if teacher.sparse and loss.sparse_teacher and not loss.confidence_weighted:
                kept = teacher.head_values()[:, :, box_ch:]
                out["kd_cls"] = self.weights["cls"] * loss.forward_sparse(student["scores"], teacher.index, kept, teacher.background)
            else:
                out["kd_cls"] = self.weights["cls"] * loss(student["scores"], t_scores())
        if "box" in self.losses:
            loss = self.losses["box"]
            weighted = getattr(loss, "confidence_weighted", False)
            if teacher.sparse:
                # the DFL bins exist at the kept anchors only: the term runs on them, gathered as one [1, C, N] batch
                b, j = (teacher.index >= 0).nonzero(as_tuple=True)
                a = teacher.index[b, j].long()
                s_boxes = student["boxes"][b, :, a].T[None]
                kept = teacher.head_values()[b, j]
                t_boxes = kept[:, :box_ch].T[None]
                # a kept anchor's confidence is its own logits' (what the expanded dense teacher holds there)
                weight = kept[:, box_ch:].sigmoid().amax(1)[None] if weighted else None
            else:
                s_boxes, t_boxes = student["boxes"], teacher.head[:, :box_ch].float()
                weight = t_conf() if weighted else None
            if s_boxes.shape[2] == 0:  # no kept anchor in the batch: nothing to distil, and no NaN from an empty mean
                out["kd_box"] = student["boxes"].sum() * 0.0
            else:
                out["kd_box"] = self.weights["box"] * loss(s_boxes, t_boxes, weight)
        if self.feat_levels:
            s_feats = [student["feats"][student_levels.index(lvl)] for lvl in self.feat_levels]
            if self.positions is not None and teacher.rows is not None:
                terms, mass = self._feature_stored_rows(s_feats, teacher, box_ch, student["feats"], student_levels)
            else:
                conf = self._level_confidence(t_conf(), student["feats"], student_levels) if self.needs_confidence else None
                if self.positions is None:
                    terms, mass = self._feature_maps(s_feats, teacher, conf)
                else:
                    terms, mass = self._feature_rows(s_feats, teacher, t_scores().amax(1), conf, student["feats"], student_levels)
            if mass is not None and self.level_balance == "confidence":
                share = mass / mass.sum().clamp_min(1e-12)
            else:
                share = torch.full_like(terms, 1.0 / len(terms))
            out["kd_feat"] = self.weights["feat"] * (share * terms).sum()
        return {k: v * self.factor for k, v in out.items()}

    def _feature_maps(self, s_feats: list[Tensor], teacher: TeacherBatch, conf: list[Tensor] | None) -> tuple[Tensor, Tensor | None]:
        """Per-level feature losses over every position, and each level's confidence mass."""
        t_feats = [teacher.feat(lvl) for lvl in self.feat_levels]
        projected = self.adapters(s_feats, t_feats)
        weights: list[Tensor | None] = conf if self.feat_weighted else [None] * len(s_feats)
        terms = torch.stack([fn(s.float(), t, w) for fn, s, t, w in zip(self.feat_losses, projected, t_feats, weights)])
        return terms, (torch.stack([c.sum() for c in conf]) if conf is not None else None)

    def _feature_rows(
        self,
        s_feats: list[Tensor],
        teacher: TeacherBatch,
        t_best: Tensor,
        conf: list[Tensor],
        all_feats: list[Tensor],
        student_levels: list[str],
    ) -> tuple[Tensor, Tensor]:
        """Per-level feature losses over each image's `positions` anchors the teacher is most confident
        in, and each level's confidence mass over them.

        Only those positions are gathered and projected, so the term costs the same whatever the
        image size; elsewhere the teacher sees background and a confidence weight is near zero anyway.
        """
        k = min(self.positions, t_best.shape[1])
        # ranked as the dump ranks the anchors it keeps: by best class logit, the lower anchor first among equals
        top = torch.sort(t_best, dim=1, descending=True, stable=True).indices[:, :k]
        chosen = torch.zeros_like(t_best, dtype=torch.bool).scatter_(1, top, True)
        chosen = self._level_confidence(chosen, all_feats, student_levels)
        terms, mass = [], []
        for level, (lvl, fn, s, keep, c) in enumerate(zip(self.feat_levels, self.feat_losses, s_feats, chosen, conf)):
            t = teacher.feats[lvl]
            self.adapters.check_teacher(level, s, t)
            b, p = keep.nonzero(as_tuple=True)
            w = c[b, p]
            mass.append(w.sum())
            if len(b) == 0:  # no chosen anchor on this level in this batch
                terms.append(s.new_zeros((), dtype=torch.float32))
                continue
            s_rows = self.adapters.rows(level, s.flatten(2)[b, :, p].float())
            t_rows = teacher.feat_rows(lvl, b, p)
            terms.append(fn(s_rows, t_rows, w if self.feat_weighted else None))
        return torch.stack(terms), torch.stack(mass)

    def _feature_stored_rows(
        self, s_feats: list[Tensor], teacher: TeacherBatch, box_ch: int, all_feats: list[Tensor], student_levels: list[str]
    ) -> tuple[Tensor, Tensor]:
        """As _feature_rows, from a sparse store's rows: each image's `positions` kept anchors the
        teacher is most confident in, their stored rows used as they are (row j is slot j's)."""
        # the dump stored the kept anchors in the teacher's rank order: the first `positions` slots are its top ones;
        # rows cover the first F slots, and a collated batch may be cut to fewer (then all of them are read)
        k = min(self.positions, teacher.index.shape[1], teacher.rows.shape[1])
        conf = teacher.head_values()[:, :k, box_ch:].amax(2).sigmoid()
        anchor = teacher.index[:, :k].long()
        chosen = anchor >= 0
        slot = torch.arange(k, device=anchor.device).expand_as(anchor)
        sizes = [f.shape[2] * f.shape[3] for f in all_feats]  # the head's anchors run P3..P5, one per feature position
        starts = dict(zip(student_levels, [sum(sizes[:i]) for i in range(len(sizes))]))
        ends = {lvl: starts[lvl] + n for lvl, n in zip(student_levels, sizes)}
        terms, mass = [], []
        for level, (lvl, fn, s) in enumerate(zip(self.feat_levels, self.feat_losses, s_feats)):
            b, q = (chosen & (anchor >= starts[lvl]) & (anchor < ends[lvl])).nonzero(as_tuple=True)
            w = conf[b, q]
            mass.append(w.sum())
            if len(b) == 0:  # no chosen anchor on this level in this batch
                terms.append(s.new_zeros((), dtype=torch.float32))
                continue
            s_rows = self.adapters.rows(level, s.flatten(2)[b, :, anchor[b, q] - starts[lvl]].float())
            t_rows = teacher.stored_rows(lvl, b, slot[b, q], self.adapters.teacher_channels[level])
            terms.append(fn(s_rows, t_rows, w if self.feat_weighted else None))
        return torch.stack(terms), torch.stack(mass)

    def _level_confidence(self, conf: Tensor, feats: list[Tensor], student_levels: list[str]) -> list[Tensor]:
        """A per-anchor tensor [B, A] (the teacher's confidence, or any anchor flag) cut into the feature levels' [B, H*W] slices."""
        sizes = [f.shape[2] * f.shape[3] for f in feats]  # the head's anchors run P3..P5, one per feature position
        if sum(sizes) != conf.shape[1]:
            raise ValueError(f"teacher head has {conf.shape[1]} anchors, student feature maps {sum(sizes)} positions")
        per_level = dict(zip(student_levels, torch.split(conf, sizes, dim=1)))
        return [per_level[lvl] for lvl in self.feat_levels]


def split_head(head_levels: list[Tensor]) -> Tensor:
    """Per-level [B, C, H, W] maps -> [B, C, A] in the head's anchor order."""
    return torch.cat([h.flatten(2) for h in head_levels], 2)
