"""Device-side selection and quantisation (softlabel.select) against a numpy reference of the same rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from softlabel.cache.encoding import quantise as quantise_np
from softlabel.select import gather_rows, quantise, select_topk

RNG = np.random.default_rng(1)


def _logit(p):
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return np.log(p) - np.log1p(-p)


def sparsify_reference(head: np.ndarray, reg_max: int, topk: int, floor: float):
    """The numpy rules: rank by best class logit (stable), keep the top-k passing the floor,
    background = logit of the mean probability of the anchors not kept, -1 for unused slots."""
    b, c, a = head.shape
    k = min(topk, a)
    logits = head[:, 4 * reg_max :, :].astype(np.float32)
    score = logits.max(1)
    order = np.argsort(-score, axis=1, kind="stable")[:, :k]
    keep = np.take_along_axis(score, order, 1) >= _logit(np.float32(floor)) if floor > 0 else np.ones_like(order, bool)
    index = np.where(keep, order, -1).astype(np.int32)
    values = np.take_along_axis(head, np.maximum(index, 0)[:, None, :], 2).transpose(0, 2, 1)
    values = np.where(keep[:, :, None], values, 0).astype(np.float32)
    dropped = np.ones((b, a), bool)
    rows = np.repeat(np.arange(b)[:, None], k, 1)
    dropped[rows[keep], index[keep]] = False
    probs = 1 / (1 + np.exp(-logits))
    n = np.maximum(dropped.sum(1), 1)[:, None]
    background = _logit((probs * dropped[:, None, :]).sum(2) / n)
    if k < topk:
        index = np.pad(index, ((0, 0), (0, topk - k)), constant_values=-1)
        values = np.pad(values, ((0, 0), (0, topk - k), (0, 0)))
    return index, values, background


@pytest.mark.parametrize("topk,floor", [(16, 0.0), (16, 0.3), (300, 0.0), (5, 0.9)])
def test_torch_selection_equals_the_numpy_rules(topk, floor):
    reg_max, nc, anchors = 2, 5, 84
    head = RNG.normal(0, 2, (3, 4 * reg_max + nc, anchors)).astype(np.float16).astype(np.float32)
    head[:, 4 * reg_max :, :] -= 3
    head[1, 4 * reg_max + 2, 10:14] = 1.5  # ties: the lower anchor ranks first in both
    ref = sparsify_reference(head, reg_max, topk, floor)
    got = [t.numpy() for t in select_topk(torch.from_numpy(head), reg_max, topk, floor)]
    np.testing.assert_array_equal(got[0], ref[0])
    assert (got[0] >= 0).sum() > 0
    np.testing.assert_array_equal(got[1], ref[1])
    np.testing.assert_allclose(got[2], ref[2], rtol=1e-5, atol=1e-5)


def test_torch_quantise_equals_numpy():
    x = RNG.normal(0, 1, (2, 6, 5, 5)).astype(np.float32) * np.array([1, 10, 0.1, 100, 3, 0])[None, :, None, None]
    q, s = quantise(torch.from_numpy(x), "int8", reduce=(2, 3))
    qn, sn = quantise_np(x, "int8", channel_axis=1)
    np.testing.assert_array_equal(q.numpy(), qn)
    np.testing.assert_array_equal(s[:, :, 0, 0].numpy(), sn)
    b, _ = quantise(torch.from_numpy(x), "bfloat16", reduce=(2, 3))
    np.testing.assert_array_equal(b.numpy().view(np.uint16), quantise_np(x, "bfloat16", channel_axis=1)[0])


def test_rows_are_the_feature_maps_at_the_kept_anchors():
    feats = [torch.randn(2, 4, 4, 4), torch.randn(2, 6, 2, 2), torch.randn(2, 6, 1, 1)]
    sizes = [16, 4, 1]
    index = torch.tensor([[0, 17, 20, -1], [15, 16, 3, 19]], dtype=torch.int32)
    rows, level = gather_rows(feats, sizes, index, width=6)
    assert rows.shape == (2, 4, 6)
    assert level.tolist() == [[0, 1, 2, -1], [0, 1, 0, 1]]
    assert torch.equal(rows[0, 0, :4], feats[0][0, :, 0, 0]) and (rows[0, 0, 4:] == 0).all()  # zero past C of P3
    assert torch.equal(rows[0, 1], feats[1][0, :, 0, 1]) and torch.equal(rows[0, 2], feats[2][0, :, 0, 0])
    assert (rows[0, 3] == 0).all()  # an unused slot
    assert torch.equal(rows[1, 0, :4], feats[0][1, :, 3, 3]) and torch.equal(rows[1, 3], feats[1][1, :, 1, 1])
    skipped, _ = gather_rows([feats[0], None, feats[2]], sizes, index, width=6)  # a level not stored reads zero
    assert (skipped[0, 1] == 0).all() and torch.equal(skipped[0, 2], rows[0, 2])
