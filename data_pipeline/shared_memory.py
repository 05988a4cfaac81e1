"""Streaming's shared memory on a node that jobs share.

A StreamingDataset registers a numbered prefix for its shared memory: it looks for the first free number,
waits on a barrier, then creates "<prefix:06>_locals". Two jobs starting at once on one node can find the
same free number and the second one's creation fails (FileExistsError), and a killed job's segments stay
behind and push every later job's number up. So the node's local rank 0 removes the segments that no
process maps and builds its datasets under a node-wide file lock that every ssmforge job takes.

Every rank of a node looks for the free number on its own, and segments go without the lock: a job that
exits unlinks its own, and a killed job's resource tracker unlinks its segments once the job's last process
has ended. A number freed between two ranks' searches gives the later one a lower number, which its local
rank 0 never registered ("prefix=N was not registered by local leader"). Streaming passes over a number whose
lock file exists in the temporary folder, so local rank 0 also creates, under the lock, that lock file for
every number that holds one of its user's segments: the number stays taken, whatever becomes of its
segments, and every rank finds the same one.
"""
from __future__ import annotations

import fcntl
import logging
import os
import re
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

# where Linux shows POSIX shared memory; streaming names its segments "<prefix:06>_<name>" there
SHARED_MEMORY_DIR = Path("/dev/shm")
LOCK_NAME = "ssmforge-streaming.lock"
# how long a starting job waits for another one's registration (seconds in practice) before it goes on
# without the lock: two multi-node jobs that share nodes could otherwise each hold one node and wait for the other
LOCK_WAIT_S = 120.0
LOCK_POLL_S = 0.1


def lock_path() -> Path:
    """One per node, whatever TMPDIR a job has: beside the shared memory on Linux."""
    return (SHARED_MEMORY_DIR if SHARED_MEMORY_DIR.is_dir() else Path(tempfile.gettempdir())) / LOCK_NAME


def _mapped_shared_memory() -> set[str]:
    """Paths under SHARED_MEMORY_DIR that a process this user can see has mapped (read from /proc)."""
    # a maps line: address perms offset dev inode path
    path = re.compile(rf" ({re.escape(str(SHARED_MEMORY_DIR))}/.+)$", re.MULTILINE)
    mapped = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            mapped.update(path.findall(maps.read_text()))
        except OSError:  # a process that ended, or another user's
            continue
    return mapped


def remove_stale_shared_memory() -> list[str]:
    """Unlink the streaming shared memory that no live process maps (what a killed run leaves, which makes
    a later run on the node fail with "Reused local directory"); return the names removed.

    A live StreamingDataset maps every segment it holds until its process exits; streaming's own
    clean_stale_shared_memory unlinks the segments of every prefix from 0 up to the first unused one, a
    running job's included. Other users' processes are not seen, but their segments are not ours to unlink.
    Call it under the node lock: a segment another job has created but not yet mapped would look stale."""
    removed = []
    for path in stale_shared_memory():
        try:
            path.unlink()
            removed.append(path.name)
        except (FileNotFoundError, PermissionError):  # gone meanwhile, or another user's
            pass
    return removed


def stale_shared_memory() -> list[Path]:
    """Streaming's segments that no live process this user can see maps."""
    # listed before the processes are read: a segment that appears in between is not a candidate
    candidates = _streaming_segments()
    mapped = _mapped_shared_memory()
    return [path for path in candidates if str(path) not in mapped]


def reserve_taken_prefixes() -> list[int]:
    """Create streaming's (empty) barrier lock file in the temporary folder for each number that holds one of
    this user's segments and has none yet; return those numbers. Another user's numbers are left alone: a
    lock file of ours would be one their job could not open, where their temporary folder is ours."""
    from streaming.base.constant import BARRIER_FILELOCK
    from streaming.base.shared.prefix import _get_path

    taken = set()
    for path in _streaming_segments():
        try:
            if path.stat().st_uid == os.getuid():
                taken.add(int(path.name.split("_", 1)[0]))
        except FileNotFoundError:  # gone already: every rank's search comes later and finds it free
            pass
    reserved = []
    for prefix in sorted(taken):
        lock_file = Path(tempfile.gettempdir()) / _get_path(prefix, BARRIER_FILELOCK)
        try:
            os.close(os.open(lock_file, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0o644))
            reserved.append(prefix)
        except FileExistsError:
            pass
        except OSError as error:  # streaming will fail on this folder itself, with its own message
            log.warning("%s: cannot reserve the taken shared-memory numbers (%s)", lock_file.parent, error)
            break
    return reserved


def _streaming_segments() -> list[Path]:
    """Every segment streaming names "<prefix:06>_<name>" in SHARED_MEMORY_DIR."""
    from streaming.base.constant import SHM_TO_CLEAN

    if not SHARED_MEMORY_DIR.is_dir():
        return []  # macOS and Windows do not list their shared memory: nothing to clean or reserve
    pattern = re.compile(rf"\d{{6,}}_({'|'.join(SHM_TO_CLEAN)})")
    return [path for path in SHARED_MEMORY_DIR.iterdir() if pattern.fullmatch(path.name)]


def _open_lock_file(path: Path) -> int:
    """A read-only descriptor (enough for flock) of the lock file, created if missing: opening another user's
    file with O_CREAT in a sticky folder such as /dev/shm is refused where fs.protected_regular is set."""
    try:
        return os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        pass
    try:
        return os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:  # another job created it meanwhile
        return os.open(path, os.O_RDONLY)


def _hold_node_lock() -> int | None:
    """The node's lock, held through the returned descriptor; None (after a warning) when it could not be
    taken within LOCK_WAIT_S or opened at all, and the job goes on as streaming alone would."""
    path = lock_path()
    try:
        fd = _open_lock_file(path)
    except OSError as error:
        log.warning("%s: cannot open the node's shared-memory lock (%s); registering without it", path, error)
        return None
    deadline = time.monotonic() + LOCK_WAIT_S
    waiting = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                log.warning("%s: another job has held the node's shared-memory lock for over %g s; "
                            "registering without it", path, LOCK_WAIT_S)
                return None
            if not waiting:
                log.info("%s: waiting for another job on this node to register its shared memory", path)
                waiting = True
            time.sleep(LOCK_POLL_S)


@contextmanager
def registering_shared_memory():
    """Wrap the construction of a StreamingDataset: local rank 0 takes the node lock, removes stale segments
    and reserves the taken numbers while the node's other ranks wait, so every rank of the job looks for its
    prefix after that, they find the same one, and no other job registers one until the dataset has."""
    import torch.distributed as dist
    from streaming.base.distributed import get_local_rank, maybe_init_dist

    own_group = maybe_init_dist()  # as streaming does: the barrier needs a group
    lock = _hold_node_lock() if get_local_rank() == 0 else None
    try:
        if get_local_rank() == 0:
            remove_stale_shared_memory()
            reserve_taken_prefixes()
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        yield
    finally:
        if lock is not None:
            os.close(lock)  # releases the flock
        if own_group:
            dist.destroy_process_group()
