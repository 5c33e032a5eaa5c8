"""Read a distillation YAML (a built-in one, softlabel/configs/distill/*.yaml, or the user's) into built loss modules and a schedule."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from softlabel.distill.adapters import ADAPTERS
from softlabel.distill.losses import LOSSES, build_loss, init_args
from softlabel.distill.schedule import DistillSchedule
from softlabel.builtin import builtin_path, resolve_config
from softlabel.errors import UserError
from softlabel.heads import BRANCHES
from softlabel.yamlfile import read_mapping

# How the feature levels share a feature term. "equal": the mean of the per-level losses.
# "confidence": each level in proportion to the teacher's confidence summed over its positions,
# so a level where the teacher sees nothing adds nearly nothing, whatever a sparse head
# reconstructed there.
LEVEL_BALANCE = ("equal", "confidence")
# Which branch of an end-to-end student (YOLO26, YOLOv10) a class or box term teaches: its dense one2many
# branch, its one2one branch, or both (the mean of the two). A one-branch student has only one.
STUDENT_BRANCHES = (*BRANCHES, "both")
DEFAULT_DISTILL = builtin_path("distill")
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
# keys a term may carry besides its loss's own arguments, and the targets they apply to
_FEATURE_KEYS = ("levels", "adapter", "level_balance", "positions")
_HEAD_KEYS = ("branch",)
_BOX_KEYS = ("min_confidence",)


@dataclass(frozen=True)
class Term:
    """One named distillation term as a config lists it."""

    loss: str
    weight: float
    options: dict[str, Any]
    levels: tuple[str, ...] | None = None  # feature terms: levels; None means every cached level
    adapter: str = "conv"  # feature terms: the student-to-teacher projector, see FeatureAdapters
    level_balance: str = "equal"  # feature terms: how levels share the term, see FeatureTerm
    positions: int | None = None  # feature terms: the teacher's top-k anchors per image; None means every position
    branch: str = "one2many"  # class and box terms: the end-to-end student's branch(es) taught
    # box terms: anchors whose teacher confidence is below this read as background, from a store and from a live
    # teacher alike; at a store's floor the box term reads exactly the anchors the store keeps
    min_confidence: float = 0.0

    @property
    def target(self) -> str:
        """What the term reads: 'cls', 'box' or 'feat', as its loss's registry entry declares."""
        return LOSSES[self.loss].target


@dataclass(frozen=True)
class DistillConfig:
    terms: dict[str, Term] = field(default_factory=dict)
    schedule: DistillSchedule = field(default_factory=DistillSchedule)
    source: str = "<defaults>"

    def of(self, target: str) -> dict[str, Term]:
        """The terms that read one target ('cls', 'box', 'feat'), by name."""
        return {name: t for name, t in self.terms.items() if t.target == target}

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, t in self.terms.items():
            out[name] = {"loss": t.loss, "weight": t.weight, **t.options}
            if t.target == "feat":
                if t.levels is not None:
                    out[name]["levels"] = list(t.levels)
                out[name]["adapter"] = t.adapter
                out[name]["level_balance"] = t.level_balance
                out[name]["positions"] = "all" if t.positions is None else t.positions
            else:
                out[name]["branch"] = t.branch
            if t.target == "box":
                out[name]["min_confidence"] = t.min_confidence
        out["schedule"] = dataclasses.asdict(self.schedule)
        return out


def parse_distill(raw: dict[str, Any], source: str) -> DistillConfig:
    """A config: any number of named terms (`name: {loss: L, weight: W, ...}`) and an optional schedule."""
    if not isinstance(raw, dict):
        raise UserError(f"{source}: expected a mapping of named terms ({{name: {{loss: ..., weight: ...}}}}) and an optional schedule")
    terms = {}
    for name, spec in raw.items():
        if name == "schedule":
            continue
        if not isinstance(name, str) or not _NAME.match(name):
            raise UserError(f"{source}: term name {name!r}: use lowercase letters, digits and '_', starting with a letter")
        if name.startswith("dfl") or "bias" in name:
            # a term's parameters are named after it, and Ultralytics freezes '.dfl' and skips weight decay on 'bias' by name
            raise UserError(f"{source}: term name {name!r}: names starting with 'dfl' or holding 'bias' are reserved "
                            "(Ultralytics treats such parameters specially); choose another name")
        if not isinstance(spec, dict) or "loss" not in spec:
            raise UserError(f"{source}: '{name}' must be a mapping with 'loss' (a registered loss, or none) and 'weight'")
        if spec["loss"] in (None, "none"):  # a term switched off
            continue
        terms[name] = _parse_term(name, dict(spec), source)
    sched = raw.get("schedule") or {}
    valid = {f.name for f in dataclasses.fields(DistillSchedule)}
    bad = set(sched) - valid
    if bad:
        raise UserError(f"{source}: schedule: unknown key(s) {', '.join(sorted(bad))}; valid keys: {', '.join(sorted(valid))}")
    try:
        schedule = DistillSchedule(**sched)
        schedule.factor(0, 1, False)
    except (ValueError, TypeError) as e:
        raise UserError(f"{source}: schedule: {e}") from None
    return DistillConfig(terms=terms, schedule=schedule, source=source)


def _parse_term(name: str, spec: dict[str, Any], source: str) -> Term:
    loss = str(spec.pop("loss"))
    if loss not in LOSSES:
        raise UserError(f"{source}: '{name}': unknown loss '{loss}'; valid losses: {', '.join(sorted(LOSSES))}")
    target = LOSSES[loss].target
    weight = float(spec.pop("weight", 1.0))
    other = {"feat": (*_HEAD_KEYS, *_BOX_KEYS), "cls": (*_FEATURE_KEYS, *_BOX_KEYS), "box": _FEATURE_KEYS}[target]
    for key in other:
        if key in spec:
            kinds = "feature terms" if key in _FEATURE_KEYS else "box terms" if key in _BOX_KEYS else "class and box terms"
            raise UserError(f"{source}: '{name}': '{key}' applies to {kinds} only (loss '{loss}' distils '{target}')")
    chosen: dict[str, Any] = {}
    if target == "feat":
        levels = spec.pop("levels", None)
        chosen["levels"] = tuple(str(v).lower() for v in levels) if levels else None
        for key, default, valid in (("adapter", "conv", ADAPTERS), ("level_balance", "equal", LEVEL_BALANCE)):
            chosen[key] = str(spec.pop(key, default))
            if chosen[key] not in valid:
                raise UserError(f"{source}: '{name}': unknown {key} '{chosen[key]}'; valid: {', '.join(valid)}")
        chosen["positions"] = _positions(spec.pop("positions", "all"), name, source)
        if chosen["positions"] is not None and not getattr(LOSSES[loss], "accepts_rows", False):
            rows = sorted(k for k, v in LOSSES.items() if getattr(v, "accepts_rows", False))
            raise UserError(f"{source}: '{name}': loss '{loss}' needs whole feature maps, so 'positions' must be 'all' "
                            f"(losses that take selected positions: {', '.join(rows)})")
    else:
        chosen["branch"] = str(spec.pop("branch", "one2many"))
        if chosen["branch"] not in STUDENT_BRANCHES:
            raise UserError(f"{source}: '{name}': unknown branch '{chosen['branch']}'; valid: {', '.join(STUDENT_BRANCHES)}")
    if target == "box":
        chosen["min_confidence"] = _score(spec.pop("min_confidence", 0.0), "min_confidence", name, source)
    term = Term(loss, weight, spec, **chosen)
    if "channels" not in init_args(loss):  # a loss sized by the teacher's channels (mgd) is checked when built
        try:
            build_loss(loss, **spec)
        except ValueError as e:
            raise UserError(f"{source}: '{name}': {e}") from None
    return term


def _score(raw: Any, key: str, name: str, source: str) -> float:
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not 0.0 <= raw < 1.0:
        raise UserError(f"{source}: '{name}': {key} is a teacher score in [0, 1), got {raw!r}")
    return float(raw)


def _positions(raw: Any, name: str, source: str) -> int | None:
    if isinstance(raw, str) and raw.strip().lower() == "all":
        return None
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 1:
        raise UserError(f"{source}: '{name}': positions must be 'all' or a whole number of anchors per image >= 1, got {raw!r}")
    return raw


def default_name(student_reg_max: int | None = None, teacher_reg_max: int | None = None) -> str:
    """The built-in config a run without --distill uses: 'default' (LD on DFL bins) where teacher and student have
    the same DFL bins, 'distances' (a box term on decoded distances) where either head predicts distances or the
    bins differ."""
    if student_reg_max is None or teacher_reg_max is None or student_reg_max == teacher_reg_max > 1:
        return "default"
    return "distances"


def load_distill(path: str | Path | None = None, student_reg_max: int | None = None,
                 teacher_reg_max: int | None = None) -> DistillConfig:
    """A built-in config by name (default, distances, accurate, logits_only) or a YAML path; None: the built-in
    default for this pair of heads (default_name)."""
    if path is None or str(path).strip() == "":
        path = default_name(student_reg_max, teacher_reg_max)
    path = resolve_config("distill", path, "--distill")
    return parse_distill(read_mapping(path, "distillation config"), str(path))
