"""Two ranks on two "nodes" of this machine with a network between them that a test can cut: rank 0 on the
machine's own network, rank 1 in a network namespace of its own (and a /dev/shm of its own, as a node has),
joined by a veth pair. Taking rank 1's end down is a node lost to the network: no reset, no FIN, its
packets just stop, as when a switch port or a node's NIC dies. Needs root (unshare -n, ip)."""
import os
import shutil
import subprocess
import time
from pathlib import Path

# rank 1's wrapper: a private network and /dev/shm, then wait for the link before the command starts
NODE_1 = ["unshare", "-n", "-m", "sh", "-c",
          'mount -t tmpfs tmpfs /dev/shm && while [ ! -e "$1" ]; do sleep 0.1; done && shift && exec "$@"', "node"]


def _ip(*args: str, namespace_of: int | None = None) -> None:
    prefix = ["nsenter", "-t", str(namespace_of), "-n"] if namespace_of else []
    subprocess.run([*prefix, "ip", *args], check=True, capture_output=True, text=True, timeout=30)


def unavailable() -> str | None:
    """Why the nodes cannot be built here, or None."""
    if shutil.which("ip") is None or shutil.which("nsenter") is None:
        return "ip (iproute2) and nsenter are needed"
    try:
        proc = subprocess.run(["unshare", "-n", "-m", "sh", "-c", "mount -t tmpfs tmpfs /dev/shm && ip link set lo up"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as error:
        return str(error)
    return None if proc.returncode == 0 else (proc.stderr.strip() or f"exit code {proc.returncode}")


def _wait_for_own_network(proc: subprocess.Popen, timeout: float = 30) -> None:
    """Until proc (started by unshare -n) is in a network namespace other than this process's."""
    own = os.stat("/proc/self/ns/net").st_ino
    deadline = time.monotonic() + timeout
    while True:
        try:
            if os.stat(f"/proc/{proc.pid}/ns/net").st_ino != own:
                return
        except FileNotFoundError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"rank 1 did not get a network of its own (exit code {proc.poll()})")
        time.sleep(0.01)


class TwoNodes:
    def __init__(self, folder: Path):
        tag = os.getpid() % 10000  # one pair of links per test process: xdist workers do not meet
        self.links = (f"sfnode{tag}a", f"sfnode{tag}b")
        subnet = 16 + os.getpid() % 200
        self.addresses = (f"10.213.{subnet}.1", f"10.213.{subnet}.2")
        self.ready = folder / "network-ready"
        self.procs: list[subprocess.Popen] = []

    def start(self, command: list[str], env: dict, port: int, **popen) -> list[subprocess.Popen]:
        """Rank 1 in its namespace, the link between the two, then rank 0; the two processes."""
        base = dict(env, WORLD_SIZE="2", LOCAL_WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR=self.addresses[0],
                    MASTER_PORT=str(port))
        rank_1 = subprocess.Popen([*NODE_1, str(self.ready), *command], start_new_session=True, **popen,
                                  env=dict(base, RANK="1", NODE_RANK="1", GLOO_SOCKET_IFNAME=self.links[1]))
        self.procs.append(rank_1)
        _wait_for_own_network(rank_1)
        _ip("link", "add", self.links[0], "type", "veth", "peer", "name", self.links[1])
        _ip("link", "set", self.links[1], "netns", str(rank_1.pid))
        _ip("addr", "add", f"{self.addresses[0]}/30", "dev", self.links[0])
        _ip("link", "set", self.links[0], "up")
        for args in (("addr", "add", f"{self.addresses[1]}/30", "dev", self.links[1]),
                     ("link", "set", self.links[1], "up"), ("link", "set", "lo", "up")):
            _ip(*args, namespace_of=rank_1.pid)
        self.ready.touch()
        rank_0 = subprocess.Popen(command, start_new_session=True, **popen,
                                  env=dict(base, RANK="0", NODE_RANK="0", GLOO_SOCKET_IFNAME=self.links[0]))
        self.procs.insert(0, rank_0)
        return self.procs

    def cut(self) -> None:
        """Rank 1's end of the link goes down: rank 0's end stays up without a carrier, so rank 0 keeps its
        address (its own rendezvous store stays reachable) and rank 1's packets stop."""
        _ip("link", "set", self.links[1], "down", namespace_of=self.procs[1].pid)

    def close(self) -> None:
        """The links go with rank 1's namespace, once its processes are gone; deleted here in case."""
        subprocess.run(["ip", "link", "del", self.links[0]], capture_output=True)
