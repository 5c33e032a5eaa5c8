"""A cohort's folder and its manifest, cohort.json: the members, settings and arguments it was started with and
each finished member's result, from which an interrupted cohort resumes."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from softlabel.errors import UserError
from softlabel.train.members import Member

MANIFEST = "cohort.json"
MANIFEST_FORMAT = 1


def cohort_folder(project: str | None, name: str | None) -> Path:
    """A fresh cohort folder, as Ultralytics names run folders (name, name2, ...)."""
    from ultralytics.utils.files import increment_path

    root = Path(project) if project else Path("runs") / "detect"
    return Path(increment_path(root / (name or "cohort"), exist_ok=False, mkdir=True))


def write_manifest(folder: Path, members: list[Member], settings: dict[str, Any], args: dict[str, Any],
                   results: dict[str, dict] | None = None) -> None:
    data = {"format": MANIFEST_FORMAT, "members": [asdict(m) for m in members], "settings": settings, "args": args,
            "results": results or {}}
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(folder / MANIFEST)


def read_manifest(folder: str | Path) -> tuple[list[Member], dict[str, Any], dict[str, Any], dict[str, dict]]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise UserError(f"{folder}: not a cohort folder (no {MANIFEST}); resume=DIR takes the folder a cohort run printed")
    try:
        data = json.loads(path.read_text())
        if data.get("format") != MANIFEST_FORMAT:
            raise UserError(f"{path}: cohort manifest format {data.get('format')}, this softlabel reads {MANIFEST_FORMAT}")
        members = [Member(**m) for m in data["members"]]
        return members, dict(data["settings"]), dict(data["args"]), dict(data.get("results", {}))
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: damaged cohort manifest ({e})") from None
