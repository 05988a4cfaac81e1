"""Finding a rank's training process among the processes of this machine, to inject a fault into it, and
what its survivor must say."""
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path


def _environ(pid: str) -> dict:
    try:
        return dict(item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in item)
    except (OSError, UnicodeDecodeError):
        return {}


def _cmdline(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _parent(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
    except (OSError, IndexError):
        return ""


def training_process(run_dir, rank: int) -> int | None:
    """The pid of the training process of `rank` (RANK as torchrun and the deepspeed launcher set it,
    SLURM_PROCID under srun) whose command line names run_dir; its loader workers, forked with the same
    command line as their parent, are not it."""
    for entry in Path("/proc").iterdir():
        pid = entry.name
        if not pid.isdigit() or str(run_dir).encode() not in (command := _cmdline(pid)):
            continue
        env = _environ(pid)
        if env.get("RANK", env.get("SLURM_PROCID")) == str(rank) and _cmdline(_parent(pid)) != command:
            return int(pid)
    return None


def assert_survivor_named_rank_1(output: str, resume_from: str = r"step_000000[1-9]0") -> None:
    """Rank 0 of 2 ended with one line naming rank 1 and a checkpoint (a launcher may prefix `[rank0]: `),
    printed no traceback through ssmforge's code, lost no loader worker and announced no stop."""
    ours = [line for line in output.splitlines() if "ssmforge: training stopped" in line]
    assert len(ours) == 1, output[-5000:]
    assert re.fullmatch(r"(\[rank0\]: )?ssmforge: training stopped: rank 0 lost rank 1 \(.+\); run the same "
                        rf"command again to resume from {resume_from}", ours[0]), ours[0]
    assert not re.search(r'File ".*/(pretrain|data_pipeline|models|kernels|evaluation|ssmforge)/', output), output[-5000:]
    assert "DataLoader worker" not in output and "checkpointing and stopping" not in output, output[-5000:]


def logged_step(run_dir) -> int:
    """The newest step run_dir's metrics name (0 before any), read while a run may be writing them."""
    path = Path(run_dir) / "metrics.jsonl"
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return 0
    return max((json.loads(line).get("step", 0) for line in lines if line.strip().endswith("}")), default=0)


def wait_for_step(run_dir, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until run_dir's metrics reach `step`; proc (rank 0) must live meanwhile."""
    deadline = time.monotonic() + timeout
    while logged_step(run_dir) < step:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"no step {step} within {timeout} s"
        time.sleep(0.2)


def kill_rank_1_after(launched: subprocess.Popen, run_dir, step: int, startup_s: float = 600) -> str:
    """Once run_dir's metrics reach `step`, SIGKILL rank 1's training process; the launcher's output (stdout
    with stderr) once it has ended, which it must within 60 s of the kill."""
    deadline = time.monotonic() + startup_s
    while logged_step(run_dir) < step:
        assert launched.poll() is None, launched.communicate()[0][-3000:]
        assert time.monotonic() < deadline, f"no step {step} within {startup_s} s"
        time.sleep(0.2)
    victim = None
    while victim is None and time.monotonic() < deadline:
        victim = training_process(run_dir, 1)
    assert victim is not None, "rank 1's process not found"
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    output, _ = launched.communicate(timeout=120)
    assert time.monotonic() - killed < 60, output[-3000:]
    return output
