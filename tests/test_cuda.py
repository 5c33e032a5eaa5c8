"""On a CUDA device: the float16 (AMP) dump against the float32 one, the copy from the teacher's device and the
pinned transfer to the student's, offline and online training steps with AMP, and contract 3 (cache terms equal
live-teacher terms) with the teacher and the student on the GPU.

Every test here is marked `cuda` and is skipped where torch.cuda.is_available() is False.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import run_cli, save_teacher

from softlabel.augment import AugmentConfig
from softlabel.cache.encoding import decode_sample
from softlabel.cache.reader import CacheReader
from softlabel.cache.schema import Layout
from softlabel.cache.store import read_attrs
from softlabel.data import build_index, load_data_yaml
from softlabel.distill.config import load_distill, parse_distill
from softlabel.distill.distiller import Distiller, TeacherBatch, split_head
from softlabel.heads import head_spec
from softlabel.replay import Replay
from softlabel.select import to_host
from softlabel.teacher import Teacher
from softlabel.teacherformat import HeadFormat
from softlabel.train import DistillDataset, DistillTrainer, ViewPlan
from softlabel.train.dataset import stack_teacher

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is absent: torch.cuda.is_available() is False"),
]

DEVICE = "cuda"  # the torch device the tests run on
CLI_DEVICE = "0"  # the same device as the CLI and Ultralytics name it
IMGSZ = 64
U16 = 2.0**-11  # float16's unit roundoff: 11 significant bits


@pytest.fixture()
def float32_reference():
    """A float32 forward that is float32: cuDNN convolutions may otherwise run in TF32 (10 significant bits, as coarse
    as float16), which would blur the float32 side of every comparison below."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(scope="module")
def trained_teacher(tmp_path_factory, dataset) -> Path:
    """A yolov8n teacher trained for 20 epochs (on the CPU, a few seconds): a trained network's activations have the
    scale and conditioning a real teacher's have. A random one's neck features are about 1e-5 to 1e-9, below
    float16's normal range, and comparisons of them would say nothing."""
    from ultralytics import YOLO

    root = tmp_path_factory.mktemp("trained")
    YOLO("yolov8n.yaml").train(data=str(dataset), epochs=20, imgsz=IMGSZ, batch=4, workers=0, device="cpu", plots=False,
                               project=str(root), name="t", seed=0, nbs=4, amp=False, val=False, optimizer="SGD", lr0=0.02,
                               warmup_epochs=0, mosaic=0.0, close_mosaic=0, verbose=False)
    return root / "t" / "weights" / "last.pt"


def _dump(teacher, dataset, out, *options):
    r = run_cli("dump", "--teacher", teacher, "--data", dataset, "--out", out, "--imgsz", IMGSZ, "--batch", 4,
                "--device", CLI_DEVICE, "--quiet", *options)
    assert r.exit_code == 0, (r.output[-3000:], r.exception)
    return out


DENSE_FLOAT16 = ("--precision", "float16", "--head-topk", 0, "--features", "dense")


def _tensor_arrays(store) -> dict[str, np.ndarray]:
    """Every cached teacher tensor of a dense store (view/head/level, view/feat/level) as float32, by name."""
    group = zarr.open_group(str(store), mode="r")
    out = {}
    for view in CacheReader(str(store)).layout.views:
        for kind in ("head", "feat"):
            for level, arr in group[f"{view}/{kind}"].arrays():
                out[f"{view}/{kind}/{level}"] = np.asarray(arr[:]).astype(np.float32)
    return out


def test_amp_dump_equals_the_float32_dump_within_float16(tmp_path, dataset, trained_teacher, float32_reference):
    """The default `--half` dump (float16 autocast) against `--no-half` (float32) of the same teacher, views and
    seed, both into a dense float16 store, array by array.

    The tolerance, from float16: it keeps 11 significant bits (unit roundoff u = 2^-11). Autocast rounds each
    convolution's inputs, weights and output to float16, so every layer adds an error of order u of its
    activations' scale; the store rounds both sides to float16 once more (u/2). Over the layers of a path these add
    up, and a trained network does not amplify them much: emulated on the CPU (float16 autocast against float32,
    this teacher, four views) the largest error was 8.3 u of the sample's largest value and the RMS error 5.1 u of
    the RMS value. Bounds: 32 u of the sample's scale for every value, 16 u of the RMS for each array. A
    dump that read the wrong sample, channel or view, or that overflowed, is off by the order of the scale itself,
    which the last assertion checks the bound catches."""
    half = _dump(trained_teacher, dataset, tmp_path / "half.zarr", "--views", 2, "--close-views", 1, "--half", *DENSE_FLOAT16)
    full = _dump(trained_teacher, dataset, tmp_path / "full.zarr", "--views", 2, "--close-views", 1, "--no-half", *DENSE_FLOAT16)
    assert read_attrs(str(half))["teacher"]["compute_dtype"] == "float16"
    assert read_attrs(str(full))["teacher"]["compute_dtype"] == "float32"
    a16, a32 = _tensor_arrays(half), _tensor_arrays(full)
    assert set(a16) == set(a32) and len(a32) == 3 * 2 * 3  # views v0, v1, c0; head and feat; p3-p5
    group16, group32 = zarr.open_group(str(half), mode="r"), zarr.open_group(str(full), mode="r")
    for view in ("v0", "v1", "c0"):  # the same replayed images on both sides
        assert np.array_equal(group16[f"{view}/fingerprint"][:], group32[f"{view}/fingerprint"][:]), view

    def excess(a: np.ndarray, b: np.ndarray) -> float:
        """The largest error as a multiple of u times its sample's scale (the sample's largest |value|)."""
        scale = np.abs(b).reshape(len(b), -1).max(1).reshape(-1, *[1] * (b.ndim - 1))
        scale = np.maximum(scale, np.finfo(np.float32).tiny)  # an all-zero sample: any error at all is beyond
        return float((np.abs(a - b) / (U16 * scale)).max())

    differ = 0
    for name, b in a32.items():
        a = a16[name]
        assert np.isfinite(a).all(), name
        assert float(np.abs(b).max()) > 0.1, name  # values of a trained network's scale, well inside float16's range
        assert excess(a, b) <= 32, (name, excess(a, b))
        rms = math.sqrt(float(np.mean((a - b) ** 2)) / float(np.mean(b**2)))
        assert rms <= 16 * U16, (name, rms / U16)
        differ += int((a != b).sum())
    assert differ > 0  # the float16 forward did run: its roundings show somewhere
    # the bound tells samples apart: each sample against its neighbour's float32 values is far beyond it
    for name in ("v0/head/p3", "v0/feat/p4"):
        assert excess(a16[name], np.roll(a32[name], 1, axis=0)) > 10 * 32, name


# -- the copy from the teacher's device, and the pinned transfer to the student's -------------------------------------

LEVELS, SIZES, T_CH, NC, REG_MAX = ["p3", "p4", "p5"], [(8, 8), (4, 4), (2, 2)], [16, 32, 48], 3, 16


def _sparse_layout(precision: str, topk: int = 24, floor: float = 0.3, rows: int = 16) -> Layout:
    head = {lvl: (4 * REG_MAX + NC, h, w) for lvl, (h, w) in zip(LEVELS, SIZES)}
    feat = {lvl: (c, h, w) for lvl, c, (h, w) in zip(LEVELS, T_CH, SIZES)}
    return Layout(count=4, shard_size=4, head=head, feat=feat, views=["v0"], reg_max=REG_MAX, nc=NC, precision=precision,
                  sparse={"topk": topk, "floor": floor, "feature_rows": rows}, feature_layout="sparse")


def _teacher_outputs(batch: int = 4) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Head maps and features per level with distinct scores; per image a different share of anchors passes the
    floor: sample 0 none (every score equal and below it), samples 1 and 2 a few (not as many), sample 3 more than
    the slots."""
    g = torch.Generator().manual_seed(0)
    head = [torch.randn(batch, 4 * REG_MAX + NC, h, w, generator=g) * 3 for h, w in SIZES]
    shifts = torch.tensor([0.0, -6.0, -7.0, 4.0])[:, None, None, None]
    head = [torch.cat([h[:, : 4 * REG_MAX], h[:, 4 * REG_MAX :] + shifts], 1) for h in head]
    for h in head:
        h[0, 4 * REG_MAX :] = -20.0
    feat = [torch.randn(batch, c, h, w, generator=g) for c, (h, w) in zip(T_CH, SIZES)]
    return head, feat


@pytest.mark.parametrize("precision", ["int8", "float16", "bfloat16"])
def test_sparse_encode_on_the_gpu_reaches_the_host_and_the_student_as_on_the_cpu(precision):
    """HeadFormat.encode on CUDA then to_host equals the same on the CPU: top-K, gather, quantisation and the packed
    copy of the kept slots (feature rows cut to their level's channels) are exact (IEEE float32 arithmetic and float16 conversions on both); the background
    logits go through sigmoid and log, which CUDA and the CPU may round differently, so they agree to one float16
    step. The collated (packed) TeacherBatch pinned and sent with non_blocking=True arrives equal."""
    layout = _sparse_layout(precision)
    fmt = HeadFormat.of(layout)
    head, feat = _teacher_outputs()
    on_cpu, copied_cpu = to_host(fmt.encode(head, feat), fmt.row_spans(head))
    with torch.no_grad():
        encoded = fmt.encode([h.to(DEVICE) for h in head], [f.to(DEVICE) for f in feat])
    assert all(t.device.type == "cuda" for t in encoded.values())
    on_gpu, copied_gpu = to_host(encoded, fmt.row_spans(head))  # as the dump copies: each row at its level's width
    assert set(on_gpu) == set(on_cpu) and copied_gpu == copied_cpu
    for name, a in on_cpu.items():
        b = on_gpu[name]
        assert b.dtype == a.dtype and b.shape == a.shape, name
        if name == "head/background":
            assert np.allclose(b.astype(np.float32), a.astype(np.float32), rtol=2**-10, atol=2**-14), name
        else:
            assert np.array_equal(b, a), name
    kept = (on_cpu["head/index"] >= 0).sum(1)
    k = layout.sparse["topk"]
    assert kept[0] == 0 and 0 < kept[1] < k and 0 < kept[2] < k and kept[1] != kept[2] and kept[3] == k, kept

    def samples(stored):
        return [decode_sample({name: a[i] for name, a in stored.items()}, layout, b"") for i in range(len(kept))]

    packed = stack_teacher(samples(on_gpu))
    assert packed.packed and packed.sparse
    pinned = packed.pin_memory()
    assert all(t.is_pinned() for t in pinned.tensors().values())
    arrived = pinned.to(DEVICE, non_blocking=True)
    torch.cuda.synchronize()
    reference = stack_teacher(samples(on_cpu))
    assert set(arrived.tensors()) == set(reference.tensors())
    for name, t in arrived.tensors().items():
        want = reference.tensors()[name]
        assert t.device.type == "cuda" and t.dtype == want.dtype, name
        if name == "background":
            assert torch.allclose(t.cpu().float(), want.float(), rtol=2**-10, atol=2**-14), name
        else:
            assert torch.equal(t.cpu(), want), name
    # laid out where it arrived, as the distiller lays it out: the same as on the CPU
    laid_gpu, laid_cpu = arrived.unpacked(), reference.unpacked()
    for name in ("index", "values", "rows"):
        assert torch.equal(getattr(laid_gpu, name).cpu(), getattr(laid_cpu, name)), name


# -- training steps with AMP ------------------------------------------------------------------------------------------


@pytest.fixture()
def seen_steps(monkeypatch):
    """What each training step saw: AMP on, its gradient scaler, and where the images and teacher tensors were."""
    seen = []
    original = DistillTrainer.preprocess_batch

    def spy(self, batch):
        batch = original(self, batch)
        teacher = batch["teacher"]
        seen.append({
            "amp": bool(self.amp),
            "scaler": bool(self.scaler.is_enabled()),
            "img": batch["img"].device.type,
            "teacher": {t.device.type for t in teacher.tensors().values()},
            "live_amp": None if self.live_teacher is None else self.live_teacher.amp,
        })
        return batch

    monkeypatch.setattr(DistillTrainer, "preprocess_batch", spy)
    return seen


def _trained_row(run: Path) -> dict:
    with open(run / "results.csv") as f:
        rows = [{k.strip(): v for k, v in row.items()} for row in csv.DictReader(f)]
    assert len(rows) == 1
    return rows[0]


def test_offline_and_online_training_steps_with_amp(tmp_path, dataset, teacher, seen_steps):
    """`softlabel train --device 0` from a cache dumped on the GPU, and online from the live teacher: one epoch each,
    every step in AMP (Ultralytics' autocast and gradient scaler) with the images and the teacher tensors on the
    GPU, the online teacher in float16 as the student's AMP asks; finite, non-zero distillation terms; a plain
    checkpoint at the end."""
    from ultralytics import YOLO

    store = _dump(teacher, dataset, tmp_path / "c.zarr", "--views", 1, "--close-views", 1, "--head-floor", 0)
    common = ("--student", "yolov8n.yaml", "--data", dataset, "--epochs", 1, "--close-mosaic", 0, "--batch", 4,
              "--device", CLI_DEVICE, "--workers", 2, "--project", tmp_path / "runs")
    for mode, source in (("offline", ("--cache", store)), ("online", ("--teacher", teacher, "--imgsz", IMGSZ))):
        seen_steps.clear()
        r = run_cli("train", *common, *source, "--name", mode)
        assert r.exit_code == 0, (mode, r.output[-3000:], r.exception)
        assert len(seen_steps) == 3, (mode, seen_steps)  # 12 images, batch 4
        for step in seen_steps:
            assert step["amp"] and step["scaler"], (mode, step)
            assert step["img"] == "cuda" and step["teacher"] == {"cuda"}, (mode, step)
            assert step["live_amp"] is (True if mode == "online" else None), (mode, step)
        row = _trained_row(tmp_path / "runs" / mode)
        for col in ("train/kd_cls", "train/kd_box", "train/kd_feat"):
            assert math.isfinite(float(row[col])) and float(row[col]) > 0, (mode, col, row[col])
        best = tmp_path / "runs" / mode / "weights" / "best.pt"
        assert type(YOLO(str(best)).model).__name__ == "DetectionModel", mode


# -- contract 3 on the GPU --------------------------------------------------------------------------------------------


def _batch(store, dataset, n: int) -> dict:
    """The first n samples of view v0 as the trainer collates them."""
    reader = CacheReader(str(store))
    aug = reader.attrs["augment"]
    replay = Replay(build_index(load_data_yaml(dataset), check_images=False), AugmentConfig.from_attrs(aug), IMGSZ, aug["seed"])
    ds = DistillDataset(replay, ViewPlan(1, 0, 1, 0), reader)
    return DistillDataset.collate_fn([ds[(i, 0)] for i in range(n)])


def _cache_and_live_terms(batch: dict, teacher_path, student_cfg: str, config=None) -> tuple[dict, dict]:
    """The distillation terms of one student on `batch`, all on the GPU: from the batch's cached teacher tensors
    (sent as the trainer sends them) and from the live float32 teacher on the same images."""
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    student = DetectionModel(student_cfg, nc=3, verbose=False).to(DEVICE).train()
    s = head_spec(student)
    t = Teacher.load(teacher_path, device=DEVICE, amp=False)
    config = config or load_distill(None, s.reg_max, t.info.reg_max)
    distiller = Distiller(config, s.reg_max, list(s.levels), list(s.channels), t.info.levels, t.info.feature_channels,
                          teacher_reg_max=t.info.reg_max, student_strides=list(s.strides), student_branches=s.branches,
                          nc=3).to(DEVICE)
    images = batch["img"].to(DEVICE).float() / 255
    preds = student(images)
    from_cache = distiller(preds, batch["teacher"].pin_memory().to(DEVICE, non_blocking=True))
    live = t(images)
    from_live = distiller(preds, TeacherBatch(split_head(live.head), dict(zip(t.info.levels, live.feat))))
    assert set(from_cache) == set(from_live) == {"kd_cls", "kd_box", "kd_feat"}
    return ({k: float(v.detach()) for k, v in from_cache.items()}, {k: float(v.detach()) for k, v in from_live.items()})


@pytest.mark.parametrize("store, options, rel", [
    ("dense-float16", DENSE_FLOAT16, 1e-3),  # float16 rounding of every value (2^-11 relative): the terms within 1e-3
    ("default", (), 1e-2),  # int8 values with one scale per sample and channel, kept anchors at the default floor
], ids=["dense-float16", "default"])
def test_cache_terms_equal_live_teacher_terms_on_the_gpu(tmp_path, dataset, trained_teacher, float32_reference, store, options, rel):
    """Contract 3 on CUDA: a yolov8n student's distillation terms from a cache dumped on the GPU (float32 teacher)
    equal those from the live float32 teacher on the same batch, within the store's precision, as on the CPU."""
    path = _dump(trained_teacher, dataset, tmp_path / "c.zarr", "--views", 1, "--close-views", 0, "--no-half", *options)
    batch = _batch(path, dataset, 12)
    if store == "default":  # a trained teacher keeps some anchors in some images, and not alike in every image
        kept = batch["teacher"].counts
        assert int(kept.sum()) > 0 and int(kept.min()) < int(kept.max()), kept
    from_cache, from_live = _cache_and_live_terms(batch, trained_teacher, "yolov8n.yaml")
    for key, b in from_live.items():
        a = from_cache[key]
        assert b > 0 and abs(a - b) <= rel * b, (key, a, b)


@pytest.fixture(scope="module")
def trained_yolo26(tmp_path_factory, dataset) -> Path:
    """A yolo26n teacher trained as trained_teacher is: an end-to-end head with distances (reg_max 1)."""
    from ultralytics import YOLO

    root = tmp_path_factory.mktemp("trained26")
    YOLO("yolo26n.yaml").train(data=str(dataset), epochs=20, imgsz=IMGSZ, batch=4, workers=0, device="cpu", plots=False,
                               project=str(root), name="t", seed=0, nbs=4, amp=False, val=False, optimizer="SGD", lr0=0.02,
                               warmup_epochs=0, mosaic=0.0, close_mosaic=0, verbose=False)
    return root / "t" / "weights" / "last.pt"


@pytest.mark.parametrize("student_cfg", ["yolo26n.yaml", "yolov8n.yaml"])
def test_yolo26_cache_equals_its_live_teacher_on_the_gpu(tmp_path, dataset, trained_yolo26, float32_reference, student_cfg):
    """Contract 3 on CUDA for an end-to-end, distance-head teacher, for a YOLO26 student (distances both sides) and a
    YOLOv8 one (DFL bins): every term from a dense float16 store dumped on the GPU within 1e-3 of the same term from
    the live teacher."""
    store = _dump(trained_yolo26, dataset, tmp_path / "c.zarr", "--views", 1, "--close-views", 0, "--no-half", *DENSE_FLOAT16)
    reg_max = 1 if student_cfg.startswith("yolo26") else 16
    config = load_distill(None, reg_max, 1)
    assert config.terms["box"].loss == "dist_iou"  # the box term that meets across forms, chosen for the pair
    # every position: a selection of the teacher's best 64 can swap near-equal anchors between a value and its
    # float16 rounding, a difference of the selection, not of the values
    config = parse_distill({**config.to_dict(), "feat": {**config.to_dict()["feat"], "positions": "all"}}, "t.yaml")
    from_cache, from_live = _cache_and_live_terms(_batch(store, dataset, 12), trained_yolo26, student_cfg, config)
    for key, b in from_live.items():
        a = from_cache[key]
        assert b > 0 and abs(a - b) <= 1e-3 * b, (key, a, b)
