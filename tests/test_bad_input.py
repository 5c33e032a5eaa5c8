"""Bad input across dump, train, verify and info: exit code 2, one line naming the culprit, no
traceback, and an existing store byte-for-byte unchanged. Then every way an output path could
delete a user's files, and every way verify must notice missing data."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
import zarr

from conftest import NAMES, assert_clean_error, make_dataset, run_cli
from softlabel.teacher import save_checkpoint_from_yaml

DUMP = ["--imgsz", "64", "--batch", "4", "--shard-size", "4", "--views", "1", "--close-views", "1", "--quiet"]


def tree_hashes(root: Path) -> dict[str, str]:
    """Every file under root (or root itself) by relative path, with the sha256 of its bytes."""
    root = Path(root)
    if root.is_file():
        return {root.name: hashlib.sha256(root.read_bytes()).hexdigest()}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory, dataset, teacher):
    """One dumped store, and the odd files the table refers to."""
    root = tmp_path_factory.mktemp("bad")
    store = root / "keep.zarr"
    r = run_cli("dump", "--teacher", teacher, "--data", dataset, "--out", store, *DUMP)
    assert r.exit_code == 0, r.output
    junk = root / "junk.pt"
    junk.write_text("this is text, not a checkpoint\n")
    from ultralytics.nn.tasks import ClassificationModel

    cls = root / "classify.pt"
    torch.save({"model": ClassificationModel("yolov8n-cls.yaml", nc=3, verbose=False).half(), "train_args": {}}, cls)
    renamed = save_checkpoint_from_yaml("yolov8n.yaml", ["cat", *NAMES[1:3]], root / "cat.pt")
    other = save_checkpoint_from_yaml("yolov8n.yaml", NAMES[:3], root / "other.pt")  # same classes, other weights
    user = root / "user_files"
    user.mkdir()
    (user / "notes.txt").write_text("precious\n")
    (user / "photo.jpg").write_bytes(b"\xff\xd8 precious")
    a_file = root / "a_file.txt"
    a_file.write_text("precious\n")
    foreign_zarr = root / "foreign.zarr"
    zarr.open_group(str(foreign_zarr), mode="w", attributes={"project": "someone else's"}).create_array("x", shape=(4,), dtype="int8")
    distill = root / "typo.yaml"
    distill.write_text("cls:\n  loss: bce\n  temprature: 2\n")
    return dict(root=root, store=store, junk=junk, cls=cls, renamed=renamed, other=other, user=user, a_file=a_file,
                foreign_zarr=foreign_zarr, distill=distill)


def _dump(b, teacher, dataset, *extra, out=None):
    return ["dump", "--teacher", teacher, "--data", dataset, "--out", out or b["store"], *DUMP, *extra]


def _train(b, dataset, *extra, student="yolov8n.yaml"):
    return ["train", "--student", student, "--data", dataset, "--cache", b["store"], "--epochs", "1", "--device", "cpu",
            "--project", b["root"] / "runs", *extra]


# (case id, function of (built, teacher, dataset) -> argv, needles the one line must name)
CASES = [
    ("dump-imgsz-0", lambda b, t, d: _dump(b, t, d, "--imgsz", "0"), ["--imgsz", "0"]),
    ("dump-imgsz-negative", lambda b, t, d: _dump(b, t, d, "--imgsz", "-32"), ["--imgsz", "-32"]),
    ("dump-imgsz-not-32", lambda b, t, d: _dump(b, t, d, "--imgsz", "100"), ["--imgsz", "100"]),
    ("dump-imgsz-text", lambda b, t, d: _dump(b, t, d, "--imgsz", "big"), ["--imgsz", "big"]),
    ("dump-batch-0", lambda b, t, d: _dump(b, t, d, "--batch", "0"), ["--batch"]),
    ("dump-workers-negative", lambda b, t, d: _dump(b, t, d, "--workers", "-1"), ["--workers", "-1"]),
    ("dump-views-0", lambda b, t, d: _dump(b, t, d, "--views", "0"), ["--views"]),
    ("dump-close-views-negative", lambda b, t, d: _dump(b, t, d, "--close-views", "-1"), ["--close-views"]),
    ("dump-shard-size-0", lambda b, t, d: _dump(b, t, d, "--shard-size", "0"), ["--shard-size"]),
    ("dump-codec", lambda b, t, d: _dump(b, t, d, "--codec", "gzip9"), ["gzip9"]),
    ("dump-precision", lambda b, t, d: _dump(b, t, d, "--precision", "float64"), ["--precision", "float64"]),
    ("dump-head-topk-negative", lambda b, t, d: _dump(b, t, d, "--head-topk", "-4"), ["--head-topk"]),
    ("dump-head-floor", lambda b, t, d: _dump(b, t, d, "--head-floor", "1.5"), ["--head-floor"]),
    ("dump-levels", lambda b, t, d: _dump(b, t, d, "--levels", "p9"), ["p9"]),
    ("dump-device", lambda b, t, d: _dump(b, t, d, "--device", "cuda:7"), ["cuda:7"]),
    ("dump-augment-missing", lambda b, t, d: _dump(b, t, d, "--augment", b["root"] / "no-aug.yaml"), ["no-aug.yaml"]),
    ("dump-data-missing", lambda b, t, d: _dump(b, t, b["root"] / "no-data.yaml"), ["no-data.yaml", "not found"]),
    ("dump-teacher-missing", lambda b, t, d: _dump(b, b["root"] / "gone.pt", d), ["gone.pt", "not found"]),
    ("dump-teacher-text-file", lambda b, t, d: _dump(b, b["junk"], d), ["junk.pt", "not an Ultralytics checkpoint"]),
    ("dump-teacher-classify", lambda b, t, d: _dump(b, b["cls"], d), ["classify.pt", "classify"]),
    ("dump-teacher-class-names", lambda b, t, d: _dump(b, b["renamed"], d), ["cat.pt", "class 0", "'cat'", f"'{NAMES[0]}'"]),
    ("dump-other-settings", lambda b, t, d: _dump(b, t, d, "--seed", "5"), ["keep.zarr", "other settings", "augment.seed"]),
    ("dump-out-file", lambda b, t, d: _dump(b, t, d, out=b["a_file"]), ["a_file.txt", "file"]),
    ("dump-out-user-folder", lambda b, t, d: _dump(b, t, d, out=b["user"]), ["user_files", "not a softlabel cache"]),
    ("dump-out-user-folder-overwrite", lambda b, t, d: _dump(b, t, d, "--overwrite", out=b["user"]), ["user_files", "not a softlabel cache"]),
    ("dump-out-foreign-zarr", lambda b, t, d: _dump(b, t, d, "--overwrite", out=b["foreign_zarr"]), ["foreign.zarr", "not a softlabel cache"]),
    ("dump-out-dataset-root", lambda b, t, d: _dump(b, t, d, "--overwrite", out=Path(d).parent), ["data.yaml", "not a softlabel cache"]),
    ("dump-out-in-images", lambda b, t, d: _dump(b, t, d, out=Path(d).parent / "images" / "train" / "c.zarr"), ["c.zarr", "inside the dataset"]),
    ("dump-out-in-labels", lambda b, t, d: _dump(b, t, d, out=Path(d).parent / "labels" / "train" / "c.zarr"), ["c.zarr", "inside the dataset"]),
    ("train-epochs-0", lambda b, t, d: _train(b, d, "--epochs", "0"), ["--epochs"]),
    ("train-batch-0", lambda b, t, d: _train(b, d, "--batch", "0"), ["--batch"]),
    ("train-workers-negative", lambda b, t, d: _train(b, d, "--workers", "-2"), ["--workers"]),
    ("train-imgsz-differs", lambda b, t, d: _train(b, d, "--imgsz", "96"), ["imgsz 64", "imgsz 96"]),
    ("train-epochs-0-as-key", lambda b, t, d: ["train", "--student", "yolov8n.yaml", "--data", d, "--cache", b["store"], "epochs=0"],
     ["epochs=0"]),
    ("train-unknown-key", lambda b, t, d: _train(b, d, "lr=0.1"), ["lr"]),
    ("train-key-fixed-by-cache", lambda b, t, d: _train(b, d, "mosaic=0.5"), ["mosaic"]),
    ("train-student-classify", lambda b, t, d: _train(b, d, student=b["cls"]), ["classify.pt", "classify"]),
    ("train-student-classify-yaml", lambda b, t, d: _train(b, d, student="yolov8n-cls.yaml"), ["yolov8n-cls.yaml", "classify"]),
    ("train-student-text-file", lambda b, t, d: _train(b, d, student=b["junk"]), ["junk.pt", "not an Ultralytics checkpoint"]),
    ("train-student-unknown", lambda b, t, d: _train(b, d, student="yolov99z"), ["yolov99z"]),
    ("train-distill-typo", lambda b, t, d: _train(b, d, "--distill", b["distill"]), ["temprature"]),
    ("train-cache-is-user-folder", lambda b, t, d: ["train", "--student", "yolov8n.yaml", "--data", d, "--cache", b["user"]],
     ["user_files", "not a softlabel cache"]),
    ("train-online-class-names", lambda b, t, d: ["train", "--student", "yolov8n.yaml", "--data", d, "--teacher", b["renamed"]],
     ["cat.pt", "class 0"]),
    ("verify-missing", lambda b, t, d: ["verify", b["root"] / "nothing.zarr"], ["nothing.zarr", "no cache store"]),
    ("verify-user-folder", lambda b, t, d: ["verify", b["user"]], ["user_files", "not a softlabel cache"]),
    ("verify-other-teacher", lambda b, t, d: ["verify", b["store"], "--teacher", b["other"]], ["other.pt", "sha256"]),
    ("verify-samples-negative", lambda b, t, d: ["verify", b["store"], "--samples", "-1"], ["--samples"]),
    ("info-missing", lambda b, t, d: ["info", b["root"] / "nothing.zarr"], ["nothing.zarr", "no cache store"]),
    ("info-file", lambda b, t, d: ["info", b["a_file"]], ["a_file.txt", "not a softlabel cache"]),
    ("info-foreign-zarr", lambda b, t, d: ["info", b["foreign_zarr"]], ["foreign.zarr", "not a softlabel cache"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_touches_nothing(case, built, teacher, dataset):
    _, argv, needles = case
    watched = [built["store"], built["user"], built["a_file"], built["foreign_zarr"], Path(dataset).parent]
    before = [tree_hashes(p) for p in watched]
    assert_clean_error(run_cli(*argv(built, teacher, dataset)), *needles)
    assert [tree_hashes(p) for p in watched] == before
    assert not (built["root"] / "runs").exists()  # no run folder for a refused training
    assert not list(built["root"].glob("*.lock"))
    assert not (Path(dataset).parent / "images" / "train" / "c.zarr").exists()


def test_the_table_is_wide():
    commands = {c[0].split("-")[0] for c in CASES}
    assert len(CASES) >= 25 and commands == {"dump", "train", "verify", "info"}


# deletion hazards: each refused, its files intact ---------------------------------------------------------------


def test_out_on_user_files_dataset_root_and_a_file_deletes_nothing(tmp_path, teacher):
    data = make_dataset(tmp_path / "ds", n_train=4, n_val=1)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "thesis.tex").write_text("years of work\n")
    (victim / "sub").mkdir()
    (victim / "sub" / "data.bin").write_bytes(bytes(range(256)))
    a_file = tmp_path / "data"
    a_file.write_text("a file named like a folder\n")
    for target in (victim, data.parent, a_file):
        before = tree_hashes(target)
        for extra in ([], ["--overwrite"]):
            r = run_cli("dump", "--teacher", teacher, "--data", data, "--out", target, *DUMP, *extra)
            assert_clean_error(r, str(target))
            assert tree_hashes(target) == before, (target, extra)
    assert not list(tmp_path.glob("*.lock"))


def test_out_as_a_new_path_or_an_empty_folder_still_works(tmp_path, dataset, teacher):
    empty = tmp_path / "empty"
    empty.mkdir()
    for out in (tmp_path / "new.zarr", empty):
        r = run_cli("dump", "--teacher", teacher, "--data", dataset, "--out", out, *DUMP)
        assert r.exit_code == 0, r.output
        assert run_cli("info", out).exit_code == 0


def test_overwrite_removes_a_store_but_not_a_file_put_inside_it(tmp_path, built, teacher, dataset):
    out = tmp_path / "c.zarr"
    shutil.copytree(built["store"], out)
    (out / "my_notes.txt").write_text("keep me\n")
    r = run_cli("dump", "--teacher", teacher, "--data", dataset, "--out", out, *DUMP, "--seed", "3", "--overwrite")
    assert_clean_error(r, "my_notes.txt")
    assert (out / "my_notes.txt").read_text() == "keep me\n"
    (out / "my_notes.txt").unlink()
    r = run_cli("dump", "--teacher", teacher, "--data", dataset, "--out", out, *DUMP, "--seed", "3", "--overwrite")
    assert r.exit_code == 0, r.output
    assert zarr.open_group(str(out), mode="r").attrs["augment"]["seed"] == 3


def test_teacher_path_is_stored_absolute_and_verify_can_point_elsewhere(tmp_path, dataset, teacher, monkeypatch):
    monkeypatch.chdir(teacher.parent)
    out = tmp_path / "rel.zarr"
    assert run_cli("dump", "--teacher", teacher.name, "--data", dataset, "--out", out, *DUMP).exit_code == 0
    attrs = zarr.open_group(str(out), mode="r").attrs
    assert attrs["teacher"]["path"] == str(teacher.absolute())
    monkeypatch.chdir(tmp_path)
    assert run_cli("verify", out, "--samples", "2", "--no-scan").exit_code == 0
    moved = tmp_path / "moved.pt"
    shutil.copy(teacher, moved)
    r = run_cli("verify", out, "--samples", "2", "--no-scan", "--teacher", moved)
    assert r.exit_code == 0 and "verify: OK" in r.stdout, r.output


# verify sees missing, truncated and unfinished data ------------------------------------------------------------


def _copy(built, tmp_path, name="v.zarr") -> Path:
    out = tmp_path / name
    shutil.copytree(built["store"], out)
    return out


def test_verify_catches_a_deleted_shard_file(tmp_path, built):
    out = _copy(built, tmp_path)
    assert run_cli("verify", out, "--samples", "2").exit_code == 0
    (out / "c0" / "feat" / "rows" / "c" / "1" / "0" / "0").unlink()  # samples 4..7 of the closing view
    r = run_cli("verify", out, "--samples", "2")
    assert r.exit_code == 1, r.output
    assert "feat/rows (view c0) samples 4-7, shard 1: shard file missing" in r.stdout
    assert "verify: FAILED (missing data)" in r.stdout


def test_verify_catches_a_truncated_shard_file(tmp_path, built):
    out = _copy(built, tmp_path)
    shard = out / "v0" / "head" / "values" / "c" / "0" / "0" / "0"
    shard.write_bytes(shard.read_bytes()[:-30])
    r = run_cli("verify", out, "--samples", "2", "--no-scan")
    assert r.exit_code == 1, r.output
    assert "head/values (view v0) samples 0-3, shard 0" in r.stdout and "truncated" in r.stdout


def test_verify_catches_a_chunk_missing_from_its_shard_index(tmp_path, built):
    """A shard whose index says one sample was never written: zarr would read it as zeros."""
    from softlabel.cache.presence import EMPTY, index_nbytes
    from crc32c import crc32c
    import numpy as np
    import struct

    out = _copy(built, tmp_path)
    shard = out / "v0" / "fingerprint" / "c" / "1" / "0"
    raw = bytearray(shard.read_bytes())
    need = index_nbytes(4)
    table = np.frombuffer(bytes(raw[-need:-4]), "<u8").reshape(4, 2).copy()
    table[2] = EMPTY
    body = table.astype("<u8").tobytes()
    raw[-need:] = body + struct.pack("<I", crc32c(body))
    shard.write_bytes(bytes(raw))
    assert np.asarray(zarr.open_group(str(out), mode="r")["v0/fingerprint"][6]).sum() == 0  # what zarr alone sees
    r = run_cli("verify", out, "--samples", "2", "--no-scan")
    assert r.exit_code == 1 and "fingerprint (view v0) samples 4-7, shard 1: chunk of row 2 never written" in r.stdout, r.output


def test_verify_reports_an_unfinished_dump_with_its_resume_command(tmp_path, built):
    out = _copy(built, tmp_path)
    flags = zarr.open_group(str(out), mode="r+")["v0/done"]
    n = flags.shape[0]
    flags[1:] = 0  # as a dump killed after its first shard leaves it
    r = run_cli("verify", out, "--samples", "2")
    assert r.exit_code == 1, r.output
    assert f"unfinished  view v0: shards 1-{n - 1}" in r.stdout
    assert "resume with softlabel dump --teacher" in r.stdout and f"--out {out} " in r.stdout
    assert "verify: FAILED (incomplete)" in r.stdout
