"""One writer or many readers per store: a lock file beside the store, `<store>.lock`.

Local stores (plain paths and file:// URLs) use a kernel lock, flock(2), on that file. A dump
(DumpLock) holds it exclusively and writes its host, pid and start time into it, so a refused
command can say who holds it; each training (ReadLock) holds it shared, so several trainings read
one store at once while no dump can write or remove it under them. The kernel drops a flock when
its holder dies, so a crash never leaves a lock that blocks: a file left behind is just locked
again. Whoever releases the last lock removes the file while still holding it; an acquirer
therefore checks, once locked, that the path still names the file it locked, and starts over if
not (it had opened the file just before it was removed). On NFS, Linux maps flock onto NFS
byte-range locks, which hold across hosts; file systems without locks make acquiring fail.

Object-store URLs (s3://, gs://, memory://, ...) have neither locks nor an atomic create: there the
dump lock is best effort only. It is an object naming its holder, with a heartbeat the holder
refreshes; it is taken over when its holder's pid is gone on this host or its heartbeat is older
than STALE_AFTER seconds. Two dumps starting within moments of each other may both proceed, and
reading is not guarded (ReadLock does nothing there).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import fsspec

from softlabel.cache.store import local_path
from softlabel.errors import UserError

HEARTBEAT_EVERY = 10.0
STALE_AFTER = 120.0
RECORD_WAIT = 1.0  # how long a refused acquirer waits for the holder to write its record, or to leave
_RETRIES = 100


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _since(started: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))


def _lock_path(location: str) -> tuple[str, Path | None]:
    """(the lock's name for messages, its local path or None for an object-store URL)."""
    location = str(location).rstrip("/")
    local = local_path(location)
    return f"{location}.lock", (Path(f"{local}.lock") if local is not None else None)


# -- local stores: flock -------------------------------------------------------------------------


def _same_file(path: Path, fd: int) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_ino, st.st_dev) == (own.st_ino, own.st_dev)


def _lock(path: Path, how: int) -> int | None:
    """A descriptor of the file at `path` holding flock `how`, or None while a holder conflicts."""
    for _ in range(_RETRIES):
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, how | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        if _same_file(path, fd):
            return fd
        os.close(fd)  # its holder removed this file on release: lock the one the path names now
    raise OSError(errno.EAGAIN, "the lock file kept being replaced")


def _unlock(path: Path, fd: int, remove: bool) -> None:
    """Close `fd`; first remove the file if asked and no one else holds it (it is then ours alone)."""
    try:
        if remove and _same_file(path, fd):
            path.unlink()
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)


def _parse_record(raw: bytes) -> dict | None:
    try:
        record = json.loads(raw)
        return {"host": str(record["host"]), "pid": int(record["pid"]), "started": float(record["started"])}
    except (ValueError, KeyError, TypeError):
        return None


def _current(record: dict | None) -> bool:
    """A record the holder wrote, not one a crashed holder left in the file before it was locked again."""
    if record is None:
        return False
    return record["host"] != socket.gethostname() or _pid_alive(record["pid"])


FREE, READERS, WRITER = "free", "readers", "writer"


def _who_holds(path: Path) -> tuple[str, dict | None]:
    """Who keeps `path` locked: FREE (no one, by now), READERS, or WRITER with its record if it wrote one."""
    deadline = time.monotonic() + RECORD_WAIT
    readers_seen = 0
    while True:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return FREE, None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                record = _parse_record(os.pread(fd, 4096, 0))
                if _current(record):
                    return WRITER, record
                if time.monotonic() > deadline:
                    return WRITER, None
            else:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    # seen a few times over, so a moment's probe like this one is not taken for a training
                    readers_seen += 1
                    if readers_seen >= 3:
                        return READERS, None
                else:
                    return FREE, None
        finally:
            os.close(fd)
        time.sleep(0.02)  # an exclusive holder between locking and writing its record, or leaving


def _make_parents(folder: Path) -> list[Path]:
    """Create `folder` and any missing folders above it; returns those created, deepest first."""
    made = []
    f = folder
    while not f.exists() and f != f.parent:
        made.append(f)
        f = f.parent
    folder.mkdir(parents=True, exist_ok=True)
    return made


class DumpLock:
    """Held by the one dump writing a store; refused while another dump or any training holds the store."""

    def __init__(self, location: str):
        self.location = str(location).rstrip("/")
        self.url, self._local = _lock_path(self.location)
        self._fd: int | None = None
        self._made: list[Path] = []
        self._record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._held_url = False
        if self._local is None:
            self.fs, self.path = fsspec.core.url_to_fs(self.url)

    def __enter__(self) -> "DumpLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> "DumpLock":
        if self._fd is not None or self._held_url:
            return self
        if self._local is None:
            return self._acquire_url()
        try:
            return self._acquire_local()
        except OSError as e:
            self._remove_made()
            raise UserError(f"{self.url}: cannot take the dump lock: {e.strerror or e}") from None
        except BaseException:
            self._remove_made()
            raise

    def _acquire_local(self) -> "DumpLock":
        path = self._local
        self._made = _make_parents(path.parent)  # `--out new/sub/c.zarr` may name folders not made yet
        for _ in range(_RETRIES):
            try:
                fd = _lock(path, fcntl.LOCK_EX)
            except FileNotFoundError:  # a refused dump removed the folders it had made a moment ago
                self._made = _make_parents(path.parent) or self._made
                continue
            if fd is not None:
                self._record["started"] = time.time()
                data = json.dumps(self._record).encode()
                os.ftruncate(fd, 0)  # a crashed holder's record may still be there
                os.pwrite(fd, data, 0)
                self._fd = fd
                return self
            state, record = _who_holds(path)
            if state == FREE:
                continue
            self._remove_made()
            if state == READERS:
                raise UserError(
                    f"{self.location}: the store is being read by a running 'softlabel train' "
                    f"(or another process holds {path}); wait for it to finish"
                )
            if record is None:
                raise UserError(f"{self.url}: another process holds the dump lock; wait for it to finish")
            raise UserError(
                f"{self.url}: another dump (pid {record['pid']} on {record['host']}, since {_since(record['started'])}) "
                "is writing this store; wait for it to finish (a crashed dump's lock is released automatically)"
            )
        raise UserError(f"{self.url}: could not take the dump lock")

    def _remove_made(self) -> None:
        """Remove the folders acquiring made, if nothing was put in them (a refused dump leaves no trace)."""
        for folder in self._made:
            try:
                folder.rmdir()
            except OSError:
                break
        self._made = []

    def release(self) -> None:
        if self._local is None:
            self._release_url()
            return
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        _unlock(self._local, fd, remove=True)  # removed while still held: no one can hold the file removed
        self._remove_made()

    # -- object stores: best effort ----------------------------------------------------------

    def _read_url(self) -> "_UrlHolder | None":
        try:
            raw = json.loads(self.fs.cat_file(self.path))
            return _UrlHolder(raw["host"], int(raw["pid"]), float(raw["started"]), float(raw["heartbeat"]))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):  # cut short by a crash while being written
            return _UrlHolder("?", -1, 0.0, 0.0)

    def _write_url(self, exclusive: bool) -> bool:
        if exclusive and self.fs.exists(self.path):  # no atomic create-if-absent: a window remains
            return False
        self.fs.pipe_file(self.path, json.dumps({**self._record, "heartbeat": time.time()}).encode())
        return True

    def _acquire_url(self) -> "DumpLock":
        for _ in range(2):
            if self._write_url(exclusive=True):
                self._held_url = True
                self._start_heartbeat()
                return self
            holder = self._read_url()
            if holder is None:
                continue
            if holder.stale(time.time()):
                try:
                    self.fs.rm_file(self.path)  # a dead holder: take over, the store resumes from its done flags
                except FileNotFoundError:
                    pass
                continue
            raise UserError(
                f"{self.url}: another dump (pid {holder.pid} on {holder.host}, since {_since(holder.started)}) "
                "is writing this store; wait for it to finish (a crashed dump's lock is taken over automatically)"
            )
        raise UserError(f"{self.url}: could not take the dump lock")

    def _start_heartbeat(self) -> None:
        def beat():
            while not self._stop.wait(HEARTBEAT_EVERY):
                try:
                    self._write_url(exclusive=False)
                except OSError:
                    pass  # a missed beat only makes the lock look older

        self._thread = threading.Thread(target=beat, name="softlabel-lock", daemon=True)
        self._thread.start()

    def _release_url(self) -> None:
        if not self._held_url:
            return
        self._held_url = False
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        holder = self._read_url()
        if holder is not None and holder.pid == os.getpid() and holder.host == socket.gethostname():
            try:
                self.fs.rm_file(self.path)
            except FileNotFoundError:
                pass


@dataclass
class _UrlHolder:
    host: str
    pid: int
    started: float
    heartbeat: float

    def stale(self, now: float) -> bool:
        if self.host == socket.gethostname():
            return not _pid_alive(self.pid)
        return now - self.heartbeat > STALE_AFTER


class ReadLock:
    """Held by each training reading a store: any number at once, never alongside a dump.

    Forked DataLoader workers inherit the descriptor; that is harmless, the lock belongs to the
    open file and ends when its last descriptor closes.
    """

    def __init__(self, location: str):
        self.location = str(location).rstrip("/")
        self.url, self._local = _lock_path(self.location)
        self._fd: int | None = None

    def __enter__(self) -> "ReadLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> "ReadLock":
        path = self._local
        if path is None or not path.parent.is_dir() or self._fd is not None:
            return self  # an object store has no locks; a missing folder holds no store to read
        for _ in range(_RETRIES):
            try:
                fd = _lock(path, fcntl.LOCK_SH)
            except OSError as e:
                if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                    return self  # a folder this user cannot write to: no lock file here, reading goes unguarded
                raise UserError(f"{self.url}: cannot take the read lock: {e.strerror or e}") from None
            if fd is not None:
                self._fd = fd
                return self
            state, record = _who_holds(path)
            if state != WRITER:
                continue
            if record is None:
                raise UserError(f"{self.location}: another process holds {path} exclusively; wait for it to finish")
            raise UserError(
                f"{self.location}: the store is being written by a running 'softlabel dump' "
                f"(pid {record['pid']} on {record['host']}, since {_since(record['started'])}); wait for it to finish"
            )
        raise UserError(f"{self.url}: could not take the read lock")

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            # the last reader out removes the file, as a dump does: only when it can hold it alone
            # (a failed upgrade drops our shared lock too, which closing does anyway)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return
        _unlock(self._local, fd, remove=True)
