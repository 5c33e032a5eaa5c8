"""Contract 1 (replay is pure) and contract 2's fingerprint."""

from __future__ import annotations

import dataclasses
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from softlabel.augment import AugmentConfig, load_augment
from softlabel.data import build_index, load_data_yaml
from softlabel.dump import _collate, _ReplayItems
from softlabel.errors import UserError
from softlabel.replay import Replay, View, fingerprint

IMGSZ = 64
GROUP = 5  # 12 images: partner groups of 5 and 7
CACHE = 2 * IMGSZ * IMGSZ * 3  # room for two or three resized images: the cache evicts all the time


@pytest.fixture(scope="module")
def replay(dataset):
    augment = dataclasses.replace(load_augment(), mosaic_group=GROUP, mixup=0.5)
    return Replay(build_index(load_data_yaml(dataset)), augment, IMGSZ, seed=7, cache_bytes=CACHE)


def _items(n):
    return [(View("v", k), i) for k in range(2) for i in range(n)] + [(View("c", 0), i) for i in range(n)]


def _fingerprints(replay, workers, order):
    items = [_items(len(replay))[j] for j in order]
    loader = DataLoader(_ReplayItems(replay, items), batch_size=5, num_workers=workers, collate_fn=_collate)
    out = {}
    for views, indices, _, fps in loader:
        out.update({(v, i): fp for v, i, fp in zip(views, indices, fps)})
    return out


def test_same_across_workers_and_order(replay):
    n = len(_items(len(replay)))
    base = _fingerprints(replay, 0, range(n))
    shuffled = list(range(n))
    random.Random(3).shuffle(shuffled)
    assert _fingerprints(replay, 2, shuffled) == base
    assert len(set(base.values())) == len(base), "every (view, index) should be a different image"


def test_same_in_another_process(replay, dataset):
    code = (
        "import dataclasses\n"
        "from softlabel.augment import load_augment\n"
        "from softlabel.data import build_index, load_data_yaml\n"
        "from softlabel.replay import Replay, View\n"
        f"a = dataclasses.replace(load_augment(), mosaic_group={GROUP}, mixup=0.5)\n"
        f"r = Replay(build_index(load_data_yaml({str(dataset)!r})), a, {IMGSZ}, seed=7)\n"
        "print(' '.join(r(i, View(k, 0)).fingerprint.hex() for k in 'vc' for i in range(len(r))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    here = [replay(i, View(k, 0)).fingerprint.hex() for k in "vc" for i in range(len(replay))]
    assert out == here


def test_global_rng_neither_read_nor_advanced(replay):
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    states = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state().clone())
    first = [replay(i, View("v", 1)) for i in range(len(replay))]
    assert random.getstate() == states[0]
    assert np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    again = [replay(i, View("v", 1)) for i in range(len(replay))]
    for a, b in zip(first, again):
        assert np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels)


def test_mosaic_partners_are_replayed(dataset):
    index = build_index(load_data_yaml(dataset))
    always = Replay(index, AugmentConfig(mosaic=1.0, fliplr=0.0, hsv_h=0, hsv_s=0, hsv_v=0, albumentations=False), IMGSZ, 0)
    never = Replay(index, AugmentConfig(mosaic=0.0, fliplr=0.0, hsv_h=0, hsv_s=0, hsv_v=0, albumentations=False), IMGSZ, 0)
    # a mosaic pulls in other images' labels: more objects than the single image on average
    mosaic_objects = sum(len(always(i, View("v", 0)).labels) for i in range(len(index)))
    single_objects = sum(len(never(i, View("v", 0)).labels) for i in range(len(index)))
    assert mosaic_objects > single_objects
    # the same partners on a fresh pipeline, after other samples were replayed in between, whatever
    # its image cache holds
    for cache_bytes in (512 << 20, IMGSZ * IMGSZ * 3):
        fresh = Replay(index, always.augment, IMGSZ, 0, cache_bytes=cache_bytes)
        for i in reversed(range(len(index))):
            fresh(i, View("v", 3))
            assert fresh(i, View("v", 0)).fingerprint == always(i, View("v", 0)).fingerprint


def test_closing_views_do_not_mosaic(dataset):
    index = build_index(load_data_yaml(dataset))
    cfg = AugmentConfig(mosaic=1.0, translate=0.0, scale=0.0, fliplr=0.0, hsv_h=0, hsv_s=0, hsv_v=0, albumentations=False)
    r = Replay(index, cfg, IMGSZ, 0)
    for i in range(len(index)):
        s = r(i, View("c", 0))
        # the image alone, centred without scaling or moving, keeps every box
        assert len(s.labels) == len(index.labels[i])


def test_labels_stay_normalised(replay):
    for i in range(len(replay)):
        s = replay(i, View("v", 0))
        assert s.image.dtype == np.uint8 and s.image.shape == (IMGSZ, IMGSZ, 3)
        if len(s.labels):
            assert s.labels[:, 1:].min() >= 0 and s.labels[:, 1:].max() <= 1
            assert (s.labels[:, 3:] > 0).all()


def test_one_changed_pixel_changes_fingerprint(replay):
    s = replay(1, View("v", 0))
    flat = s.image.reshape(-1)
    for at in (0, 5 * IMGSZ * 3 + 7 * 3 + 1, len(flat) // 2, 3 * len(flat) // 4 - 1, len(flat) - 1):  # every quarter
        for bit in (1, 128):
            image = s.image.copy()
            image.reshape(-1)[at] ^= bit
            assert fingerprint(image, s.labels) != s.fingerprint, (at, bit)
    assert fingerprint(s.image.reshape(IMGSZ // 2, IMGSZ * 2, 3), s.labels) != s.fingerprint  # same bytes, other shape
    labels = s.labels.copy()
    if len(labels):
        labels[0, 1] += 1e-6
        assert fingerprint(s.image, labels) != s.fingerprint
    assert fingerprint(s.image, s.labels) == s.fingerprint


def test_seed_and_view_change_the_sample(dataset, replay):
    other = Replay(replay.index, replay.augment, IMGSZ, seed=8)
    assert other(2, View("v", 0)).fingerprint != replay(2, View("v", 0)).fingerprint
    assert replay(2, View("v", 1)).fingerprint != replay(2, View("v", 0)).fingerprint


@pytest.mark.parametrize("key", ["rect", "multi_scale"])
def test_rect_and_multiscale_refused(key):
    with pytest.raises(UserError, match=key):
        AugmentConfig.from_dict({key: True})


def test_unknown_augment_key_lists_valid_ones():
    with pytest.raises(UserError, match="valid keys: mosaic"):
        AugmentConfig.from_dict({"mosiac": 1.0})
