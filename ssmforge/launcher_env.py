"""The one mapping from a launcher's variables to the names torch.distributed and mosaicml-streaming read.

torchrun and the deepspeed launcher set RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR and
MASTER_PORT themselves. srun sets only its own (SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, SLURM_NODEID,
the tasks per node and the node list), so a process that srun started fills the torch names from them
here, before anything reads them. The job script therefore runs the ssmforge command directly under srun.
"""
from __future__ import annotations

import os
import re
import subprocess

from ssmforge.errors import ConfigError

# where srun puts the task counts per node, most specific first: the step's own layout, then the
# allocation's (srun overwrites it for the step); "8(x2),4" means 8, 8, 4
_TASKS_PER_NODE = ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE")


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[003-005,007],cpu01' -> 'gpu003' (scontrol when present)."""
    try:
        hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                               timeout=30, check=True).stdout.split()
        if hosts:
            return hosts[0]
    except (OSError, subprocess.SubprocessError):
        pass  # no scontrol on this host: read the first entry ourselves
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if not match:
        raise ConfigError(f"SLURM_JOB_NODELIST={nodelist!r} is not a node list")
    prefix, ranges = match.groups()
    return prefix + (ranges.split(",")[0].split("-")[0] if ranges else "")


def tasks_on_node(layout: str, node: int) -> int | None:
    """Tasks on node `node` of a SLURM layout such as '8(x2),4'; None when the layout does not say."""
    counts = []
    for part in layout.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not match:
            return None
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts[node] if 0 <= node < len(counts) else None


def export_launcher_env(env: dict | None = None) -> None:
    """Fill RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, NODE_RANK, MASTER_ADDR and MASTER_PORT (in
    os.environ by default) from SLURM's variables when srun started the process and no other launcher
    set them; a launcher's own variables always win. MASTER_ADDR is the first host of the step (rank 0
    runs there) and MASTER_PORT derives from the job id, so every task of a job computes the same pair.
    Does nothing outside srun, and nothing the second time."""
    env = os.environ if env is None else env
    if "RANK" in env or "SLURM_PROCID" not in env:
        return
    node = env.get("SLURM_NODEID", "0")
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = env.get("SLURM_NTASKS", "1")
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    env.setdefault("NODE_RANK", node)
    for name in _TASKS_PER_NODE:
        per_node = tasks_on_node(env.get(name, ""), int(node)) if node.isdigit() else None
        if per_node is not None:
            env["LOCAL_WORLD_SIZE"] = str(per_node)
            break
    else:  # --ntasks-per-node: one count for every node
        per_node = env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
        if per_node.isdigit():
            env["LOCAL_WORLD_SIZE"] = per_node
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if "MASTER_ADDR" not in env and nodelist:
        env["MASTER_ADDR"] = first_host(nodelist)
    if "MASTER_PORT" not in env and "SLURM_JOB_ID" in env:
        job_id = env["SLURM_JOB_ID"]
        if not job_id.isdigit():
            raise ConfigError(f"environment variable SLURM_JOB_ID={job_id!r} is not an integer")
        # a port per job: two jobs sharing a node do not collide (unless their ids are 20000 apart)
        env["MASTER_PORT"] = str(20000 + int(job_id) % 20000)
