"""A cohort: several students trained at once on one stream of replayed, cached batches."""

from __future__ import annotations

import csv
import json
import threading
from pathlib import Path

import pytest
import torch
from conftest import assert_clean_error, run_cli

from softlabel.errors import UserError
from softlabel.train.members import Member, expand_members, parse_sweep
from softlabel.train.dataset import DistillDataset
from softlabel.train.stream import SharedStream
from softlabel.train.trainer import DistillTrainer

IMGSZ = 64
COMMON = ("--epochs", 2, "--close-mosaic", 1, "--batch", 4, "--device", "cpu")


@pytest.fixture(scope="module")
def cache(tmp_path_factory, dataset):
    from softlabel.teacher import save_checkpoint_from_yaml

    root = tmp_path_factory.mktemp("cohort")
    teacher = save_checkpoint_from_yaml("yolov8s.yaml", ["square", "disc", "bar"], root / "yolov8s.pt")
    out = root / "c.zarr"
    r = run_cli("dump", "--teacher", teacher, "--data", dataset, "--out", out, "--imgsz", IMGSZ, "--batch", 4, "--views", 2,
                "--close-views", 1, "--quiet", "--head-floor", 0)
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture
def items(monkeypatch):
    """Counts the samples the training set replays and reads (every thread, every loader)."""
    counter = {"n": 0}
    lock = threading.Lock()
    original = DistillDataset.__getitem__

    def counted(self, item):
        with lock:
            counter["n"] += 1
        return original(self, item)

    monkeypatch.setattr(DistillDataset, "__getitem__", counted)
    return counter


def _weights(path: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    return (ckpt.get("model") or ckpt["ema"]).float().state_dict()


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, f"{a} and {b} differ in {len(differ)} tensors, e.g. {differ[:3]}"


def _table(output: str, n: int) -> list[list[str]]:
    lines = output.strip().splitlines()
    return [ln.split() for ln in lines[-n:]]


def test_cohort_students_end_with_the_weights_they_train_alone_and_read_each_batch_once(tmp_path, cache, dataset, items):
    students = ("yolov8n.yaml", "yolo26n.yaml")
    r = run_cli("train", "--cohort", *(a for s in students for a in ("--student", s)), "--cache", cache, *COMMON,
                "--project", tmp_path / "cohort", "--name", "c")
    assert r.exit_code == 0, (r.output[-3000:], r.exception)
    in_cohort = items["n"]
    rows = _table(r.stdout, 2)
    assert [row[0] for row in rows] == ["yolov8n", "yolo26n"] and all(row[5] == "2" for row in rows)
    for student in students:
        items["n"] = 0
        stem = Path(student).stem
        r = run_cli("train", "--student", student, "--cache", cache, *COMMON, "--project", tmp_path / "alone", "--name", stem)
        assert r.exit_code == 0, (r.output[-3000:], r.exception)
        alone = items["n"]
        # the same batches in the same order, the same seeds: every tensor of both checkpoints equal, bit for bit
        for weights in ("best.pt", "last.pt"):
            _assert_same_weights(tmp_path / "cohort" / "c" / stem / "weights" / weights, tmp_path / "alone" / stem / "weights" / weights)
    # 12 images, 2 epochs: the cohort replayed and read them once for both students, as one student alone does
    assert alone == 24 and in_cohort == alone
    manifest = json.loads((tmp_path / "cohort" / "c" / "cohort.json").read_text())
    assert [m["name"] for m in manifest["members"]] == ["yolov8n", "yolo26n"]
    assert set(manifest["results"]) == {"yolov8n", "yolo26n"}


def test_three_families_each_keep_their_own_run(tmp_path, cache, items):
    students = ("yolov8n", "yolo11n", "yolo26n")
    r = run_cli("train", "--cohort", *(a for s in students for a in ("--student", f"{s}.yaml")), "--cache", cache, *COMMON,
                "--project", tmp_path)
    assert r.exit_code == 0, (r.output[-3000:], r.exception)
    assert [row[0] for row in _table(r.stdout, 3)] == list(students)
    assert items["n"] == 24  # three students, one stream
    for name in students:
        run = tmp_path / "cohort" / name
        assert f"model: {name}.yaml" in (run / "args.yaml").read_text()
        with open(run / "results.csv") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 2 and float(rows[0]["train/kd_cls"]) > 0
        assert (run / "weights" / "best.pt").is_file()


def test_a_failing_and_a_stopping_student_leave_the_others_training(tmp_path, cache, monkeypatch):
    original_step = DistillTrainer.preprocess_batch

    def failing_step(self, batch):
        if self.args.lr0 == 0.003 and self.epoch == 1:
            raise RuntimeError("a deliberately broken student")
        return original_step(self, batch)

    original_val = DistillTrainer.validate

    def stopping_val(self):
        out = original_val(self)
        if self.args.lr0 == 0.004:
            self.stop = True  # as early stopping does after epoch 0
        return out

    monkeypatch.setattr(DistillTrainer, "preprocess_batch", failing_step)
    monkeypatch.setattr(DistillTrainer, "validate", stopping_val)
    r = run_cli("train", "--cohort", "--student", "yolov8n.yaml", "--sweep", "lr0=0.002,0.003,0.004", "--cache", cache, *COMMON,
                "optimizer=SGD", "--project", tmp_path, "--name", "c")  # optimizer=auto would replace lr0
    assert r.exit_code == 0, (r.output[-3000:], r.exception)
    rows = {row[0]: row for row in _table(r.stdout, 3)}
    assert rows["yolov8n-lr0=0.002"][5] == "2"  # trained to the end
    assert "lr0: 0.002" in (tmp_path / "c" / "yolov8n-lr0=0.002" / "args.yaml").read_text()
    assert rows["yolov8n-lr0=0.003"][1] == "failed:" and "deliberately broken" in " ".join(rows["yolov8n-lr0=0.003"])
    assert rows["yolov8n-lr0=0.004"][5] == "1" and "(stopped early)" in " ".join(rows["yolov8n-lr0=0.004"])
    assert "deliberately broken" in (tmp_path / "c" / "yolov8n-lr0=0.003" / "error.txt").read_text()
    done = json.loads((tmp_path / "c" / "cohort.json").read_text())["results"]
    assert set(done) == {"yolov8n-lr0=0.002", "yolov8n-lr0=0.004"}


def test_a_student_that_repeats_an_epoch_or_halves_its_batch_reads_alone_and_the_others_stay_equal(tmp_path, cache, dataset, monkeypatch):
    """NaN recovery makes Ultralytics run an epoch again from last.pt, and running out of memory in the first epoch
    makes it halve the batch: either student leaves the stream and reads its epochs from a loader of its own, and
    the other student ends exactly as it would alone."""
    from softlabel.distill.model import DistillModel

    original = DistillModel.loss
    fired = {}
    recovered, reads = [], {}

    def nan_once(self, batch, preds=None):
        loss, items = original(self, batch, preds)
        training_epoch = int(batch["epoch"][0]) if "epoch" in batch else None  # validation batches carry none
        if self.student_model.yaml.get("yaml_file", "").startswith("yolo11") and training_epoch == 1 and not recovered:
            fired["at"] = training_epoch  # every batch of its first pass through epoch 1 diverges
            loss = loss * float("nan")
        return loss, items

    monkeypatch.setattr(DistillModel, "loss", nan_once)
    original_preprocess = DistillTrainer.preprocess_batch
    oom = []

    def out_of_memory_once(self, batch):
        if self.cohort_member == "yolo26n" and not oom:
            oom.append(self.batch_size)
            raise RuntimeError("CUDA out of memory (simulated on the CPU)")
        return original_preprocess(self, batch)

    monkeypatch.setattr(DistillTrainer, "preprocess_batch", out_of_memory_once)
    original_recovery = DistillTrainer._handle_nan_recovery

    def recovery(self, epoch):
        done = original_recovery(self, epoch)
        if done:
            recovered.append((self.cohort_member, epoch))
        return done

    original_close = DistillTrainer.final_eval

    def final_eval(self):  # where each student of the cohort read its epochs
        if self.cohort_member:
            loader = self.train_loader
            reads[self.cohort_member] = (getattr(loader, "shared_epochs", "own loader"), getattr(loader, "alone_epochs", loader.batch_size))
        return original_close(self)

    monkeypatch.setattr(DistillTrainer, "_handle_nan_recovery", recovery)
    monkeypatch.setattr(DistillTrainer, "final_eval", final_eval)
    r = run_cli("train", "--cohort", "--student", "yolov8n.yaml", "--student", "yolo11n.yaml", "--student", "yolo26n.yaml",
                "--cache", cache, *COMMON, "--project", tmp_path, "--name", "c")
    assert r.exit_code == 0, (r.output[-3000:], r.exception)
    assert fired == {"at": 1} and recovered == [("yolo11n", 1)] and oom == [4]
    # yolo11n read epochs 0 and 1 from the stream, then epoch 1 again from its own loader; yolo26n trained on at
    # batch 2 from a loader of its own
    assert reads == {"yolov8n": (2, 0), "yolo11n": (2, 1), "yolo26n": ("own loader", 2)}
    rows = {row[0]: row for row in _table(r.stdout, 3)}
    assert rows["yolov8n"][5] == "2" and rows["yolo11n"][5] == "2" and rows["yolo26n"][5] == "2"
    r = run_cli("train", "--student", "yolov8n.yaml", "--cache", cache, *COMMON, "--project", tmp_path / "alone", "--name", "v8")
    assert r.exit_code == 0, (r.output[-3000:], r.exception)
    _assert_same_weights(tmp_path / "c" / "yolov8n" / "weights" / "last.pt", tmp_path / "alone" / "v8" / "weights" / "last.pt")


def test_a_student_out_of_memory_after_its_first_epoch_finishes_alone_after_the_others(tmp_path, cache, monkeypatch):
    original_preprocess = DistillTrainer.preprocess_batch
    oom, order = [], []

    def out_of_memory_in_epoch_1(self, batch):
        if self.cohort_member == "yolo26n" and self.epoch == 1 and not oom:
            oom.append(self.epoch)  # Ultralytics halves the batch only in the first epoch: this one it raises
            raise RuntimeError("CUDA out of memory (simulated on the CPU)")
        return original_preprocess(self, batch)

    original_final = DistillTrainer.final_eval

    def final_eval(self):
        order.append((self.cohort_member, self.args.name))
        return original_final(self)

    monkeypatch.setattr(DistillTrainer, "preprocess_batch", out_of_memory_in_epoch_1)
    monkeypatch.setattr(DistillTrainer, "final_eval", final_eval)
    r = run_cli("train", "--cohort", "--student", "yolov8n.yaml", "--student", "yolo26n.yaml", "--cache", cache, *COMMON,
                "--project", tmp_path, "--name", "c")
    assert r.exit_code == 0, (r.output[-3000:], r.exception)
    assert oom == [1]
    # yolov8n finished in the cohort; yolo26n went on alone (no cohort member) from its epoch-0 last.pt afterwards
    assert order == [("yolov8n", "yolov8n"), (None, "yolo26n")]
    rows = {row[0]: " ".join(row) for row in _table(r.stdout, 2)}
    assert "(done, alone after running out of memory)" in rows["yolo26n"] and rows["yolo26n"].split()[5] == "2"
    with open(tmp_path / "c" / "yolo26n" / "results.csv") as f:
        assert [int(float(row["epoch"])) for row in csv.DictReader(f)] == [1, 2]


def test_an_interrupted_cohort_resumes_every_student_where_it_stopped(tmp_path, cache, monkeypatch):
    original_save = DistillTrainer.save_model
    state = {"interrupt": True}

    def interrupted(self):
        out = original_save(self)  # last.pt of the epoch
        if state["interrupt"] and self.epoch == 0:
            raise KeyboardInterrupt("the machine went away")
        return out

    monkeypatch.setattr(DistillTrainer, "save_model", interrupted)
    r = run_cli("train", "--cohort", "--student", "yolov8n.yaml", "--student", "yolo26n.yaml", "--cache", cache, *COMMON,
                "--project", tmp_path, "--name", "c")
    assert r.exit_code == 0, (r.output[-3000:], r.exception)
    assert all(row[1] == "failed:" for row in _table(r.stdout, 2))
    for name in ("yolov8n", "yolo26n"):
        assert (tmp_path / "c" / name / "weights" / "last.pt").is_file()
    starts = {}
    original_setup = DistillTrainer._setup_train

    def record(self):
        original_setup(self)
        starts[self.cohort_member] = self.start_epoch

    monkeypatch.setattr(DistillTrainer, "_setup_train", record)
    state["interrupt"] = False
    r = run_cli("train", "--cohort", f"resume={tmp_path / 'c'}")
    assert r.exit_code == 0, (r.output[-3000:], r.exception)
    assert starts == {"yolov8n": 1, "yolo26n": 1}
    rows = {row[0]: row for row in _table(r.stdout, 2)}
    assert rows["yolov8n"][5] == "2" and rows["yolo26n"][5] == "2"
    for name in ("yolov8n", "yolo26n"):
        with open(tmp_path / "c" / name / "results.csv") as f:
            assert [int(float(row["epoch"])) for row in csv.DictReader(f)] == [1, 2]
    r = run_cli("train", "--cohort", f"resume={tmp_path / 'c'}")  # everything finished: reported, not trained again
    assert r.exit_code == 0 and "2 of 2 students finished" in r.stdout


def test_a_bad_student_or_sweep_is_refused_before_anything_trains(tmp_path, cache):
    r = run_cli("train", "--cohort", "--student", "yolov8n.yaml", "--student", "yolo11n.yaml", "--student", "no-such-model.yaml",
                "--cache", cache, *COMMON, "--project", tmp_path)
    assert_clean_error(r, "no-such-model.yaml")
    assert not any(tmp_path.iterdir())  # no run folder was made
    for sweep, needle in (("batch=4,8", "one value for all"), ("lr0", "KEY=VALUE1,VALUE2"), ("lr0=0.1,0.1", "given twice"),
                          ("lr0=abc,0.1", "lr0"), ("distill=no-such-config,default", "no-such-config")):
        r = run_cli("train", "--cohort", "--student", "yolov8n.yaml", "--sweep", sweep, "--cache", cache, *COMMON, "--project", tmp_path)
        assert_clean_error(r, needle)
    assert not any(tmp_path.iterdir())
    r = run_cli("train", "--student", "yolov8n.yaml", "--sweep", "lr0=0.1,0.2", "--cache", cache, *COMMON, "--project", tmp_path)
    assert_clean_error(r, "--cohort")
    r = run_cli("train", "--cohort", f"resume={tmp_path}")
    assert_clean_error(r, "cohort.json")


def test_sweeps_expand_to_named_members():
    members = expand_members(["yolov8n.yaml", "runs/x/weights/best.pt"], ["lr0=0.01,0.02", "distill=default,accurate"])
    assert [m.name for m in members][:4] == ["yolov8n-lr0=0.01-distill=default", "yolov8n-lr0=0.01-distill=accurate",
                                             "yolov8n-lr0=0.02-distill=default", "yolov8n-lr0=0.02-distill=accurate"]
    assert members[0].overrides == {"lr0": 0.01, "distill_config": "default"}
    assert members[4].name == "best-lr0=0.01-distill=default" and members[4].student == "runs/x/weights/best.pt"
    assert [m.name for m in expand_members(["yolov8n.yaml", "yolov8n.yaml"], [])] == ["yolov8n-1", "yolov8n-2"]
    assert parse_sweep("mosaic=0.5,1.0") == ("mosaic", ["0.5", "1.0"])
    with pytest.raises(UserError, match="one value for all"):
        parse_sweep("imgsz=32,64")
    assert Member("a", "b").overrides == {}


def test_the_stream_holds_batches_for_members_yet_to_arrive_and_bounds_the_lag():
    class Loader:  # an InfiniteDataLoader's surface: one epoch per pass, a sampler with next_epoch
        def __init__(self):
            self.sampler = type("S", (), {"next_epoch": 0, "__len__": lambda s: 6})()
            self.dataset, self.batch_size, self.num_workers, self.drop_last = None, 2, 0, False
            self.drawn = 0

        def __len__(self):
            return 3

        def reset(self):
            pass

        def __iter__(self):
            for _ in range(3):
                self.drawn += 1
                yield {"k": self.drawn}

    stream = SharedStream(["a", "b"], max_lag=2)
    loader = Loader()
    a, b = stream.view("a", lambda: loader), stream.view("b", lambda: pytest.fail("b reads the stream, not a loader of its own"))
    it = iter(a)
    assert [next(it)["k"], next(it)["k"]] == [1, 2]
    got = []
    t = threading.Thread(target=lambda: got.append(next(it)["k"]))
    t.start()
    t.join(0.5)
    assert t.is_alive() and not got  # 'a' is max_lag batches ahead of 'b', who has not even started
    assert [batch["k"] for batch in b] == [1, 2, 3]  # 'b' arrives: nothing was dropped before it took it
    t.join(2)
    assert got == [3] and loader.drawn == 3
    with pytest.raises(ValueError, match="not a member"):
        stream.view("c", lambda: loader)


def test_an_online_cohort_runs_the_teacher_once_per_batch_and_shares_the_batch(tmp_path, dataset, monkeypatch):
    from softlabel.teacher import Teacher, save_checkpoint_from_yaml

    teacher = save_checkpoint_from_yaml("yolov8s.yaml", ["square", "disc", "bar"], tmp_path / "yolov8s.pt")
    calls, images = [], {}
    original_call = Teacher.__call__

    def counted(self, img):
        calls.append(img.shape[0])
        return original_call(self, img)

    original_preprocess = DistillTrainer.preprocess_batch

    def seen(self, batch):
        out = original_preprocess(self, batch)
        images.setdefault(self.cohort_member, []).append(out["img"].data_ptr())
        return out

    monkeypatch.setattr(Teacher, "__call__", counted)
    monkeypatch.setattr(DistillTrainer, "preprocess_batch", seen)
    online = ("--teacher", teacher, "--data", dataset, "--imgsz", IMGSZ, "--views", 2, *COMMON)
    r = run_cli("train", "--cohort", "--student", "yolov8n.yaml", "--student", "yolo26n.yaml", *online, "--project", tmp_path, "--name", "c")
    assert r.exit_code == 0, (r.output[-3000:], r.exception)
    assert len(calls) == 6  # 12 images in batches of 4, 2 epochs: once per batch, not once per student
    assert images["yolov8n"] == images["yolo26n"]  # one device copy of each batch, shared
    calls.clear()
    r = run_cli("train", "--student", "yolov8n.yaml", *online, "--project", tmp_path / "alone", "--name", "v8")
    assert r.exit_code == 0, (r.output[-3000:], r.exception)
    assert len(calls) == 6
    _assert_same_weights(tmp_path / "c" / "yolov8n" / "weights" / "last.pt", tmp_path / "alone" / "v8" / "weights" / "last.pt")
