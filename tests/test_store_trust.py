"""A store that cannot lie, run code or eat files: checkpoints load the safe way and are hashed
before they load, every teacher record is sealed to its view and sample, --overwrite removes only
what a store can hold, and creation that fails or is killed leaves nothing that blocks a rerun."""

from __future__ import annotations

import errno
import fractions
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from conftest import assert_clean_error, run_cli
from softlabel.cache import store
from softlabel.cache.digest import record_digest
from softlabel.cache.reader import CacheReader
from softlabel.errors import UserError
from softlabel.teacher import save_checkpoint_from_yaml
from softlabel.trust import TRUST_ENV

# floor 0: a random-weight teacher scores every anchor below the default floor, and records that keep no
# anchor are alike from image to image; these keep every anchor, so each record is its image's own
DUMP = ["--imgsz", "64", "--batch", "4", "--shard-size", "4", "--views", "2", "--close-views", "1", "--head-floor", "0", "--quiet"]


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(root).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def sealed(tmp_path_factory, dataset, teacher) -> Path:
    """A store in the default format (int8, sparse head, feature rows): six tensors per record."""
    out = tmp_path_factory.mktemp("sealed") / "c.zarr"
    r = run_cli("dump", "--teacher", teacher, "--data", dataset, "--out", out, *DUMP)
    assert r.exit_code == 0, r.output
    return out


def _copy(src: Path, tmp_path: Path, name: str = "c.zarr") -> Path:
    out = tmp_path / name
    shutil.copytree(src, out)
    return out


def _evil_checkpoint(path: Path, marker: Path) -> Path:
    """A pickle that runs a shell command as it loads: what a received .pt can carry."""

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"model": Payload(), "train_args": {}}, path)
    return path


# 1. nothing runs from a file before it is verified ------------------------------------------------------------


def test_verify_hashes_the_teacher_before_loading_it(tmp_path, sealed):
    out = _copy(sealed, tmp_path)
    marker = tmp_path / "ran"
    evil = _evil_checkpoint(tmp_path / "evil.pt", marker)
    group = zarr.open_group(str(out), mode="r+")
    teacher = dict(group.attrs["teacher"])
    teacher["path"] = str(evil)  # the path a received store names
    group.attrs["teacher"] = teacher
    assert_clean_error(run_cli("verify", out, "--no-scan", "--samples", "2"), evil, "sha256 differs", "not loaded")
    assert not marker.exists()


@pytest.mark.parametrize("command", ["dump", "train-student", "train-teacher"])
def test_a_checkpoint_that_would_run_code_is_refused_unrun(command, tmp_path, dataset, teacher):
    marker = tmp_path / "ran"
    evil = _evil_checkpoint(tmp_path / "evil.pt", marker)
    common = ["--data", dataset, "--epochs", "1", "--device", "cpu", "--imgsz", "64", "--project", tmp_path / "runs"]
    argv = {
        "dump": ["dump", "--teacher", evil, "--data", dataset, "--out", tmp_path / "c.zarr", *DUMP],
        "train-student": ["train", "--student", evil, "--teacher", teacher, *common],
        "train-teacher": ["train", "--student", "yolov8n.yaml", "--teacher", evil, *common],
    }[command]
    assert_clean_error(run_cli(*argv), evil, "could run code", f"{TRUST_ENV}=1")
    assert not marker.exists()
    assert not (tmp_path / "c.zarr").exists() and not (tmp_path / "runs").exists()


def test_trusting_a_file_is_an_opt_out_that_loads_it(tmp_path, monkeypatch):
    """A checkpoint holding a class outside Ultralytics' allow-list: refused by default, read when trusted."""
    from softlabel.teacher import read_checkpoint

    path = save_checkpoint_from_yaml("yolov8n.yaml", ["a", "b", "c"], tmp_path / "custom.pt")
    ckpt = torch.load(path, weights_only=False)
    ckpt["note"] = fractions.Fraction(1, 3)
    torch.save(ckpt, path)
    monkeypatch.delenv(TRUST_ENV, raising=False)
    with pytest.raises(UserError, match=f"{TRUST_ENV}=1"):
        read_checkpoint(path)
    monkeypatch.setenv(TRUST_ENV, "1")
    model, loaded = read_checkpoint(path)
    assert loaded["note"] == fractions.Fraction(1, 3) and int(model.model[-1].nc) == 3


@pytest.mark.parametrize("trusted", [False, True])
def test_ultralytics_own_loads_are_safe_unless_trusted(trusted):
    """Training loads a student .pt and last.pt through Ultralytics: its flag must be set before its import."""
    env = {k: v for k, v in os.environ.items() if k not in (TRUST_ENV, "ULTRALYTICS_SAFE_LOAD")}
    if trusted:
        env[TRUST_ENV] = "1"
    code = "import softlabel.cli; from ultralytics.utils import SAFE_LOAD; print(SAFE_LOAD)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == str(not trusted), out.stderr


# 2. every record is bound to its view and sample ----------------------------------------------------------------


def _move_shard(out: Path, src_view: str, src_shard: int, dst_view: str, dst_shard: int) -> list[str]:
    """Copy one shard of every stored tensor (not the fingerprint or digest) from one place to another."""
    reader = CacheReader(str(out))
    moved = []
    for name in reader.layout.stored(dst_view):
        tensor = name[len(dst_view) + 1 :]
        src = out / src_view / tensor / "c" / str(src_shard)
        dst = out / dst_view / tensor / "c" / str(dst_shard)
        shutil.rmtree(dst)
        shutil.copytree(src, dst)
        moved.append(tensor)
    return moved


def test_every_stored_record_carries_its_seal(sealed):
    reader = CacheReader(str(sealed))
    group = zarr.open_group(str(sealed), mode="r")
    for view in reader.layout.views:
        for i in (0, 5, 11):
            stored = {name[len(view) + 1 :]: np.asarray(group[name][i]) for name in reader.layout.stored(view)}
            fp = np.asarray(group[f"{view}/fingerprint"][i]).tobytes()
            assert np.asarray(group[f"{view}/digest"][i]).tobytes() == record_digest(view, i, fp, stored)
            assert record_digest(view, i + 1, fp, stored) != record_digest(view, i, fp, stored)
            assert record_digest("c0" if view != "c0" else "v0", i, fp, stored) != record_digest(view, i, fp, stored)


@pytest.mark.parametrize("src", [("v1", 1), ("v0", 2)], ids=["other-view", "next-shard"])
def test_a_moved_shard_stops_training_naming_the_sample(src, tmp_path, sealed, dataset):
    out = _copy(sealed, tmp_path)
    moved = _move_shard(out, src[0], src[1], "v0", 1)
    assert len(moved) == 6, moved  # index, values, scale, background, feature rows and their scales
    r = run_cli("train", "--student", "yolov8n.yaml", "--data", dataset, "--cache", out, "--epochs", "1",
                "--close-mosaic", "0", "--device", "cpu", "--project", tmp_path / "runs", "--name", "t")  # epoch 0 reads v0
    assert_clean_error(r, "view v0", "shard 1", "not the one written")
    assert re.search(r"view v0, sample [4-7] \(images/", r.stderr), r.stderr  # whichever of the shard's samples came first
    r = run_cli("verify", out, "--samples", "2")
    assert r.exit_code == 1, r.output
    for i in range(4, 8):
        assert f"misplaced   view v0, sample {i} (" in r.stdout, r.stdout
    assert "records       36 digests recomputed, 4 not of their view and sample" in r.stdout
    assert "verify: FAILED (misplaced records)" in r.stdout
    r = run_cli("verify", out, "--samples", "240", "--no-scan")  # more than there are: every record, each named once
    assert r.exit_code == 1, r.output
    assert "fingerprints  36/36 match" in r.stdout and "records       36 digests recomputed, 4 not of" in r.stdout, r.stdout
    for i in range(4, 8):
        assert r.stdout.count(f"misplaced   view v0, sample {i} (") == 1, r.stdout


def test_verify_names_each_sample_beyond_tolerance(tmp_path, sealed):
    """A record altered and sealed again passes every checksum: the live teacher still names it."""
    out = _copy(sealed, tmp_path)
    reader = CacheReader(str(out))
    group = zarr.open_group(str(out), mode="r+")
    view, i = "v1", 6
    scale = np.asarray(group[f"{view}/head/scale"][i])
    group[f"{view}/head/scale"][i] = scale * 3
    stored = {name[len(view) + 1 :]: np.asarray(group[name][i]) for name in reader.layout.stored(view)}
    group[f"{view}/digest"][i] = np.frombuffer(record_digest(view, i, np.asarray(group[f"{view}/fingerprint"][i]).tobytes(), stored), np.uint8)
    r = run_cli("verify", out, "--samples", "36")
    assert r.exit_code == 1, r.output
    assert "1 samples beyond tolerance" in r.stdout and f"beyond      head/values: view {view}, sample {i} (" in r.stdout, r.stdout
    assert "0 not of their view and sample" in r.stdout


def test_verify_checks_root_attributes(tmp_path, sealed):
    out = _copy(sealed, tmp_path)
    assert run_cli("verify", out, "--samples", "2").exit_code == 0
    group = zarr.open_group(str(out), mode="r+")
    teacher = dict(group.attrs["teacher"])
    teacher["names"] = [teacher["names"][1], teacher["names"][0], *teacher["names"][2:]]
    group.attrs["teacher"] = teacher
    r = run_cli("verify", out, "--samples", "2")
    assert r.exit_code == 1, r.output
    assert "contradicts teacher.names vs data.names" in r.stdout
    assert "contradicts teacher.names: the store says ['disc', 'square', 'bar'], the teacher has ['square', 'disc', 'bar']" in r.stdout
    assert "verify: FAILED (contradicting attributes)" in r.stdout


# 3. --overwrite removes only what a store can hold ------------------------------------------------------------


def test_overwrite_refuses_user_files_anywhere_inside_and_touches_nothing(tmp_path, sealed, teacher, dataset):
    out = _copy(sealed, tmp_path)
    (out / "v0" / "notes.txt").write_text("precious\n")
    (out / "v1" / "head" / "mine").mkdir()
    (out / "v1" / "head" / "mine" / "data.bin").write_bytes(b"precious")
    (out / "v0" / "head" / "values" / "c" / "link").symlink_to(tmp_path)
    before = tree_hashes(out)
    r = run_cli("dump", "--teacher", teacher, "--data", dataset, "--out", out, *DUMP, "--seed", "5", "--overwrite")
    assert_clean_error(r, "v0/head/values/c/link", "and 2 more", "nothing was removed")
    assert tree_hashes(out) == before
    for extra in ("v0/notes.txt", "v1/head/mine/data.bin", "v0/head/values/c/link"):
        (out / extra).unlink()
    (out / "v1" / "head" / "mine").rmdir()
    r = run_cli("dump", "--teacher", teacher, "--data", dataset, "--out", out, *DUMP, "--seed", "5", "--overwrite")
    assert r.exit_code == 0, r.output
    assert zarr.open_group(str(out), mode="r").attrs["augment"]["seed"] == 5


def test_a_symlinked_out_writes_the_folder_it_names(tmp_path, sealed, teacher, dataset):
    real = _copy(sealed, tmp_path, "real.zarr")
    link = tmp_path / "link.zarr"
    link.symlink_to(real)
    r = run_cli("dump", "--teacher", teacher, "--data", dataset, "--out", link, *DUMP, "--seed", "4", "--overwrite")
    assert r.exit_code == 0, r.output
    assert link.is_symlink() and zarr.open_group(str(real), mode="r").attrs["augment"]["seed"] == 4
    assert run_cli("info", link).exit_code == 0


# 4. creation that fails or is killed never blocks a rerun --------------------------------------------------------


def test_a_failed_creation_leaves_nothing_and_the_same_command_then_works(tmp_path, teacher, dataset, monkeypatch):
    out = tmp_path / "c.zarr"
    argv = ["dump", "--teacher", teacher, "--data", dataset, "--out", out, *DUMP]
    real = store.ensure_arrays

    def full_disk(group, attrs, layout):
        real(group, attrs, layout)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store, "ensure_arrays", full_disk)
    assert_clean_error(run_cli(*argv), out, "creating the store failed", "No space left on device")
    assert not out.exists() and not store.staging_path(out).exists()
    monkeypatch.setattr(store, "ensure_arrays", real)
    assert run_cli(*argv).exit_code == 0
    assert run_cli("verify", out, "--samples", "2").exit_code == 0


def test_a_creation_killed_midway_is_cleared_by_the_same_command(tmp_path, teacher, dataset):
    """What a kill at any moment of creation leaves: a half-built staging folder beside --out."""
    out = tmp_path / "c.zarr"
    argv = ["dump", "--teacher", teacher, "--data", dataset, "--out", out, *DUMP]
    assert run_cli(*argv).exit_code == 0
    staging = store.staging_path(out)
    shutil.copytree(out, staging)
    shutil.rmtree(staging / "v1")
    (staging / "zarr.0123456789abcdef0123456789abcdef.partial").write_text("{")  # a root write cut short
    shutil.rmtree(out)
    assert run_cli("info", out).exit_code == 2  # nothing at --out yet
    r = run_cli(*argv)
    assert r.exit_code == 0, r.output
    assert not staging.exists()
    assert run_cli("verify", out, "--samples", "2").exit_code == 0


def test_a_full_disk_during_creation_then_more_space(tmp_path, teacher, dataset):
    """A real small filesystem: creation runs out of space, then the same command resumes after a remount."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        out = disk / "c.zarr"
        argv = ["dump", "--teacher", teacher, "--data", dataset, "--out", out, *DUMP]
        assert_clean_error(run_cli(*argv), out, "No space left on device")
        assert sorted(p.name for p in disk.iterdir() if not p.name.endswith(".lock")) == []
        subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)
        r = run_cli(*argv)
        assert r.exit_code == 0, r.output
        assert run_cli("verify", out, "--samples", "2").exit_code == 0
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


# 6. damaged stores end in one line ------------------------------------------------------------------------------


def test_a_truncated_array_metadata_file_is_one_line(tmp_path, sealed, dataset):
    out = _copy(sealed, tmp_path)
    meta = out / "v0" / "head" / "values" / "zarr.json"
    meta.write_bytes(meta.read_bytes()[:40])
    assert_clean_error(run_cli("verify", out, "--samples", "2"), "v0/head/values/zarr.json", "cannot be read", "damaged")


def test_a_deleted_done_folder_is_one_line(tmp_path, sealed, dataset):
    out = _copy(sealed, tmp_path)
    shutil.rmtree(out / "v1" / "done")
    assert_clean_error(run_cli("verify", out, "--samples", "2"), "v1/done is missing", "damaged")
    r = run_cli("train", "--student", "yolov8n.yaml", "--data", dataset, "--cache", out, "--epochs", "1",
                "--device", "cpu", "--project", tmp_path / "runs")
    assert_clean_error(r, "v1/done is missing")


