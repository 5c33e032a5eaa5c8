"""The store lock: one dump at a time, never alongside a training, never stuck after a crash."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest

from conftest import assert_clean_error, run_cli
from softlabel.cache import store
from softlabel.cache.lock import DumpLock, ReadLock
from softlabel.errors import UserError
from test_bad_input import tree_hashes
from test_dump import dump_args

FORK = mp.get_context("fork")  # starts in milliseconds, so many contenders really meet at the barrier
ROUNDS, CONTENDERS = 20, 8  # 160 process starts per race
HOLD = 0.03  # long enough for a second holder, were there one, to be seen inside


def _contend(location: str, barrier, inside, doubles, results) -> None:
    """One racer: acquire at the barrier; while holding, count who else is inside."""
    try:
        barrier.wait(timeout=60)
        try:
            lock = DumpLock(location).acquire()
        except UserError as e:
            results.put(("refused", str(e)))
            return
        with inside.get_lock():
            inside.value += 1
            if inside.value > 1:
                doubles.value += 1
        time.sleep(HOLD)
        with inside.get_lock():
            inside.value -= 1
        lock.release()
        results.put(("held", ""))
    except BaseException:
        results.put(("error", traceback.format_exc()))


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _leave_a_crashed_lock(lock_path: Path) -> None:
    """What a holder killed mid-dump leaves behind: the file, naming a pid that is gone."""
    now = time.time()
    lock_path.write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(), "started": now - 60, "heartbeat": now - 60}))


def _race(location: Path, leftover: bool) -> dict[str, list[str]]:
    inside, doubles = FORK.Value("i", 0), FORK.Value("i", 0)
    seen: dict[str, list[str]] = {"held": [], "refused": [], "error": []}
    for _ in range(ROUNDS):
        if leftover:
            _leave_a_crashed_lock(Path(f"{location}.lock"))
        barrier, results = FORK.Barrier(CONTENDERS), FORK.SimpleQueue()
        procs = [FORK.Process(target=_contend, args=(str(location), barrier, inside, doubles, results)) for _ in range(CONTENDERS)]
        for p in procs:
            p.start()
        outcomes = [results.get() for _ in procs]
        for p in procs:
            p.join(timeout=30)
            assert p.exitcode == 0
        for kind, text in outcomes:
            seen[kind].append(text)
        assert any(kind == "held" for kind, _ in outcomes), outcomes  # someone always gets it
        assert not Path(f"{location}.lock").exists()  # the last holder out removed it
    seen["doubles"] = [str(doubles.value)]
    return seen


def _assert_one_holder_at_a_time(seen: dict[str, list[str]]) -> None:
    assert seen["error"] == [], seen["error"][0]
    assert seen["doubles"] == ["0"], f"{seen['doubles'][0]} holders found another one inside"
    assert len(seen["held"]) + len(seen["refused"]) == ROUNDS * CONTENDERS
    for message in seen["refused"]:
        assert "another dump (pid" in message and "wait for it to finish" in message, message


def test_simultaneous_dumps_never_both_hold_the_lock(tmp_path):
    _assert_one_holder_at_a_time(_race(tmp_path / "race.zarr", leftover=False))


def test_simultaneous_dumps_over_a_crashed_holders_lock_never_both_hold_it(tmp_path):
    _assert_one_holder_at_a_time(_race(tmp_path / "race.zarr", leftover=True))


def _hold(kind: str, location: str, ready, stop) -> None:
    lock = (DumpLock if kind == "dump" else ReadLock)(location).acquire()
    ready.set()
    stop.wait(60)
    lock.release()


class _Holder:
    """A lock held by another process, until released or killed."""

    def __init__(self, kind: str, location):
        self.ready, self.stop = FORK.Event(), FORK.Event()
        self.proc = FORK.Process(target=_hold, args=(kind, str(location), self.ready, self.stop))
        self.proc.start()
        assert self.ready.wait(30), "the holder never got the lock"
        self.pid = self.proc.pid

    def release(self) -> None:
        self.stop.set()
        self.proc.join(30)
        assert self.proc.exitcode == 0

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        self.proc.join(30)


def test_a_killed_holders_lock_is_free_at_once(tmp_path):
    location = tmp_path / "c.zarr"
    holder = _Holder("dump", location)
    try:
        with pytest.raises(UserError, match=rf"another dump \(pid {holder.pid} on {socket.gethostname()}, since "):
            DumpLock(location).acquire()
    finally:
        holder.kill()
    assert Path(f"{location}.lock").exists()  # killed while holding: the file stays, the kernel lock does not
    start = time.monotonic()
    with DumpLock(location):
        assert time.monotonic() - start < 1
        record = json.loads(Path(f"{location}.lock").read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    assert not Path(f"{location}.lock").exists()


def test_a_training_keeps_dumps_out_and_a_dump_keeps_trainings_out(tmp_path):
    location = tmp_path / "c.zarr"
    reader = _Holder("read", location)
    try:
        with pytest.raises(UserError) as refused:
            DumpLock(location).acquire()
        message = str(refused.value)
        assert f"{location}: the store is being read by a running 'softlabel train'" in message
        assert f"{location}.lock" in message and "wait for it to finish" in message
        with ReadLock(location), ReadLock(location):  # trainings read side by side
            pass
    finally:
        reader.release()
    assert not Path(f"{location}.lock").exists()  # the last reader out removed it

    dump = _Holder("dump", location)
    try:
        with pytest.raises(UserError) as refused:
            ReadLock(location).acquire()
        message = str(refused.value)
        assert f"{location}: the store is being written by a running 'softlabel dump' (pid {dump.pid} on {socket.gethostname()}" in message
        assert "wait for it to finish" in message
    finally:
        dump.release()
    with ReadLock(location):  # the dump ended: reading may start
        assert Path(f"{location}.lock").exists()


def test_url_stores_keep_the_best_effort_lock(tmp_path):
    url = f"memory://softlabel-lock-test/{tmp_path.name}.zarr"
    with DumpLock(url):
        with pytest.raises(UserError, match="another dump"):
            DumpLock(url).acquire()
        with ReadLock(url):  # no locks on an object store: reading is not guarded
            pass
    with DumpLock(url):
        pass


# the command line ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nested(tmp_path_factory, dataset, teacher):
    out = tmp_path_factory.mktemp("lock") / "new" / "sub" / "c.zarr"
    r = run_cli(*dump_args(teacher, dataset, out))
    assert r.exit_code == 0, r.output + str(r.exception)
    return out


def test_dump_under_missing_folders_makes_them(nested):
    assert store.exists(str(nested))
    assert not Path(f"{nested}.lock").exists()


def test_refused_dump_leaves_no_folders_behind(tmp_path, nested, dataset, teacher):
    holder = _Holder("dump", tmp_path / "a" / "b" / "c.zarr")  # makes a/b
    try:
        r = run_cli(*dump_args(teacher, dataset, tmp_path / "a" / "b" / "c.zarr"))
        assert_clean_error(r, f"pid {holder.pid}", "another dump")
    finally:
        holder.release()
    assert not (tmp_path / "a").exists()  # nothing was written there: the holder's folders went with it


def test_overwrite_under_a_running_training_is_refused_and_deletes_nothing(nested, dataset, teacher):
    before = tree_hashes(nested)
    reader = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from softlabel.cache.lock import ReadLock\n"
         "lock = ReadLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)", str(nested)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert reader.stdout.readline().strip() == "held"
        r = run_cli(*dump_args(teacher, dataset, nested, "--overwrite"))
        assert_clean_error(r, str(nested), "being read by a running 'softlabel train'", "wait for it to finish")
        assert tree_hashes(nested) == before
    finally:
        reader.kill()
        reader.wait()
    with DumpLock(nested):  # the reader died: its lock went with it
        pass


def _train(cache, dataset, tmp_path):
    return ["train", "--student", "yolov8n.yaml", "--data", dataset, "--cache", cache, "--epochs", "1", "--device", "cpu",
            "--project", tmp_path / "runs"]


def test_training_a_store_a_dump_is_writing_is_refused(tmp_path, nested, dataset):
    holder = _Holder("dump", nested)
    try:
        r = run_cli(*_train(nested, dataset, tmp_path))
        assert_clean_error(r, str(nested), "being written by a running 'softlabel dump'", f"pid {holder.pid}")
    finally:
        holder.release()
    assert not (tmp_path / "runs").exists()


def test_training_holds_the_read_lock_throughout(tmp_path, nested, dataset, monkeypatch):
    import softlabel.train
    from ultralytics.models.yolo.detect import DetectionTrainer

    from softlabel.train.trainer import DistillTrainer

    def refused_dump() -> str:
        with pytest.raises(UserError) as e:
            DumpLock(nested).acquire()
        return str(e.value)

    calls = []
    monkeypatch.setattr(softlabel.train, "train_students", lambda students, settings, **args: calls.append(refused_dump()) or [])
    r = run_cli(*_train(nested, dataset, tmp_path))
    assert r.exit_code == 0, r.output + str(r.exception)
    assert len(calls) == 1 and "being read by a running 'softlabel train'" in calls[0]
    assert not Path(f"{nested}.lock").exists()

    def failing_train(self):  # the trainer itself (the demo and the Python API reach it without the CLI)
        calls.append(refused_dump())
        raise RuntimeError("training failed")

    monkeypatch.setattr(DetectionTrainer, "train", failing_train)
    trainer = DistillTrainer.__new__(DistillTrainer)
    trainer.cache = str(nested)
    with pytest.raises(RuntimeError, match="training failed"):
        trainer.train()
    assert "being read by a running 'softlabel train'" in calls[1]
    with DumpLock(nested):  # released on the error too
        pass
