"""The augmentation hyperparameters a cache is built with, read from YAML and checked."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from softlabel.builtin import builtin_path, resolve_config
from softlabel.errors import UserError
from softlabel.yamlfile import read_mapping

DEFAULT_AUGMENT = builtin_path("augment")

# Settings that reorder or resize whole batches after the dataset: a cached tensor could no longer
# be tied to one replayed sample, so they are refused rather than ignored.
_REFUSED = {
    "rect": "rectangular batches re-sort the dataset and change each image's shape",
    "multi_scale": "multi-scale training resizes whole batches after the dataset",
    "copy_paste": "copy-paste needs segment labels and is not replayable here yet",
    "cutmix": "cutmix is not part of the replayable pipeline yet",
}


@dataclass(frozen=True)
class AugmentConfig:
    mosaic: float = 1.0
    degrees: float = 0.0
    translate: float = 0.1
    scale: float = 0.5
    shear: float = 0.0
    perspective: float = 0.0
    hsv_h: float = 0.015
    hsv_s: float = 0.7
    hsv_v: float = 0.4
    flipud: float = 0.0
    fliplr: float = 0.5
    mixup: float = 0.0
    albumentations: bool = True
    close_mosaic: int = 10
    mosaic_group: int = 64  # mosaic and mixup partners come from the image's group of this many (softlabel.replay)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "augmentation config") -> "AugmentConfig":
        valid = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in raw.items():
            if key in _REFUSED:
                if value:
                    raise UserError(f"{source}: '{key}' is not supported: {_REFUSED[key]}")
                continue
            if key not in valid:
                raise UserError(f"{source}: unknown key '{key}'; valid keys: {', '.join(valid)}")
            typ = type(valid[key].default)
            try:
                kwargs[key] = typ(value) if typ is not bool else _as_bool(value)
            except (TypeError, ValueError):
                raise UserError(f"{source}: '{key}' must be {typ.__name__}, got {value!r}") from None
        cfg = cls(**kwargs)
        for key in ("mosaic", "flipud", "fliplr", "mixup"):
            if not 0.0 <= getattr(cfg, key) <= 1.0:
                raise UserError(f"{source}: '{key}' is a probability in [0, 1], got {getattr(cfg, key)}")
        if cfg.close_mosaic < 0:
            raise UserError(f"{source}: 'close_mosaic' must be >= 0")
        if cfg.mosaic_group < 1:
            raise UserError(f"{source}: 'mosaic_group' must be >= 1, got {cfg.mosaic_group}")
        return cfg


    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> "AugmentConfig":
        """The augmentation part of a cache's attributes (which also holds seed, imgsz and views)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in attrs.items() if k in names})


def _as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError(value)


def load_augment(path: str | Path | None = None) -> AugmentConfig:
    """Read an augmentation YAML, or a built-in one by name; keys it leaves out take Ultralytics' defaults."""
    path = resolve_config("augment", path, "--augment")
    raw = read_mapping(path, "augmentation config")
    return AugmentConfig.from_dict(raw, source=str(path))
