import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from ..conftest import seed_kernel_cache

ROOT = Path(__file__).resolve().parents[2]
START_SCRIPT = ROOT / "slurm" / "start_local_cluster.sh"
SYNTHETIC = "data.sources=[{kind: synthetic, max_documents: 300}]"
TINY = (f"{SYNTHETIC}", "data.num_workers=0")


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """ssmforge's caches (measured CPU peaks, the compiled scan) go to a per-session folder, not the user's."""
    monkeypatch.setenv("SSMFORGE_CACHE_DIR", str(seed_kernel_cache(tmp_path_factory.getbasetemp() / "ssmforge-cache")))


SYSTEM_CONFIG_DIRS = ("/etc/slurm", "/etc/slurm-llnl", "/etc/munge")
INSTALL_OPT_IN = "SSMFORGE_TEST_SLURM_INSTALL"
NODES = ("<host>", "localhost")  # the test cluster's nodes: the machine's own name, then localhost


def system_config_state() -> dict:
    """Path -> (mode, size, mtime, sha256) of everything under the system's SLURM and munge config folders
    ({} where they do not exist): what a test cluster must leave exactly as it found."""
    state = {}
    for top in map(Path, SYSTEM_CONFIG_DIRS):
        for path in [top, *sorted(top.rglob("*"))] if top.exists() else []:
            st = path.lstat()
            digest = None
            if path.is_file():
                try:
                    digest = hashlib.sha256(path.read_bytes()).hexdigest()
                except OSError:
                    pass  # unreadable for this user: its stat still tells a rewrite
            state[str(path)] = (st.st_mode, st.st_size, st.st_mtime_ns, digest)
    return state


def cluster_script(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(START_SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "SSMFORGE_SLURM_QUIET": "1", "SSMFORGE_SLURM_NODES": str(len(NODES))})


@dataclass(frozen=True)
class LocalCluster:
    host: str  # this machine, also the first node's name
    nodes: tuple[str, ...]  # its two nodes: slurmd's of their own on this machine (start_local_cluster.sh)
    folder: Path  # its config, state, logs and munge socket
    system_config_before: dict  # system_config_state() once the packages were in place, before it started


@pytest.fixture(scope="session")
def local_cluster(tmp_path_factory) -> LocalCluster:
    """A two-node SLURM of this session's own, or a skip with the reason: slurm/start_local_cluster.sh in
    a temporary folder (or $SSMFORGE_TEST_SLURM_DIR), with SLURM_CONF set for the session so that every
    sbatch, srun, squeue, scontrol and sinfo here and in the code under test reaches it and never the
    system's. Stopped at the end of the session unless it was already running when the session began."""
    if shutil.which("bash") is None:
        pytest.skip("no SLURM: bash is missing")
    folder = Path(os.environ.get("SSMFORGE_TEST_SLURM_DIR") or tmp_path_factory.mktemp("slurm")).resolve()
    opted_in = os.environ.get(INSTALL_OPT_IN) == "1"
    already_running = False

    def failed(proc: subprocess.CompletedProcess):
        reason = (proc.stderr.strip() or proc.stdout.strip() or f"exit code {proc.returncode}").splitlines()[-1]
        if not already_running:
            cluster_script("stop", str(folder), timeout=120)  # whatever daemons a failed start left running
        if opted_in:  # asked for (CI): a cluster that cannot start is a failure, not a skip
            pytest.fail(f"no SLURM test cluster could be started: {reason}")
        pytest.skip(f"no SLURM test cluster: {reason}")

    # Each pytest-xdist worker starts a cluster of its own (free ports, job ids from a random first one, so
    # that jobs of two clusters never share a MASTER_PORT); one at a time, as apt and the port choice
    # would race. The lock file sits in the folder that every worker's temporary folder shares.
    lock = open(tmp_path_factory.getbasetemp().parent / "slurm-cluster-start.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        # packages first (only with the opt-in): installing them writes /etc, which is apt's business
        if (proc := cluster_script("install", str(folder))).returncode != 0:
            failed(proc)
        before = system_config_state()
        already_running = cluster_script("status", str(folder)).returncode == 0
        if (proc := cluster_script("start", str(folder))).returncode != 0:
            failed(proc)
    except subprocess.TimeoutExpired:
        failed(subprocess.CompletedProcess([], 1, "", "slurm/start_local_cluster.sh did not finish in 15 minutes"))
    finally:
        lock.close()
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("SLURM_CONF", str(folder / "slurm.conf"))
    try:
        host = subprocess.run(["hostname", "-s"], capture_output=True, text=True).stdout.strip()
        yield LocalCluster(host, (host, *NODES[1:]), folder, before)
    finally:
        monkeypatch.undo()
        if not already_running:
            stopped = cluster_script("stop", str(folder), timeout=120)
            assert stopped.returncode == 0, stopped.stderr


@pytest.fixture(scope="session")
def slurm_cluster(local_cluster) -> str:
    """The session's two-node SLURM (see local_cluster); its host name."""
    return local_cluster.host


def clean_env(**extra) -> dict:
    """The environment without any launcher's rank variables (SLURM_CONF stays: it names the test cluster)."""
    env = {k: v for k, v in os.environ.items()
           if k == "SLURM_CONF" or not k.startswith(("SLURM_", "RANK", "LOCAL_", "WORLD_", "MASTER_"))}
    env.update(extra)
    return env


def pretrain_command(run_dir, *overrides) -> list[str]:
    return [sys.executable, "-m", "ssmforge", "pretrain", str(ROOT / "configs" / "tiny.yaml"),
            f"run_dir={run_dir}", *TINY, *overrides]


def train_losses(run_dir) -> dict[int, float]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"}


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
