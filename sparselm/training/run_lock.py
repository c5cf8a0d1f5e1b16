"""One run per output directory: an exclusive OS lock on ``<out_dir>/.lock`` held by global rank 0.

``fcntl.flock`` locks belong to the open file, so the kernel releases them when the process ends however it
ends (``kill -9`` included): a requeued job is never blocked by the job it replaces, while a second run
started on the same directory (a double submission, a requeue racing a stuck job) stops at start-up.  The
file holds who has it (host, pid, start time) for the message; its presence alone means nothing.  flock
works across nodes on NFSv4 and on Lustre mounted with ``-o flock``.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from sparselm.errors import ConfigError

LOCK_FILE = ".lock"
_HELD: dict[str, tuple[int, bool]] = {}
"""Lock path -> (file descriptor, whether acquiring created the directory), for the locks this process holds."""


def acquire(out_dir: str | Path) -> Path:
    """Take the lock of ``out_dir`` (created if missing) or raise ConfigError naming the run that holds it.
    A lock this process already holds (a trainer that was not closed) is taken over."""
    path = Path(out_dir) / LOCK_FILE
    created = not path.parent.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    key = str(path.resolve())
    if key in _HELD:
        release(out_dir)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _describe(os.read(fd, 4096))
        os.close(fd)
        raise ConfigError(f"train.out_dir '{out_dir}' is in use by another run ({holder}); wait for it to end or "
                          "stop it, or choose another --train.out_dir") from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                             "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}).encode() + b"\n")
    os.fsync(fd)
    _HELD[key] = (fd, created)
    return path


def release(out_dir: str | Path, remove_if_created: bool = False) -> None:
    """Give the lock of ``out_dir`` back (a no-op when this process does not hold it).  With
    ``remove_if_created`` (a start-up that failed), a directory that acquiring created and that holds nothing
    but the lock file is removed."""
    path = Path(out_dir) / LOCK_FILE
    fd, created = _HELD.pop(str(path.resolve()), (None, False))
    if fd is None:
        return
    if remove_if_created and created and [p.name for p in path.parent.iterdir()] == [LOCK_FILE]:
        path.unlink()
        path.parent.rmdir()
    else:
        os.ftruncate(fd, 0)
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def _describe(raw: bytes) -> str:
    try:
        info = json.loads(raw.decode())
        return f"host {info['host']}, pid {info['pid']}, started {info['started']}"
    except (ValueError, KeyError, UnicodeDecodeError):
        return "holder unknown"
