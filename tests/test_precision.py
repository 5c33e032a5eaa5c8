"""The teacher's precision (--half/--no-half) in dump, verify and online training, and what the store records."""

from __future__ import annotations

import shutil

import pytest
import zarr
from conftest import run_cli

from softlabel.cache.store import read_attrs
from softlabel.teacher import Teacher

IMGSZ = 64


@pytest.fixture()
def amp_seen(monkeypatch):
    """Every `amp` a Teacher is built with, while still building it."""
    seen = []
    load = Teacher.load.__func__

    def spy(cls, path, device="cpu", amp=True, **kwargs):
        seen.append(amp)
        return load(cls, path, device, amp, **kwargs)

    monkeypatch.setattr(Teacher, "load", classmethod(spy))
    return seen


@pytest.fixture(scope="module")
def store(tmp_path_factory, dataset, teacher):
    out = tmp_path_factory.mktemp("half") / "c.zarr"
    r = run_cli("dump", "--teacher", teacher, "--data", dataset, "--out", out, "--imgsz", IMGSZ, "--batch", 4,
                "--views", 1, "--close-views", 0, "--quiet", "--no-half")
    assert r.exit_code == 0, r.output
    return out


def test_dump_passes_half_to_the_teacher_and_records_what_ran(tmp_path, dataset, teacher, amp_seen, store):
    assert read_attrs(str(store))["teacher"]["compute_dtype"] == "float32"
    r = run_cli("dump", "--teacher", teacher, "--data", dataset, "--out", tmp_path / "h.zarr", "--imgsz", IMGSZ,
                "--batch", 4, "--views", 1, "--close-views", 0, "--quiet")
    assert r.exit_code == 0, r.output
    assert amp_seen == [True]
    # float16 autocast exists on CUDA only: on the CPU the teacher ran, and is recorded, in float32
    assert read_attrs(str(tmp_path / "h.zarr"))["teacher"]["compute_dtype"] == "float32"
    cpu = Teacher.load(teacher, amp=True)
    assert not cpu.amp and cpu.compute_dtype == "float32"


def test_verify_runs_the_teacher_as_the_dump_did_and_widens_for_float16(tmp_path, store, amp_seen):
    from softlabel.verify import HALF_COMPUTE_TOLERANCE, TOLERANCE, run_verify

    storage = TOLERANCE["int8"]
    report = run_verify(str(store), samples=2, scan=False)
    assert report.ok and amp_seen == [False]
    assert (report.atol, report.rtol) == storage and "float32 in the dump" in report.compute

    half = tmp_path / "half.zarr"
    shutil.copytree(store, half)
    group = zarr.open_group(str(half), mode="r+")
    group.attrs["teacher"] = {**group.attrs["teacher"], "compute_dtype": "float16"}
    report = run_verify(str(half), samples=2, scan=False)
    assert amp_seen[-1] is True  # as the dump did (a no-op on the CPU, where it runs in float32)
    assert report.atol == pytest.approx(storage[0] + HALF_COMPUTE_TOLERANCE[0])
    assert report.rtol == pytest.approx(storage[1] + HALF_COMPUTE_TOLERANCE[1])
    report = run_verify(str(half), samples=2, scan=False, half=False)
    assert amp_seen[-1] is False and report.atol == pytest.approx(storage[0] + HALF_COMPUTE_TOLERANCE[0])
    report = run_verify(str(half), samples=2, scan=False, atol=1e-3)  # a given tolerance is taken as given
    assert report.atol == 1e-3
    old = dict(group.attrs["teacher"])  # a store from before the record: assume the coarser float16
    del old["compute_dtype"]
    group.attrs["teacher"] = old
    report = run_verify(str(half), samples=2, scan=False)
    assert amp_seen[-1] is True and report.atol == pytest.approx(storage[0] + HALF_COMPUTE_TOLERANCE[0])


def test_online_teacher_follows_half_or_the_student_amp(tmp_path, dataset, teacher, amp_seen, monkeypatch):
    from softlabel.train import make_trainer

    args = dict(model="yolov8n.yaml", data=str(dataset), imgsz=IMGSZ, epochs=1, batch=4, device="cpu", project=str(tmp_path),
                exist_ok=True, plots=False)
    for half, amp, expected in ((None, False, False), (None, True, True), (False, True, False), (True, False, True)):
        trainer = make_trainer(teacher_path=str(teacher), teacher_half=half)(overrides={**args, "amp": amp, "name": f"o{half}{amp}"})
        trainer._open_sources()
        assert amp_seen[-1] is expected, (half, amp)

    captured = {}
    monkeypatch.setattr("softlabel.train.train_students", lambda students, settings, **kw: captured.setdefault("s", settings) and [])
    for flag, expected in (("--no-half", False), ("--half", True), (None, None)):
        captured.clear()
        r = run_cli("train", "--student", "yolov8n", "--teacher", teacher, "--data", dataset, *([flag] if flag else []))
        assert r.exit_code == 0, (r.output, r.exception)
        assert captured["s"]["teacher_half"] is expected
