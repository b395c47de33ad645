"""One job per run directory: an OS advisory lock held for the job's life.

`fcntl.flock` is released by the kernel when the holding process dies, so a killed job
never leaves a stale lock behind; the lock file only records who holds it, for the
message a second job gets.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from tokdist_ray.errors import RunConflictError

LOCK_FILE = ".tokdist.lock"


class RunDirLock:
    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.path = run_dir / LOCK_FILE
        self._file = None

    def __enter__(self) -> "RunDirLock":
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            f = open(self.path, "a+", encoding="utf-8")
        except OSError as e:  # read-only, a file in the way, no permission
            raise RunConflictError(
                f"run_dir {self.run_dir} cannot be written ({e.strerror or e}); name a writable directory (--run_dir ...)"
            ) from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = _describe(f.read())
            f.close()
            raise RunConflictError(
                f"run_dir {self.run_dir} is in use by another job ({holder}); wait for that job to finish "
                "(or stop it), or give this job its own run_dir (--run_dir ...)"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
        f.flush()
        self._file = f
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()


def _describe(record: str) -> str:
    try:
        holder = json.loads(record)
        return f"pid {holder['pid']} on {holder['host']}, since {holder['since']}"
    except (ValueError, KeyError, TypeError):
        return "pid unknown: it has not written its name yet"
