"""What a job asks of its nodes, derived where the config leaves it open: CPUs per task from the partition's
nodes (sinfo), and whether a run folder is on storage every node of a job can see."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

DEFAULT_CPUS_PER_TASK = 8  # only when neither the config nor sinfo says

# filesystems that live on one machine: a multi-node job's ranks would each see their own copy
NODE_LOCAL_FILESYSTEMS = {"tmpfs", "ramfs", "ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "overlay", "zfs",
                          "vfat", "devtmpfs"}


def node_cpus(partition: str | None) -> int | None:
    """The fewest CPUs of a node of `partition` (the default one when None), from sinfo; None when sinfo is
    missing or says nothing usable."""
    sinfo = shutil.which("sinfo")
    if sinfo is None:
        return None
    command = [sinfo, "-h", "-N", "-o", "%c"] + (["-p", partition] if partition else [])
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    counts = [int(word) for word in out.stdout.split() if word.isdigit()] if out.returncode == 0 else []
    return min(counts) if counts else None


def cpus_per_task(configured: int | None, partition: str | None, tasks_per_node: int) -> tuple[int, str]:
    """(CPUs per task, where the number comes from) for a job of `tasks_per_node` tasks on each node."""
    if configured is not None:
        return configured, "slurm.cpus_per_task"
    cpus = node_cpus(partition)
    if cpus is None:
        return DEFAULT_CPUS_PER_TASK, (f"the default: sinfo could not tell the CPUs of a node of "
                                       f"{partition or 'the default partition'}; set --cpus-per-task")
    return max(1, cpus // tasks_per_node), (f"{cpus} CPUs per node of {partition or 'the default partition'} "
                                            f"(sinfo) / {tasks_per_node} tasks")


def _mounts() -> list[tuple[str, str]]:
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return []
    mounts = []
    for line in lines:
        fields = line.split()
        if len(fields) >= 3:
            mounts.append((fields[1].replace("\\040", " "), fields[2]))
    return mounts


def node_local_storage(path: str | Path) -> str | None:
    """'MOUNTPOINT (FSTYPE)' when `path` (or its nearest existing parent) is on a filesystem of this machine
    alone (tmpfs, ext4, xfs, overlay, ...); None on a shared one (NFS, Lustre, GPFS, BeeGFS, CephFS, ...) or
    when the mount table cannot tell."""
    target = Path(path).absolute()
    while not target.exists() and target != target.parent:
        target = target.parent
    target_text = os.path.realpath(target)
    best = None
    for mountpoint, fstype in _mounts():
        inside = target_text == mountpoint or target_text.startswith(mountpoint.rstrip("/") + "/")
        if inside and (best is None or len(mountpoint) > len(best[0])):
            best = (mountpoint, fstype)
    if best is None or best[1] not in NODE_LOCAL_FILESYSTEMS:
        return None
    return f"{best[0]} ({best[1]})"
