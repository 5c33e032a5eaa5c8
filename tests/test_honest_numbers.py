"""The numbers a user sees are true: a teacher that keeps no anchor is said so, the dump's byte count
is what its shards take on disk, and results.csv holds no column that is always zero."""

from __future__ import annotations

import csv
from pathlib import Path

from conftest import run_cli
from softlabel.dump import DumpSettings, run_dump

DUMP = ["--imgsz", "64", "--batch", "4", "--shard-size", "4", "--views", "2", "--close-views", "1"]
WARNING = "warning: the teacher keeps 0.0 anchors per image on average (min 0, max 0) above --head-floor 0.005 in its first 4 images"


def test_a_teacher_that_keeps_no_anchor_is_warned_about_and_shown(tmp_path, dataset, teacher):
    """A random-weight teacher scores every anchor below the default floor: the store would teach nothing
    through its kept anchors. The dump says so on its first batch; info and verify show it afterwards."""
    out = tmp_path / "weak.zarr"
    r = run_cli("dump", "--teacher", teacher, "--data", dataset, "--out", out, *DUMP, "--quiet")
    assert r.exit_code == 0, r.output
    assert r.stderr.count("softlabel: warning: the teacher keeps") == 1 and WARNING in r.stderr, r.stderr
    assert "lower --head-floor" in r.stderr
    info = run_cli("info", out)
    assert "kept       0.0 per image on average (min 0, max 0; cap 512, floor 0.005), 100% of images keep none; over 36 sample-views" in info.stdout
    verify = run_cli("verify", out, "--samples", 2)
    assert "kept          0.0 per image on average" in verify.stdout
    every = tmp_path / "every.zarr"
    r = run_cli("dump", "--teacher", teacher, "--data", dataset, "--out", every, *DUMP, "--quiet", "--head-floor", 0)
    assert r.exit_code == 0 and "warning: the teacher keeps" not in r.stderr, r.output
    assert "kept       84.0 per image on average (min 84, max 84; cap 512, floor 0.0), 0% of images keep none" in run_cli("info", every).stdout


def test_dump_bytes_are_the_bytes_its_shards_take_on_disk(tmp_path, dataset, teacher):
    out = tmp_path / "c.zarr"
    result = run_dump(DumpSettings(teacher=str(teacher), data=str(dataset), out=str(out), imgsz=64, batch=4, shard_size=4,
                                   views=2, close_views=1, progress=False))
    shards = sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and "/c/" in p.as_posix()[len(str(out)):]
                 and not p.as_posix().startswith(str(out / "samples")))
    assert result.disk_bytes == shards > 0
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert result.disk_bytes > 0.5 * total  # the rest is zarr.json metadata and the sample paths
    r = run_cli("dump", "--teacher", teacher, "--data", dataset, "--out", tmp_path / "d.zarr", *DUMP, "--quiet")
    assert f"written in 9 shards, {shards / 1e6:.2f} MB of shards on disk" in r.stdout, (r.stdout, shards)


def test_results_csv_has_no_distillation_column_that_validation_cannot_fill(tmp_path, dataset, teacher):
    out = tmp_path / "c.zarr"
    assert run_cli("dump", "--teacher", teacher, "--data", dataset, "--out", out, *DUMP, "--quiet", "--head-floor", 0).exit_code == 0
    r = run_cli("train", "--student", "yolov8n.yaml", "--cache", out, "--epochs", 1, "--close-mosaic", 0, "--device", "cpu",
                "--project", tmp_path / "runs", "--name", "t")
    assert r.exit_code == 0, r.output
    with open(Path(tmp_path / "runs" / "t" / "results.csv")) as f:
        row = next(csv.DictReader(f))
    assert {"train/kd_cls", "train/kd_box", "train/kd_feat"} <= set(row) and float(row["train/kd_feat"]) > 0
    assert "val/box_loss" in row and not [k for k in row if k.startswith("val/kd_")]
