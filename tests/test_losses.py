"""Tests for softlabel.distill losses, adapters and schedule."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from softlabel.builtin import builtin_names
from softlabel.distill.adapters import FeatureAdapters
from softlabel.distill.losses import LOSSES, build_loss
from softlabel.distill.schedule import DistillSchedule

B, NC, REG_MAX, A = 2, 3, 16, 20
C, H, W = 8, 4, 4

# MGD reconstructs the teacher from a randomly masked student through a freshly initialised generator,
# so its loss measures the generator's reconstruction error, not student/teacher disagreement: it is
# not zero when student == teacher. Its gradient and determinism are tested separately.
NOT_ZERO_AT_EQUALITY = {"mgd"}

# Values for constructor arguments without a default. A new loss with another required argument makes
# `_make` fail loudly, so the table has to be extended consciously.
REQUIRED_ARGS = {"channels": C}


def _make(name: str, **kwargs):
    params = inspect.signature(LOSSES[name].__init__).parameters
    for k, p in params.items():
        if k == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is p.empty and k not in kwargs:
            kwargs[k] = REQUIRED_ARGS[k]
    return build_loss(name, **kwargs)


def _shape(target: str) -> tuple[int, ...]:
    return {"cls": (B, NC, A), "box": (B, 4 * REG_MAX, A), "feat": (B, C, H, W)}[target]


def _pair(target: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = _shape(target)
    return torch.randn(shape, generator=g) * 2, torch.randn(shape, generator=g) * 2


def _pair_of(name: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A student/teacher pair in the form loss ``name`` reads: box losses on distances take ltrb distances
    [B, 4, A], which are not negative."""
    if LOSSES[name].box_form == "distances":
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(B, 4, A, generator=g) * 2).abs(), (torch.randn(B, 4, A, generator=g) * 2).abs()
    return _pair(LOSSES[name].target, seed)


ALL = sorted(LOSSES)
ZEROABLE = [n for n in ALL if n not in NOT_ZERO_AT_EQUALITY]
WITH_T = [n for n in ALL if "temperature" in inspect.signature(LOSSES[n].__init__).parameters]


def test_registry_has_expected_losses_and_targets():
    assert {"bce", "kl_cls", "mse_logits", "ld", "mimic", "cwd", "mgd"} <= set(LOSSES)
    expected = {"bce": "cls", "kl_cls": "cls", "mse_logits": "cls", "ld": "box", "mimic": "feat", "cwd": "feat",
                "mgd": "feat"}
    for name, target in expected.items():
        assert LOSSES[name].target == target


@pytest.mark.parametrize("name", ZEROABLE)
def test_zero_at_equality_positive_otherwise(name):
    loss = _make(name)
    s, t = _pair_of(name)
    assert loss(t.clone(), t).item() == pytest.approx(0.0, abs=1e-6)
    value = loss(s, t)
    assert value.ndim == 0
    assert value.item() > 1e-4


def test_mgd_not_zero_at_equality_but_positive():
    loss = _make("mgd", seed=0)
    _, t = _pair("feat")
    assert loss(t.clone(), t).item() > 0


@pytest.mark.parametrize("name", ALL)
def test_gradient_reaches_student_not_teacher(name):
    torch.manual_seed(0)
    loss = _make(name)
    s, t = _pair_of(name)
    s.requires_grad_(True)
    t.requires_grad_(True)
    loss(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_mgd_deterministic_given_seed():
    s, t = _pair("feat")

    def run(seed: int) -> list[float]:
        torch.manual_seed(123)  # generator weights
        loss = _make("mgd", seed=seed)
        return [loss(s, t).item() for _ in range(3)]

    first, again, other = run(7), run(7), run(8)
    assert first == again
    assert first != other
    assert len(set(first)) > 1  # mask is redrawn each step rather than frozen


def test_build_loss_unknown_name_lists_names():
    with pytest.raises(ValueError) as e:
        build_loss("no_such_loss")
    for name in LOSSES:
        assert name in str(e.value)


def test_build_loss_unknown_key_lists_arguments():
    with pytest.raises(ValueError) as e:
        build_loss("bce", temprature=2.0)
    msg = str(e.value)
    assert "temprature" in msg and "temperature" in msg and "confidence_weighted" in msg


def test_build_loss_missing_required_argument():
    with pytest.raises(ValueError, match="channels"):
        build_loss("mgd")


def test_build_loss_passes_kwargs():
    assert build_loss("cwd", temperature=2.0).temperature == 2.0
    assert build_loss("ld").temperature == 10.0


@pytest.mark.parametrize("name", WITH_T)
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_temperature_finite(name, temperature):
    loss = _make(name, temperature=temperature)
    s, t = _pair_of(name)
    value = loss(s * 20, t * 20)  # saturated logits must not overflow
    assert torch.isfinite(value) and value.item() > 0


@pytest.mark.parametrize("name", WITH_T)
def test_temperature_changes_value(name):
    s, t = _pair_of(name)
    assert _make(name, temperature=1.0)(s, t).item() != pytest.approx(_make(name, temperature=4.0)(s, t).item())


def test_kl_cls_high_temperature_limit():
    # With the T^2 factor, T^2 KL(softmax(t/T) || softmax(s/T)) -> sum_c (d_c - mean d)^2 / (2 nc).
    s, t = _pair("cls")
    d = s - t
    expected = ((d - d.mean(1, keepdim=True)) ** 2).sum(1).div(2 * NC).mean()
    got = build_loss("kl_cls", temperature=500.0)(s.double(), t.double())
    assert got.item() == pytest.approx(expected.item(), rel=2e-2)


def test_bce_high_temperature_limit():
    # Bernoulli KL at high T: T^2 KL -> (s - t)^2 / 8 per class, summed over classes.
    s, t = _pair("cls")
    expected = ((s - t) ** 2 / 8).sum(1).mean()
    got = build_loss("bce", temperature=500.0)(s, t)
    assert got.item() == pytest.approx(expected.item(), rel=2e-2)


def test_bce_matches_bce_minus_teacher_entropy():
    s, t = _pair("cls")
    p = torch.sigmoid(t)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    ref = (bce(s, p, reduction="none") - bce(t, p, reduction="none")).sum(1).mean()
    assert build_loss("bce")(s, t).item() == pytest.approx(ref.item(), rel=1e-5)


def test_bce_confidence_weighting_changes_value_and_stays_zero():
    s, t = _pair("cls")
    plain, weighted = build_loss("bce"), build_loss("bce", confidence_weighted=True)
    assert weighted(s, t).item() != pytest.approx(plain(s, t).item(), rel=1e-3)
    assert weighted(t.clone(), t).item() == pytest.approx(0.0, abs=1e-6)
    # Anchors the teacher is confident about must dominate: put the disagreement there only.
    conf = torch.sigmoid(t).amax(1)
    confident = conf > conf.median()
    s_conf = torch.where(confident[:, None], s, t)
    s_unconf = torch.where(confident[:, None], t, s)
    ratio_w = weighted(s_conf, t) / weighted(s_unconf, t)
    ratio_p = plain(s_conf, t) / plain(s_unconf, t)
    assert ratio_w > ratio_p


def test_ld_confidence_weighting():
    s, t = _pair("box")
    conf = torch.rand(B, A, generator=torch.Generator().manual_seed(1))
    cw = build_loss("ld", confidence_weighted=True)
    assert cw(s, t, conf).item() != pytest.approx(build_loss("ld")(s, t).item(), rel=1e-3)
    with pytest.raises(ValueError, match="weight"):
        cw(s, t)


@pytest.mark.parametrize("name", [n for n in ZEROABLE if LOSSES[n].target in ("cls", "box")])
def test_anchor_mask_excludes_disagreement(name):
    s, t = _pair_of(name)
    bad = torch.zeros(B, A, dtype=torch.bool)
    bad[:, :5] = True
    mixed = torch.where(bad[:, None], s, t)
    loss = _make(name)
    assert loss(mixed, t, (~bad).float()).item() == pytest.approx(0.0, abs=1e-6)
    assert loss(mixed, t, bad.float()).item() > 1e-4
    with pytest.raises(ValueError):
        loss(mixed, t, torch.ones(B, A + 1))


@pytest.mark.parametrize("name", ["mimic", "mgd"])
def test_feature_position_weight(name):
    s, t = _pair("feat")
    loss = _make(name, seed=0) if name == "mgd" else _make(name)
    w = torch.ones(B, H, W)
    w[:, 0] = 0
    # Same mask draws for both calls so only the weighting differs.
    base = _make(name, seed=0) if name == "mgd" else _make(name)
    if name == "mgd":
        base.load_state_dict(loss.state_dict())
    assert loss(s, t, w).item() != pytest.approx(base(s, t).item(), rel=1e-4)
    assert torch.isfinite(loss(s, t, w.flatten(1)))


def test_cwd_rejects_weight():
    s, t = _pair("feat")
    with pytest.raises(ValueError):
        build_loss("cwd")(s, t, torch.ones(B, H * W))


def test_shape_mismatch_rejected():
    s, t = _pair("cls")
    with pytest.raises(ValueError, match="shape"):
        build_loss("bce")(s[:, :2], t)


def test_adapters_shapes_and_grad():
    ad = FeatureAdapters([4, 6, 8], [8, 12, 16])
    feats = [torch.randn(B, c, h, h, requires_grad=True) for c, h in ((4, 8), (6, 4), (8, 2))]
    teach = [torch.randn(B, c, h, h) for c, h in ((8, 8), (12, 4), (16, 2))]
    out = ad(feats, teach)
    assert [tuple(o.shape) for o in out] == [tuple(t.shape) for t in teach]
    sum(build_loss("mimic")(o, t) for o, t in zip(out, teach)).backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in feats)


def test_adapters_spatial_mismatch_names_level_and_shapes():
    ad = FeatureAdapters([4, 6], [8, 12])
    feats = [torch.randn(B, 4, 8, 8), torch.randn(B, 6, 4, 4)]
    teach = [torch.randn(B, 8, 8, 8), torch.randn(B, 12, 5, 4)]
    with pytest.raises(ValueError) as e:
        ad(feats, teach)
    msg = str(e.value)
    assert "level 1" in msg and "(2, 6, 4, 4)" in msg and "(2, 12, 5, 4)" in msg


def test_adapters_channel_and_level_errors():
    with pytest.raises(ValueError):
        FeatureAdapters([4, 6], [8])
    ad = FeatureAdapters([4], [8])
    with pytest.raises(ValueError, match="level 0"):
        ad([torch.randn(B, 5, 4, 4)])
    with pytest.raises(ValueError, match="level 0"):
        ad([torch.randn(B, 4, 4, 4)], [torch.randn(B, 9, 4, 4)])


def test_schedule_warmup_and_constant():
    sch = DistillSchedule(warmup_epochs=2)
    assert [sch.factor(e, 10, False) for e in range(4)] == [0.0, 0.0, 1.0, 1.0]
    assert sch.factor(9, 10, True) == 1.0  # closing only matters with off_when_closed


def test_schedule_cosine_endpoints():
    sch = DistillSchedule(warmup_epochs=2, weight="cosine", final_ratio=0.2)
    assert sch.factor(1, 12, False) == 0.0
    assert sch.factor(2, 12, False) == pytest.approx(1.0)
    assert sch.factor(11, 12, False) == pytest.approx(0.2)
    assert sch.factor(2 + 9 / 2, 12, False) == pytest.approx(0.6)  # midpoint of the cosine
    values = [sch.factor(e, 12, False) for e in range(2, 12)]
    assert all(a > b for a, b in zip(values, values[1:]))


def test_schedule_closing():
    sch = DistillSchedule(off_when_closed=True)
    assert sch.factor(5, 10, True) == 0.0
    assert sch.factor(5, 10, False) == 1.0


def test_schedule_unknown_kind_lists_valid():
    with pytest.raises(ValueError) as e:
        DistillSchedule(weight="linear")
    assert "constant" in str(e.value) and "cosine" in str(e.value)
    sch = DistillSchedule()
    sch.weight = "step"
    with pytest.raises(ValueError, match="cosine"):
        sch.factor(0, 10, False)


def test_schedule_factor_depends_on_its_arguments_only():
    """Resume and NaN recovery ask for an epoch's factor again, out of order: it must not carry state."""
    sch = DistillSchedule(weight="cosine", warmup_epochs=1)
    forward = [sch.factor(e, 10, False) for e in range(10)]
    backward = [sch.factor(e, 10, False) for e in reversed(range(10))][::-1]
    assert forward == backward
    assert forward[0] == 0.0 and math.isclose(forward[1], 1.0)
    assert math.isclose(forward[4], 0.5 * (1 + math.cos(math.pi * 3 / 8)))  # 3 of 8 post-warm-up steps


def test_mlp_adapter_is_two_layers_and_trains():
    ad = FeatureAdapters([4, 6], [8, 12], kind="mlp")
    assert sum(p.numel() for p in ad.parameters()) == (4 * 8 + 8 + 8 * 8 + 8) + (6 * 12 + 12 + 12 * 12 + 12)
    feats = [torch.randn(B, 4, 4, 4, requires_grad=True), torch.randn(B, 6, 2, 2, requires_grad=True)]
    teach = [torch.randn(B, 8, 4, 4), torch.randn(B, 12, 2, 2)]
    sum(build_loss("mimic")(o, t) for o, t in zip(ad(feats, teach), teach)).backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in feats)
    narrow = FeatureAdapters([4, 6], [8, 12], kind="mlp_narrow")
    assert sum(p.numel() for p in narrow.parameters()) == (4 * 4 + 4 + 4 * 8 + 8) + (6 * 6 + 6 + 6 * 12 + 12)
    assert [tuple(o.shape) for o in narrow(feats, teach)] == [tuple(t.shape) for t in teach]
    with pytest.raises(ValueError, match="adapter must be one of"):
        FeatureAdapters([4], [8], kind="linear")


def test_confidence_weighted_mimic_needs_a_weight_and_ignores_zero_weight_positions():
    s, t = _pair("feat")
    loss = build_loss("mimic", confidence_weighted=True)
    with pytest.raises(ValueError, match="confidence"):
        loss(s, t)
    w = torch.zeros(B, H * W)
    w[:, :3] = torch.rand(B, 3) + 0.1
    changed = s.clone()
    changed.flatten(2)[:, :, 3:] += 5.0  # only where the weight is zero
    assert loss(changed, t, w).item() == pytest.approx(loss(s, t, w).item(), rel=1e-6)
    assert loss(t.clone(), t, w).item() == pytest.approx(0.0, abs=1e-9)


def test_mimic_normalisation_choices():
    s, t = _pair("feat")
    t = t * torch.linspace(0.1, 3.0, C).view(1, C, 1, 1)  # channels of very different spread
    raw = build_loss("mimic", normalize="none")(s, t).item()
    assert raw == pytest.approx(((s - t) ** 2).mean().item(), rel=1e-5)
    assert build_loss("mimic", normalize="global")(s, t).item() == pytest.approx(raw / t.std(unbiased=False).item() ** 2, rel=1e-4)
    # the per-channel form is scale free: scaling both maps leaves it unchanged, the plain MSE does not
    assert build_loss("mimic")(s * 7, t * 7).item() == pytest.approx(build_loss("mimic")(s, t).item(), rel=1e-4)
    assert build_loss("mimic", normalize="global")(s * 7, t * 7).item() == pytest.approx(
        build_loss("mimic", normalize="global")(s, t).item(), rel=1e-4)
    with pytest.raises(ValueError, match="normalize"):
        build_loss("mimic", normalize="batch")


@pytest.mark.parametrize("name", ["default", "accurate", "logits_only"])
def test_bundled_distill_configs_load_by_name_and_path(name):
    from softlabel.builtin import builtin_path
    from softlabel.distill.config import load_distill

    assert name in builtin_names("distill")
    config = load_distill(name)
    assert {"cls", "box"} <= set(config.terms)
    assert ("feat" in config.terms) == (name != "logits_only")
    # the file inside the package, named by its path, is the same config
    assert load_distill(str(builtin_path("distill", name))).to_dict() == config.to_dict()


def test_unknown_config_name_is_refused():
    from softlabel.augment import load_augment
    from softlabel.distill.config import load_distill
    from softlabel.errors import UserError

    with pytest.raises(UserError, match="built-in distill config.*accurate"):
        load_distill("acurate")
    with pytest.raises(UserError, match="not found"):
        load_distill("missing/acurate.yaml")
    assert load_augment("default") == load_augment(None)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_bce_from_kept_anchors_equals_bce_on_the_expanded_teacher(temperature):
    """The sparse form never builds the dense teacher; value and student gradient equal the dense loss's."""
    from softlabel.distill.teacherbatch import TeacherBatch

    gen = torch.Generator().manual_seed(0)
    b, nc, a, k = 3, 5, 40, 7
    index = torch.full((b, k), -1, dtype=torch.int32)
    for i, n in enumerate([7, 2, 0]):  # full, part-used and empty slot rows
        index[i, :n] = torch.randperm(a, generator=gen)[:n].to(torch.int32)
    kept = torch.randn((b, k, nc), generator=gen) * 4
    background = torch.randn((b, nc), generator=gen) - 5
    reg = 2
    values = torch.cat([torch.randn((b, k, 4 * reg), generator=gen), kept], 2)
    dense = TeacherBatch(index=index, values=values, background=background).class_logits(4 * reg, a)
    loss = build_loss("bce", temperature=temperature)
    assert LOSSES["bce"].sparse_teacher and not LOSSES["kl_cls"].sparse_teacher
    s1 = (torch.randn((b, nc, a), generator=gen) * 3).requires_grad_()
    s2 = s1.detach().clone().requires_grad_()
    want, got = loss(s1, dense), loss.forward_sparse(s2, index, kept, background)
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    want.backward()
    got.backward()
    assert torch.allclose(s1.grad, s2.grad, rtol=1e-4, atol=1e-9)
    # a student equal to the expanded teacher: zero, up to rounding
    assert abs(float(loss.forward_sparse(dense.clone(), index, kept, background))) < 1e-5
    with pytest.raises(ValueError, match="unweighted"):
        build_loss("bce", confidence_weighted=True).forward_sparse(s2, index, kept, background)


def test_sparse_teacher_is_declared_only_by_class_losses_with_a_sparse_form():
    from softlabel.distill.losses import register

    with pytest.raises(ValueError, match="forward_sparse"):
        @register("mse_sparse_without_form", sparse_teacher=True)
        class NoForm(torch.nn.Module):
            target = "cls"
    assert "mse_sparse_without_form" not in LOSSES
