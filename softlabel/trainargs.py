"""Ultralytics training arguments in Ultralytics' own `key=value` form, checked by Ultralytics' own config check.

`softlabel train ... lr0=0.005 optimizer=AdamW cos_lr=True` passes every argument `yolo train`
knows straight to the trainer, except those that would change what a cached sample means: the
replay fixes the augmentation, the image shapes and the image list when the cache is dumped.
"""

from __future__ import annotations

import contextlib
import logging
import re
from typing import Any, Iterator

from softlabel.errors import UserError

_CACHE_FIXES = "the replay fixes it when the cache is dumped, so a student cannot change it"
_AUGMENT = "augmentation comes from the cache (dump --augment NAME|CONFIG.yaml; online: train --augment)"
_DATA = "it changes the images or classes the cache was dumped for"

# Keys whose meaning cannot combine with replayed, cached samples, and why.
REFUSED: dict[str, str] = {
    "rect": "rectangular batches re-sort the dataset and change each image's shape; " + _CACHE_FIXES,
    "multi_scale": "multi-scale training resizes whole batches after the dataset; " + _CACHE_FIXES,
    **{k: _AUGMENT for k in ("hsv_h", "hsv_s", "hsv_v", "degrees", "translate", "scale", "shear", "perspective",
                              "flipud", "fliplr", "bgr", "mosaic", "mixup", "cutmix", "copy_paste", "copy_paste_mode",
                              "auto_augment", "erasing")},
    **{k: _DATA for k in ("fraction", "classes", "single_cls", "cls_remap")},
    "model": "the student is given with --student",
    "task": "softlabel trains detection students",
    "mode": "softlabel train always trains",
    "cfg": "give the arguments themselves as key=value, so each is checked",
    "distill_model": "softlabel distils from --cache or --teacher, not Ultralytics' own distillation",
    "dis": "softlabel distils from --cache or --teacher, not Ultralytics' own distillation",
}

# Keys that also have a softlabel option: either form works, but not both at once.
OPTION_KEYS = ("data", "epochs", "imgsz", "batch", "device", "workers", "seed", "close_mosaic", "project", "name", "plots")


@contextlib.contextmanager
def _quiet_ultralytics() -> Iterator[None]:
    """Ultralytics prints its whole CLI help before refusing a key; the user gets our one line instead."""
    logger = logging.getLogger("ultralytics")
    before = logger.disabled
    logger.disabled = True
    try:
        yield
    finally:
        logger.disabled = before


def _one_line(error: BaseException) -> str:
    text = " ".join(ln.strip() for ln in str(error).splitlines() if ln.strip())
    return re.sub(r"\s+", " ", text.replace("❌", "").replace("⚠️", "")).strip()


def parse_train_args(pairs: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`key=value` strings -> Ultralytics training arguments, typed and checked by `ultralytics.cfg.get_cfg`."""
    from ultralytics.cfg import DEFAULT_CFG_DICT, get_cfg, parse_key_value_pair

    given: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair or pair.startswith("="):
            raise UserError(f"'{pair}': expected an Ultralytics training argument as key=value, e.g. lr0=0.005")
        try:
            key, value = parse_key_value_pair(pair)
        except AssertionError as e:
            raise UserError(f"'{pair}': {e}") from None
        if key in given:
            raise UserError(f"'{key}' is given twice")
        given[key] = value
    if not given:
        return {}
    try:
        with _quiet_ultralytics():
            cfg = vars(get_cfg(DEFAULT_CFG_DICT, given))
    except (SyntaxError, TypeError, ValueError) as e:
        raise UserError(_one_line(e)) from None
    for key in given:
        if key in REFUSED:
            raise UserError(f"{key}={given[key]}: not with softlabel train: {REFUSED[key]}")
    # Ultralytics' values (typed, deprecated names replaced), for the keys the user set
    return {k: v for k, v in cfg.items() if k in given or v != DEFAULT_CFG_DICT.get(k, v)}


def merge_options(options: dict[str, Any], explicit: set[str], args: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Options that also came as key=value take that value; given both ways, refused.

    `explicit` names the options typed on the command line. Returns (options, remaining key=value arguments)."""
    options, args = dict(options), dict(args)
    for key in OPTION_KEYS:
        if key in args:
            if key in explicit:
                raise UserError(f"'{key}' is given twice: as --{key.replace('_', '-')} and as {key}=")
            options[key] = args.pop(key)
    return options, args
