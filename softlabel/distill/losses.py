"""Distillation losses for Ultralytics YOLO detectors and the registry that builds them.

Every loss is an ``nn.Module`` whose ``forward(student, teacher, weight=None)`` returns a scalar and
whose class attribute ``target`` names the head tensor it consumes:

* ``"cls"``  class logits ``[B, nc, A]`` (independent sigmoids per class),
* ``"box"``  box distributions ``[B, 4 * reg_max, A]`` (sides ltrb, bins minor),
* ``"feat"`` one feature level ``[B, C, H, W]`` with the student already projected to teacher channels.

``weight`` is an optional non-negative anchor weight ``[B, A]``; feature losses take the slice of it
that belongs to their level, ``[B, H * W]`` or ``[B, H, W]``. Weighted losses divide by the weight
sum, so a weight acts like a mask whose scale does not change the loss magnitude.
"""

from __future__ import annotations

import inspect
from typing import Callable, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LOSSES",
    "TARGETS",
    "register",
    "build_loss",
    "BCEDistill",
    "KLClassDistill",
    "MSELogitsDistill",
    "LDLoss",
    "MimicLoss",
    "CWDLoss",
    "MGDLoss",
]

TARGETS = ("cls", "box", "feat")
LOSSES: dict[str, type[nn.Module]] = {}

_M = TypeVar("_M", bound=type[nn.Module])


def register(name: str, sparse_teacher: bool = False) -> Callable[[_M], _M]:
    """Class decorator adding a loss to ``LOSSES`` under ``name``.

    ``sparse_teacher``: a class loss that also computes itself from a sparse store's teacher as it is
    (kept anchors, one background logit per class) through ``forward_sparse``, equal to ``forward`` on
    the expanded dense teacher when unweighted."""

    def wrap(cls: _M) -> _M:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is already registered by {LOSSES[name].__name__}")
        target = getattr(cls, "target", None)
        if target not in TARGETS:
            raise ValueError(f"{cls.__name__}.target must be one of {list(TARGETS)}, got {target!r}")
        if sparse_teacher and not (target == "cls" and hasattr(cls, "forward_sparse")):
            raise ValueError(f"{cls.__name__}: sparse_teacher needs a class loss with forward_sparse")
        cls.name = name
        cls.sparse_teacher = sparse_teacher
        LOSSES[name] = cls
        return cls

    return wrap


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


def _check_pair(student: Tensor, teacher: Tensor, ndim: int, what: str) -> None:
    if student.shape != teacher.shape:
        raise ValueError(f"{what}: student shape {tuple(student.shape)} != teacher shape {tuple(teacher.shape)}")
    if student.ndim != ndim:
        raise ValueError(f"{what}: expected {ndim}-d tensors, got shape {tuple(student.shape)}")


def _weighted_mean(values: Tensor, weight: Tensor | None) -> Tensor:
    """Mean of ``values`` ``[B, N]``, weighted by ``weight`` ``[B, N]`` when given."""
    if weight is None:
        return values.mean()
    if weight.shape != values.shape:
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match {tuple(values.shape)}")
    weight = weight.to(values.dtype)
    # Clamping keeps an all-zero mask at a loss of exactly 0 instead of NaN.
    return (values * weight).sum() / weight.sum().clamp_min(1e-12)


def _position_weight(weight: Tensor | None, feat: Tensor) -> Tensor | None:
    """Flatten a level's anchor weight to ``[B, H * W]`` to match ``feat`` ``[B, C, H, W]``."""
    if weight is None:
        return None
    b, _, h, w = feat.shape
    if weight.shape not in ((b, h * w), (b, h, w)):
        raise ValueError(f"feature weight must be [B, H*W] or [B, H, W] = {(b, h * w)} or {(b, h, w)}, "
                         f"got {tuple(weight.shape)}")
    return weight.reshape(b, h * w)


def _check_temperature(temperature: float) -> float:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return float(temperature)


# ----------------------------------------------------------------------------------------------- cls


@register("bce", sparse_teacher=True)
class BCEDistill(nn.Module):
    """Soft-target sigmoid distillation (Hinton et al., 2015, per-class Bernoulli form used by YOLO heads)."""

    target = "cls"

    def __init__(self, temperature: float = 1.0, confidence_weighted: bool = False) -> None:
        super().__init__()
        self.temperature = _check_temperature(temperature)
        self.confidence_weighted = confidence_weighted

    def forward(self, student: Tensor, teacher: Tensor, weight: Tensor | None = None) -> Tensor:
        _check_pair(student, teacher, 3, "bce")
        teacher = teacher.detach()
        t = self.temperature
        s_logit, t_logit = student.float() / t, teacher.float() / t
        p = torch.sigmoid(t_logit)
        # BCE(s, p) - BCE(t, p) is the Bernoulli KL: it removes the teacher-entropy floor so the loss
        # is exactly 0 at agreement. logsigmoid keeps it finite for saturated logits.
        kl = p * (F.logsigmoid(t_logit) - F.logsigmoid(s_logit)) + (1 - p) * (
            F.logsigmoid(-t_logit) - F.logsigmoid(-s_logit)
        )
        # Summing over classes treats each anchor as one multi-label prediction; a class mean would
        # shrink a single-class disagreement by nc (80 on COCO) and make the scale dataset dependent.
        per_anchor = kl.sum(1)
        if self.confidence_weighted:
            conf = torch.sigmoid(teacher.float()).amax(1)
            weight = conf if weight is None else weight * conf
        # T^2 keeps gradient magnitude comparable across temperatures (Hinton et al.).
        return _weighted_mean(per_anchor, weight) * t * t

    def forward_sparse(self, student: Tensor, index: Tensor, kept: Tensor, background: Tensor) -> Tensor:
        """forward(student, teacher) unweighted, for a teacher that is ``background`` [B, nc] at every anchor but
        the kept ones: ``index`` [B, K] (-1 unused, distinct otherwise) with logits ``kept`` [B, K, nc].

        Per element the KL is softplus(s) - p*s - (softplus(t) - p*t). Summed over a background anchor run, p is
        one number per image and class, so only softplus(s) and the sum of s pass over every anchor; the
        teacher's dense logits never exist. With a 640 px, 80-class student this is one transcendental pass
        over [B, 80, 8400] instead of five."""
        if self.confidence_weighted:
            raise ValueError("bce: forward_sparse computes the unweighted loss only")
        b, nc, a = student.shape
        t = self.temperature
        s = student.float() / t
        used = index >= 0
        bi, j = used.nonzero(as_tuple=True)
        anchor = index[bi, j].long()
        t_bg = background.detach().float() / t  # [B, nc]
        t_kept = kept.detach().float()[bi, j] / t  # [N, nc]
        p_bg, p_kept = torch.sigmoid(t_bg), torch.sigmoid(t_kept)
        s_kept = s[bi, :, anchor]  # [N, nc]
        n_bg = (a - used.sum(1)).float()[:, None]  # [B, 1] background anchors per image
        # per image and class, summed over anchors: softplus(s) - p * s, with p = p_bg except at the kept anchors,
        # less the teacher's own term; grouped per image and class before the total to limit cancellation
        background_part = F.softplus(s).sum(2) - p_bg * s.sum(2) - n_bg * (F.softplus(t_bg) - p_bg * t_bg)
        kept_part = -(p_kept - p_bg[bi]) * s_kept - (F.softplus(t_kept) - p_kept * t_kept)
        return (background_part.sum() + kept_part.sum()) / (b * a) * t * t


@register("kl_cls")
class KLClassDistill(nn.Module):
    """Softmax-over-classes KL distillation (Hinton et al., 2015)."""

    target = "cls"

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = _check_temperature(temperature)

    def forward(self, student: Tensor, teacher: Tensor, weight: Tensor | None = None) -> Tensor:
        _check_pair(student, teacher, 3, "kl_cls")
        t = self.temperature
        log_q = F.log_softmax(student.float() / t, dim=1)
        log_p = F.log_softmax(teacher.detach().float() / t, dim=1)
        per_anchor = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(1)
        return _weighted_mean(per_anchor, weight) * t * t


@register("mse_logits")
class MSELogitsDistill(nn.Module):
    """Logit regression (Ba & Caruana, "Do Deep Nets Really Need to be Deep?", 2014)."""

    target = "cls"

    def forward(self, student: Tensor, teacher: Tensor, weight: Tensor | None = None) -> Tensor:
        _check_pair(student, teacher, 3, "mse_logits")
        per_anchor = (student.float() - teacher.detach().float()).pow(2).mean(1)
        return _weighted_mean(per_anchor, weight)


# ----------------------------------------------------------------------------------------------- box


@register("ld")
class LDLoss(nn.Module):
    """Localization Distillation on DFL bin distributions (Zheng et al., CVPR 2022)."""

    target = "box"

    def __init__(self, temperature: float = 10.0, confidence_weighted: bool = False) -> None:
        # T = 10 is the value the LD paper uses for its GFL heads, which share the DFL parametrisation.
        super().__init__()
        self.temperature = _check_temperature(temperature)
        self.confidence_weighted = confidence_weighted

    def forward(self, student: Tensor, teacher: Tensor, weight: Tensor | None = None) -> Tensor:
        _check_pair(student, teacher, 3, "ld")
        if self.confidence_weighted and weight is None:
            # Box distributions carry no class score, so the confidence must come from the caller.
            raise ValueError("ld(confidence_weighted=True) needs weight=[B, A] teacher confidence")
        b, c, a = student.shape
        if c % 4:
            raise ValueError(f"ld: channel dim {c} is not 4 * reg_max")
        t = self.temperature
        log_q = F.log_softmax(student.float().view(b, 4, c // 4, a) / t, dim=2)
        log_p = F.log_softmax(teacher.detach().float().view(b, 4, c // 4, a) / t, dim=2)
        per_anchor = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(2).mean(1)
        return _weighted_mean(per_anchor, weight) * t * t


# ---------------------------------------------------------------------------------------------- feat


@register("mimic")
class MimicLoss(nn.Module):
    """Feature imitation with an MSE hint loss (FitNets, Romero et al., ICLR 2015)."""

    target = "feat"

    NORMALIZE = ("channel", "global", "none")
    # Also takes rows: student and teacher [N, C], the feature vectors at N gathered positions, and
    # a weight [N]. The Distiller passes rows when the feature term keeps only some positions.
    accepts_rows = True

    def __init__(self, eps: float = 1e-5, confidence_weighted: bool = False, normalize: str = "channel") -> None:
        super().__init__()
        if normalize not in self.NORMALIZE:
            raise ValueError(f"normalize must be one of {list(self.NORMALIZE)}, got {normalize!r}")
        self.eps = eps
        # Positions weighted by the teacher's best class score (the caller passes it as ``weight``):
        # the features worth copying are where the teacher sees an object, not the empty background.
        self.confidence_weighted = confidence_weighted
        self.normalize = normalize

    def forward(self, student: Tensor, teacher: Tensor, weight: Tensor | None = None) -> Tensor:
        rows = student.ndim == 2
        _check_pair(student, teacher, 2 if rows else 4, "mimic")
        if self.confidence_weighted and weight is None:
            raise ValueError("mimic(confidence_weighted=True) needs weight=[B, H*W] (or [N] for rows) teacher confidence")
        teacher = teacher.detach().float()
        diff = student.float() - teacher
        pooled = (0,) if rows else (0, 2, 3)
        # Dividing by the *teacher's* spread removes the arbitrary magnitude of the tapped layer while
        # staying one shared map, so the loss is zero only when the maps are equal. "channel" gives
        # every channel the same say, near-constant ones included; "global" keeps the teacher's own
        # balance between channels, as the plain MSE ("none") does. Statistics pool batch and space
        # so a tiny P5 map (even 1x1) still gives a usable scale; rows pool the gathered positions.
        if self.normalize == "channel":
            diff = diff / (teacher.std(pooled, keepdim=True, unbiased=False) + self.eps)
        elif self.normalize == "global":
            diff = diff / (teacher.std(unbiased=False) + self.eps)
        if rows:
            return _weighted_mean(diff.pow(2).mean(1), weight)
        per_pos = diff.pow(2).mean(1).flatten(1)
        return _weighted_mean(per_pos, _position_weight(weight, student))


@register("cwd")
class CWDLoss(nn.Module):
    """Channel-wise Knowledge Distillation for dense prediction (Shu et al., ICCV 2021)."""

    target = "feat"

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        self.temperature = _check_temperature(temperature)

    def forward(self, student: Tensor, teacher: Tensor, weight: Tensor | None = None) -> Tensor:
        _check_pair(student, teacher, 4, "cwd")
        if weight is not None:
            # Each channel is one distribution over all positions; masking positions would no longer
            # compare normalised distributions.
            raise ValueError("cwd normalises over all spatial positions and does not accept a weight")
        t = self.temperature
        log_q = F.log_softmax(student.float().flatten(2) / t, dim=2)
        log_p = F.log_softmax(teacher.detach().float().flatten(2) / t, dim=2)
        per_channel = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(2)
        return per_channel.mean() * t * t


@register("mgd")
class MGDLoss(nn.Module):
    """Masked Generative Distillation (Yang et al., ECCV 2022)."""

    target = "feat"

    def __init__(self, channels: int, lambda_mgd: float = 0.65, seed: int | None = None) -> None:
        super().__init__()
        if not 0.0 <= lambda_mgd < 1.0:
            raise ValueError(f"lambda_mgd must be in [0, 1), got {lambda_mgd}")
        self.channels = int(channels)
        self.lambda_mgd = float(lambda_mgd)
        self.generation = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1),
        )
        # A private generator makes the mask sequence reproducible without touching global RNG state.
        self._rng: torch.Generator | None = None
        if seed is not None:
            self._rng = torch.Generator().manual_seed(seed)

    def forward(self, student: Tensor, teacher: Tensor, weight: Tensor | None = None) -> Tensor:
        _check_pair(student, teacher, 4, "mgd")
        b, c, h, w = student.shape
        if c != self.channels:
            raise ValueError(f"mgd was built for {self.channels} channels, got {c}")
        # Drawn on CPU so the same seed gives the same mask on any device.
        rand = torch.rand((b, 1, h, w), generator=self._rng)
        keep = (rand >= self.lambda_mgd).to(device=student.device, dtype=student.dtype)
        recon = self.generation(student * keep)
        per_pos = (recon.float() - teacher.detach().float()).pow(2).mean(1).flatten(1)
        return _weighted_mean(per_pos, _position_weight(weight, student))
