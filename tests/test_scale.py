"""Reliability and scale: several ranks, fsspec URLs, crashes, full disks, locks, damaged chunks."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
import zarr

from softlabel.cache.reader import CacheReader
from test_dump import _done_shards as _done
from test_dump import arrays_of, dump_args

SMALL = ["--shard-size", "2", "--batch", "3"]  # batches straddle shards: ranks and resumes must still agree



@pytest.fixture(scope="module")
def reference(tmp_path_factory, dataset, teacher):
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    r = run_cli(*dump_args(teacher, dataset, out, *SMALL))
    assert r.exit_code == 0, r.output
    return out


def _assert_same(a_path, b_path):
    a, b = arrays_of(a_path), arrays_of(b_path)
    assert a.keys() == b.keys()
    for key in a:
        assert np.array_equal(a[key], b[key]), key


@pytest.mark.slow
def test_two_ranks_write_the_same_store_as_one(tmp_path, dataset, teacher, reference):
    out = tmp_path / "ranks.zarr"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
           "-m", "softlabel", *dump_args(teacher, dataset, out, *SMALL)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same(out, reference)
    attrs = zarr.open_group(str(out), mode="r").attrs
    assert attrs["format"] == "softlabel-cache" and "creating" not in attrs
    assert not Path(f"{out}.lock").exists()


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_fsspec_urls(tmp_path, dataset, teacher, reference, scheme):
    url = f"memory://softlabel-test/{tmp_path.name}.zarr" if scheme == "memory" else f"file://{tmp_path}/u.zarr"
    r = run_cli(*dump_args(teacher, dataset, url, *SMALL))
    assert r.exit_code == 0, (r.output, r.exception)
    info = run_cli("info", url, "--json")
    assert info.exit_code == 0 and json.loads(info.stdout)["complete"] is True
    reader, ref = CacheReader(url), CacheReader(str(reference))
    for view, i in (("v0", 0), ("v1", 7), ("c0", 11)):
        a, b = reader.read(view, i), ref.read(view, i)
        assert a.fingerprint == b.fingerprint and np.array_equal(a.head, b.head)
    again = run_cli(*dump_args(teacher, dataset, url, *SMALL))
    assert again.exit_code == 0 and "0 sample-views written" in again.stdout


@pytest.mark.slow
def test_five_sigkills_then_resume_equals_uninterrupted(tmp_path, dataset, teacher, reference):
    out = tmp_path / "killed.zarr"
    cmd = [sys.executable, "-m", "softlabel", *dump_args(teacher, dataset, out, *SMALL)]
    rng = np.random.default_rng()
    total = 18  # 3 views x 6 shards
    kills, progress = 0, []
    for attempt in range(6):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if attempt == 0:
            time.sleep(float(rng.uniform(0.5, 3.0)))  # somewhere in start-up or store creation
        else:
            target = min(total - 1, _done(out) + int(rng.integers(1, 3)))
            deadline = time.time() + 120
            while _done(out) < target and proc.poll() is None and time.time() < deadline:
                time.sleep(0.01)
            time.sleep(float(rng.uniform(0, 0.05)))  # mid-shard, mid-write or between shards
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        progress.append(_done(out))
    assert kills >= 5, f"only {kills} kills landed before the dump finished ({progress})"
    resumed = subprocess.run(cmd, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _assert_same(out, reference)


def test_full_disk_stops_cleanly_and_resumes(tmp_path, dataset, teacher, reference, monkeypatch):
    from zarr.storage import LocalStore

    real_set = LocalStore.set

    async def failing_set(self, key, value):
        if key.startswith("v1/head/p3/c/3/"):  # the disk fills up while shard 3 of view v1 is written
            raise OSError(errno.ENOSPC, "No space left on device")
        return await real_set(self, key, value)

    out = tmp_path / "full.zarr"
    monkeypatch.setattr(LocalStore, "set", failing_set)
    r = run_cli(*dump_args(teacher, dataset, out, *SMALL))
    assert r.exit_code == 2, (r.output, r.exception)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "No space left on device" in lines[0] and "shard 3 of view v1" in lines[0]
    done = zarr.open_group(str(out), mode="r")["v1/done"][:]
    assert done[3] == 0 and np.asarray(zarr.open_group(str(out), mode="r")["v0/done"][:]).all()
    monkeypatch.setattr(LocalStore, "set", real_set)
    again = run_cli(*dump_args(teacher, dataset, out, *SMALL))
    assert again.exit_code == 0, again.output
    _assert_same(out, reference)


def _hold_lock(out: Path) -> subprocess.Popen:
    """Another process holding the dump lock of `out`, as a running dump does."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from softlabel.cache.lock import DumpLock\n"
         "lock = DumpLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)", str(out)],
        stdout=subprocess.PIPE, text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_live_lock_refuses_a_second_dump_and_a_dead_one_does_not(tmp_path, dataset, teacher):
    out = tmp_path / "locked.zarr"
    lock = Path(f"{out}.lock")
    holder = _hold_lock(out)
    try:
        r = run_cli(*dump_args(teacher, dataset, out, *SMALL))
        assert r.exit_code == 2 and f"pid {holder.pid}" in r.stderr and "another dump" in r.stderr
        assert not out.exists()
    finally:
        holder.kill()  # SIGKILL: no release runs, the kernel drops the lock
        holder.wait()
    assert lock.exists()
    r = run_cli(*dump_args(teacher, dataset, out, *SMALL))  # the holder died: its lock died with it
    assert r.exit_code == 0, r.output
    assert not lock.exists()
    # a file left by a crash names a holder that no longer holds it, whatever its host or age
    lock.write_text(json.dumps({"host": "some-other-host", "pid": 1, "started": time.time(), "heartbeat": time.time()}))
    assert run_cli(*dump_args(teacher, dataset, out, *SMALL)).exit_code == 0
    assert not lock.exists()


@pytest.mark.slow
def test_second_dump_into_a_running_dump_is_refused(tmp_path, dataset, teacher):
    out = tmp_path / "busy.zarr"
    proc = subprocess.Popen([sys.executable, "-m", "softlabel", *dump_args(teacher, dataset, out, "--shard-size", "1", "--batch", "1")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while _done(out) < 1 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "the first dump ended too soon"
        r = run_cli(*dump_args(teacher, dataset, out, "--shard-size", "1", "--batch", "1"))
        assert r.exit_code == 2 and "another dump" in r.stderr
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_two_trainings_read_one_store_at_once(tmp_path, dataset, reference):
    procs = [
        subprocess.Popen([sys.executable, "-m", "softlabel", "train", "--student", "yolov8n", "--cache", str(reference),
                          "--data", str(dataset), "--epochs", "1", "--close-mosaic", "0", "--batch", "4", "--device", "cpu",
                          "--project", str(tmp_path / "runs"), "--name", f"r{k}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for k in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    for k in range(2):
        assert (tmp_path / "runs" / f"r{k}" / "weights" / "best.pt").is_file()


def test_train_stops_on_a_damaged_chunk_naming_sample_and_tensor(tmp_path, dataset, reference):
    bad = tmp_path / "bad.zarr"
    shutil.copytree(reference, bad)
    shard = bad / "v0" / "feat" / "p4" / "c" / "2" / "0" / "0" / "0"  # samples 4 and 5
    data = bytearray(shard.read_bytes())
    data[30] ^= 0x01
    shard.write_bytes(bytes(data))
    r = run_cli("train", "--student", "yolov8n.yaml", "--cache", bad, "--data", dataset, "--epochs", 1, "--close-mosaic", 0,
                "--batch", 12, "--device", "cpu", "--project", tmp_path / "runs")
    assert r.exit_code == 2, (r.output[-2000:], r.exception)
    line = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(line) == 1 and "v0/feat/p4 sample 4" in line[0] and "damaged" in line[0]


def test_train_refuses_a_newer_schema(tmp_path, dataset, reference):
    newer = tmp_path / "newer.zarr"
    shutil.copytree(reference, newer)
    zarr.open_group(str(newer), mode="r+").attrs["schema_version"] = 7
    r = run_cli("train", "--student", "yolov8n", "--cache", newer, "--data", dataset, "--epochs", 1)
    assert r.exit_code == 2 and "schema version 7" in r.stderr
