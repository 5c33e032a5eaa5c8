"""The loss registry: every loss module registers its class here, and ``build_loss`` builds one by name."""

from __future__ import annotations

import inspect
from typing import Callable, TypeVar

from torch import nn

TARGETS = ("cls", "box", "feat")
# What a box loss reads: "bins", the DFL bin logits [B, 4 * reg_max, A] (reg_max > 1, the same for
# teacher and student); "distances", the ltrb distances [B, 4, A] in grid units.
BOX_FORMS = ("bins", "distances")
LOSSES: dict[str, type[nn.Module]] = {}

_M = TypeVar("_M", bound=type[nn.Module])


def register(name: str, sparse_teacher: bool = False, box_form: str | None = None) -> Callable[[_M], _M]:
    """Class decorator adding a loss to ``LOSSES`` under ``name``.

    ``sparse_teacher``: a class loss that also computes itself from a sparse store's teacher as it is
    (kept anchors, one background logit per class) through ``forward_sparse``, equal to ``forward`` on
    the expanded dense teacher when unweighted.

    ``box_form``: what a box loss reads, and only a box loss gives it: ``"bins"`` for the DFL bin
    logits ``[B, 4 * reg_max, A]`` of teacher and student (same reg_max > 1), ``"distances"`` for the
    ltrb distances ``[B, 4, A]`` in grid units that Ultralytics decodes before ``dist2bbox`` (the DFL
    expectation of a DFL head, the raw output of a reg_max 1 head)."""

    def wrap(cls: _M) -> _M:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is already registered by {LOSSES[name].__name__}")
        target = getattr(cls, "target", None)
        if target not in TARGETS:
            raise ValueError(f"{cls.__name__}.target must be one of {list(TARGETS)}, got {target!r}")
        if sparse_teacher and not (target == "cls" and hasattr(cls, "forward_sparse")):
            raise ValueError(f"{cls.__name__}: sparse_teacher needs a class loss with forward_sparse")
        if target == "box" and box_form not in BOX_FORMS:
            raise ValueError(f"{cls.__name__}: a box loss must give box_form, one of {list(BOX_FORMS)}, "
                             f"got {box_form!r}")
        if target != "box" and box_form is not None:
            raise ValueError(f"{cls.__name__}: box_form is for box losses only, not for a {target!r} loss")
        cls.name = name
        cls.sparse_teacher = sparse_teacher
        cls.box_form = box_form
        LOSSES[name] = cls
        return cls

    return wrap


def init_args(name: str) -> set[str]:
    """The constructor arguments of a registered loss (a loss sized by the teacher's channels takes `channels`)."""
    return set(_init_params(LOSSES[name]))


def _init_params(cls: type[nn.Module]) -> dict[str, inspect.Parameter]:
    params = inspect.signature(cls.__init__).parameters
    return {
        k: p
        for k, p in params.items()
        if k != "self" and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    }


def build_loss(name: str, **kwargs: object) -> nn.Module:
    """Instantiate the registered loss ``name`` with keyword arguments ``kwargs``."""
    if name not in LOSSES:
        raise ValueError(f"unknown distillation loss {name!r}; valid names: {sorted(LOSSES)}")
    cls = LOSSES[name]
    params = _init_params(cls)
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        valid = [f"{k}={p.default!r}" if p.default is not p.empty else k for k, p in params.items()]
        raise ValueError(f"unknown argument(s) {unknown} for loss {name!r}; valid arguments: {valid}")
    missing = [k for k, p in params.items() if p.default is p.empty and k not in kwargs]
    if missing:
        raise ValueError(f"loss {name!r} requires argument(s) {missing}")
    return cls(**kwargs)
