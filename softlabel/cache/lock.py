"""One dump job per store: a lock beside the store that a crash cannot leave blocking.

The lock (`<store>.lock`) names its holder's host and pid and carries a heartbeat the holder
refreshes. It is stale, and taken over, when its holder's pid is gone on this host, or when its
heartbeat is older than STALE_AFTER seconds (a holder on another machine that stopped beating).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass

import fsspec
from fsspec.implementations.local import LocalFileSystem

from softlabel.errors import UserError

HEARTBEAT_EVERY = 10.0
STALE_AFTER = 120.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class _Holder:
    host: str
    pid: int
    started: float
    heartbeat: float

    def stale(self, now: float) -> bool:
        if self.host == socket.gethostname():
            return not _pid_alive(self.pid)
        return now - self.heartbeat > STALE_AFTER


class DumpLock:
    def __init__(self, location: str):
        self.url = f"{str(location).rstrip('/')}.lock"
        self.fs, self.path = fsspec.core.url_to_fs(self.url)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}

    def _read(self) -> _Holder | None:
        try:
            raw = json.loads(self.fs.cat_file(self.path))
            return _Holder(raw["host"], int(raw["pid"]), float(raw["started"]), float(raw["heartbeat"]))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):  # a lock cut short by a crash while being written
            return _Holder("?", -1, 0.0, 0.0)

    def _write(self, exclusive: bool) -> bool:
        data = json.dumps({**self._record, "heartbeat": time.time()}).encode()
        if exclusive and isinstance(self.fs, LocalFileSystem):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        if exclusive and self.fs.exists(self.path):  # object stores: best effort, no atomic create
            return False
        self.fs.pipe_file(self.path, data)
        return True

    def acquire(self) -> "DumpLock":
        for _ in range(2):
            if self._write(exclusive=True):
                self._start_heartbeat()
                return self
            holder = self._read()
            if holder is None:
                continue
            if holder.stale(time.time()):
                self.fs.rm_file(self.path)  # a dead holder: take over, the store resumes from its done flags
                continue
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.started))
            raise UserError(
                f"{self.url}: another dump (pid {holder.pid} on {holder.host}, since {since}) is writing this store; "
                "wait for it to finish (a crashed dump's lock is taken over automatically)"
            )
        raise UserError(f"{self.url}: could not take the dump lock")

    def _start_heartbeat(self) -> None:
        def beat():
            while not self._stop.wait(HEARTBEAT_EVERY):
                try:
                    self._write(exclusive=False)
                except OSError:
                    pass  # a missed beat only makes the lock look older

        self._thread = threading.Thread(target=beat, name="softlabel-lock", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        holder = self._read()
        if holder is not None and holder.pid == os.getpid() and holder.host == socket.gethostname():
            self.fs.rm_file(self.path)
