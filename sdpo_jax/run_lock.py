"""One trainer per run folder: an exclusive lock on ``output_dir/.sdpo-train.lock``.

The lock is an advisory `flock` on the file, so the operating system drops it when the holder
exits in any way (also SIGKILL): a stale file never blocks a rerun. The file says who holds it
(host, process id, start time, command), so that a second `sdpo-train` on the same folder can
name the first and stop. On file systems without `flock` (some network mounts) the run goes on
unlocked, with a warning.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from sdpo_jax.errors import RunLocked

LOCK_NAME = ".sdpo-train.lock"


class RunFolderLock:
    """Holds the lock of ``folder`` from `acquire` until `release` (or the process's end)."""

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / LOCK_NAME
        self._file = None

    def acquire(self) -> str | None:
        """Take the lock; `RunLocked` naming the holder when another process has it. Returns a warning
        when the file system cannot lock (the run then goes on unlocked), else None."""
        handle = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                handle.close()
                return (
                    f"{self.path}: the file system cannot lock files ({err.strerror}); "
                    "make sure no other run uses this folder"
                )
            handle.seek(0)
            holder = handle.read().strip()
            handle.close()
            raise RunLocked(
                f"output_dir {self.path.parent} is in use by another sdpo-train ({_describe(holder)}); "
                "wait for it to finish or use another output_dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(
            json.dumps(
                {
                    "host": socket.gethostname(),
                    "pid": os.getpid(),
                    "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                    "command": " ".join(sys.argv),
                }
            )
        )
        handle.flush()
        self._file = handle
        return None

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def _describe(holder: str) -> str:
    try:
        info = json.loads(holder)
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"
