"""Mosaic partner groups: partners come from the image's group, and training visits a mosaic epoch
group by group, so a small per-process image cache reads each image about once per epoch."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

import softlabel.replay as replay_module
from softlabel.augment import AugmentConfig, load_augment
from softlabel.data import build_index, load_data_yaml
from softlabel.replay import Replay, View, mosaic_groups
from softlabel.toydata import make_dataset
from softlabel.train import EpochSampler

IMGSZ = 64


@pytest.mark.parametrize("n,size,expected", [(12, 4, [4, 4, 4]), (13, 4, [4, 4, 5]), (15, 4, [4, 4, 7]), (3, 4, [3]), (7, 4, [7])])
def test_groups_partition_the_images(n, size, expected):
    groups = mosaic_groups(n, size, 0, View("v", 0))
    members = groups.all()
    assert [len(m) for m in members] == expected
    assert sorted(np.concatenate(members).tolist()) == list(range(n))
    for k, m in enumerate(members):
        assert (groups.of[m] == k).all()


def test_groups_differ_between_views_and_seeds_and_repeat():
    base = mosaic_groups(100, 8, 0, View("v", 0)).order
    assert np.array_equal(base, mosaic_groups(100, 8, 0, View("v", 0)).order)
    assert not np.array_equal(base, mosaic_groups(100, 8, 0, View("v", 1)).order)
    assert not np.array_equal(base, mosaic_groups(100, 8, 1, View("v", 0)).order)
    with pytest.raises(ValueError, match="c0"):
        mosaic_groups(100, 8, 0, View("c", 0))


@pytest.fixture(scope="module")
def index(dataset):
    return build_index(load_data_yaml(dataset))


def test_every_partner_lies_in_the_image_group(index):
    # mixup always: the mixup image and its own mosaic partners come from the group too
    cfg = dataclasses.replace(load_augment(), mosaic=1.0, mixup=1.0, mosaic_group=4)
    replay = Replay(index, cfg, IMGSZ, seed=3)
    for view in (View("v", 0), View("v", 1)):
        outside_uniform = 0
        for i in range(len(index)):
            group = set(replay.group_of(i, view).tolist())
            assert i in group and len(group) in (4, 5, 6, 7)
            loaded = []
            original = replay._load
            replay._load = lambda j: loaded.append(j) or original(j)
            try:
                replay(i, view)
            finally:
                del replay._load
            assert len(loaded) == 8  # two mosaics of four
            assert set(loaded) <= group, (i, view, loaded, group)
            outside_uniform += len(set(np.random.default_rng(i).integers(len(index), size=6).tolist()) - group)
        assert outside_uniform > 0  # uniform draws over the whole dataset would leave the group


def test_mosaic_group_is_an_augment_setting():
    assert AugmentConfig.from_attrs({**load_augment().to_dict(), "mosaic_group": 5, "seed": 0}).mosaic_group == 5
    from softlabel.errors import UserError

    with pytest.raises(UserError, match="mosaic_group"):
        AugmentConfig.from_dict({"mosaic_group": 0})


# the sampler's layout ---------------------------------------------------------------------------


def _batches(part: list[int], batch: int) -> list[list[int]]:
    return [part[k : k + batch] for k in range(0, len(part), batch)]


def _split_groups(groups, part: list[int], batch: int, workers: int) -> int:
    """How many groups reach more than one worker, batch k going to worker k % workers."""
    worker_of = {}
    for k, b in enumerate(_batches(part, batch)):
        for i in b:
            worker_of.setdefault(i, set()).add(k % workers)
    return sum(len(set().union(*(worker_of[i] for i in g.tolist() if i in worker_of))) > 1 for g in groups)


@pytest.mark.parametrize("n,size,batch,workers,world", [(64, 8, 4, 2, 1), (70, 8, 5, 3, 1), (96, 8, 4, 2, 2), (70, 6, 3, 2, 3)])
def test_sampler_gives_each_group_to_one_worker_of_one_rank(n, size, batch, workers, world):
    groups = mosaic_groups(n, size, 0, View("v", 0)).all()
    samplers = [EpochSampler(n, seed=1, rank=r, world=world, groups=lambda e: groups, batch=batch, workers=workers)
                for r in range(world)]
    parts = [[i for i, _ in s] for s in samplers]
    pad = len(samplers[0]) * world - n
    assert all(len(p) == len(samplers[0]) for p in parts)  # equal shares
    everything = sorted(i for p in parts for i in p)
    assert sorted(set(everything)) == list(range(n)) and len(everything) == n + pad
    # ranks get whole groups: at most world - 1 groups straddle a cut between ranks
    rank_of = {i: r for r, p in enumerate(parts) for i in p}
    assert sum(len({rank_of[i] for i in g.tolist()}) > 1 for g in groups) <= world - 1
    for p in parts:
        split = _split_groups(groups, p, batch, workers)
        assert split <= workers - 1
        if (n // world) % (workers * size) == 0 and (n // world) % (workers * batch) == 0:
            assert split == 0  # whole groups fill each worker's batches exactly
    # the plain permutation would hand nearly every group to every worker
    plain = EpochSampler(n, seed=1, rank=0, world=world)
    assert _split_groups(groups, [i for i, _ in plain], batch, workers) > workers


def test_sampler_orders_differ_per_epoch_and_follow_set_epoch():
    groups = mosaic_groups(40, 8, 0, View("v", 0)).all()
    s = EpochSampler(40, seed=2, groups=lambda e: groups, batch=4, workers=2)
    e0, e1 = [i for i, _ in s], [i for i, _ in s]
    assert e0 != e1 and sorted(e0) == sorted(e1) == list(range(40))
    s.set_epoch(0)
    assert [i for i, _ in s] == e0
    # a closing epoch (no groups) keeps the plain permutation
    closing = EpochSampler(40, seed=2, groups=lambda e: None)
    assert [i for i, _ in closing] == [i for i, _ in EpochSampler(40, seed=2)]


class _WhichWorker(Dataset):
    def __len__(self):
        return 36

    def __getitem__(self, item):
        info = torch.utils.data.get_worker_info()
        return torch.tensor([item[0], item[1], info.id])


def test_dataloader_workers_get_whole_groups():
    """The DataLoader's own dealing of batches, over epochs of an odd number of batches."""
    from ultralytics.data.build import InfiniteDataLoader

    groups = mosaic_groups(36, 6, 0, View("v", 0)).all()
    sampler = EpochSampler(36, seed=0, groups=lambda e: groups, batch=4, workers=2)  # 9 batches per epoch
    loader = InfiniteDataLoader(_WhichWorker(), batch_size=4, sampler=sampler, num_workers=2)
    try:
        for epoch in range(2):
            rows = torch.cat(list(loader)).tolist()
            assert {e for _, e, _ in rows} == {epoch} and sorted(i for i, _, _ in rows) == list(range(36))
            worker = {i: w for i, _, w in rows}
            assert sum(len({worker[i] for i in g.tolist()}) > 1 for g in groups) <= 1
    finally:
        loader.reset()


# decodes per item ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def larger(tmp_path_factory):
    return build_index(load_data_yaml(make_dataset(tmp_path_factory.mktemp("larger"), n_train=48, n_val=1)))


def _decodes_per_item(index, monkeypatch, size: int, grouped_order: bool) -> float:
    cfg = dataclasses.replace(load_augment(), mosaic=1.0, mixup=0.0, mosaic_group=size)
    replay = Replay(index, cfg, IMGSZ, seed=0, cache_bytes=8 * IMGSZ * IMGSZ * 3)  # 8 images or more
    view = View("v", 0)
    groups = (lambda e: replay.groups(view).all()) if grouped_order else None
    sampler = EpochSampler(len(index), seed=0, groups=groups, batch=4, workers=0)
    calls = []
    load = replay_module.load_resized
    monkeypatch.setattr(replay_module, "load_resized", lambda path, imgsz: calls.append(path) or load(path, imgsz))
    for i, _ in sampler:
        replay(i, view)
    monkeypatch.undo()
    return len(calls) / len(index)


def test_group_by_group_reads_each_image_about_once(larger, monkeypatch):
    grouped = _decodes_per_item(larger, monkeypatch, 4, grouped_order=True)
    uniform = _decodes_per_item(larger, monkeypatch, 64, grouped_order=False)  # partners from all 48 images
    scattered = _decodes_per_item(larger, monkeypatch, 4, grouped_order=False)  # groups, but not visited in order
    assert grouped <= 1.2, grouped
    assert uniform >= 2.5, uniform
    assert scattered >= 2.0, scattered
