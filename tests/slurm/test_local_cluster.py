"""The test cluster (slurm/start_local_cluster.sh) runs from a folder of its own and leaves the machine's
SLURM alone: its config is reached only through SLURM_CONF, with its own ports, name, state and munged;
/etc/slurm and /etc/munge are exactly as before; start is idempotent and stop stops what it started."""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from .conftest import START_SCRIPT, system_config_state


def _config(conf: Path) -> dict:
    """`scontrol show config` of the cluster whose slurm.conf is conf, as a dict."""
    out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, check=True,
                         env={**os.environ, "SLURM_CONF": str(conf)}).stdout
    return dict(m.groups() for m in re.finditer(r"^(\S+)\s+= (.*)$", out, re.MULTILINE))


def _alive(pid: int, name: str) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.startswith(f"{pid} ({name}) ") and stat.split(") ")[1][0] not in "ZX"


def _daemons(folder: Path) -> dict[str, int]:
    """Pid of each daemon the cluster in `folder` started: munged, slurmctld, one slurmd per node."""
    pidfiles = {"munged": folder / "munge" / "munged.pid", "slurmctld": folder / "slurmctld.pid"}
    pidfiles.update({p.stem: p for p in folder.glob("slurmd-*.pid")})
    return {name: int(path.read_text()) for name, path in pidfiles.items()}


def _alive_daemon(name: str, pid: int) -> bool:
    return _alive(pid, name.split("-")[0])  # slurmd-NODE is a slurmd


def _script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(START_SCRIPT), *args], capture_output=True, text=True, timeout=300)


def test_the_cluster_runs_from_its_own_folder_and_leaves_the_system_config_alone(local_cluster):
    folder = local_cluster.folder
    assert system_config_state() == local_cluster.system_config_before
    assert os.environ["SLURM_CONF"] == str(folder / "slurm.conf") and not str(folder).startswith("/etc")
    config = _config(folder / "slurm.conf")
    socket = folder / "munge" / "munge.socket"
    assert config["ClusterName"] == "ssmforge_test"
    assert config["AuthInfo"] == f"socket={socket},cred_expire=10"
    assert (config["StateSaveLocation"], config["SlurmdSpoolDir"]) == (str(folder / "state"), str(folder / "spool/%n"))
    written = (folder / "slurm.conf").read_text()
    ports = {key: config[key] for key in ("SlurmctldPort", "SlurmdPort")}
    assert all(f"{key}={value}\n" in written for key, value in ports.items())
    assert not {"6817", "6818"} & set(ports.values())  # SLURM's default ports stay free for a site's daemons
    # its own munged, on its own socket and key
    daemons = _daemons(folder)
    assert all(_alive_daemon(name, pid) for name, pid in daemons.items()), daemons
    assert sorted(name for name in daemons if name.startswith("slurmd")) == sorted(
        f"slurmd-{node}" for node in local_cluster.nodes)
    # two nodes on one machine, each with a /dev/shm of its own, as real nodes have (streaming keeps its
    # per-node shared memory there)
    namespaces = {os.readlink(f"/proc/{pid}/ns/mnt") for name, pid in daemons.items() if name.startswith("slurmd")}
    assert len(namespaces) == len(local_cluster.nodes) == 2 and os.readlink("/proc/self/ns/mnt") not in namespaces
    nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, timeout=60).stdout
    assert sorted(nodes.split()[::2]) == sorted(local_cluster.nodes), nodes
    cmdline = Path(f"/proc/{daemons['munged']}/cmdline").read_bytes().split(b"\0")
    assert f"--socket={socket}".encode() in cmdline and f"--key-file={folder}/munge/munge.key".encode() in cmdline
    # a job sees the same config (sbatch and srun pass SLURM_CONF on)
    job = subprocess.run(["srun", "-n1", "printenv", "SLURM_CONF"], capture_output=True, text=True, timeout=120)
    assert job.returncode == 0 and job.stdout.strip() == str(folder / "slurm.conf"), job.stderr


@pytest.mark.slow
def test_start_is_idempotent_and_stop_stops_only_what_it_started(local_cluster, tmp_path_factory):
    # a second cluster beside the session's: its own folder, ports and daemons
    folder = tmp_path_factory.mktemp("c2")
    try:
        started = _script("start", str(folder))
        assert started.returncode == 0, started.stderr
        daemons = _daemons(folder)
        assert all(_alive_daemon(name, pid) for name, pid in daemons.items()), daemons
        again = _script("start", str(folder))
        assert again.returncode == 0 and "already running" in again.stdout, again.stderr
        assert _daemons(folder) == daemons
        assert _script("status", str(folder)).returncode == 0
        ours, session = _config(folder / "slurm.conf"), _config(local_cluster.folder / "slurm.conf")
        assert ours["SlurmctldPort"] != session["SlurmctldPort"] and ours["SlurmdPort"] != session["SlurmdPort"]
    finally:
        stopped = _script("stop", str(folder))
    assert stopped.returncode == 0, stopped.stderr
    assert not any(_alive_daemon(name, pid) for name, pid in daemons.items())
    assert _script("status", str(folder)).returncode == 1
    # the session's cluster still answers, and /etc is as it was
    assert all(_alive_daemon(name, pid) for name, pid in _daemons(local_cluster.folder).items())
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=60)
    assert ping.returncode == 0 and "UP" in ping.stdout, ping.stdout + ping.stderr
    assert system_config_state() == local_cluster.system_config_before


def test_missing_packages_without_the_opt_in_are_one_line_saying_how_to_enable_them(tmp_path):
    bash = shutil.which("bash")
    empty = tmp_path / "bin"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "SSMFORGE_TEST_SLURM_INSTALL"}
    proc = subprocess.run([bash, str(START_SCRIPT), "start", str(tmp_path / "cluster")], capture_output=True,
                          text=True, timeout=60, env={**env, "PATH": str(empty)})  # no slurmctld, munged, ...
    assert proc.returncode == 3
    assert len(proc.stderr.splitlines()) == 1 and proc.stdout == ""
    assert "SLURM is not installed here; set SSMFORGE_TEST_SLURM_INSTALL=1" in proc.stderr
    assert not (tmp_path / "cluster").exists()  # nothing written, nothing installed
