"""An exclusive lock per run folder, so two workers (threads, processes, Ray tasks, nodes) never train one run.

The lock is `fcntl.flock` on `<run>/.lock`. The kernel drops it when its holder dies, however it
dies (SIGKILL included), so a dead holder never leaves a stale lock: the file stays, the lock does
not. The file records who holds it (host, pid, since) for the error message. flock works across
processes of one machine and, on Linux NFS clients (2.6.12+), across machines that share the folder.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_FILE = ".lock"


class RunLocked(RuntimeError):
    """Another live process holds the run folder's lock; the message names it."""


class RunLock:
    """`with RunLock(run_dir):` holds `run_dir/.lock` exclusively for the block.

    Args:
        run_dir: the run folder (created if missing).
        timeout_s: how long to wait for a held lock; 0 fails at once, None waits for ever.

    Raises:
        RunLocked: on entry, when the lock is still held after `timeout_s`.
    """

    def __init__(self, run_dir: str | Path, timeout_s: float | None = 0.0, poll_s: float = 0.2) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.timeout_s, self.poll_s = timeout_s, poll_s
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # one open file description per holder: flock locks of two opens in one process conflict too
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        deadline = None if self.timeout_s is None else time.monotonic() + self.timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise OSError(e.errno, f"cannot lock {self.path}: {e.strerror}") from None
                if deadline is not None and time.monotonic() >= deadline:
                    os.close(fd)
                    raise RunLocked(
                        f"{self.path.parent} is being trained by another process ({describe_holder(self.path)}); "
                        f"wait for it to finish, or stop that process (its lock goes with it)"
                    ) from None
                time.sleep(self.poll_s)
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "since": round(time.time(), 1)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # the owner line goes first: a reader never sees a released lock's owner
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def lock_holder(run_dir: str | Path) -> dict | None:
    """{host, pid, since} of the process holding `run_dir`'s lock, or None when nobody holds it."""
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # we got it: nobody holds the exclusive lock
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        except OSError:
            pass
        text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    finally:
        os.close(fd)
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {"host": "?", "pid": None, "since": None}  # taken a moment ago, owner line not yet written


def describe_holder(path: Path) -> str:
    holder = lock_holder(path.parent) or {}
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"
