"""The feature term on selected positions (`positions: K`) and int8 teacher maps dequantised by the distiller."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from softlabel.cache.encoding import decode_sample, encode_shard
from softlabel.distill.adapters import FeatureAdapters
from softlabel.distill.config import parse_distill
from softlabel.distill.distiller import Distiller, TeacherBatch
from softlabel.distill.losses import build_loss
from softlabel.errors import UserError

LEVELS, S_CH, T_CH, SIZES, NC, REG_MAX = ["p3", "p4", "p5"], [4, 8, 12], [6, 10, 14], [(6, 6), (3, 3), (2, 2)], 3, 16
ANCHORS = sum(h * w for h, w in SIZES)
FEAT = {"loss": "mimic", "weight": 1.0, "confidence_weighted": True, "normalize": "none", "level_balance": "confidence"}


def _inputs(seed: int = 0, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    s_feats = [torch.randn(batch, c, h, w, generator=g, requires_grad=True) for c, (h, w) in zip(S_CH, SIZES)]
    t_feats = {lvl: torch.randn(batch, c, h, w, generator=g) for lvl, c, (h, w) in zip(LEVELS, T_CH, SIZES)}
    head = torch.randn(batch, 4 * REG_MAX + NC, ANCHORS, generator=g) * 3
    student = {"scores": torch.zeros(batch, NC, ANCHORS), "boxes": torch.zeros(batch, 4 * REG_MAX, ANCHORS), "feats": s_feats}
    return student, TeacherBatch(head, t_feats)


def _distiller(**feat) -> Distiller:
    torch.manual_seed(0)  # the same adapter weights for every distiller built here
    return Distiller(parse_distill({"feat": {**FEAT, **feat}}, "t.yaml"), REG_MAX, LEVELS, S_CH, LEVELS, T_CH)


@pytest.mark.parametrize("kind", ["conv", "mlp"])
def test_adapter_rows_are_the_maps_at_those_positions(kind):
    ad = FeatureAdapters([4, 8], [6, 10], kind)
    feats = [torch.randn(2, 4, 5, 5), torch.randn(2, 8, 3, 3)]
    for level, (f, m) in enumerate(zip(feats, ad(feats))):
        rows = f.flatten(2).transpose(1, 2).reshape(-1, f.shape[1])
        expected = m.flatten(2).transpose(1, 2).reshape(-1, m.shape[1])
        assert torch.allclose(ad.rows(level, rows), expected, atol=1e-5)
    with pytest.raises(ValueError, match=r"level 1: expected student rows \[N, 8\]"):
        ad.rows(1, torch.randn(3, 4))


@pytest.mark.parametrize("normalize", ["none", "global", "channel"])
def test_mimic_on_rows_equals_mimic_on_maps(normalize):
    loss = build_loss("mimic", normalize=normalize, confidence_weighted=True)
    s, t, w = torch.randn(2, 6, 4, 3), torch.randn(2, 6, 4, 3), torch.rand(2, 12)

    def rows(x):
        return x.flatten(2).transpose(1, 2).reshape(-1, x.shape[1])

    assert float(loss(rows(s), rows(t), w.reshape(-1))) == pytest.approx(float(loss(s, t, w)), rel=1e-5)
    with pytest.raises(ValueError, match="needs weight"):
        loss(rows(s), rows(t))


@pytest.mark.parametrize("normalize", ["none", "channel"])
def test_every_position_selected_equals_the_whole_maps(normalize):
    """positions >= the anchor count keeps every position: the same loss and gradients as positions: all."""
    whole, selected = _distiller(normalize=normalize), _distiller(normalize=normalize, positions=ANCHORS + 5)
    selected.load_state_dict(whole.state_dict())
    grads = []
    for d in (whole, selected):
        student, teacher = _inputs()
        kd = d(student, teacher, LEVELS)["kd_feat"]
        kd.backward()
        grads.append((float(kd.detach()), [f.grad for f in student["feats"]], [p.grad.clone() for p in d.adapters.parameters()]))
    assert grads[1][0] == pytest.approx(grads[0][0], rel=1e-5)
    for a, b in zip(grads[0][1] + grads[0][2], grads[1][1] + grads[1][2]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_only_the_teachers_top_positions_are_distilled():
    k = 5
    d = _distiller(positions=k)
    student, teacher = _inputs(seed=1)
    d(student, teacher, LEVELS)["kd_feat"].backward()
    conf = teacher.head[:, 4 * REG_MAX :].sigmoid().amax(1)
    top = torch.zeros_like(conf, dtype=torch.bool).scatter_(1, conf.topk(k, dim=1).indices, True)
    grads = [f.grad if f.grad is not None else torch.zeros_like(f) for f in student["feats"]]
    touched = torch.cat([(g.abs().sum(1) > 0).flatten(1) for g in grads], 1)
    assert torch.equal(touched, top)
    assert d.config.to_dict()["feat"]["positions"] == k


def test_level_without_chosen_positions_adds_nothing():
    d = _distiller(positions=3)
    student, teacher = _inputs()
    teacher.head[:, 4 * REG_MAX :] = -20.0
    teacher.head[:, 4 * REG_MAX, :3] = 5.0  # the teacher's three best anchors are all on P3
    kd = d(student, teacher, LEVELS)["kd_feat"]
    assert torch.isfinite(kd) and float(kd.detach()) > 0
    kd.backward()
    assert student["feats"][0].grad is not None
    assert all(f.grad is None or float(f.grad.abs().sum()) == 0 for f in student["feats"][1:])


def test_int8_maps_dequantised_by_the_distiller_match_the_decoded_store():
    """The trainer reads int8 maps with their scales; the distiller's dequantisation equals the reader's."""
    student, teacher = _inputs(seed=2, batch=3)
    raw = {f"feat/{lvl}": teacher.feats[lvl].numpy().astype(np.float16) for lvl in LEVELS}

    class _L:  # the part of a Layout that encode_shard and decode_sample read for feature maps
        precision, sparse, head, feat = "int8", None, {}, {lvl: None for lvl in LEVELS}

    stored = encode_shard(raw, _L)
    decoded = [decode_sample({k: v[i] for k, v in stored.items()}, _L) for i in range(3)]
    kept = [decode_sample({k: v[i] for k, v in stored.items()}, _L, dequantise_feat=False) for i in range(3)]
    assert all(f.dtype == np.int8 for s in kept for f in s.feat.values()) and kept[0].feat_scale is not None
    dense = TeacherBatch(teacher.head, {lvl: torch.from_numpy(np.stack([s.feat[lvl] for s in decoded])) for lvl in LEVELS})
    int8 = TeacherBatch(teacher.head, {lvl: torch.from_numpy(np.stack([s.feat[lvl] for s in kept])) for lvl in LEVELS},
                        feat_scale={lvl: torch.from_numpy(np.stack([s.feat_scale[lvl] for s in kept])) for lvl in LEVELS})
    for lvl in LEVELS:
        assert torch.equal(int8.feat(lvl), dense.feat(lvl))
        b, p = torch.tensor([0, 2, 2]), torch.tensor([1, 0, 3])
        assert torch.equal(int8.feat_rows(lvl, b, p), dense.feat(lvl).flatten(2)[b, :, p])
    for positions in ("all", 6):
        d = _distiller(positions=positions)
        a, c = d(student, dense, LEVELS)["kd_feat"], d(student, int8, LEVELS)["kd_feat"]
        assert float(a.detach()) == pytest.approx(float(c.detach()), rel=1e-6)


def test_positions_option_is_checked():
    for bad in (0, -3, "some", True, 2.5):
        with pytest.raises(UserError, match="positions must be 'all' or a whole number"):
            parse_distill({"feat": {**FEAT, "positions": bad}}, "t.yaml")
    with pytest.raises(UserError, match="loss 'cwd' needs whole feature maps.*mimic"):
        parse_distill({"feat": {"loss": "cwd", "positions": 64}}, "t.yaml")
    with pytest.raises(UserError, match="'positions' applies to 'feat' only"):
        parse_distill({"cls": {"loss": "bce", "positions": 64}}, "t.yaml")
    assert parse_distill({"feat": {**FEAT, "positions": "all"}}, "t.yaml").terms["feat"].positions is None


@pytest.mark.parametrize("weighted", [True, False])
def test_box_term_on_kept_anchors_equals_the_masked_full_term(weighted):
    """With a sparse head's mask the box term is computed on the kept anchors only: the same value and
    gradient as weighting every anchor by the mask."""
    from softlabel.distill.losses import build_loss

    cfg = parse_distill({"box": {"loss": "ld", "temperature": 2.0, "confidence_weighted": weighted}}, "t.yaml")
    d = Distiller(cfg, REG_MAX, LEVELS, S_CH, LEVELS, T_CH)
    student, teacher = _inputs(seed=3)
    student["boxes"] = torch.randn_like(student["boxes"]).requires_grad_()
    teacher.head[:, : 4 * REG_MAX] = torch.randn_like(teacher.head[:, : 4 * REG_MAX])
    teacher.mask = (torch.rand(teacher.head.shape[0], ANCHORS, generator=torch.Generator().manual_seed(4)) < 0.3).float()
    kd = d(student, teacher, LEVELS)["kd_box"]
    kd.backward()
    conf = teacher.head[:, 4 * REG_MAX :].sigmoid().amax(1)
    boxes = student["boxes"].detach().clone().requires_grad_()
    full = build_loss("ld", temperature=2.0, confidence_weighted=weighted)(
        boxes, teacher.head[:, : 4 * REG_MAX], (conf if weighted else 1) * teacher.mask)
    full.backward()
    assert float(kd.detach()) == pytest.approx(float(full.detach()), rel=1e-5)
    assert torch.allclose(student["boxes"].grad, boxes.grad, rtol=1e-4, atol=1e-8)
    teacher.mask.zero_()  # no kept anchor at all: the term is 0, not NaN
    assert float(d(student, teacher, LEVELS)["kd_box"].detach()) == 0
