"""Streaming's shared memory on a node that jobs share: a starting job removes what a killed job left and keeps
what a running job holds, and registers its own prefix while no other job does."""
import fcntl
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

import pytest
import torch

from ssmforge.data_pipeline import shared_memory
from ssmforge.data_pipeline.shared_memory import (SHARED_MEMORY_DIR, lock_path, registering_shared_memory,
                                                  remove_stale_shared_memory)

from .test_loader import loader, shards, take  # noqa: F401 (shards is a fixture)

pytestmark = pytest.mark.skipif(not SHARED_MEMORY_DIR.is_dir() or not Path("/proc/self/maps").exists(),
                                reason="shared memory is listed in /dev/shm and /proc on Linux only")

# A job reading 3 batches, then (once `go` exists) 9 more, which it saves.
JOB = """
import logging, sys, time
from pathlib import Path
import torch
from ssmforge.data_pipeline.loader import build_loader

shard_dir, cache_dir, workers, control = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
logging.basicConfig(level=logging.INFO)
batches = iter(build_loader(shard_dir, "train", 4, 5, cache_dir, num_workers=workers))
read = [next(batches) for _ in range(3)]
(control / "ready").touch()
while not (control / "go").exists():
    time.sleep(0.05)
read += [next(batches) for _ in range(9)]
torch.save(read, control / "batches.pt")
"""


def start_job(config, control: Path, workers: int = 0, wait: bool = True) -> subprocess.Popen:
    """A job of its own, with its own temporary folder as SLURM's job_container/tmpfs gives each job: streaming
    keeps lock files there that would otherwise keep a later job off a killed job's prefix numbers. Its log is
    control/log; with `wait`, returns once it has read its first batches."""
    control.mkdir(parents=True)
    # short, as a job's /tmp is: the loader workers' sockets live there and a Unix socket path has ~107 bytes
    job_tmp = tempfile.mkdtemp(prefix="job")
    with (control / "log").open("w") as log:
        proc = subprocess.Popen([sys.executable, "-c", JOB, config.data.shard_dir, config.data.cache_dir,
                                 str(workers), str(control)], env={**os.environ, "TMPDIR": job_tmp},
                                start_new_session=True, stderr=log)
    proc.job_tmp = job_tmp  # removed by the test once the job has ended
    if wait:
        wait_until_ready(proc, control)
    return proc


def wait_until_ready(proc: subprocess.Popen, control: Path) -> None:
    deadline = time.time() + 180
    while not (control / "ready").exists():
        assert proc.poll() is None and time.time() < deadline, \
            f"the job died or hung before its first batches: {(control / 'log').read_text()[-3000:]}"
        time.sleep(0.1)


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
    stale = SHARED_MEMORY_DIR / f"{uuid.uuid4().int % 10**9:09}_barrier"
    stale.write_bytes(bytes(64))
    try:
        monkeypatch.setenv("LOCAL_RANK", "1")
        with registering_shared_memory():
            pass
        assert stale.exists()
        monkeypatch.setenv("LOCAL_RANK", "0")
        with registering_shared_memory():
            pass
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
        # as SLURM ends a job: every process of it, Python's resource tracker too (which would unlink the segments);
        # under the node lock, so that no job another test starts meanwhile removes them before they are counted
        with another_job_registering():
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
                job.wait(timeout=60)
            shutil.rmtree(job.job_tmp, ignore_errors=True)


@contextmanager
def another_job_registering():
    """The node lock, held as a job holds it while it registers its prefix."""
    fd = os.open(lock_path(), os.O_RDONLY | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        os.close(fd)


def node_lock_held_by_this_process() -> bool:
    """Whether /proc/locks lists a granted flock on the node's lock file taken by this process: other tests'
    jobs take the same lock meanwhile, so whether it is free says nothing about who holds it."""
    status = os.stat(lock_path())
    file_id = f"{os.major(status.st_dev):02x}:{os.minor(status.st_dev):02x}:{status.st_ino}"
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        # "1: FLOCK ADVISORY WRITE <pid> <major:minor:inode> 0 EOF"; a waiter's line has "->" after the number
        if fields[1] == "FLOCK" and fields[4] == str(os.getpid()) and fields[5] == file_id:
            return True
    return False


def test_a_job_finds_and_creates_its_prefix_under_the_node_lock(shards, monkeypatch):
    import streaming.base.dataset as streaming_dataset

    # the node's own lock: a job registering under another one would race the jobs other tests start
    held_while_registering = []
    register = streaming_dataset.get_shm_prefix

    def watched(*args, **kwargs):
        held_while_registering.append(node_lock_held_by_this_process())
        return register(*args, **kwargs)

    monkeypatch.setattr(streaming_dataset, "get_shm_prefix", watched)
    take(loader(shards), 1)
    assert held_while_registering == [True]
    assert not node_lock_held_by_this_process()  # released once the dataset is built


@pytest.mark.slow
def test_a_starting_job_waits_while_another_registers_its_prefix(shards, tmp_path):
    expected = take(loader(shards), 12)
    control = tmp_path / "waiting"
    job = None
    try:
        with another_job_registering():
            job = start_job(shards, control, wait=False)
            deadline = time.time() + 180
            while "waiting for another job on this node to register its shared memory" not in \
                    (control / "log").read_text():
                assert job.poll() is None and time.time() < deadline, (control / "log").read_text()[-3000:]
                time.sleep(0.1)
            time.sleep(1)
            assert job.poll() is None and not (control / "ready").exists()
        wait_until_ready(job, control)
        (control / "go").touch()
        assert job.wait(timeout=180) == 0
        read = torch.load(control / "batches.pt")
        assert all(torch.equal(a, b) for a, b in zip(read, expected, strict=True))
    finally:
        if job is not None:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
                job.wait(timeout=60)
            shutil.rmtree(job.job_tmp, ignore_errors=True)


def test_a_lock_held_too_long_is_named_and_the_job_goes_on_without_it(shards, monkeypatch, caplog):
    expected = take(loader(shards), 3)
    monkeypatch.setattr(shared_memory, "LOCK_WAIT_S", 0.5)
    with another_job_registering(), caplog.at_level(logging.INFO, logger=shared_memory.__name__):
        read = take(loader(shards), 3)
    assert all(torch.equal(a, b) for a, b in zip(read, expected, strict=True))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"{lock_path()}: another job has held the node's shared-memory lock for over 0.5 s; "
                        "registering without it"]


def test_the_ranks_of_a_node_find_one_prefix_when_a_segment_goes_between_their_searches(monkeypatch, tmp_path):
    """Each rank looks for the first free number on its own; a job that exits meanwhile unlinks its segments
    without the node lock. The number local rank 0 found must be the one the later ranks find."""
    from streaming.base.constant import LOCALS, SHM_TO_CLEAN
    from streaming.base.shared.prefix import _check_and_find, _get_path

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # streaming's lock files: this test's own folder
    monkeypatch.setenv("LOCAL_RANK", "0")

    def search() -> int:  # what streaming's get_shm_prefix finds, before any rank registers it
        return max(_check_and_find([str(tmp_path / "train")], [None], name) for name in SHM_TO_CLEAN)

    with registering_shared_memory():  # the node lock: no job of another test registers meanwhile
        free = search()
        exiting = SharedMemory(_get_path(free, LOCALS), create=True, size=64)  # a job's, mapped: not stale
    try:
        with registering_shared_memory():
            by_local_rank_0 = search()
            exiting.close()
            exiting.unlink()  # the job exits
            exiting = None
            by_local_rank_1 = search()
        assert by_local_rank_0 == by_local_rank_1 > free
        assert (tmp_path / f"{free:06}_barrier_filelock").exists()
    finally:
        if exiting is not None:
            exiting.close()
            exiting.unlink()
