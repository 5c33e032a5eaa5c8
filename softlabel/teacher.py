"""Load an Ultralytics detection checkpoint and capture its raw head outputs and neck features."""

from __future__ import annotations

import contextlib
import copy
import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from softlabel import trust
from softlabel.anchors import level_ranges, map_sizes
from softlabel.errors import UserError
from softlabel.heads import DEFAULT_BRANCH, branch_output, check_branch, head_spec


@dataclass(frozen=True)
class TeacherInfo:
    """What a cache records about the teacher that produced it."""

    path: str
    sha256: str
    arch: str
    nc: int
    names: list[str]
    strides: list[int]
    reg_max: int
    levels: list[str]
    feature_channels: list[int]
    branches: list[str]  # [] for a one-branch head; ["one2many", "one2one"] for an end-to-end one
    branch: str  # the branch whose outputs the cache keeps ("" for a one-branch head)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def head_channels(self) -> int:
        return 4 * self.reg_max + self.nc


@dataclass
class TeacherOutput:
    """Per level l: head [B, 4*reg_max + nc, H_l, W_l] (box outputs: DFL bins or distances, then class logits) and feat [B, C_l, H_l, W_l]."""

    head: list[torch.Tensor]
    feat: list[torch.Tensor]


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def describe(model: nn.Module, path: str = "", sha256: str = "", branch: str | None = None) -> TeacherInfo:
    """Check that a model is a supported detector and say what the cache needs to know of it; `branch`: which
    branch of an end-to-end head the cache keeps (default one2many; ignored for a one-branch head)."""
    spec = head_spec(model, str(path))
    kept = check_branch(branch or DEFAULT_BRANCH, f"{path or 'teacher'}") if spec.end2end else ""
    names = getattr(model, "names", None) or {i: str(i) for i in range(spec.nc)}
    names = [str(names[i]) for i in range(spec.nc)] if isinstance(names, dict) else [str(n) for n in names]
    yaml_file = (getattr(model, "yaml", None) or {}).get("yaml_file", "")
    arch = Path(yaml_file).stem if yaml_file else type(model).__name__
    return TeacherInfo(
        path=str(path),
        sha256=sha256,
        arch=arch,
        nc=spec.nc,
        names=names,
        strides=list(spec.strides),
        reg_max=spec.reg_max,
        levels=list(spec.levels),
        feature_channels=list(spec.channels),
        branches=list(spec.branches),
        branch=kept,
    )


def read_checkpoint(path: str | Path, role: str = "teacher") -> tuple[nn.Module, dict]:
    """An Ultralytics checkpoint as an FP32 module in eval mode and its dict; one clear error otherwise.

    Read with Ultralytics' safe load unless the user trusts their files (softlabel.trust): a pickle
    that names anything outside its allow-list of model classes is refused before it runs."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {role} checkpoint not found")
    from ultralytics.nn.tasks import torch_safe_load

    safe = not trust.trusted()
    try:
        ckpt, _ = torch_safe_load(str(path), safe_only=safe)
    except Exception as e:  # a pickle, a zip, a text file: every loader fails its own way
        if safe and _refused_by_safe_load(e):
            raise UserError(trust.refused(str(path), role)) from None
        raise UserError(f"{path}: not an Ultralytics checkpoint ({type(e).__name__}: {_first_line(str(e))})") from None
    model = (ckpt.get("ema") or ckpt.get("model")) if isinstance(ckpt, dict) else None
    if not isinstance(model, nn.Module):
        raise UserError(f"{path}: not an Ultralytics checkpoint (no model in it)")
    model = model.float().eval()  # as Ultralytics' load_checkpoint hands it over: FP32, eval mode
    if not hasattr(model, "stride"):
        model.stride = torch.tensor([32.0])
    return model, ckpt


def _refused_by_safe_load(error: BaseException) -> bool:
    """torch's weights_only unpickler met a global outside the allow-list (Ultralytics re-raises it as a
    TypeError); a file that is simply not a pickle fails differently, and is reported as such."""
    texts = [str(error).lower(), str(error.__cause__ or "").lower()]
    return any("unsupported global" in t for t in texts)


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in text.replace("❌️", "").replace("❌", "").splitlines() if ln.strip()]
    return (lines[0] if lines else "")[:200]


def load_model(path: str | Path, expect_sha256: str | None = None, branch: str | None = None) -> tuple[nn.Module, TeacherInfo]:
    """Read a checkpoint from disk and refuse anything that is not a supported detector.

    With `expect_sha256` the file is hashed first and refused unread when it is not that file: a store
    names its teacher's path, and whatever lies there now must not get to run before it is compared."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: teacher checkpoint not found")
    sha = file_sha256(path)
    if expect_sha256 is not None and sha != expect_sha256:
        raise UserError(f"{path}: not the checkpoint the cache was dumped with (sha256 differs); it was not loaded")
    model, _ = read_checkpoint(path, "teacher")
    # stored absolute, so verify and train find it from any working folder
    info = describe(model, str(path.expanduser().absolute()), sha, branch)
    return model, info


class Teacher:
    """A frozen detector in eval mode; one call -> raw head outputs and neck features per level."""

    def __init__(self, model: nn.Module, info: TeacherInfo, device: str | torch.device = "cpu", amp: bool = True):
        self.info = info
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().float()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.amp = amp and self.device.type == "cuda"  # float16 autocast exists on CUDA only; elsewhere float32

    @property
    def compute_dtype(self) -> str:
        """The precision the forward actually runs in, as a cache records it."""
        return "float16" if self.amp else "float32"

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", amp: bool = True,
             expect_sha256: str | None = None, branch: str | None = None) -> "Teacher":
        model, info = load_model(path, expect_sha256, branch)
        return cls(model, info, device, amp)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> TeacherOutput:
        """images: float [B, 3, H, W] RGB in [0, 1] on the teacher's device."""
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.amp):
            out = self.model(images)
        preds = branch_output(out, self.info.branch)
        return split_levels(preds["boxes"], preds["scores"], preds["feats"])


def split_levels(boxes: torch.Tensor, scores: torch.Tensor, feats: Sequence[torch.Tensor]) -> TeacherOutput:
    """Turn the head's anchor-major tensors [B, C, A] back into per-level maps [B, C, H, W]."""
    head = []
    for f, (start, end) in zip(feats, level_ranges(map_sizes(feats))):
        b, _, h, w = f.shape
        head.append(torch.cat([boxes[:, :, start:end], scores[:, :, start:end]], 1).reshape(b, -1, h, w))
    return TeacherOutput(head=head, feat=list(feats))


def to_model_input(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 [B, H, W, 3] BGR (as replayed) -> float [B, 3, H, W] RGB in [0, 1], as Ultralytics feeds models."""
    x = images.to(device, non_blocking=True).permute(0, 3, 1, 2).flip(1)
    return x.float().div_(255)


def save_checkpoint_from_yaml(cfg: str, names: Sequence[str], path: str | Path) -> Path:
    """Build a detector from an Ultralytics model yaml and save it as a checkpoint Ultralytics loads."""
    from ultralytics.nn.tasks import DetectionModel

    with contextlib.redirect_stdout(None):
        model = DetectionModel(cfg, nc=len(names), verbose=False)
    model.names = {i: str(n) for i, n in enumerate(names)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": copy.deepcopy(model).half(), "ema": None, "epoch": -1, "train_args": {}}, path)
    return path
