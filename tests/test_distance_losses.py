"""Box losses on decoded ltrb distances (dist_l1, dist_iou), box_form in the registry, and the loss package layout."""

from __future__ import annotations

import importlib
import shutil
import sys
from pathlib import Path

import pytest
import torch
from ultralytics.utils.loss import BboxLoss
from ultralytics.utils.metrics import bbox_iou
from ultralytics.utils.tal import dist2bbox

import softlabel.distill.losses as losses_pkg
from softlabel.distill.losses import LOSSES, build_loss, register

B, A = 2, 12
DISTANCE_LOSSES = ["dist_l1", "dist_iou"]


def _distances(seed: int, low: float = 0.5, high: float = 6.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(B, 4, A, generator=g)


def _norm(width: float = 640.0, height: float = 480.0) -> torch.Tensor:
    """stride / image width for l and r, stride / image height for t and b, per anchor: [1, 4, A]."""
    stride = torch.tensor([8.0] * (A // 2) + [16.0] * (A - A // 2))
    return torch.stack([stride / width, stride / height, stride / width, stride / height])[None]


@pytest.mark.parametrize("name", DISTANCE_LOSSES)
def test_zero_loss_and_zero_gradient_at_agreement(name):
    t = _distances(0)
    s = t.clone().requires_grad_(True)
    loss = build_loss(name)(s, t, norm=_norm())
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    loss.backward()
    assert s.grad.abs().max().item() < 1e-6
    # and it is a loss: a different student costs something
    assert build_loss(name)(_distances(1), t, norm=_norm()).item() > 1e-3


def test_dist_l1_matches_a_hand_computation_with_norm():
    s = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]]])  # [1, 4, 2]: rows l, t, r, b
    t = torch.tensor([[[2.0, 2.0], [1.0, 4.0], [5.0, 10.0], [7.0, 0.0]]])
    norm = torch.tensor([0.5, 0.25, 0.5, 0.25]).view(1, 4, 1)
    # |norm * (s - t)|: anchor 0: l 0.5, t 0.5, r 0, b 0 -> mean 0.25; anchor 1: l 0, t 0, r 2, b 2 -> mean 1.0
    loss = build_loss("dist_l1")
    assert loss(s, t, norm=norm).item() == pytest.approx(0.625, abs=1e-7)
    assert loss(s, t, torch.tensor([[1.0, 3.0]]), norm).item() == pytest.approx((0.25 + 3 * 1.0) / 4, abs=1e-7)
    # without norm: anchor 0: (1 + 2 + 0 + 0) / 4, anchor 1: (0 + 0 + 4 + 8) / 4
    assert loss(s, t).item() == pytest.approx((0.75 + 3.0) / 2, abs=1e-7)
    with pytest.raises(ValueError, match="norm"):
        loss(s, t, norm=torch.ones(1, 3, 1))


def test_dist_l1_is_ultralytics_reg_max_1_box_l1_with_the_teacher_as_target():
    g = torch.Generator().manual_seed(3)
    s, t = _distances(4), _distances(5)
    anchors = torch.rand(A, 2, generator=g) * 40
    stride = _norm(1.0, 1.0)[0, 0][:, None]  # [A, 1]
    imgsz = torch.tensor([480.0, 640.0])  # (H, W)
    scores = torch.rand(B, A, 3, generator=g)
    fg = torch.ones(B, A, dtype=torch.bool)
    _, l1 = BboxLoss(reg_max=1)(
        s.transpose(1, 2), dist2bbox(s.transpose(1, 2), anchors, xywh=False), anchors,
        dist2bbox(t.transpose(1, 2), anchors, xywh=False), scores, scores.sum(), fg, imgsz, stride)
    got = build_loss("dist_l1")(s, t, scores.sum(-1), _norm(640.0, 480.0))
    assert got.item() == pytest.approx(l1.item(), rel=1e-5)


def test_dist_iou_is_one_minus_the_iou_of_the_decoded_boxes():
    g = torch.Generator().manual_seed(6)
    s, t = _distances(7, 0.0, 5.0), _distances(8, 0.0, 5.0)
    anchors = torch.rand(A, 2, generator=g) * 80
    box_s = dist2bbox(s.transpose(1, 2), anchors, xywh=False)  # [B, A, 4] xyxy
    box_t = dist2bbox(t.transpose(1, 2), anchors, xywh=False)
    per_anchor = 1 - bbox_iou(box_s, box_t, xywh=False).squeeze(-1)  # [B, A]
    loss = build_loss("dist_iou")
    assert loss(s, t).item() == pytest.approx(per_anchor.mean().item(), rel=1e-5)
    w = torch.rand(B, A, generator=g)
    assert loss(s, t, w).item() == pytest.approx(((per_anchor * w).sum() / w.sum()).item(), rel=1e-5)
    # norm rescales both boxes alike, which leaves the IoU as it is
    assert loss(s, t, w, _norm()).item() == loss(s, t, w).item()


def test_dist_iou_reads_negative_distances_as_zero():
    s, t = _distances(9) - 2.0, _distances(10)
    assert (s < 0).any()
    loss = build_loss("dist_iou")
    assert loss(s, t).item() == pytest.approx(loss(s.clamp_min(0), t).item(), abs=1e-7)


@pytest.mark.parametrize("name", DISTANCE_LOSSES)
def test_zero_weight_gives_zero_and_one_hot_weight_picks_its_anchor(name):
    s, t = _distances(11), _distances(12)
    loss = build_loss(name)
    zero = loss(s, t, torch.zeros(B, A), _norm())
    assert zero.item() == 0.0  # not NaN
    b, a = 1, 7
    one_hot = torch.zeros(B, A)
    one_hot[b, a] = 1.0
    alone = loss(s[b:b + 1, :, a:a + 1], t[b:b + 1, :, a:a + 1], norm=_norm()[..., a:a + 1])
    assert loss(s, t, one_hot, _norm()).item() == pytest.approx(alone.item(), rel=1e-6)
    assert alone.item() != pytest.approx(loss(s, t, norm=_norm()).item(), rel=1e-3)


@pytest.mark.parametrize("name", DISTANCE_LOSSES)
def test_confidence_weighted_needs_a_weight(name):
    s, t = _distances(13), _distances(14)
    loss = build_loss(name, confidence_weighted=True)
    with pytest.raises(ValueError, match="weight"):
        loss(s, t)
    assert torch.isfinite(loss(s, t, torch.rand(B, A)))


@pytest.mark.parametrize("name", DISTANCE_LOSSES)
def test_gradient_reaches_the_student_only(name):
    s = _distances(15).requires_grad_(True)
    t = _distances(16).requires_grad_(True)
    build_loss(name)(s, t, torch.rand(B, A), _norm()).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


@pytest.mark.parametrize("name", DISTANCE_LOSSES)
def test_bins_are_refused(name):
    with pytest.raises(ValueError, match=r"\[B, 4, A\]"):
        build_loss(name)(torch.randn(B, 64, A), torch.randn(B, 64, A))


def test_box_form_is_declared_by_box_losses_only():
    assert LOSSES["ld"].box_form == "bins"
    assert LOSSES["dist_l1"].box_form == LOSSES["dist_iou"].box_form == "distances"
    assert LOSSES["dist_l1"].target == LOSSES["dist_iou"].target == "box"
    for name, cls in LOSSES.items():
        assert (cls.box_form is not None) == (cls.target == "box"), name

    class Box(torch.nn.Module):
        target = "box"

    class Cls(torch.nn.Module):
        target = "cls"

    for bad_form in (None, "xyxy"):
        with pytest.raises(ValueError, match="box_form"):
            register("box_without_form", box_form=bad_form)(Box)
    with pytest.raises(ValueError, match="box_form"):
        register("cls_with_form", box_form="distances")(Cls)
    assert "box_without_form" not in LOSSES and "cls_with_form" not in LOSSES


def test_public_names():
    for name in ("LOSSES", "TARGETS", "register", "build_loss", "BCEDistill", "KLClassDistill", "MSELogitsDistill",
                 "LDLoss", "MimicLoss", "CWDLoss", "MGDLoss", "DistanceL1Distill", "DistanceIoUDistill"):
        assert name in losses_pkg.__all__ and hasattr(losses_pkg, name), name
    assert losses_pkg.DistanceL1Distill is LOSSES["dist_l1"] and losses_pkg.DistanceIoUDistill is LOSSES["dist_iou"]


def test_every_loss_module_in_the_package_registers_a_loss():
    package_dir = Path(losses_pkg.__file__).parent
    modules = {p.stem for p in package_dir.glob("*.py")} - {"__init__", "registry", "common"}
    assert {"bce", "kl_cls", "mse_logits", "ld", "mimic", "cwd", "mgd", "dist_l1", "dist_iou"} <= modules
    registered_from = {cls.__module__ for cls in LOSSES.values()}
    for module in modules:
        assert f"{losses_pkg.__name__}.{module}" in registered_from, f"{module}.py registers no loss"


def test_a_new_module_file_registers_itself(tmp_path, monkeypatch):
    # A copy of the package under another name has its own registry, so the real LOSSES stays as it is.
    copy = tmp_path / "losses_copy"
    shutil.copytree(Path(losses_pkg.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "added.py").write_text(
        "from torch import nn\n\nfrom .registry import register\n\n\n"
        "@register('added', box_form='distances')\nclass Added(nn.Module):\n    target = 'box'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        copied = importlib.import_module("losses_copy")
        assert "added" in copied.LOSSES
        assert set(copied.LOSSES) == set(LOSSES) | {"added"}
    finally:
        for key in [k for k in sys.modules if k == "losses_copy" or k.startswith("losses_copy.")]:
            del sys.modules[key]
    assert "added" not in LOSSES
