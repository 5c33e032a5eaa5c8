"""Phase two: training against the cache, online mode, contract 3, checkpoints, verify, bad input."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_clean_error, reseal, run_cli
import torch
import zarr

from softlabel.augment import AugmentConfig
from softlabel.cache.reader import CacheReader
from softlabel.data import build_index, load_data_yaml
from softlabel.distill.config import load_distill
from softlabel.distill.distiller import Distiller, TeacherBatch, split_head
from softlabel.errors import UserError
from softlabel.heads import head_spec
from softlabel.replay import Replay
from softlabel.teacher import Teacher, save_checkpoint_from_yaml
from softlabel.train import DistillDataset, EpochSampler, ViewPlan, check_epoch, make_trainer

IMGSZ = 64



@pytest.fixture(scope="module")
def v8s_teacher(tmp_path_factory):
    return save_checkpoint_from_yaml("yolov8s.yaml", ["square", "disc", "bar"], tmp_path_factory.mktemp("t8s") / "yolov8s.pt")


@pytest.fixture(scope="module")
def cache(tmp_path_factory, dataset, v8s_teacher):
    out = tmp_path_factory.mktemp("c8s") / "c.zarr"
    augment = out.parent / "augment.yaml"
    augment.write_text("mosaic_group: 4\n")  # 12 images: three partner groups, which the trainer visits group by group
    r = run_cli("dump", "--teacher", v8s_teacher, "--data", dataset, "--out", out, "--imgsz", IMGSZ, "--batch", 4, "--augment", augment,
                "--shard-size", 4, "--views", 2, "--close-views", 1, "--quiet", "--precision", "float16", "--head-topk", 0, "--features", "dense")
    assert r.exit_code == 0, r.output
    return out


def _replay_for(reader: CacheReader, dataset, seed=None) -> Replay:
    aug = reader.attrs["augment"]
    index = build_index(load_data_yaml(dataset), check_images=False)
    return Replay(index, AugmentConfig.from_attrs(aug), IMGSZ, aug["seed"] if seed is None else seed)


def _batch(dataset_obj, items):
    return DistillDataset.collate_fn([dataset_obj[it] for it in items])


def test_view_plan_cycles_views_and_closes_at_the_end():
    plan = ViewPlan(epochs=6, close_mosaic=2, views=2, close_views=1)
    assert [plan.view(e).key for e in range(6)] == ["v0", "v1", "v0", "v1", "c0", "c0"]
    assert [plan.closing(e) for e in range(6)] == [False] * 4 + [True] * 2


def test_views_advice_warns_only_past_the_measured_replays_per_view():
    from softlabel.train.plan import FIT_REPLAYS, views_advice

    # Ultralytics' default schedule on the dump's default views: 90 mosaic epochs over 8 views, 11.25 replays
    assert ViewPlan(epochs=100, close_mosaic=10, views=8, close_views=1).replays_per_view == 11.25
    assert views_advice(ViewPlan(epochs=100, close_mosaic=10, views=8, close_views=1)) is None
    one = ViewPlan(epochs=100, close_mosaic=10, views=1, close_views=1)
    advice = views_advice(one)
    assert advice is not None and "90.0 times" in advice and f"--views {-(-90 // FIT_REPLAYS)} or more" in advice
    edge = ViewPlan(epochs=FIT_REPLAYS * 2, close_mosaic=0, views=2, close_views=0)
    assert edge.mosaic_epochs == FIT_REPLAYS * 2 and views_advice(edge) is None
    assert views_advice(ViewPlan(epochs=FIT_REPLAYS * 2 + 1, close_mosaic=0, views=2, close_views=0)) is not None
    assert ViewPlan(epochs=5, close_mosaic=10, views=1, close_views=1).mosaic_epochs == 0  # every epoch closes


def test_sampler_carries_the_epoch_and_is_deterministic():
    s = EpochSampler(10, seed=3)
    e0, e1 = list(s), list(s)
    assert {e for _, e in e0} == {0} and {e for _, e in e1} == {1}
    assert sorted(i for i, _ in e0) == list(range(10)) and [i for i, _ in e0] != [i for i, _ in e1]
    again = EpochSampler(10, seed=3)
    assert list(again) == e0
    ranks = [list(EpochSampler(10, seed=3, rank=r, world=3)) for r in range(3)]
    assert sorted({i for part in ranks for i, _ in part}) == list(range(10)) and all(len(p) == 4 for p in ranks)


def test_stale_worker_epoch_is_caught():
    check_epoch({"epoch": torch.tensor([2, 2])}, 2)
    with pytest.raises(RuntimeError, match="stale epoch"):
        check_epoch({"epoch": torch.tensor([1, 1])}, 2)
    with pytest.raises(RuntimeError, match="stale epoch"):
        check_epoch({"epoch": torch.tensor([1, 2])}, 2)


def test_infinite_loader_with_workers_delivers_each_epoch_in_order(cache, dataset):
    from ultralytics.data.build import InfiniteDataLoader

    reader = CacheReader(str(cache))
    ds = DistillDataset(_replay_for(reader, dataset), ViewPlan(3, 1, 2, 1), reader)
    sampler = EpochSampler(len(ds), seed=0, groups=ds.epoch_groups, batch=4, workers=2)
    loader = InfiniteDataLoader(ds, batch_size=4, sampler=sampler, num_workers=2, collate_fn=DistillDataset.collate_fn)
    for epoch in range(3):  # workers persist and prefetch into the next epoch; every batch still says its epoch
        seen = []
        for batch in loader:  # the dataset compares every replayed fingerprint with the cached one
            check_epoch(batch, epoch)
            seen += batch["sample"].tolist()
        assert sorted(seen) == list(range(len(ds)))
    loader.reset()


def test_trainer_with_workers_hands_each_epoch_over_and_closes_mosaic(tmp_path, cache, dataset):
    """The trainer itself with DataLoader workers (Ultralytics forces 0 on a CPU; this test gives it 2): the
    persistent workers prefetch into the next epoch, the closing epoch rebuilds the iterator, and every batch
    must still belong to the epoch that trains on it (preprocess_batch checks each one)."""
    from ultralytics import YOLO

    class WithWorkers(make_trainer(cache=str(cache))):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.args.workers = 2

    epochs = {}

    def record(trainer):
        epochs[trainer.epoch] = (trainer.train_loader.num_workers, trainer.plan.view(trainer.epoch).key)

    model = YOLO("yolov8n.yaml")
    model.add_callback("on_train_epoch_end", record)
    model.train(trainer=WithWorkers, name="w", **_train_args(tmp_path, dataset, epochs=4, close_mosaic=2))
    assert epochs == {0: (2, "v0"), 1: (2, "v1"), 2: (2, "c0"), 3: (2, "c0")}, epochs


def test_other_seed_is_stopped_naming_sample_and_view(cache, dataset):
    reader = CacheReader(str(cache))
    ds = DistillDataset(_replay_for(reader, dataset, seed=12345), ViewPlan(2, 0, 2, 1), reader)
    with pytest.raises(UserError, match=r"sample 3 \(img003.*view v1.*fingerprint"):
        ds[(3, 1)]


def _cache_and_live_terms(batch: dict, teacher_path) -> tuple[TeacherBatch, dict, dict]:
    """The default distillation terms of one yolov8n student on `batch`: from the batch's cached
    teacher tensors and from the live teacher on the same images. Also returns the cached TeacherBatch."""
    from ultralytics.nn.tasks import DetectionModel

    student = DetectionModel("yolov8n.yaml", nc=3, verbose=False).train()
    spec = head_spec(student)
    levels, channels, reg_max = list(spec.levels), list(spec.channels), spec.reg_max
    t = Teacher.load(teacher_path)
    distiller = Distiller(load_distill(None), reg_max, levels, channels, t.info.levels, t.info.feature_channels)
    torch.manual_seed(0)
    preds = student(batch["img"].float() / 255)
    cached = batch["teacher"]
    from_cache = distiller(preds, cached)
    live = t(batch["img"].float() / 255)
    from_live = distiller(preds, TeacherBatch(split_head(live.head), dict(zip(t.info.levels, live.feat))))
    return cached, from_cache, from_live


def test_cache_loss_equals_live_teacher_loss(cache, dataset, v8s_teacher):
    """Contract 3: on the same batch, distillation from the cache equals distillation from the live teacher."""
    reader = CacheReader(str(cache))
    ds = DistillDataset(_replay_for(reader, dataset), ViewPlan(4, 1, 2, 1), reader)
    _, from_cache, from_live = _cache_and_live_terms(_batch(ds, [(i, 1) for i in range(6)]), v8s_teacher)
    assert set(from_cache) == {"kd_cls", "kd_box", "kd_feat"}
    for key in from_cache:
        a, b = float(from_cache[key].detach()), float(from_live[key].detach())
        assert a > 0
        assert abs(a - b) <= 1e-3 * abs(b) + 1e-6, (key, a, b)


def test_default_store_loss_is_close_to_the_live_teacher(tmp_path, dataset, v8s_teacher):
    """Contract 3 for the default store (int8, sparse head, feature rows at the first kept anchors; floor 0,
    as an untrained teacher scores no anchor above the default floor): the loss stays within 1% of the
    live teacher's, and so do its class and feature terms."""
    out = tmp_path / "default.zarr"
    r = run_cli("dump", "--teacher", v8s_teacher, "--data", dataset, "--out", out, "--imgsz", IMGSZ, "--batch", 4,
                "--views", 1, "--close-views", 0, "--quiet", "--head-floor", 0)
    assert r.exit_code == 0, r.output
    reader = CacheReader(str(out))
    assert reader.attrs["storage"]["precision"] == "int8" and reader.attrs["storage"]["head_sparse"]
    ds = DistillDataset(_replay_for(reader, dataset), ViewPlan(1, 0, 1, 0), reader)
    teacher, from_cache, from_live = _cache_and_live_terms(_batch(ds, [(i, 0) for i in range(6)]), v8s_teacher)
    assert teacher.sparse and not teacher.feats and teacher.rows.dtype == torch.int8 and teacher.values.dtype == torch.int8
    for key in ("kd_cls", "kd_feat"):  # the box term reads the kept anchors only: the total bounds it
        a, b = float(from_cache[key].detach()), float(from_live[key].detach())
        assert b > 0 and abs(a - b) <= 0.01 * b, (key, a, b)
    a = float(sum(from_cache.values()).detach())
    b = float(sum(from_live.values()).detach())
    assert b > 0 and abs(a - b) <= 0.01 * b, (a, b)


@pytest.fixture(scope="module")
def trained_teacher(tmp_path_factory, dataset):
    """A yolov8n teacher trained until it scores anchors above the default floor (20 epochs, ~10 s):
    a random one keeps none, and the sparse terms would compare zero with zero."""
    from ultralytics import YOLO

    root = tmp_path_factory.mktemp("trained")
    YOLO("yolov8n.yaml").train(data=str(dataset), epochs=20, imgsz=IMGSZ, batch=4, workers=0, device="cpu", plots=False,
                               project=str(root), name="t", seed=0, nbs=4, amp=False, val=False, optimizer="SGD", lr0=0.02,
                               warmup_epochs=0, mosaic=0.0, close_mosaic=0, verbose=False)
    return root / "t" / "weights" / "last.pt"


def test_default_store_at_the_default_floor_is_the_live_teacher(tmp_path, dataset, trained_teacher):
    """Contract 3 for the store as users get it: int8, sparse head at the default floor (0.005), feature
    rows; a trained teacher keeps some anchors in some images and none in others. Every term, the box
    term on the kept anchors included, is within 1% of the live teacher's whole outputs."""
    out = tmp_path / "default.zarr"
    r = run_cli("dump", "--teacher", trained_teacher, "--data", dataset, "--out", out, "--imgsz", IMGSZ, "--batch", 4,
                "--views", 1, "--close-views", 0, "--quiet")
    assert r.exit_code == 0, r.output
    reader = CacheReader(str(out))
    assert reader.attrs["storage"]["head_sparse"]["floor"] == 0.005
    ds = DistillDataset(_replay_for(reader, dataset), ViewPlan(1, 0, 1, 0), reader)
    teacher, from_cache, from_live = _cache_and_live_terms(_batch(ds, [(i, 0) for i in range(12)]), trained_teacher)
    kept = teacher.counts if teacher.counts is not None else (teacher.index >= 0).sum(1)
    assert int(kept.sum()) > 0 and int(kept.min()) < int(kept.max()), kept  # anchors kept, and not alike in every image
    for key in ("kd_cls", "kd_box", "kd_feat"):
        a, b = float(from_cache[key].detach()), float(from_live[key].detach())
        assert b > 0 and abs(a - b) <= 0.01 * b, (key, a, b)


def _train_args(tmp_path, dataset, **kw):
    args = dict(data=str(dataset), epochs=2, imgsz=IMGSZ, batch=4, workers=0, device="cpu", plots=False,
                project=str(tmp_path / "runs"), seed=0, nbs=4, close_mosaic=1, exist_ok=True, amp=False)
    args.update(kw)
    return args


def test_two_students_one_cache_table_columns_and_plain_checkpoints(tmp_path, cache, dataset):
    r = run_cli("train", "--student", "yolov8n", "--student", "yolo11n", "--cache", cache, "--data", dataset,
                "--epochs", 2, "--close-mosaic", 1, "--batch", 4, "--device", "cpu", "--project", tmp_path / "runs")
    assert r.exit_code == 0, (r.output[-3000:], r.exception)
    table = r.stdout.strip().splitlines()[-4:]
    assert table[0].startswith("student") and "mAP50-95" in table[0] and "GFLOPs" in table[0]
    assert table[1].startswith("---")
    assert table[2].split()[0] == "yolov8n" and table[3].split()[0] == "yolo11n"
    for student in ("yolov8n", "yolo11n"):
        run = tmp_path / "runs" / student
        with open(run / "results.csv") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 2
        for col in ("train/kd_cls", "train/kd_box", "train/kd_feat"):
            assert col in rows[0] and float(rows[0][col]) > 0
        ckpt = torch.load(run / "weights" / "best.pt", map_location="cpu", weights_only=False)
        model = ckpt["model"] if ckpt.get("model") is not None else ckpt["ema"]
        keys = list(model.state_dict())
        assert not any("adapter" in k or "distill" in k for k in keys)
        assert getattr(model, "criterion", None) is None
        assert type(model).__name__ == "DetectionModel"


def test_checkpoint_reloads_predicts_and_exports_onnx(tmp_path, cache, dataset):
    from ultralytics import YOLO

    model = YOLO("yolo11n.yaml")
    model.train(trainer=make_trainer(cache=str(cache)), name="x", **_train_args(tmp_path, dataset, epochs=1, close_mosaic=0))
    best = Path(model.trainer.best)
    trained = {k: v.detach().half() for k, v in model.trainer.ema.ema.student_model.state_dict().items()}  # what training ended with
    plain = YOLO(str(best))
    loaded = plain.model.state_dict()
    assert set(loaded) == set(trained) and all(torch.equal(loaded[k].half(), trained[k]) for k in trained)
    metrics = plain.val(data=str(dataset), imgsz=IMGSZ, batch=4, device="cpu", plots=False, project=str(tmp_path / "v"))
    assert metrics.box.map == pytest.approx(model.trainer.metrics["metrics/mAP50-95(B)"], abs=1e-6)
    image = next((Path(load_data_yaml(dataset).root) / "images" / "val").iterdir())
    plain.predict(str(image), imgsz=IMGSZ, device="cpu", verbose=False)
    onnx = plain.export(format="onnx", imgsz=IMGSZ, device="cpu")
    assert Path(onnx).is_file() and Path(onnx).stat().st_size > 100_000


def test_interrupted_student_run_resumes_with_its_adapters(tmp_path, cache, dataset):
    from ultralytics import YOLO

    class Stop(Exception):
        pass

    def stop_after_first(trainer):
        if trainer.epoch == 0:
            raise Stop

    trainer = make_trainer(cache=str(cache))
    model = YOLO("yolov8n.yaml")
    model.add_callback("on_fit_epoch_end", stop_after_first)
    with pytest.raises(Stop):
        model.train(trainer=trainer, name="r", **_train_args(tmp_path, dataset, epochs=3))
    weights = tmp_path / "runs" / "r" / "weights"
    saved = _saved_projector(weights / "last.pt")
    seen = {}

    def grab(t):
        seen["start"] = t.start_epoch
        seen["state"] = {k: v.clone() for k, v in t.distiller.state_dict().items()}

    resumed = YOLO(str(weights / "last.pt"))
    resumed.add_callback("on_pretrain_routine_end", grab)
    resumed.train(trainer=trainer, resume=True)
    assert seen["start"] == 1
    assert saved and all(torch.equal(seen["state"][k].cpu(), saved[k].float()) for k in saved)
    with open(tmp_path / "runs" / "r" / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 3


def _saved_projector(last: Path) -> dict:
    """The distillation terms' weights a mid-run last.pt holds (its EMA is the student wrapped with them), read
    with Ultralytics' safe load, as resume reads it."""
    from ultralytics.nn.tasks import torch_safe_load

    ckpt, _ = torch_safe_load(str(last), safe_only=True)
    return {k: v.cpu() for k, v in ckpt["ema"].projector.state_dict().items()}


def test_online_mode_trains_with_the_same_terms(tmp_path, dataset, v8s_teacher):
    r = run_cli("train", "--student", "yolov8n", "--teacher", v8s_teacher, "--data", dataset, "--epochs", 1,
                "--imgsz", IMGSZ, "--close-mosaic", 0, "--batch", 4, "--device", "cpu", "--project", tmp_path / "runs",
                "--name", "online")
    assert r.exit_code == 0, (r.output[-3000:], r.exception)
    with open(tmp_path / "runs" / "online" / "results.csv") as f:
        row = next(csv.DictReader(f))
    assert float(row["train/kd_cls"]) > 0 and float(row["train/kd_feat"]) > 0


def test_verify_passes_then_catches_an_altered_chunk(tmp_path, cache):
    good = run_cli("verify", cache, "--samples", 6)
    assert good.exit_code == 0, good.output
    assert "verify: OK" in good.stdout and "6/6 match" in good.stdout
    bad = tmp_path / "bad.zarr"
    shutil.copytree(cache, bad)
    shard = bad / "v1" / "head" / "p4" / "c" / "1" / "0" / "0" / "0"  # samples 4..7
    data = bytearray(shard.read_bytes())
    data[40] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = run_cli("verify", bad, "--samples", 2)
    assert result.exit_code == 1
    assert "v1/head/p4 sample 4" in result.stdout and "verify: FAILED" in result.stdout


def test_verify_catches_values_that_are_not_the_teacher(tmp_path, cache):
    bad = tmp_path / "wrong.zarr"
    shutil.copytree(cache, bad)
    arr = zarr.open_group(str(bad), mode="r+")["v0/head/p5"]
    arr[0:4] = np.asarray(arr[0:4]) + np.float16(0.5)  # valid checksums, wrong values
    reseal(bad, "v0", range(4))  # and valid seals: only the live teacher can tell
    result = run_cli("verify", bad, "--samples", 6)
    assert result.exit_code == 1 and "head/p5" in result.stdout and "beyond tolerance" in result.stdout


# bad input -----------------------------------------------------------------------------------


def test_cache_and_teacher_both_or_neither(dataset, cache, v8s_teacher):
    assert_clean_error(run_cli("train", "--student", "yolov8n", "--data", dataset), "exactly one of --cache")
    assert_clean_error(run_cli("train", "--student", "yolov8n", "--data", dataset, "--cache", cache, "--teacher", v8s_teacher), "exactly one")


def test_unknown_student_and_bad_distill_config(tmp_path, dataset, cache):
    assert_clean_error(run_cli("train", "--student", "yolov99z", "--data", dataset, "--cache", cache, "--epochs", 1), "yolov99z")
    cfg = tmp_path / "d.yaml"
    cfg.write_text("cls:\n  loss: focal\n")
    assert_clean_error(run_cli("train", "--student", "yolov8n", "--data", dataset, "--cache", cache, "--distill", cfg), "focal", "bce")
    cfg.write_text("cls:\n  loss: bce\n  temprature: 2\n")
    assert_clean_error(run_cli("train", "--student", "yolov8n", "--data", dataset, "--cache", cache, "--distill", cfg), "temprature", "temperature")
    cfg.write_text("Logits-KD:\n  loss: bce\n")
    assert_clean_error(run_cli("train", "--student", "yolov8n", "--data", dataset, "--cache", cache, "--distill", cfg), "Logits-KD", "lowercase")
    cfg.write_text("logits:\n  weight: 2\n")
    assert_clean_error(run_cli("train", "--student", "yolov8n", "--data", dataset, "--cache", cache, "--distill", cfg), "'logits'", "'loss'")


def test_mismatched_cache_is_refused(tmp_path, dataset, cache):
    common = ["train", "--student", "yolov8n.yaml", "--cache", cache, "--epochs", 1, "--device", "cpu", "--project", tmp_path / "r"]
    assert_clean_error(run_cli(*common, "--data", dataset, "--imgsz", 96), "imgsz 64", "imgsz 96")
    from conftest import make_dataset

    other = make_dataset(tmp_path / "other", n_train=5, n_val=2, seed=9)
    assert_clean_error(run_cli(*common, "--data", other), "other data")
    four = make_dataset(tmp_path / "four", n_train=5, n_val=2, seed=9, nc=2)
    assert_clean_error(run_cli(*common, "--data", four), "3 classes", "nc=2")


def test_incomplete_cache_is_refused(tmp_path, dataset, cache):
    partial = tmp_path / "partial.zarr"
    shutil.copytree(cache, partial)
    zarr.open_group(str(partial), mode="r+")["v1/done"][1] = 0
    r = run_cli("train", "--student", "yolov8n.yaml", "--cache", partial, "--data", dataset, "--epochs", 1, "--device", "cpu",
                "--project", tmp_path / "r")
    assert_clean_error(r, "incomplete", "v1: 1/3 shards missing", "softlabel dump")


class _Failing(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        raise UserError("sample 1 (img001.png), view v0: the replayed image differs")


def test_an_error_in_a_worker_still_prints_one_line():
    from softlabel.cli import _one_line

    with pytest.raises(UserError) as caught:
        list(torch.utils.data.DataLoader(_Failing(), num_workers=1))
    assert "Traceback" in str(caught.value)
    assert _one_line(str(caught.value)) == "sample 1 (img001.png), view v0: the replayed image differs"


def test_confidence_weighted_features_follow_the_teacher_scores(tmp_path):
    """The feature weight of each position is the teacher's best class score at that position's anchor."""
    from softlabel.distill.config import parse_distill

    cfg = parse_distill({"feat": {"loss": "mimic", "weight": 1.0, "confidence_weighted": True, "adapter": "mlp"}}, "t.yaml")
    assert cfg.terms["feat"].adapter == "mlp" and cfg.to_dict()["feat"]["adapter"] == "mlp"
    levels, s_ch, t_ch, sizes, nc, reg_max = ["p3", "p4"], [4, 8], [6, 10], [(4, 4), (2, 2)], 3, 16
    d = Distiller(cfg, reg_max, levels, s_ch, levels, t_ch)
    g = torch.Generator().manual_seed(0)
    s_feats = [torch.randn(2, c, h, w, generator=g) for c, (h, w) in zip(s_ch, sizes)]
    t_feats = {lvl: torch.randn(2, c, h, w, generator=g) for lvl, c, (h, w) in zip(levels, t_ch, sizes)}
    anchors = sum(h * w for h, w in sizes)
    head = torch.full((2, 4 * reg_max + nc, anchors), -20.0)  # the teacher sees nothing anywhere ...
    head[:, 4 * reg_max, 0] = 5.0  # ... except at the first P3 anchor
    student = {"scores": torch.zeros(2, nc, anchors), "boxes": torch.zeros(2, 4 * reg_max, anchors), "feats": s_feats}
    teacher = TeacherBatch(head, t_feats)
    base = float(d(student, teacher)["kd_feat"].detach())
    moved = [f.clone() for f in s_feats]
    moved[0].flatten(2)[:, :, 1:] += 3.0  # change the student only where the teacher sees nothing
    kd = float(d({**student, "feats": moved}, teacher)["kd_feat"].detach())
    assert kd == pytest.approx(base, rel=1e-4)
    moved[0].flatten(2)[:, :, 0] += 3.0  # and where it sees the object
    assert abs(float(d({**student, "feats": moved}, teacher)["kd_feat"].detach()) - base) > 1e-3 * base


def test_adapter_option_is_checked(tmp_path):
    from softlabel.distill.config import parse_distill

    with pytest.raises(UserError, match="unknown adapter 'linear'.*conv, mlp"):
        parse_distill({"feat": {"loss": "mimic", "adapter": "linear"}}, "t.yaml")
    with pytest.raises(UserError, match="'adapter' applies to feature terms only"):
        parse_distill({"cls": {"loss": "bce", "adapter": "mlp"}}, "t.yaml")


def test_confidence_level_balance_follows_where_the_teacher_sees_objects():
    """level_balance: confidence gives a level without objects (nearly) no share of the feature term."""
    from softlabel.distill.config import parse_distill

    levels, s_ch, t_ch, sizes, nc, reg_max = ["p3", "p4"], [4, 8], [6, 10], [(4, 4), (2, 2)], 3, 16
    g = torch.Generator().manual_seed(0)
    s_feats = [torch.randn(2, c, h, w, generator=g) for c, (h, w) in zip(s_ch, sizes)]
    t_feats = {lvl: torch.randn(2, c, h, w, generator=g) for lvl, c, (h, w) in zip(levels, t_ch, sizes)}
    head = torch.full((2, 4 * reg_max + nc, 20), -20.0)
    head[:, 4 * reg_max, :16] = 3.0  # objects on P3 only
    student = {"scores": torch.zeros(2, nc, 20), "boxes": torch.zeros(2, 4 * reg_max, 20), "feats": s_feats}
    feat = {"loss": "mimic", "weight": 1.0, "confidence_weighted": True, "normalize": "none"}
    balanced = Distiller(parse_distill({"feat": {**feat, "level_balance": "confidence"}}, "t.yaml"), reg_max, levels, s_ch, levels, t_ch)
    equal = Distiller(parse_distill({"feat": feat}, "t.yaml"), reg_max, levels, s_ch, levels, t_ch)
    equal.load_state_dict(balanced.state_dict())
    term = balanced.terms["feat"]
    with torch.no_grad():
        per_level = [fn(p, t_feats[lvl], w) for fn, p, lvl, w in zip(
            term.loss, term.adapters(s_feats), levels, term._per_level(head[:, 4 * reg_max:].sigmoid().amax(1), s_feats))]
        kd_balanced = balanced(student, TeacherBatch(head, t_feats))["kd_feat"]
        kd_equal = equal(student, TeacherBatch(head, t_feats))["kd_feat"]
    assert float(kd_equal) == pytest.approx(float(sum(per_level)) / 2, rel=1e-5)
    assert float(kd_balanced) == pytest.approx(float(per_level[0]), rel=1e-5)  # P4's share is ~1e-8
    with pytest.raises(UserError, match="unknown level_balance 'area'"):
        parse_distill({"feat": {**feat, "level_balance": "area"}}, "t.yaml")
