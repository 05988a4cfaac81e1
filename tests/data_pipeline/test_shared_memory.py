"""Streaming's shared memory on a node that jobs share: a starting job removes what a killed job left and keeps
what a running job holds."""
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

import pytest
import torch

from ssmforge.data_pipeline.loader import SHARED_MEMORY_DIR, remove_stale_shared_memory

from .test_loader import loader, shards, take  # noqa: F401 (shards is a fixture)

pytestmark = pytest.mark.skipif(not SHARED_MEMORY_DIR.is_dir() or not Path("/proc/self/maps").exists(),
                                reason="shared memory is listed in /dev/shm and /proc on Linux only")

# A job reading 3 batches, then (once `go` exists) 9 more, which it saves.
JOB = """
import sys, time
from pathlib import Path
import torch
from ssmforge.data_pipeline.loader import build_loader

shard_dir, cache_dir, workers, control = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
batches = iter(build_loader(shard_dir, "train", 4, 5, cache_dir, num_workers=workers))
read = [next(batches) for _ in range(3)]
(control / "ready").touch()
while not (control / "go").exists():
    time.sleep(0.05)
read += [next(batches) for _ in range(9)]
torch.save(read, control / "batches.pt")
"""


def start_job(config, control: Path, workers: int = 0) -> subprocess.Popen:
    """A job of its own, with its own temporary folder as SLURM's job_container/tmpfs gives each job: streaming
    keeps lock files there that would otherwise keep a later job off a killed job's prefix numbers."""
    control.mkdir(parents=True)
    (control / "tmp").mkdir()
    proc = subprocess.Popen([sys.executable, "-c", JOB, config.data.shard_dir, config.data.cache_dir, str(workers),
                             str(control)], env={**os.environ, "TMPDIR": str(control / "tmp")}, start_new_session=True)
    deadline = time.time() + 180
    while not (control / "ready").exists():
        assert proc.poll() is None and time.time() < deadline, "the job died or hung before its first batches"
        time.sleep(0.1)
    return proc


def mapped_segments(pid: int) -> dict[str, int]:
    """Path -> inode of the streaming shared memory ("<prefix>_<name>") a process maps."""
    paths = re.findall(rf" ({SHARED_MEMORY_DIR}/\d{{6,}}_[a-z_]+)$", Path(f"/proc/{pid}/maps").read_text(), re.MULTILINE)
    return {path: os.stat(path).st_ino for path in set(paths)}


def still_there(segments: dict[str, int]) -> list[str]:
    """The segments that exist still, the same ones (not new ones of the same name)."""
    return sorted(path for path, inode in segments.items() if os.path.exists(path) and os.stat(path).st_ino == inode)


def test_only_segments_that_no_process_maps_are_removed():
    name = f"{uuid.uuid4().int % 10**9:09}"
    held = SharedMemory(f"{name}_locals", create=True, size=64)  # a running job's, mapped here
    stale = SHARED_MEMORY_DIR / f"{name}_barrier"
    stale.write_bytes(bytes(64))  # a killed job's: nobody maps it
    other = SHARED_MEMORY_DIR / f"{name}_not_streaming"
    other.write_bytes(bytes(64))
    try:
        removed = remove_stale_shared_memory()
        assert stale.name in removed and not stale.exists()
        assert held.name not in removed and (SHARED_MEMORY_DIR / held.name).exists()
        assert other.exists()
    finally:
        held.close()
        held.unlink()
        other.unlink()


def test_only_local_rank_0_removes_stale_segments(monkeypatch):
    from ssmforge.data_pipeline.loader import _remove_stale_shared_memory_on_local_rank_0

    stale = SHARED_MEMORY_DIR / f"{uuid.uuid4().int % 10**9:09}_barrier"
    stale.write_bytes(bytes(64))
    try:
        monkeypatch.setenv("LOCAL_RANK", "1")
        _remove_stale_shared_memory_on_local_rank_0()
        assert stale.exists()
        monkeypatch.setenv("LOCAL_RANK", "0")
        _remove_stale_shared_memory_on_local_rank_0()
        assert not stale.exists()
    finally:
        stale.unlink(missing_ok=True)


@pytest.mark.slow
def test_a_starting_job_keeps_a_running_jobs_shared_memory_and_removes_a_killed_ones(shards, tmp_path):
    expected = take(loader(shards, workers=2), 12)
    jobs = {}
    try:
        jobs["running"] = start_job(shards, tmp_path / "running", workers=2)
        jobs["killed"] = start_job(shards, tmp_path / "killed")
        running = mapped_segments(jobs["running"].pid)
        # a job maps the segments of the prefixes that streaming walked past to find a free one
        killed = {path: inode for path, inode in mapped_segments(jobs["killed"].pid).items() if path not in running}
        assert len(running) >= 6 and len(killed) >= 6  # locals, barrier, next_epoch, cache_usage, shard_states, ...
        # as SLURM ends a job: every process of it, Python's resource tracker too (which would unlink the segments)
        os.killpg(jobs["killed"].pid, signal.SIGKILL)
        jobs["killed"].wait(timeout=60)
        assert still_there(killed) == sorted(killed)  # left behind

        jobs["starting"] = start_job(shards, tmp_path / "starting")
        assert still_there(killed) == []
        assert still_there(running) == sorted(running)
        for name in ("running", "starting"):
            (tmp_path / name / "go").touch()
            assert jobs[name].wait(timeout=180) == 0
            read = torch.load(tmp_path / name / "batches.pt")
            assert all(torch.equal(a, b) for a, b in zip(read, expected, strict=True)), name
    finally:
        for job in jobs.values():
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
