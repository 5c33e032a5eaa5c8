"""All distillation terms of one student: the configured losses plus the feature adapters.

Takes tensors only (the student's train-mode head dict and the teacher's tensors), so the cache,
a live teacher and the tests all feed it the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from softlabel.distill.adapters import FeatureAdapters
from softlabel.distill.config import DistillConfig
from softlabel.errors import UserError

ITEM = {"cls": "kd_cls", "box": "kd_box", "feat": "kd_feat"}


@dataclass
class TeacherBatch:
    head: Tensor  # [B, 4*reg_max + nc, A]: DFL bins then class logits, anchors P3..P5 row-major
    feats: dict[str, Tensor]  # level -> [B, C, H, W]
    mask: Tensor | None = None  # [B, A], 1 where the head is the teacher's own (a sparse cache reconstructs the rest)
    feat_scale: dict[str, Tensor] | None = None  # int8 cache: level -> [B, C], and feats hold the int8 values

    @classmethod
    def from_batch(cls, batch: dict) -> "TeacherBatch":
        """The teacher tensors of a training batch: teacher_head, teacher_feat_<level>, and when
        present teacher_mask and teacher_scale_<level>."""
        feats = {k[len("teacher_feat_") :]: v for k, v in batch.items() if k.startswith("teacher_feat_")}
        scales = {k[len("teacher_scale_") :]: v for k, v in batch.items() if k.startswith("teacher_scale_")}
        return cls(batch["teacher_head"], feats, batch.get("teacher_mask"), scales or None)

    def feat(self, level: str) -> Tensor:
        """One level's feature map [B, C, H, W] as float32."""
        f = self.feats[level].float()
        scale = (self.feat_scale or {}).get(level)
        return f if scale is None else f * scale.float()[:, :, None, None]

    def feat_rows(self, level: str, b: Tensor, p: Tensor) -> Tensor:
        """The feature vectors [N, C] at (image b[n], flattened position p[n]) as float32: an int8
        map is dequantised at those positions only."""
        # indexing batch and position around the channel slice gives rows [N, C]
        rows = self.feats[level].flatten(2)[b, :, p].float()
        scale = (self.feat_scale or {}).get(level)
        return rows if scale is None else rows * scale[b].float()


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
        t_boxes, t_scores = teacher.head[:, :box_ch].float(), teacher.head[:, box_ch:].float()
        out: dict[str, Tensor] = {}
        zero = student["scores"].new_zeros(())
        if self.factor == 0:
            return {name: zero for name in self.item_names}
        if "cls" in self.losses:
            out["kd_cls"] = self.weights["cls"] * self.losses["cls"](student["scores"], t_scores)
        t_conf = t_scores.sigmoid().amax(1) if self.needs_confidence else None
        if "box" in self.losses:
            loss = self.losses["box"]
            weight = t_conf if getattr(loss, "confidence_weighted", False) else None
            s_boxes = student["boxes"]
            if teacher.mask is not None:
                # a sparse head: reconstructed anchors weigh 0, so the term is computed on the kept
                # anchors alone, gathered as one [1, C, N] batch (the same weighted mean, far fewer anchors)
                b, a = (teacher.mask > 0).nonzero(as_tuple=True)
                s_boxes, t_boxes = s_boxes[b, :, a].T[None], t_boxes[b, :, a].T[None]
                kept = teacher.mask[b, a].to(t_boxes.dtype)
                weight = (kept if weight is None else weight[b, a] * kept)[None]
            out["kd_box"] = self.weights["box"] * loss(s_boxes, t_boxes, weight)
        if self.feat_levels:
            s_feats = [student["feats"][student_levels.index(lvl)] for lvl in self.feat_levels]
            conf = self._level_confidence(t_conf, student["feats"], student_levels) if t_conf is not None else None
            if self.positions is None:
                terms, mass = self._feature_maps(s_feats, teacher, conf)
            else:
                terms, mass = self._feature_rows(s_feats, teacher, t_conf, conf, student["feats"], student_levels)
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
        t_conf: Tensor,
        conf: list[Tensor],
        all_feats: list[Tensor],
        student_levels: list[str],
    ) -> tuple[Tensor, Tensor]:
        """Per-level feature losses over each image's `positions` anchors the teacher is most confident
        in, and each level's confidence mass over them.

        Only those positions are gathered and projected, so the term costs the same whatever the
        image size; elsewhere the teacher sees background and a confidence weight is near zero anyway.
        """
        k = min(self.positions, t_conf.shape[1])
        chosen = torch.zeros_like(t_conf, dtype=torch.bool).scatter_(1, t_conf.topk(k, dim=1).indices, True)
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
