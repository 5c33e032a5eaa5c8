"""Who is in a cohort: the students given and every combination of the swept values, each a member with its
own name and its own arguments; what a sweep may not vary (the batch stream the members share)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from softlabel.errors import UserError

# arguments that shape the batch stream or the device the students share: one value for the whole cohort
STREAM_KEYS = frozenset({
    "data", "imgsz", "batch", "epochs", "seed", "close_mosaic", "workers", "device", "rect", "multi_scale", "fraction",
    "cache", "resume", "time", "deterministic", "amp", "project", "name", "exist_ok", "single_cls", "classes",
})
# softlabel settings a sweep may vary per student (the others are the cohort's, like the stream keys)
MEMBER_SETTINGS = ("distill_config",)
SWEEP_SETTINGS = {"distill": "distill_config"}


@dataclass(frozen=True)
class Member:
    """One student of a cohort: its run folder name, the student as given, and its own arguments."""

    name: str
    student: str
    overrides: dict[str, Any] = field(default_factory=dict)  # Ultralytics arguments and MEMBER_SETTINGS of its own


def parse_sweep(text: str) -> tuple[str, list[str]]:
    """'lr0=0.01,0.005' -> ('lr0', ['0.01', '0.005'])."""
    key, sep, values = text.partition("=")
    key = key.strip()
    items = [v.strip() for v in values.split(",") if v.strip()]
    if not sep or not key or not items:
        raise UserError(f"--sweep '{text}': expected KEY=VALUE1,VALUE2,... e.g. lr0=0.01,0.005")
    if key in STREAM_KEYS:
        raise UserError(f"--sweep {key}: every student of a cohort reads the same batches, so {key} is one value for all")
    if len(set(items)) != len(items):
        raise UserError(f"--sweep '{text}': a value is given twice")
    return key, items


def expand_members(students: list[str], sweeps: list[str]) -> list[Member]:
    """Every student with every combination of the swept values, named after both (yolov8n-lr0=0.01)."""
    from softlabel.trainargs import parse_train_args

    axes = [parse_sweep(s) for s in sweeps]
    if len({k for k, _ in axes}) != len(axes):
        raise UserError("--sweep: a key is swept twice")
    combos: list[dict[str, str]] = [{}]
    for key, values in axes:
        combos = [{**c, key: v} for c in combos for v in values]
    members = []
    for student in students:
        for combo in combos:
            overrides: dict[str, Any] = {}
            ultralytics = {k: v for k, v in combo.items() if k not in SWEEP_SETTINGS}
            overrides.update(parse_train_args([f"{k}={v}" for k, v in ultralytics.items()]))  # checked as Ultralytics would
            for key, setting in SWEEP_SETTINGS.items():
                if key in combo:
                    from softlabel.distill.config import load_distill

                    load_distill(combo[key])  # a bad config stops here, before any training
                    overrides[setting] = combo[key]
            stem = Path(student).stem
            name = "-".join([stem, *(f"{k}={v}" for k, v in combo.items())])
            members.append(Member(name=name.replace("/", "_"), student=student, overrides=overrides))
    names = [m.name for m in members]
    if len(set(names)) != len(names):  # one student given twice: number the repeats
        seen: dict[str, int] = {}
        renamed = []
        for m in members:
            seen[m.name] = seen.get(m.name, 0) + 1
            renamed.append(Member(f"{m.name}-{seen[m.name]}" if names.count(m.name) > 1 else m.name, m.student, m.overrides))
        members = renamed
    return members
