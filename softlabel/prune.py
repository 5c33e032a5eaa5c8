"""Structured channel pruning of a YOLO detector with torch-pruning, saved as a checkpoint Ultralytics loads.

torch-pruning's dependency graph removes whole channels and keeps every layer that shares them
consistent: residual adds, concatenations, depthwise convs, BatchNorm. Two Ultralytics blocks need
help before it can trace them:

- C2f (and C3k2) cut cv1's output in two with chunk(2) and feed both halves to one concat; the graph
  cannot tell the halves apart there and maps indices wrongly. While tracing and pruning, cv1 is
  therefore cut into two convs, one per half, and merged back afterwards. Every layer loses the same
  fraction of its channels, so both halves keep the same count and chunk(2) still splits them right.
- C2PSA reshapes channels into attention heads. It is traced as cv2(cv1(x)), which has the same
  shapes, and its convs are protected: only its input channels follow the layer before it.

The Detect head keeps its output shapes: the last conv of each box and class branch (4*reg_max and nc
channels) and the DFL are protected. The head's inner channels are pruned unless prune_head=False.

A pruned model carries a `softlabel_pruned` attribute. It survives Ultralytics' EMA copies and
checkpoints, so a trainer can tell that the student must not be rebuilt from its yaml at full width
(see pruned_model_or_none).
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import types
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from softlabel.errors import UserError

PRUNED_ATTR = "softlabel_pruned"
IMPORTANCES = ("l2", "l1", "bn")


@dataclass
class PruneResult:
    out: str
    ratio: float
    importance: str
    prune_head: bool
    round_to: int | None
    imgsz: int
    params_before: int
    params_after: int
    gflops_before: float
    gflops_after: float
    level_channels_before: list[int]
    level_channels_after: list[int]

    def to_dict(self) -> dict:
        return asdict(self)


# -- loading and checks -----------------------------------------------------------------------------


def load_detector(path: str | Path) -> tuple[nn.Module, dict]:
    """An Ultralytics detection checkpoint as an FP32 module in eval mode, and the checkpoint dict."""
    from softlabel.teacher import read_checkpoint

    model, ckpt = read_checkpoint(path, "model")
    check_prunable(model, str(path))
    return model, ckpt


def check_prunable(model: nn.Module, where: str = "") -> None:
    """Only plain Detect heads: segment, pose and OBB heads have more fixed-width outputs, end-to-end heads a second branch."""
    prefix = f"{where}: " if where else ""
    head = model.model[-1] if hasattr(model, "model") and len(getattr(model, "model", [])) else None
    kind = type(head).__name__ if head is not None else type(model).__name__
    if kind != "Detect":
        raise UserError(f"{prefix}a model with a {kind} head cannot be pruned; softlabel prune handles detection models (Detect head)")
    if getattr(head, "one2one_cv2", None) is not None:
        raise UserError(f"{prefix}end-to-end (one-to-one) Detect heads cannot be pruned yet")
    inside_c2psa = {id(c) for m in model.modules() if type(m).__name__ == "C2PSA" for c in m.modules()}
    attention = sorted({type(m).__name__ for m in model.modules() if id(m) not in inside_c2psa and _is_attention(m)})
    if attention:  # heads reshape channels; only C2PSA (YOLO11) has a stand-in that traces it safely
        raise UserError(f"{prefix}attention blocks ({', '.join(attention)}) cannot be pruned yet; YOLOv8 and YOLO11 models can")
    fused = any(type(m).__name__ == "Conv" and not hasattr(m, "bn") for m in model.modules())
    if fused:
        raise UserError(f"{prefix}the model is fused (conv and BatchNorm merged); prune the training checkpoint instead")


def _is_attention(m: nn.Module) -> bool:
    name = type(m).__name__
    return (any(k in name for k in ("Attn", "Attention", "Transformer")) or name.startswith("PSA") or name.endswith("PSA")
            or name in ("A2C2f", "ABlock", "AIFI"))


def level_channels(model: nn.Module) -> list[int]:
    """Input channels of the Detect head per level: what feature distillation adapts from."""
    return [int(seq[0].conv.in_channels) for seq in model.model[-1].cv2]


def is_pruned(model: nn.Module | None) -> bool:
    return bool(getattr(model, PRUNED_ATTR, None))


def pruned_model_or_none(weights: nn.Module | None, nc: int | None = None) -> nn.Module | None:
    """The student module itself when it was pruned, else None (build it from its yaml as usual).

    Ultralytics' trainer rebuilds a .pt student from its yaml and copies weights by shape, which
    would silently restore full width and drop every pruned layer. A pruned head cannot be rebuilt
    for other classes either, so a class count that differs from the data is refused.
    """
    if weights is None or not is_pruned(weights):
        return None
    head_nc = int(weights.model[-1].nc)
    if nc is not None and head_nc != int(nc):
        raise UserError(
            f"the pruned student predicts {head_nc} classes but the data has nc={nc}; "
            "prune a model trained on these classes"
        )
    return weights


# -- tracing aids -------------------------------------------------------------------------------------


def _take(block: nn.Module, rows: slice) -> nn.Module:
    """A copy of an Ultralytics Conv (conv + BatchNorm + act) keeping only some output channels."""
    out = copy.deepcopy(block)
    out.conv.weight = nn.Parameter(block.conv.weight.data[rows].clone())
    out.conv.out_channels = out.conv.weight.shape[0]
    bn = out.bn
    bn.weight = nn.Parameter(block.bn.weight.data[rows].clone())
    bn.bias = nn.Parameter(block.bn.bias.data[rows].clone())
    bn.running_mean = block.bn.running_mean[rows].clone()
    bn.running_var = block.bn.running_var[rows].clone()
    bn.num_features = bn.weight.shape[0]
    return out


def _join(a: nn.Module, b: nn.Module) -> nn.Module:
    """The inverse of _take: one Conv whose output channels are a's then b's."""
    out = copy.deepcopy(a)
    out.conv.weight = nn.Parameter(torch.cat([a.conv.weight.data, b.conv.weight.data]))
    out.conv.out_channels = out.conv.weight.shape[0]
    for k in ("weight", "bias"):
        setattr(out.bn, k, nn.Parameter(torch.cat([getattr(a.bn, k).data, getattr(b.bn, k).data])))
    for k in ("running_mean", "running_var"):
        setattr(out.bn, k, torch.cat([getattr(a.bn, k), getattr(b.bn, k)]))
    out.bn.num_features = out.bn.weight.shape[0]
    return out


def _two_half_forward(self, x):
    y = [self.cv1_lo(x), self.cv1_hi(x)]
    y.extend(m(y[-1]) for m in self.m)
    return self.cv2(torch.cat(y, 1))


def _attention_standin_forward(self, x):
    return self.cv2(self.cv1(x))  # same shapes as C2PSA's forward, without the head reshapes


@contextlib.contextmanager
def traceable(model: nn.Module) -> Iterator[list[nn.Module]]:
    """Rewrite the blocks torch-pruning cannot trace (see the module docstring) and undo it on exit.

    Yields the convs that must keep their output channels. On exit the C2f halves are merged back,
    so the model is made of Ultralytics' own classes again.
    """
    from ultralytics.nn.modules.block import C2PSA, C2f

    halves = [m for m in model.modules() if isinstance(m, C2f) and type(m).forward is C2f.forward]
    attention = [m for m in model.modules() if isinstance(m, C2PSA)]
    for m in halves:
        m.cv1_lo, m.cv1_hi = _take(m.cv1, slice(0, m.c)), _take(m.cv1, slice(m.c, None))
        del m.cv1
        m.forward = types.MethodType(_two_half_forward, m)
    for m in attention:
        m.forward = types.MethodType(_attention_standin_forward, m)
    protected = [c for m in attention for c in m.modules() if isinstance(c, nn.Conv2d)]
    try:
        yield protected
    finally:
        for m in attention:
            del m.forward
    # only after a clean exit: a failed pruning leaves no model worth restoring, and its error must show
    for m in halves:
        lo, hi = m.cv1_lo, m.cv1_hi
        if lo.conv.out_channels != hi.conv.out_channels:  # per-layer pruning with one ratio cannot do this
            raise RuntimeError(f"C2f halves were pruned unequally ({lo.conv.out_channels} vs {hi.conv.out_channels})")
        m.cv1 = _join(lo, hi)
        m.c = lo.conv.out_channels  # forward_split (used by Ultralytics' exporter) reads it
        del m.cv1_lo, m.cv1_hi, m.forward


def _raw_head_outputs(head: nn.Module):
    """Trace through the head's raw maps, not its box decoding (DFL, anchors), which would tie unrelated channels."""

    def forward(model, x):
        was = head.training
        head.training = True  # Detect returns its raw per-anchor maps in training mode; no BatchNorm is in train mode
        try:
            out = model(x)
        finally:
            head.training = was
        return [out["boxes"], out["scores"]]

    return forward


def _importance(name: str):
    import torch_pruning as tp

    if name == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if name == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1)
    if name == "bn":
        return tp.importance.BNScaleImportance()
    raise UserError(f"unknown importance '{name}': choose {', '.join(IMPORTANCES)}")


def check_ratio(ratio: float) -> None:
    if not 0.0 < ratio < 1.0:
        raise UserError(f"--ratio {ratio} must be between 0 and 1 (the fraction of channels removed from each layer)")


# -- pruning ------------------------------------------------------------------------------------------


def prune_detector(model: nn.Module, ratio: float, imgsz: int = 640, importance: str = "l2", prune_head: bool = True,
                   round_to: int | None = None) -> nn.Module:
    """Remove `ratio` of the channels of every prunable layer (per layer, not global), in place.

    Per layer: every group of coupled channels loses the same fraction, ranked inside the group by
    `importance`. Global ranking would compare norms across layers of different scale and can empty
    a narrow layer; it would also break the equal C2f halves that chunk(2) needs.
    """
    import torch_pruning as tp

    check_ratio(ratio)
    check_prunable(model)
    imp = _importance(importance)
    head = model.model[-1]
    model.float().eval()
    before = _head_shapes(model, imgsz)
    with traceable(model) as protected:
        fixed = [head.dfl.conv] if isinstance(getattr(head.dfl, "conv", None), nn.Conv2d) else []
        fixed += [branch[-1] for branch in (*head.cv2, *head.cv3)]  # 4*reg_max and nc outputs
        if not prune_head:
            fixed += [m for m in head.modules() if isinstance(m, nn.Conv2d)]
        example = torch.zeros(1, 3, imgsz, imgsz)
        with torch.enable_grad():  # the graph is read from autograd
            requires = {p: p.requires_grad for p in model.parameters()}
            for p in model.parameters():
                p.requires_grad_(True)
            try:
                pruner = tp.pruner.BasePruner(
                    model, example, importance=imp, pruning_ratio=ratio, global_pruning=False, round_to=round_to,
                    ignored_layers=fixed + protected, forward_fn=_raw_head_outputs(head),
                )
                pruner.step()
            except (IndexError, RuntimeError, ValueError) as e:  # torch-pruning met a block it cannot map
                raise UserError(f"this architecture cannot be pruned: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from e
            finally:
                for p, r in requires.items():
                    p.requires_grad_(r)
    model.eval()
    try:
        after = _head_shapes(model, imgsz)
    except RuntimeError as e:  # a block whose channel bookkeeping torch-pruning got wrong
        raise UserError(f"this architecture cannot be pruned: the pruned model fails ({str(e).splitlines()[0][:200]})") from e
    if after != before:
        raise UserError(f"pruning changed the Detect outputs: {before} -> {after}")
    return model


def _head_shapes(model: nn.Module, imgsz: int) -> list[tuple[int, ...]]:
    """The shapes of the raw box and class maps, which must not change."""
    head = model.model[-1]
    with torch.no_grad():
        out = _raw_head_outputs(head)(model, torch.zeros(1, 3, imgsz, imgsz))
    return [tuple(t.shape) for t in out]


def prune_checkpoint(model_path: str | Path, out: str | Path, ratio: float, imgsz: int | None = None,
                     importance: str = "l2", prune_head: bool = True, round_to: int | None = None) -> PruneResult:
    """Prune a detection checkpoint and save it where Ultralytics (YOLO(out)) and softlabel train can load it."""
    from ultralytics.utils.torch_utils import get_flops, get_num_params

    check_ratio(ratio)
    if importance not in IMPORTANCES:
        raise UserError(f"unknown importance '{importance}': choose {', '.join(IMPORTANCES)}")
    if round_to is not None and round_to < 1:
        raise UserError(f"--round-to {round_to} must be a positive number of channels")
    out = Path(out)
    if out.suffix != ".pt":
        raise UserError(f"{out}: the pruned checkpoint must be a .pt file")
    model, ckpt = load_detector(model_path)
    train_args = dict(ckpt.get("train_args") or {})
    imgsz = int(imgsz or train_args.get("imgsz") or 640)
    stride = int(max(model.stride.tolist())) if hasattr(model, "stride") else 32
    if imgsz < stride or imgsz % stride:
        raise UserError(f"--imgsz {imgsz} must be a positive multiple of the model's stride {stride}")
    params0, flops0, chans0 = int(get_num_params(model)), float(get_flops(model, imgsz)), level_channels(model)
    prune_detector(model, ratio, imgsz, importance, prune_head, round_to)
    result = PruneResult(
        out=str(out), ratio=ratio, importance=importance, prune_head=prune_head, round_to=round_to, imgsz=imgsz,
        params_before=params0, params_after=int(get_num_params(model)),
        gflops_before=flops0, gflops_after=float(get_flops(model, imgsz)),
        level_channels_before=chans0, level_channels_after=level_channels(model),
    )
    earlier = getattr(model, PRUNED_ATTR, None)  # pruning a pruned model again keeps the history
    setattr(model, PRUNED_ATTR, {
        **{k: v for k, v in result.to_dict().items() if k != "out"},
        "source": str(model_path),
        "earlier": earlier or None,
    })
    save_pruned(model, ckpt, out, result)
    return result


def save_pruned(model: nn.Module, ckpt: dict, out: Path, result: PruneResult) -> Path:
    """The layout of Ultralytics' own checkpoints, with no optimizer: it starts a new training, never resumes one."""
    import ultralytics

    out.parent.mkdir(parents=True, exist_ok=True)
    for p in model.parameters():
        p.requires_grad_(False)
    state = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "version": ultralytics.__version__,
        "model": copy.deepcopy(model).half(),
        "ema": None,
        "updates": None,
        "optimizer": None,
        "epoch": -1,
        "train_args": dict(ckpt.get("train_args") or {}),
        "train_metrics": None,
        PRUNED_ATTR: result.to_dict(),
    }
    tmp = out.with_name(out.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(out)  # a half-written file never carries the final name
    return out


def render(result: PruneResult) -> str:
    p0, p1, f0, f1 = result.params_before, result.params_after, result.gflops_before, result.gflops_after
    return "\n".join([
        f"{'':<10}{'params':>14}{'GFLOPs':>10}  Detect input channels",
        f"{'before':<10}{p0:>14,}{f0:>10.2f}  {result.level_channels_before}",
        f"{'after':<10}{p1:>14,}{f1:>10.2f}  {result.level_channels_after}",
        f"{'kept':<10}{p1 / p0:>14.1%}{(f1 / f0 if f0 else float('nan')):>10.1%}",
        f"pruned {result.ratio:g} of the channels of every layer ({result.importance} importance"
        f"{', head kept whole' if not result.prune_head else ''}{f', rounded to {result.round_to}' if result.round_to else ''}); "
        f"GFLOPs at imgsz {result.imgsz}",
        f"saved {result.out}; fine-tune it: softlabel train --student {result.out} --cache CACHE --data DATA",
    ])
