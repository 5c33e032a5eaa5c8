"""The feature term on selected positions (`positions: K`) and int8 teacher maps dequantised by the distiller."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from softlabel.cache.encoding import decode_sample
from softlabel.cache.schema import Layout
from softlabel.distill.adapters import FeatureAdapters
from softlabel.distill.config import parse_distill
from softlabel.distill.distiller import Distiller, TeacherBatch
from softlabel.distill.losses import build_loss
from softlabel.errors import UserError
from softlabel.select import encode_batch, to_host
from softlabel.train.dataset import stack_teacher

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
        kd = d(student, teacher)["kd_feat"]
        kd.backward()
        grads.append((float(kd.detach()), [f.grad for f in student["feats"]], [p.grad.clone() for p in d.terms['feat'].adapters.parameters()]))
    assert grads[1][0] == pytest.approx(grads[0][0], rel=1e-5)
    for a, b in zip(grads[0][1] + grads[0][2], grads[1][1] + grads[1][2]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_only_the_teachers_top_positions_are_distilled():
    k = 5
    d = _distiller(positions=k)
    student, teacher = _inputs(seed=1)
    d(student, teacher)["kd_feat"].backward()
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
    kd = d(student, teacher)["kd_feat"]
    assert torch.isfinite(kd) and float(kd.detach()) > 0
    kd.backward()
    assert student["feats"][0].grad is not None
    assert all(f.grad is None or float(f.grad.abs().sum()) == 0 for f in student["feats"][1:])


def _layout(precision: str, topk: int | None = None, features: str = "dense", floor: float = 0.0, rows: int | None = None) -> Layout:
    head = {lvl: (4 * REG_MAX + NC, h, w) for lvl, (h, w) in zip(LEVELS, SIZES)}
    feat = {lvl: (c, h, w) for lvl, c, (h, w) in zip(LEVELS, T_CH, SIZES)}
    return Layout(count=3, shard_size=3, head=head, feat=feat, views=["v0"], reg_max=REG_MAX, nc=NC, precision=precision,
                  sparse={"topk": topk, "floor": floor, "feature_rows": rows} if topk else None, feature_layout=features)


def _samples(teacher: TeacherBatch, layout: Layout) -> list:
    """Teacher tensors through the dump's encoding and the reader's decoding: one TeacherSample per image."""
    starts = np.cumsum([0] + [h * w for h, w in SIZES])
    head = [teacher.head[:, :, a:b].reshape(-1, teacher.head.shape[1], h, w) for a, b, (h, w) in zip(starts, starts[1:], SIZES)]
    stored, _ = to_host(encode_batch(head, [teacher.feats[lvl] for lvl in LEVELS], layout))
    n = len(next(iter(stored.values())))
    return [decode_sample({k: v[i] for k, v in stored.items()}, layout, b"") for i in range(n)]


def _stored(teacher: TeacherBatch, layout: Layout) -> TeacherBatch:
    """Teacher tensors through the dump's encoding and the reader's decoding, collated as the trainer does and
    laid out as the distiller lays it out (a no-op for dense stores)."""
    return stack_teacher(_samples(teacher, layout)).unpacked()


def test_int8_maps_dequantised_by_the_distiller_match_the_decoded_store():
    """The trainer reads int8 maps with their scales; the distiller's dequantisation equals the reader's."""
    student, teacher = _inputs(seed=2, batch=3)
    int8 = _stored(teacher, _layout("int8"))
    assert all(f.dtype == torch.int8 for f in int8.feats.values()) and int8.feat_scale is not None
    dense = TeacherBatch(int8.head, {lvl: int8.feat(lvl) for lvl in LEVELS})
    for lvl in LEVELS:
        step = teacher.feats[lvl].abs().amax(dim=(2, 3), keepdim=True) / 127
        assert ((int8.feat(lvl) - teacher.feats[lvl]).abs() <= 0.5 * step + 1e-6).all()
        b, p = torch.tensor([0, 2, 2]), torch.tensor([1, 0, 3])
        assert torch.equal(int8.feat_rows(lvl, b, p), dense.feat(lvl).flatten(2)[b, :, p])
    for positions in ("all", 6):
        d = _distiller(positions=positions)
        a, c = d(student, dense)["kd_feat"], d(student, int8)["kd_feat"]
        assert float(a.detach()) == pytest.approx(float(c.detach()), rel=1e-6)


def test_positions_option_is_checked():
    for bad in (0, -3, "some", True, 2.5):
        with pytest.raises(UserError, match="positions must be 'all' or a whole number"):
            parse_distill({"feat": {**FEAT, "positions": bad}}, "t.yaml")
    with pytest.raises(UserError, match="loss 'cwd' needs whole feature maps.*mimic"):
        parse_distill({"feat": {"loss": "cwd", "positions": 64}}, "t.yaml")
    with pytest.raises(UserError, match="'positions' applies to feature terms only"):
        parse_distill({"cls": {"loss": "bce", "positions": 64}}, "t.yaml")
    assert parse_distill({"feat": {**FEAT, "positions": "all"}}, "t.yaml").terms["feat"].positions is None


@pytest.mark.parametrize("weighted", [True, False])
def test_box_term_on_kept_anchors_equals_the_masked_full_term(weighted):
    """With a sparse head the box term is computed on the kept anchors only: the same value and
    gradient as weighting every anchor by a mask of them."""
    from softlabel.distill.losses import build_loss

    cfg = parse_distill({"box": {"loss": "ld", "temperature": 2.0, "confidence_weighted": weighted}}, "t.yaml")
    d = Distiller(cfg, REG_MAX, LEVELS, S_CH, LEVELS, T_CH)
    student, teacher = _inputs(seed=3)
    student["boxes"] = torch.randn_like(student["boxes"]).requires_grad_()
    teacher.head[:, : 4 * REG_MAX] = torch.randn_like(teacher.head[:, : 4 * REG_MAX])
    mask = (torch.rand(teacher.head.shape[0], ANCHORS, generator=torch.Generator().manual_seed(4)) < 0.3).float()
    k = int(mask.sum(1).max()) + 2  # a few unused slots too
    index = torch.full((mask.shape[0], k), -1, dtype=torch.int32)
    for b in range(mask.shape[0]):
        kept = mask[b].nonzero()[:, 0]
        index[b, : len(kept)] = kept.flip(0).to(torch.int32)  # slot order is the teacher's rank, not the anchor's
    values = torch.stack([teacher.head[b][:, index[b].clamp_min(0).long()].T * (index[b] >= 0)[:, None] for b in range(mask.shape[0])])
    background = torch.full((mask.shape[0], NC), -9.0)
    sparse = TeacherBatch(index=index, values=values, background=background)
    kd = d(student, sparse)["kd_box"]
    kd.backward()
    conf = sparse.class_logits(4 * REG_MAX, ANCHORS).sigmoid().amax(1)
    boxes = student["boxes"].detach().clone().requires_grad_()
    full = build_loss("ld", temperature=2.0, confidence_weighted=weighted)(
        boxes, teacher.head[:, : 4 * REG_MAX], (conf if weighted else 1) * mask)
    full.backward()
    assert float(kd.detach()) == pytest.approx(float(full.detach()), rel=1e-5)
    assert torch.allclose(student["boxes"].grad, boxes.grad, rtol=1e-4, atol=1e-8)
    none = TeacherBatch(index=torch.full_like(index, -1), values=values, background=background)
    assert float(d(student, none)["kd_box"].detach()) == 0  # no kept anchor at all: the term is 0, not NaN


@pytest.mark.parametrize("precision,rel", [("float16", 5e-3), ("int8", 1e-2)])
def test_stored_rows_give_the_feature_term_of_the_whole_maps(precision, rel):
    """Sparse features: the rows a store keeps are the maps at the kept anchors, and the feature term
    from them equals the one from the teacher's whole maps (P <= F positions; rows for the first F of K slots)."""
    student, teacher = _inputs(seed=3, batch=3)
    k, f = 12, 8
    sparse = _stored(teacher, _layout(precision, topk=k, features="sparse", rows=f))
    assert sparse.index.shape == (3, k) and sparse.rows.shape == (3, f, max(T_CH)) and not sparse.feats and sparse.head is None
    starts = dict(zip(LEVELS, np.cumsum([0] + [h * w for h, w in SIZES])))
    for b in range(3):
        for j in range(f):
            a = int(sparse.index[b, j])
            lvl = [lv for lv in LEVELS if a >= starts[lv]][-1]
            c = T_CH[LEVELS.index(lvl)]
            want = teacher.feats[lvl][b].flatten(1)[:, a - starts[lvl]]
            got = sparse.stored_rows(lvl, torch.tensor([b]), torch.tensor([j]), c)[0]
            step = 0.51 * sparse.rows_scale[b, LEVELS.index(lvl), :c] if precision == "int8" else 1e-3 * want.abs() + 1e-6
            assert ((got - want).abs() <= step).all(), (b, j, lvl)
            assert (sparse.rows[b, j, c:] == 0).all()  # zero past the level's channels
    for positions in (6, f):
        d = _distiller(positions=positions)
        whole, rows = d(student, teacher)["kd_feat"], d(student, sparse)["kd_feat"]
        assert float(rows.detach()) == pytest.approx(float(whole.detach()), rel=rel)


@pytest.mark.parametrize("rows", [3, 8])
def test_collate_packs_the_kept_anchors_and_the_terms_stay_the_same(rows):
    """Kept anchors are a prefix of the K slots: collate packs each sample's kept slots (rows: of its
    first F), the distiller lays them out to the batch's largest kept count, and every term equals the
    one from the whole padded arrays."""
    from softlabel.distill.config import load_distill

    student, teacher = _inputs(seed=5, batch=3)
    g = torch.Generator().manual_seed(6)
    student["scores"] = torch.randn(student["scores"].shape, generator=g, requires_grad=True)
    student["boxes"] = torch.randn(student["boxes"].shape, generator=g, requires_grad=True)
    teacher.head[:, 4 * REG_MAX :] = -9.0  # below the floor everywhere but at the anchors set next
    for b, n in enumerate((3, 5, 0)):
        anchors = torch.randperm(ANCHORS, generator=g)[:n]
        teacher.head[b, 4 * REG_MAX + b % NC, anchors] = torch.rand(n, generator=g) * 3
    k = 12
    samples = _samples(teacher, _layout("int8", topk=k, features="sparse", floor=0.01, rows=rows))
    assert [int((s.index >= 0).sum()) for s in samples] == [3, 5, 0]

    def uncut(batch: list) -> TeacherBatch:
        def stack(name: str) -> torch.Tensor:
            return torch.from_numpy(np.stack([getattr(s, name) for s in batch]))

        return TeacherBatch(index=stack("index"), values=stack("values"), values_scale=stack("values_scale"),
                            background=stack("background"), rows=stack("rows"), rows_scale=stack("rows_scale"),
                            row_levels=batch[0].row_levels)

    def nbytes(t: TeacherBatch) -> int:
        return sum(x.numel() * x.element_size() for x in t.tensors().values())

    torch.manual_seed(0)
    d = Distiller(load_distill(None), REG_MAX, LEVELS, S_CH, LEVELS, T_CH)  # the default terms, positions: 64
    for sel, width in ((slice(0, 3), 5), (slice(2, 3), 1), (slice(0, 1), 3)):
        batch = samples[sel]
        part = {"scores": student["scores"][sel], "boxes": student["boxes"][sel], "feats": [f[sel] for f in student["feats"]]}
        packed, full = stack_teacher(batch), uncut(batch)
        counts = [int((x.index >= 0).sum()) for x in batch]
        # packed: the kept slots only, rows for each sample's first `rows` of them
        assert packed.counts.tolist() == counts and packed.index.shape == (sum(counts),)
        assert packed.values.shape[0] == sum(counts) and packed.rows.shape == (sum(min(n, rows) for n in counts), max(T_CH))
        assert nbytes(packed) < nbytes(full)
        cut = packed.unpacked()
        assert cut.index.shape == (len(batch), width) and cut.values.shape[1] == width
        assert cut.rows.shape == (len(batch), min(rows, width), max(T_CH)) and full.index.shape == (len(batch), k)
        assert torch.equal(cut.index, full.index[:, :width]) and torch.equal(cut.values, full.values[:, :width])
        assert torch.equal(cut.rows, full.rows[:, : min(rows, width)])
        a, b = d(part, packed), d(part, full)
        assert set(a) == {"kd_cls", "kd_box", "kd_feat"}
        for key in a:
            assert torch.equal(a[key], b[key]), (key, width, float(a[key]), float(b[key]))
    assert float(d(student, stack_teacher(samples))["kd_feat"].detach()) > 0


def test_a_sparse_head_with_whole_feature_maps_collates_both():
    """--features dense with a sparse head: collate packs the head and keeps the maps, and a feature term on every
    position reads them as from a dense store."""
    student, teacher = _inputs(seed=5, batch=3)
    samples = _samples(teacher, _layout("int8", topk=12, features="dense"))
    packed = stack_teacher(samples)
    assert packed.packed and set(packed.feats) == set(LEVELS) and packed.rows is None
    assert all(packed.feats[lvl].shape[0] == 3 and packed.feats[lvl].dtype == torch.int8 for lvl in LEVELS)
    dense = stack_teacher(_samples(teacher, _layout("int8")))
    # unweighted, so that the sparse head's background (the confidence elsewhere) does not enter the term
    d = _distiller(positions="all", confidence_weighted=False, level_balance="equal")
    assert torch.equal(d(student, packed)["kd_feat"], d(student, dense)["kd_feat"])
