"""Reading a YAML file the user named: one clear error for a missing file, bad YAML or a non-mapping,
and bounds checked on the raw text before any YAML is composed, so a hostile file costs little."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from softlabel.errors import UserError

# Ultralytics' largest bundled data.yaml (ImageNet.yaml, 1,000 class names) is 42 KB; a 21,841-class list
# (ImageNet-21k) is under 1 MB. 2 MiB leaves room for either and is read and scanned in well under a second.
MAX_YAML_BYTES = 2 << 20

# An alias repeats what its anchor holds, and aliases of aliases multiply: with N aliases a document can stand
# for about 3**(N/3) copies of its own text (billion laughs: 9 levels of 9 aliases stand for 10**9 strings,
# and `str()` of them, which Ultralytics applies to every class name, takes minutes and gigabytes). 12 allows
# any sensible reuse of a block (data.yaml and softlabel's configs use none) and caps the expansion at 81
# times a file of at most MAX_YAML_BYTES.
MAX_YAML_ALIASES = 12

# Real configs nest a few levels. PyYAML composes recursively: safe_load of 500 nested '[' ends in a RecursionError
# (a traceback, not a YAML error), and libyaml stops at 1,000 levels; 64 refuses both with one line.
MAX_YAML_DEPTH = 64

_OPEN = (yaml.BlockMappingStartToken, yaml.BlockSequenceStartToken, yaml.FlowMappingStartToken, yaml.FlowSequenceStartToken)
_CLOSE = (yaml.BlockEndToken, yaml.FlowMappingEndToken, yaml.FlowSequenceEndToken)
_SCAN_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's scanner when installed: same tokens, faster


def read_yaml_text(path: Path, what: str, errors: str = "strict") -> str:
    """The text of a YAML file, refused before it is read when it is larger than any real one."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} not found")
    size = path.stat().st_size
    if size > MAX_YAML_BYTES:
        raise UserError(f"{path}: {what} is {size:,} bytes, over the {MAX_YAML_BYTES:,}-byte limit for a YAML file")
    try:
        with open(path, encoding="utf-8", errors=errors) as f:
            text = f.read(MAX_YAML_BYTES + 1)  # the file may have grown since stat
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read this {what} ({e})") from None
    if len(text) > MAX_YAML_BYTES:
        raise UserError(f"{path}: {what} is over the {MAX_YAML_BYTES:,}-byte limit for a YAML file")
    return text


def check_yaml_text(text: str, path: Path) -> None:
    """Count aliases and nesting on the token stream alone (no node is composed, no alias expanded)."""
    aliases = depth = 0
    try:
        for token in yaml.scan(text, Loader=_SCAN_LOADER):
            if isinstance(token, yaml.AliasToken):
                aliases += 1
                if aliases > MAX_YAML_ALIASES:
                    raise UserError(
                        f"{path}: more than {MAX_YAML_ALIASES} YAML aliases (*name), the limit; "
                        "aliases of aliases can make a small file expand without bound"
                    )
            elif isinstance(token, _OPEN):
                depth += 1
                if depth > MAX_YAML_DEPTH:
                    raise UserError(f"{path}: YAML nested more than {MAX_YAML_DEPTH} levels deep, the limit")
            elif isinstance(token, _CLOSE):
                depth -= 1
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None


def read_mapping(path: Path, what: str) -> dict[str, Any]:
    """The mapping in a YAML file; `what` names the file's role in messages (e.g. 'data.yaml')."""
    text = read_yaml_text(path, what)
    check_yaml_text(text, path)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping in this {what}")
    return raw
