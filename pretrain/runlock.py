"""One training job per run folder: rank 0 holds an exclusive lock on `run_dir/.lock` while it trains.

A second job pointed at the same folder would interleave checkpoints and metrics with the first, so it
is refused with who holds the folder. The lock is a kernel `flock`: it is released when its holder
exits in any way (a crash or SIGKILL too), so a job requeued by SLURM, or a command run again after a
failure, takes it back at once. Where the old incarnation of the same SLURM job still holds it (its
processes not yet reaped on this node), the new one waits for it rather than refusing.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from ssmforge.errors import ConfigError

LOCK_FILE = ".lock"
SAME_JOB_WAIT_S = 120.0  # how long a requeued job waits for its previous incarnation to let go


class RunLock:
    """Exclusive lock on a run folder, held from `acquire()` until `release()` or process exit."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def holder(self) -> dict:
        """What the current holder wrote: host, pid, SLURM job id (empty dict if unreadable)."""
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self, env: dict | None = None) -> None:
        """Take the lock or raise ConfigError naming the folder and its holder."""
        env = os.environ if env is None else env
        job = env.get("SLURM_JOB_ID", "")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = None
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = self.holder()
                if job and holder.get("slurm_job_id") == job:
                    deadline = deadline or time.monotonic() + SAME_JOB_WAIT_S
                    if time.monotonic() < deadline:
                        time.sleep(1.0)
                        continue
                os.close(fd)
                who = ", ".join(f"{k} {v}" for k, v in holder.items() if v) or "another process"
                raise ConfigError(f"run_dir={self.path.parent} is in use by a running job ({who}); "
                                  f"wait for it, stop it, or choose another run_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": job}).encode())
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
