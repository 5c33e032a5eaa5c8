"""Storage options: precision, int8 scales, sparse heads, per-tensor codecs; round trips and refusals."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import run_cli
import zarr

import torch

from softlabel.cache.encoding import dequantise, quantise
from softlabel.distill.teacherbatch import TeacherBatch
from softlabel.select import logit, select_topk
from softlabel.cache.reader import CacheReader
from test_dump import dump_args

RNG = np.random.default_rng(0)



def test_bfloat16_round_trip_is_within_half_a_step():
    x = RNG.normal(0, 5, (3, 8, 4, 4)).astype(np.float32)
    q, scale = quantise(x, "bfloat16", channel_axis=1)
    assert q.dtype == np.uint16 and scale is None
    back = np.stack([dequantise(s, "bfloat16", None, 0) for s in q])
    assert np.all(np.abs(back - x) <= np.abs(x) * 2**-8 + 1e-30)
    assert not np.array_equal(back, x)


def test_int8_per_channel_round_trip_is_within_half_a_step():
    x = RNG.normal(0, 1, (2, 6, 5, 5)).astype(np.float32) * np.array([1, 10, 0.1, 100, 3, 0])[None, :, None, None]
    q, scale = quantise(x, "int8", channel_axis=1)
    assert q.dtype == np.int8 and scale.shape == (2, 6)
    for s in range(2):
        back = dequantise(q[s], "int8", scale[s], 0)
        step = np.abs(x[s]).max(axis=(1, 2)) / 127
        assert np.all(np.abs(back - x[s]) <= 0.5 * step[:, None, None] + 1e-6)
    values = RNG.normal(0, 1, (2, 7, 6)).astype(np.float32)  # [S, K, C]: channels last
    qv, sv = quantise(values, "int8", channel_axis=2)
    assert sv.shape == (2, 6)
    assert np.allclose(dequantise(qv[1], "int8", sv[1], 1), values[1], atol=np.abs(values[1]).max(0).max() / 127)


def test_sparse_head_keeps_the_best_anchors_and_a_background_constant():
    reg_max, nc, anchors = 2, 3, 12
    head = RNG.normal(0, 1, (2, 4 * reg_max + nc, anchors)).astype(np.float32)
    head[:, 4 * reg_max :, :] -= 8  # mostly background
    head[0, 4 * reg_max + 1, [3, 7]] = [4.0, 2.0]  # two confident anchors
    index, values, background = select_topk(torch.from_numpy(head), reg_max, topk=4, floor=0.5)
    assert index.shape == (2, 4) and set(index[0][index[0] >= 0].tolist()) == {3, 7}  # the floor drops the rest
    teacher = TeacherBatch(index=index, values=values, background=background.half())
    logits = teacher.class_logits(4 * reg_max, anchors)[0].numpy()  # expanded as the distiller does
    mask = np.zeros(anchors, bool)
    mask[[3, 7]] = True
    assert np.allclose(logits[:, mask], head[0, 4 * reg_max :][:, mask])
    assert np.allclose(values[0, :2].numpy(), head[0][:, [3, 7]].T)
    dropped = ~mask
    probs = 1 / (1 + np.exp(-head[0, 4 * reg_max :, dropped.nonzero()[0]]))
    expected = logit(torch.from_numpy(probs.mean(0))).numpy()
    assert np.allclose(logits[:, dropped], expected[:, None].astype(np.float16), atol=1e-2)
    no_floor, _, _ = select_topk(torch.from_numpy(head), reg_max, topk=5, floor=0.0)
    assert (no_floor >= 0).all()
    more_slots, more_values, _ = select_topk(torch.from_numpy(head), reg_max, topk=anchors + 3, floor=0.0)  # more slots than anchors
    assert more_slots.shape == (2, anchors + 3) and (more_slots[:, anchors:] == -1).all() and more_values.shape[1] == anchors + 3


@pytest.mark.parametrize(
    "options",
    [
        ["--precision", "int8"],
        ["--precision", "bfloat16", "--codec", "head=zstd,feat=blosc-lz4"],
        ["--head-topk", "30", "--head-floor", "0.0"],
        ["--head-topk", "30", "--head-floor", "0", "--precision", "int8", "--no-features"],
        ["--head-topk", "30", "--head-floor", "0", "--features", "sparse", "--precision", "int8", "--feature-rows", "20"],
        ["--head-topk", "30", "--head-floor", "0", "--features", "sparse", "--precision", "bfloat16"],
    ],
    ids=["int8", "bf16-codecs", "sparse", "sparse-int8-nofeat", "sparse-rows-int8", "sparse-rows-bf16"],
)
def test_options_round_trip_and_verify(tmp_path, dataset, teacher, options):
    out = tmp_path / "s.zarr"
    r = run_cli(*dump_args(teacher, dataset, out, "--views", "1", *options))
    assert r.exit_code == 0, (r.output, r.exception)
    info = run_cli("info", out)
    assert info.exit_code == 0 and "head (all)" in info.stdout
    reader = CacheReader(str(out))
    sample = reader.read("v0", 4)
    if "--head-topk" in options:
        assert sample.head is None and sample.values.shape == (30, 67) and (sample.index >= 0).sum() == 30
    else:
        assert sample.head.shape == (67, 84) and sample.index is None
    if "sparse" in options:
        assert sample.rows.shape == (20 if "--feature-rows" in options else 30, 256) and not sample.feat
        assert (sample.rows_scale is not None) == ("int8" in options)
    v = run_cli("verify", out, "--samples", 4)
    assert v.exit_code == 0, v.output
    group = zarr.open_group(str(out), mode="r")
    if "int8" in options:
        assert group["v0/head/values" if "--head-topk" in options else "v0/head/p3"].dtype == np.int8
    if "bfloat16" in options:
        assert group["v0/feat/rows" if "sparse" in options else "v0/feat/p3"].dtype == np.uint16
        if "--codec" in options:
            assert reader.attrs["storage"]["codec"]["head"]["preset"] == "zstd"


def test_a_sparse_batch_holds_no_dense_tensor(tmp_path, dataset, teacher):
    """The collated teacher batch of a sparse store is [B, K, ...] throughout: nothing [B, C, A] on the CPU side."""
    from softlabel.augment import AugmentConfig
    from softlabel.data import build_index, load_data_yaml
    from softlabel.replay import Replay
    from softlabel.train import DistillDataset, ViewPlan

    out = tmp_path / "sp.zarr"
    assert run_cli(*dump_args(teacher, dataset, out, "--views", "1", "--head-topk", "10", "--head-floor", "0",
                              "--features", "sparse", "--precision", "int8")).exit_code == 0
    reader = CacheReader(str(out))
    aug = reader.attrs["augment"]
    replay = Replay(build_index(load_data_yaml(dataset), check_images=False), AugmentConfig.from_attrs(aug), 64, aug["seed"])
    batch = DistillDataset.collate_fn([DistillDataset(replay, ViewPlan(2, 0, 1, 1), reader)[(i, 0)] for i in range(3)])
    assert not [k for k in batch if k.startswith("teacher_")]
    t = batch["teacher"]
    assert isinstance(t, TeacherBatch) and t.head is None and not t.feats
    shapes = {name: tuple(v.shape) for name, v in t.tensors().items()}
    # packed: 10 kept slots per sample (floor 0), one after another, and the counts
    assert shapes == {"index": (30,), "values": (30, 67), "values_scale": (3, 67), "background": (3, 3),
                      "rows": (30, 256), "rows_scale": (3, 3, 256), "counts": (3,)}
    laid = t.unpacked()
    assert laid.index.shape == (3, 10) and laid.values.shape == (3, 10, 67) and laid.rows.shape == (3, 10, 256)
    for i in range(3):
        assert np.array_equal(laid.index[i].numpy(), reader.read("v0", i).index)
    assert t.values.dtype == torch.int8 and t.rows.dtype == torch.int8 and t.row_levels == ("p3", "p4", "p5")
    assert all(84 not in shape for shape in shapes.values())  # no tensor spans the 84 anchors
    moved = t.to("cpu")
    assert moved is not t and torch.equal(moved.rows, t.rows)


def test_mismatched_options_are_refused(tmp_path, dataset, teacher):
    out = tmp_path / "m.zarr"
    assert run_cli(*dump_args(teacher, dataset, out, "--views", "1", "--no-features")).exit_code == 0
    resumed = run_cli(*dump_args(teacher, dataset, out, "--views", "1", "--no-features", "--precision", "int8"))
    assert resumed.exit_code == 2 and "storage.precision: 'float16' -> 'int8'" in resumed.stderr
    # a feature term against a cache without features
    r = run_cli("train", "--student", "yolov8n", "--cache", out, "--data", dataset, "--epochs", 1, "--device", "cpu",
                "--close-mosaic", 0, "--project", tmp_path / "runs")
    assert r.exit_code == 2 and "no features" in r.stderr
    for bad, needle in ((["--head-floor", "0.3"], "needs a sparse head"), (["--codec", "head=lz9"], "unknown codec"),
                        (["--head-topk", "-1"], "0 (a dense head")):
        b = run_cli(*dump_args(teacher, dataset, tmp_path / "x.zarr", *bad))
        assert b.exit_code == 2 and needle in b.stderr, (bad, b.stderr)


def test_default_store_is_int8_with_a_sparse_head(tmp_path, dataset, teacher):
    from softlabel.dump import DEFAULT_FEATURE_ROWS, DEFAULT_HEAD_FLOOR, DEFAULT_HEAD_TOPK

    assert (DEFAULT_HEAD_TOPK, DEFAULT_HEAD_FLOOR, DEFAULT_FEATURE_ROWS) == (512, 0.005, 64)
    out = tmp_path / "d.zarr"
    r = run_cli("dump", "--teacher", teacher, "--data", dataset, "--out", out, "--imgsz", 64, "--batch", 4, "--views", 1,
                "--close-views", 0, "--quiet")
    assert r.exit_code == 0, r.output
    attrs = CacheReader(str(out)).attrs
    storage = attrs["storage"]
    assert storage["precision"] == "int8" and storage["head_sparse"] == {"topk": 512, "floor": 0.005, "feature_rows": 64}
    assert storage["feature_layout"] == "sparse"
    command = attrs["command"]  # the resume command names them, so it resumes with the same store whatever the defaults
    assert command[command.index("--head-topk") + 1] == "512"
    assert command[command.index("--head-floor") + 1] == "0.005" and command[command.index("--feature-rows") + 1] == "64"
    sample = CacheReader(str(out)).read("v0", 0)
    assert sample.index.shape == (512,) and sample.rows.shape == (64, 256)
    assert run_cli("verify", out, "--samples", 2).exit_code == 0
    dense = tmp_path / "dense.zarr"
    r = run_cli("dump", "--teacher", teacher, "--data", dataset, "--out", dense, "--imgsz", 64, "--batch", 4, "--views", 1,
                "--close-views", 0, "--quiet", "--head-topk", 0, "--precision", "float16", "--features", "dense")
    assert r.exit_code == 0, r.output
    storage = CacheReader(str(dense)).attrs["storage"]
    assert storage["precision"] == "float16" and storage["head_sparse"] is None
