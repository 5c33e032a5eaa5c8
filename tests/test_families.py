"""Every detector family as teacher and student: YOLO26's end-to-end distance head, YOLOv10's end-to-end DFL
head, YOLOv8 and YOLO11, each from a cache of another; the terms each pair distils, and plain checkpoints."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from conftest import run_cli, save_teacher
from softlabel.augment import AugmentConfig
from softlabel.cache.reader import CacheReader
from softlabel.data import build_index, load_data_yaml
from softlabel.distill.config import load_distill, parse_distill
from softlabel.distill.distiller import Distiller, TeacherBatch, split_head
from softlabel.errors import UserError
from softlabel.heads import BRANCHES, distances, head_spec
from softlabel.replay import Replay
from softlabel.teacher import Teacher
from softlabel.train import DistillDataset, ViewPlan

IMGSZ = 64
TEACHERS = ("yolov8s", "yolo11s", "yolo26s")


@pytest.fixture(scope="module")
def teachers(tmp_path_factory, dataset) -> dict[str, tuple[Path, Path]]:
    """Each teacher family's checkpoint and its default store (sparse, the precision of its head's default; floor 0:
    an untrained teacher scores few anchors above the default floor)."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for name in TEACHERS:
        ckpt = save_teacher(root / f"{name}.pt", f"{name}.yaml")
        store = root / f"{name}.zarr"
        r = run_cli("dump", "--teacher", ckpt, "--data", dataset, "--out", store, "--imgsz", IMGSZ, "--batch", 4,
                    "--shard-size", 4, "--views", 1, "--close-views", 1, "--head-floor", 0, "--quiet")
        assert r.exit_code == 0, r.output
        out[name] = (ckpt, store)
    return out


@pytest.mark.parametrize("teacher, student", [
    ("yolov8s", "yolo26n"), ("yolo11s", "yolo26n"), ("yolo26s", "yolo26n"),
    ("yolo26s", "yolov8n"), ("yolo26s", "yolo11n"), ("yolov8s", "yolov10n"),
])
def test_any_student_trains_from_any_teachers_cache(teacher, student, teachers, dataset, tmp_path):
    """Trains with every term non-zero, and best.pt is a plain Ultralytics checkpoint that validates and exports,
    an end-to-end student in its end-to-end (NMS-free) form too."""
    from ultralytics import YOLO

    r = run_cli("train", "--student", f"{student}.yaml", "--cache", teachers[teacher][1], "--data", dataset, "--epochs", 2,
                "--close-mosaic", 1, "--batch", 4, "--device", "cpu", "--project", tmp_path, "--name", "r")
    assert r.exit_code == 0, (r.output[-3000:], r.exception)
    with open(tmp_path / "r" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    for col in ("train/kd_cls", "train/kd_box", "train/kd_feat"):
        assert float(rows[0][col]) > 0, col
    best = tmp_path / "r" / "weights" / "best.pt"
    ckpt = torch.load(best, map_location="cpu", weights_only=False)
    model = ckpt["model"] if ckpt.get("model") is not None else ckpt["ema"]
    assert type(model).__name__ == "DetectionModel" and not any("projector" in k for k in model.state_dict())
    plain = YOLO(str(best))
    metrics = plain.val(data=str(dataset), imgsz=IMGSZ, batch=4, device="cpu", plots=False, project=str(tmp_path / "v"))
    assert metrics.box.map == pytest.approx(float(rows[-1]["metrics/mAP50-95(B)"]), abs=1e-6)
    onnx = Path(plain.export(format="onnx", imgsz=IMGSZ, device="cpu"))
    assert onnx.is_file() and onnx.stat().st_size > 100_000
    if head_spec(plain.model).end2end:
        import onnxruntime as ort

        e2e = YOLO(str(best)).export(format="onnx", imgsz=IMGSZ, device="cpu", nms=False)
        shape = ort.InferenceSession(e2e).get_outputs()[0].shape
        assert shape[0] == 1 and shape[2] == 6, shape  # [image, detection, (x1, y1, x2, y2, score, class)]


def _replay_for(reader: CacheReader, dataset) -> Replay:
    aug = reader.attrs["augment"]
    index = build_index(load_data_yaml(dataset), check_images=False)
    return Replay(index, AugmentConfig.from_attrs(aug), IMGSZ, aug["seed"])


@pytest.mark.parametrize("student_cfg", ["yolo26n.yaml", "yolov8n.yaml"])
def test_yolo26_cache_equals_its_live_teacher(teachers, dataset, student_cfg):
    """Contract 3 for an end-to-end, distance-head teacher: every term from the default store is within 1% of the
    same term from the live teacher, for a YOLO26 student (distances both sides) and a YOLOv8 one (DFL bins)."""
    from ultralytics.nn.tasks import DetectionModel

    ckpt, store = teachers["yolo26s"]
    reader = CacheReader(str(store))
    assert reader.layout.precision == "float16"  # a distance head's default store (int8 rounds small boxes' distances)
    ds = DistillDataset(_replay_for(reader, dataset), ViewPlan(1, 0, 1, 1), reader)
    batch = DistillDataset.collate_fn([ds[(i, 0)] for i in range(6)])
    torch.manual_seed(0)  # the student's weights: the same in any test order
    student = DetectionModel(student_cfg, nc=3, verbose=False).train()
    s = head_spec(student)
    t = Teacher.load(ckpt)
    config = load_distill(None, s.reg_max, t.info.reg_max)
    assert config.terms["box"].loss == "dist_iou"  # the box term that meets across forms, chosen for the pair
    config = parse_distill({**config.to_dict(), "feat": {**config.to_dict()["feat"], "positions": 64}}, "t.yaml")
    distiller = Distiller(config, s.reg_max, list(s.levels), list(s.channels), t.info.levels, t.info.feature_channels,
                          teacher_reg_max=t.info.reg_max, student_strides=list(s.strides), student_branches=s.branches, nc=3)
    torch.manual_seed(0)
    with torch.no_grad():
        preds = student(batch["img"].float() / 255)
    leaves: list[torch.Tensor] = []
    preds = _as_leaves(preds, leaves)  # what the student learns from a term is that term's gradient on its outputs
    from_cache = distiller(preds, batch["teacher"])
    live = t(batch["img"].float() / 255)
    from_live = distiller(preds, TeacherBatch(split_head(live.head), dict(zip(t.info.levels, live.feat))))
    assert set(from_cache) == {"kd_cls", "kd_box", "kd_feat"}
    # every anchor is kept here (floor 0, 64 px has 84 anchors < 1024 slots), so each term and its gradient agree
    for key in from_cache:
        a, b = float(from_cache[key].detach()), float(from_live[key].detach())
        assert b > 0 and abs(a - b) <= 0.01 * b, (key, a, b)
        ga = torch.autograd.grad(from_cache[key], leaves, retain_graph=True, allow_unused=True)
        gb = torch.autograd.grad(from_live[key], leaves, retain_graph=True, allow_unused=True)
        diff = sum(float((x - y).pow(2).sum()) for x, y in zip(ga, gb) if y is not None)
        norm = sum(float(y.pow(2).sum()) for y in gb if y is not None)
        assert norm > 0 and (diff / norm) ** 0.5 <= 0.01, (key, (diff / norm) ** 0.5)


def _as_leaves(value, leaves: list):
    """Tensors nested in lists and dicts as fresh leaves that need a gradient, each appended to `leaves`."""
    if isinstance(value, dict):
        return {k: _as_leaves(v, leaves) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_as_leaves(v, leaves) for v in value)
    leaves.append(value.detach().requires_grad_())
    return leaves[-1]


def _e2e_student(g: torch.Generator, nc: int = 3, anchors: int = 20, reg_max: int = 1) -> dict:
    feats = [torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 8, 2, 2, generator=g)]
    branch = lambda: {"boxes": torch.rand(2, 4 * reg_max, anchors, generator=g) * 3, "scores": torch.randn(2, nc, anchors, generator=g), "feats": feats}  # noqa: E731
    return {b: branch() for b in BRANCHES}


@pytest.mark.parametrize("branch", ["one2many", "one2one", "both"])
def test_class_and_box_terms_teach_the_branch_the_config_names(branch):
    g = torch.Generator().manual_seed(0)
    student = _e2e_student(g)
    head = torch.randn(2, 4 + 3, 20, generator=g)
    head[:, :4] = head[:, :4].abs() * 2
    config = parse_distill({"cls": {"loss": "bce", "branch": branch}, "box": {"loss": "dist_l1", "branch": branch}}, "t.yaml")
    d = Distiller(config, 1, ["p3", "p4"], [4, 8], ["p3", "p4"], [4, 8], teacher_reg_max=1, student_branches=BRANCHES, nc=3)
    got = d(student, TeacherBatch(head=head))
    one = {b: Distiller(parse_distill({"cls": {"loss": "bce", "branch": b}, "box": {"loss": "dist_l1", "branch": b}}, "t.yaml"),
                        1, ["p3", "p4"], [4, 8], ["p3", "p4"], [4, 8], teacher_reg_max=1, student_branches=BRANCHES, nc=3)(student, TeacherBatch(head=head))
           for b in BRANCHES}
    assert float((one["one2many"]["kd_cls"] - one["one2one"]["kd_cls"]).abs()) > 1e-3  # the branches differ
    for key in ("kd_cls", "kd_box"):
        want = (one["one2many"][key] + one["one2one"][key]) / 2 if branch == "both" else one[branch][key]
        assert float(got[key]) == pytest.approx(float(want), rel=1e-6)


def test_box_term_across_forms_compares_decoded_distances():
    """A DFL teacher and a distance student meet on distances: the teacher's bins by their expectation."""
    from softlabel.distill.losses import build_loss

    g = torch.Generator().manual_seed(1)
    student = _e2e_student(g)
    t_head = torch.randn(2, 4 * 16 + 3, 20, generator=g)
    d = Distiller(parse_distill({"box": {"loss": "dist_iou"}}, "t.yaml"), 1, ["p3", "p4"], [4, 8], ["p3", "p4"], [4, 8],
                  teacher_reg_max=16, student_branches=BRANCHES, nc=3)
    got = d(student, TeacherBatch(head=t_head))["kd_box"]
    want = build_loss("dist_iou")(student["one2many"]["boxes"], distances(t_head[:, :64], 16))
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    with pytest.raises(UserError, match="'ld' compares DFL bins.*reg_max 16.*reg_max 1.*dist_iou"):
        Distiller(parse_distill({"box": {"loss": "ld"}}, "t.yaml"), 1, ["p3", "p4"], [4, 8], ["p3", "p4"], [4, 8],
                  teacher_reg_max=16, student_branches=BRANCHES, nc=3)


@pytest.mark.parametrize("weighted", [True, False])
def test_box_floor_reads_the_same_anchors_from_a_store_and_a_live_teacher(weighted):
    """With min_confidence at the store's floor, the box term and its gradient from a sparse store equal the live
    teacher's dense ones; without it the live teacher's low-confidence anchors weigh in where a store has no box."""
    from softlabel.select import logit, select_topk

    g = torch.Generator().manual_seed(3)
    student = _e2e_student(g)
    t_head = torch.cat([torch.rand(2, 4, 20, generator=g) * 3, torch.randn(2, 3, 20, generator=g) * 3 - 4], 1)
    floor = 0.05
    index, values, background = select_topk(t_head, 1, 20, floor)
    kept = int((index >= 0).sum())
    assert 4 < kept < 36  # some anchors of each image on each side of the floor
    sparse, dense = TeacherBatch(index=index, values=values, background=background), TeacherBatch(head=t_head)

    def term(min_confidence: float, teacher: TeacherBatch) -> tuple[float, torch.Tensor]:
        config = {"box": {"loss": "dist_iou", "confidence_weighted": weighted, "min_confidence": min_confidence}}
        d = Distiller(parse_distill(config, "t.yaml"), 1, ["p3", "p4"], [4, 8], ["p3", "p4"], [4, 8],
                      student_branches=BRANCHES, nc=3)
        boxes = student["one2many"]["boxes"].clone().requires_grad_()
        out = d({**student, "one2many": {**student["one2many"], "boxes": boxes}}, teacher)["kd_box"]
        return float(out.detach()), torch.autograd.grad(out, boxes)[0]

    (a, ga), (b, gb) = term(floor, sparse), term(floor, dense)
    assert a == pytest.approx(b, rel=1e-6) and torch.allclose(ga, gb, rtol=1e-5, atol=1e-9)
    assert float(logit(torch.tensor(floor))) > float(t_head[:, 4:].amax(1).min())  # the floor drops anchors live
    (a, ga), (b, gb) = term(0.0, sparse), term(0.0, dense)
    assert float((ga - gb).norm() / gb.norm()) > 0.01  # more than the 1% contract 3 allows


def test_default_store_follows_the_teachers_box_form(teachers):
    """int8, floor 0.005, cap 512 for a DFL head; float16, floor 0.001, cap 1024 for a distance head (README, Contract 3)."""
    from softlabel.dump import DumpSettings, resolve_head

    for reg_max, precision, floor, cap, boxes in ((16, "int8", 0.005, 512, None), (1, "float16", 0.001, 1024, "float32")):
        s = resolve_head(DumpSettings(teacher="", data="", out=""), reg_max)
        assert (s.precision, s.head_floor, s.head_topk, s.feature_rows, s.box_precision) == (precision, floor, cap, 64, boxes)
        assert resolve_head(DumpSettings(teacher="", data="", out="", box_precision="same"), reg_max).box_precision is None
        chosen = resolve_head(DumpSettings(teacher="", data="", out="", precision="bfloat16", head_floor=0.01, head_topk=64), reg_max)
        assert (chosen.precision, chosen.head_floor, chosen.head_topk) == ("bfloat16", 0.01, 64)
        dense = resolve_head(DumpSettings(teacher="", data="", out="", head_topk=0, feature_layout="dense"), reg_max)
        assert (dense.head_topk, dense.head_floor, dense.feature_rows, dense.box_precision) == (None, 0.0, None, None)
    for name, precision in (("yolov8s", "int8"), ("yolo11s", "int8"), ("yolo26s", "float16")):
        attrs = CacheReader(str(teachers[name][1])).attrs
        assert attrs["storage"]["precision"] == precision, name
        command = attrs["command"]  # the resume command names what the defaults chose
        assert command[command.index("--precision") + 1] == precision
        assert command[command.index("--head-topk") + 1] == ("1024" if name == "yolo26s" else "512")
        assert command[command.index("--box-precision") + 1] == ("float32" if name == "yolo26s" else "same")
        stored = CacheReader(str(teachers[name][1])).layout.stored("v0")
        info = run_cli("info", teachers[name][1])
        assert info.exit_code == 0 and ("boxes apart in float32" in info.output) == (name == "yolo26s"), info.output
        if name == "yolo26s":  # the 4 distances apart in float32, the 3 class logits in float16
            assert (stored["v0/head/boxes"].shape, stored["v0/head/boxes"].dtype) == ((1024, 4), "float32")
            assert (stored["v0/head/values"].shape, stored["v0/head/values"].dtype) == ((1024, 3), "float16")
        else:
            assert "v0/head/boxes" not in stored and stored["v0/head/values"].shape == (512, 64 + 3)


def test_a_stored_logit_rounded_under_the_floor_keeps_its_box():
    """A store kept its anchors by their unrounded scores: an anchor whose stored logit rounds to just under the floor
    still counts, as it does live, instead of being dropped again by min_confidence at the store's own floor."""
    from softlabel.select import logit, select_topk

    g = torch.Generator().manual_seed(5)
    student = _e2e_student(g)
    t_head = torch.cat([torch.rand(2, 4, 20, generator=g) * 3, torch.randn(2, 3, 20, generator=g) * 2 - 3], 1)
    floor = 0.05
    index, values, background = select_topk(t_head, 1, 20, floor)
    last = int((index[0] >= 0).sum()) - 1  # image 0's least confident kept anchor: its best logit set just over the floor
    best = int(values[0, last, 4:].argmax())
    at = float(logit(torch.tensor(floor)))
    t_head[0, 4 + best, index[0, last].long()] = at + 1e-4
    values[0, last, 4 + best] = at - 1e-3  # as stored: rounded to just under it
    config = parse_distill({"box": {"loss": "dist_iou", "confidence_weighted": True, "min_confidence": floor}}, "t.yaml")
    d = Distiller(config, 1, ["p3", "p4"], [4, 8], ["p3", "p4"], [4, 8], student_branches=BRANCHES, nc=3)
    live = float(d(student, TeacherBatch(head=t_head))["kd_box"])
    stored = float(d(student, TeacherBatch(index=index, values=values, background=background, floor=floor))["kd_box"])
    masked = float(d(student, TeacherBatch(index=index, values=values, background=background))["kd_box"])  # floor unknown
    assert stored == pytest.approx(live, rel=1e-4)
    assert abs(masked - live) > 1e-3 * live  # masking it again would drop the anchor the live teacher counts


def test_min_confidence_is_a_box_term_option():
    config = parse_distill({"box": {"loss": "dist_iou", "min_confidence": 0.001}}, "t.yaml")
    assert config.terms["box"].min_confidence == 0.001
    assert parse_distill(config.to_dict(), "t.yaml") == config
    assert load_distill("distances").terms["box"].min_confidence == 0.001  # a distance head store's floor
    with pytest.raises(UserError, match="'min_confidence' applies to box terms only"):
        parse_distill({"cls": {"loss": "bce", "min_confidence": 0.001}}, "t.yaml")
    with pytest.raises(UserError, match=r"min_confidence is a teacher score in \[0, 1\)"):
        parse_distill({"box": {"loss": "dist_iou", "min_confidence": 1.5}}, "t.yaml")


def test_nan_recovery_restores_the_adapters_with_the_student(teachers, dataset, tmp_path):
    """Ultralytics' NaN recovery reloads last.pt: the adapters come back with the student, not left as they were."""
    from ultralytics import YOLO
    from ultralytics.nn.tasks import torch_safe_load

    from softlabel.train import make_trainer

    seen = {}

    def corrupt(trainer):
        if trainer.epoch == 1 and "saved" not in seen:
            ema = torch_safe_load(str(trainer.last), safe_only=True)[0]["ema"]
            seen["saved"] = {k: v.float() for k, v in ema.projector.state_dict().items()}
            with torch.no_grad():
                for p in trainer.distiller.parameters():
                    p.fill_(float("nan"))
            trainer.loss = torch.tensor(float("nan"))

    def restored(trainer):
        if trainer.epoch == 1 and "saved" in seen and "after" not in seen:
            seen["after"] = {k: v.detach().clone() for k, v in trainer.distiller.state_dict().items()}

    model = YOLO("yolo26n.yaml")
    model.add_callback("on_train_epoch_end", corrupt)
    model.add_callback("on_train_epoch_start", restored)
    model.train(trainer=make_trainer(cache=str(teachers["yolov8s"][1])), data=str(dataset), epochs=3, imgsz=IMGSZ,
                batch=4, workers=0, device="cpu", plots=False, project=str(tmp_path), name="n", close_mosaic=1, amp=False)
    assert seen["saved"] and set(seen["after"]) == set(seen["saved"])
    assert all(torch.equal(seen["after"][k], seen["saved"][k]) for k in seen["saved"])


def test_two_class_terms_at_once_each_its_own_column(teachers, dataset, tmp_path):
    """N named terms: BCE and KL on the class logits side by side is a config, each term its own loss column."""
    cfg = tmp_path / "two.yaml"
    cfg.write_text("cls:\n  loss: bce\n  weight: 1.0\ncls_kl:\n  loss: kl_cls\n  weight: 0.5\n  temperature: 2.0\n"
                   "box:\n  loss: ld\n  temperature: 2.0\n")
    r = run_cli("train", "--student", "yolov8n.yaml", "--cache", teachers["yolov8s"][1], "--data", dataset, "--epochs", 1,
                "--close-mosaic", 0, "--batch", 4, "--device", "cpu", "--project", tmp_path, "--name", "r", "--distill", cfg)
    assert r.exit_code == 0, (r.output[-3000:], r.exception)
    with open(tmp_path / "r" / "results.csv") as f:
        row = next(csv.DictReader(f))
    assert {"train/kd_cls", "train/kd_cls_kl", "train/kd_box"} <= set(row) and "train/kd_feat" not in row
    assert float(row["train/kd_cls"]) > 0 and float(row["train/kd_cls_kl"]) > 0


@pytest.mark.parametrize("name", ["dfl_extra", "cls_bias"])
def test_term_names_ultralytics_reads_specially_are_refused(name):
    with pytest.raises(UserError, match=f"term name '{name}'.*reserved"):
        parse_distill({name: {"loss": "bce"}}, "t.yaml")
