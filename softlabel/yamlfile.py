"""Reading a YAML file the user named: one clear error for a missing file, bad YAML or a non-mapping."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from softlabel.errors import UserError


def read_mapping(path: Path, what: str) -> dict[str, Any]:
    """The mapping in a YAML file; `what` names the file's role in messages (e.g. 'data.yaml')."""
    if not path.is_file():
        raise UserError(f"{path}: {what} not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping in this {what}")
    return raw
