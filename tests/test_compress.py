"""Pruning (softlabel prune), fine-tuning a pruned student from a cache, and ONNX FP32/INT8 export (softlabel export)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
from conftest import assert_clean_error, run_cli
import numpy as np
import torch

from softlabel.errors import UserError
from softlabel.prune import PRUNED_ATTR, is_pruned, level_channels, load_detector, prune_detector, pruned_model_or_none
from softlabel.teacher import save_checkpoint_from_yaml
from softlabel.toydata import NAMES
from softlabel.train import make_trainer

IMGSZ = 64


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _raw_shapes(model, imgsz=IMGSZ) -> list[tuple[int, ...]]:
    """Shapes of the Detect head's raw box and class maps (training-mode outputs), BatchNorm left in eval."""
    model = model.float().eval()
    head = model.model[-1]
    head.training = True
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, 3, imgsz, imgsz))
    finally:
        head.training = False
    return [tuple(out["boxes"].shape), tuple(out["scores"].shape)]


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    return save_checkpoint_from_yaml("yolov8n.yaml", NAMES, tmp_path_factory.mktemp("orig") / "yolov8n.pt")


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, original):
    out = tmp_path_factory.mktemp("pruned") / "pruned.pt"
    r = run_cli("prune", "--model", original, "--ratio", 0.3, "--imgsz", IMGSZ, "--out", out)
    assert r.exit_code == 0, (r.output[-3000:], r.exception)
    assert "before" in r.stdout and "after" in r.stdout and "GFLOPs" in r.stdout
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory, dataset, teacher):
    out = tmp_path_factory.mktemp("cprune") / "c.zarr"
    r = run_cli("dump", "--teacher", teacher, "--data", dataset, "--out", out, "--imgsz", IMGSZ, "--batch", 4,
                "--shard-size", 4, "--views", 1, "--close-views", 0, "--quiet")
    assert r.exit_code == 0, r.output
    return out


def test_pruned_checkpoint_is_smaller_keeps_head_outputs_loads_and_predicts(original, pruned, dataset):
    from ultralytics import YOLO

    full, _ = load_detector(original)
    small = YOLO(str(pruned))
    assert _params(small.model) < 0.7 * _params(full)
    assert _raw_shapes(small.model) == _raw_shapes(full)
    assert is_pruned(small.model) and getattr(small.model, PRUNED_ATTR)["ratio"] == 0.3
    assert all(s < f for s, f in zip(level_channels(small.model), level_channels(full)))
    image = sorted((Path(dataset).parent / "images" / "val").iterdir())[0]
    result = small.predict(str(image), imgsz=IMGSZ, device="cpu", verbose=False)
    assert result[0].boxes is not None


def test_yolo11_with_attention_and_a_protected_head():
    from ultralytics.nn.tasks import DetectionModel

    model = DetectionModel("yolo11n.yaml", nc=3, verbose=False)
    shapes, params = _raw_shapes(model), _params(model)
    head_before = [m.weight.shape for m in model.model[-1].modules() if isinstance(m, torch.nn.Conv2d)]
    prune_detector(model, 0.25, IMGSZ, prune_head=False)
    head_after = [m.weight.shape for m in model.model[-1].modules() if isinstance(m, torch.nn.Conv2d)]
    assert _params(model) < params
    assert _raw_shapes(model) == shapes and _raw_shapes(model, 96)[0][:2] == shapes[0][:2]
    assert [s[0] for s in head_after] == [s[0] for s in head_before]  # --ignore-head: no head output channel removed


def test_seam_returns_only_pruned_students_with_the_data_classes(pruned, original):
    small, _ = load_detector(pruned)
    full, _ = load_detector(original)
    assert pruned_model_or_none(small, nc=len(NAMES)) is small
    assert pruned_model_or_none(full, nc=len(NAMES)) is None and pruned_model_or_none(None) is None
    with pytest.raises(UserError, match="predicts 3 classes but the data has nc=5"):
        pruned_model_or_none(small, nc=5)


def test_pruned_student_fine_tunes_from_the_cache_and_stays_pruned(tmp_path, pruned, cache, dataset):
    from ultralytics import YOLO

    trainer = make_trainer(cache=str(cache))  # the production trainer: its get_model keeps a pruned student
    student = YOLO(str(pruned))
    n_pruned = _params(student.model)
    student.train(trainer=trainer, data=str(dataset), epochs=1, imgsz=IMGSZ, batch=4, workers=0, device="cpu", plots=False,
                  project=str(tmp_path / "runs"), name="ft", seed=0, nbs=4, close_mosaic=0, exist_ok=True, amp=False)
    with open(tmp_path / "runs" / "ft" / "results.csv") as f:
        header = f.readline()
    assert "train/kd_cls" in header
    best = YOLO(str(tmp_path / "runs" / "ft" / "weights" / "best.pt"))
    assert _params(best.model) == n_pruned and is_pruned(best.model)


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime not installed (pip install softlabel[export])")
def test_onnx_fp32_and_int8_export_validate_and_int8_is_smaller(tmp_path, pruned, dataset):
    r = run_cli("export", "--model", pruned, "--format", "onnx", "--int8", "--data", dataset, "--imgsz", IMGSZ,
                "--out", tmp_path / "x", "--calib-images", 6, "--runs", 3, "--json")
    assert r.exit_code == 0, (r.output[-3000:], r.exception)
    report = json.loads(r.stdout[r.stdout.index("{"):])
    rows = {row["precision"]: row for row in report["rows"]}
    assert set(rows) == {"fp32", "int8"} and report["calib_images"] == 6
    import onnxruntime as ort

    for row in rows.values():
        assert Path(row["path"]).is_file() and row["path"].endswith(".onnx") and row["latency_ms"] > 0
    # the FP32 file computes the pruned model: same raw predictions on the same input
    model = load_detector(str(pruned))[0].float().eval()
    x = torch.rand(1, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(x)[0].numpy()
    session = ort.InferenceSession(rows["fp32"]["path"], providers=["CPUExecutionProvider"])
    theirs = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert theirs.shape == ours.shape and np.allclose(theirs, ours, rtol=1e-3, atol=1e-3 * float(np.abs(ours).max()))
    assert rows["int8"]["size_mb"] < 0.5 * rows["fp32"]["size_mb"]


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None or importlib.util.find_spec("nncf") is None,
                    reason="openvino/nncf not installed (pip install softlabel[openvino])")
def test_openvino_fp32_and_int8_export_validate(tmp_path, pruned, dataset):
    from softlabel.export import run_export

    report = run_export(str(pruned), "openvino", int8=True, data=str(dataset), imgsz=IMGSZ, out=str(tmp_path / "ov"),
                        calib_images=4, runs=2)
    rows = {row.precision: row for row in report.rows}
    assert Path(rows["int8"].path).is_dir() and rows["int8"].size_mb < 0.5 * rows["fp32"].size_mb
    from ultralytics import YOLO

    for row in rows.values():  # each reported mAP is the validator's on that very model
        again = YOLO(row.path, task="detect").val(data=str(dataset), imgsz=IMGSZ, batch=1, rect=False, device="cpu",
                                                  plots=False, project=str(tmp_path / "val"), verbose=False)
        assert math.isclose(row.map50_95, float(again.box.map), abs_tol=1e-6), (row, again.box.map)


def test_bad_input_is_one_line_and_exit_2(tmp_path, original, dataset):
    missing = tmp_path / "nope.pt"
    assert_clean_error(run_cli("prune", "--model", missing, "--out", tmp_path / "p.pt"), "nope.pt", "not found")
    for ratio in (0, 1, 1.5, -0.2):
        assert_clean_error(run_cli("prune", "--model", original, "--ratio", ratio, "--out", tmp_path / "p.pt"), "--ratio", "between 0 and 1")
    assert_clean_error(run_cli("prune", "--model", original, "--importance", "taylor", "--out", tmp_path / "p.pt"), "taylor", "l2")
    assert_clean_error(run_cli("export", "--model", missing, "--format", "onnx"), "nope.pt", "not found")
    assert_clean_error(run_cli("export", "--model", original, "--format", "tflite"), "unsupported format 'tflite'", "onnx or openvino")
    assert_clean_error(run_cli("export", "--model", original, "--format", "onnx", "--int8"), "--int8 needs --data")
    assert not (tmp_path / "p.pt").exists()
