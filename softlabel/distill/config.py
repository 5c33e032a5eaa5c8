"""Read a distillation YAML (a built-in one, softlabel/configs/distill/*.yaml, or the user's) into built loss modules and a schedule."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from softlabel.distill.adapters import ADAPTERS
from softlabel.distill.losses import LOSSES, build_loss
from softlabel.distill.schedule import DistillSchedule
from softlabel.builtin import builtin_path, resolve_config
from softlabel.errors import UserError
from softlabel.yamlfile import read_mapping

TERMS = ("cls", "box", "feat")
# How the feature levels share the feature term. "equal": the mean of the per-level losses.
# "confidence": each level in proportion to the teacher's confidence summed over its positions,
# so a level where the teacher sees nothing adds nearly nothing, whatever a sparse head
# reconstructed there.
LEVEL_BALANCE = ("equal", "confidence")
DEFAULT_DISTILL = builtin_path("distill")


@dataclass(frozen=True)
class Term:
    loss: str
    weight: float
    options: dict[str, Any]
    levels: tuple[str, ...] | None = None  # feature levels; None means every cached level
    adapter: str = "conv"  # feature term: the student-to-teacher projector, see FeatureAdapters
    level_balance: str = "equal"  # feature term: how levels share the term, see Distiller
    positions: int | None = None  # feature term: the teacher's top-k anchors per image; None means every position


@dataclass(frozen=True)
class DistillConfig:
    terms: dict[str, Term] = field(default_factory=dict)
    schedule: DistillSchedule = field(default_factory=DistillSchedule)
    source: str = "<defaults>"

    def build(self, name: str, **extra: Any) -> nn.Module:
        term = self.terms[name]
        try:
            return build_loss(term.loss, **term.options, **extra)
        except ValueError as e:
            raise UserError(f"{self.source}: '{name}': {e}") from None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, t in self.terms.items():
            out[name] = {"loss": t.loss, "weight": t.weight, **t.options}
            if t.levels is not None:
                out[name]["levels"] = list(t.levels)
            if name == "feat":
                out[name]["adapter"] = t.adapter
                out[name]["level_balance"] = t.level_balance
                out[name]["positions"] = "all" if t.positions is None else t.positions
        out["schedule"] = dataclasses.asdict(self.schedule)
        return out


def parse_distill(raw: dict[str, Any], source: str) -> DistillConfig:
    if not isinstance(raw, dict):
        raise UserError(f"{source}: expected a mapping with any of {', '.join(TERMS)}, schedule")
    unknown = set(raw) - {*TERMS, "schedule"}
    if unknown:
        raise UserError(f"{source}: unknown key(s) {', '.join(sorted(unknown))}; valid keys: {', '.join(TERMS)}, schedule")
    terms = {}
    for name in TERMS:
        spec = raw.get(name)
        if spec is None or (isinstance(spec, dict) and spec.get("loss") in (None, "none")):
            continue
        if not isinstance(spec, dict):
            raise UserError(f"{source}: '{name}' must be a mapping with 'loss' and 'weight'")
        spec = dict(spec)
        loss = str(spec.pop("loss"))
        if loss not in LOSSES:
            raise UserError(f"{source}: '{name}': unknown loss '{loss}'; valid losses: {', '.join(sorted(LOSSES))}")
        if LOSSES[loss].target != name:
            valid = sorted(k for k, v in LOSSES.items() if v.target == name)
            raise UserError(f"{source}: '{name}': loss '{loss}' distils '{LOSSES[loss].target}'; for '{name}' use one of {', '.join(valid)}")
        weight = float(spec.pop("weight", 1.0))
        levels = spec.pop("levels", None)
        if levels is not None and name != "feat":
            raise UserError(f"{source}: 'levels' applies to 'feat' only")
        feat_only = {"adapter": ("conv", ADAPTERS), "level_balance": ("equal", LEVEL_BALANCE)}
        chosen = {}
        for key, (default, valid) in feat_only.items():
            if key in spec and name != "feat":
                raise UserError(f"{source}: '{key}' applies to 'feat' only")
            chosen[key] = str(spec.pop(key, default))
            if chosen[key] not in valid:
                raise UserError(f"{source}: 'feat': unknown {key} '{chosen[key]}'; valid: {', '.join(valid)}")
        if "positions" in spec and name != "feat":
            raise UserError(f"{source}: 'positions' applies to 'feat' only")
        positions = _positions(spec.pop("positions", "all"), source)
        if positions is not None and not getattr(LOSSES[loss], "accepts_rows", False):
            rows = sorted(k for k, v in LOSSES.items() if getattr(v, "accepts_rows", False))
            raise UserError(f"{source}: 'feat': loss '{loss}' needs whole feature maps, so 'positions' must be 'all' "
                            f"(losses that take selected positions: {', '.join(rows)})")
        terms[name] = Term(loss, weight, spec, tuple(str(v).lower() for v in levels) if levels else None, **chosen,
                           positions=positions)
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
    config = DistillConfig(terms=terms, schedule=schedule, source=source)
    for name in terms:
        if name != "feat" or terms[name].loss != "mgd":  # mgd needs the channel count, checked when built
            config.build(name)
    return config


def _positions(raw: Any, source: str) -> int | None:
    if isinstance(raw, str) and raw.strip().lower() == "all":
        return None
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 1:
        raise UserError(f"{source}: 'feat': positions must be 'all' or a whole number of anchors per image >= 1, got {raw!r}")
    return raw


def load_distill(path: str | Path | None = None) -> DistillConfig:
    """A built-in config by name (default, accurate, logits_only) or a YAML path; None: the default."""
    path = resolve_config("distill", path, "--distill")
    return parse_distill(read_mapping(path, "distillation config"), str(path))
