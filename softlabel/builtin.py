"""The configs shipped inside the package, chosen by name (`default`) or by the path of a YAML file."""

from __future__ import annotations

from pathlib import Path

from softlabel.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
KINDS = ("augment", "distill")


def builtin_names(kind: str) -> list[str]:
    """The names of the configs of one kind (`augment` or `distill`) that ship with softlabel."""
    return sorted(p.stem for p in (CONFIG_DIR / kind).glob("*.yaml"))


def builtin_path(kind: str, name: str = "default") -> Path:
    return CONFIG_DIR / kind / f"{name}.yaml"


def resolve_config(kind: str, value: str | Path | None, option: str) -> Path:
    """A built-in name (`accurate`) or a YAML path; None means the built-in default.

    A name wins only where no file of that name exists, so a local `default` file is still
    reachable as `./default`."""
    if value is None or str(value).strip() == "":
        return builtin_path(kind)
    text = str(value)
    path = Path(text)
    if path.suffix in (".yaml", ".yml") or path.exists() or "/" in text or "\\" in text:
        return path
    if text in builtin_names(kind):
        return builtin_path(kind, text)
    raise UserError(
        f"{option} {text}: neither a YAML file nor a built-in {kind} config (built-in: {', '.join(builtin_names(kind))})"
    )
