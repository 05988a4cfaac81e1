import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
START_SCRIPT = ROOT / "slurm" / "start_local_cluster.sh"
SYNTHETIC = "data.sources=[{kind: synthetic, max_documents: 300}]"
TINY = (f"{SYNTHETIC}", "data.num_workers=0")


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """ssmforge's caches (measured CPU peaks, the compiled scan) go to a per-session folder, not the user's."""
    monkeypatch.setenv("SSMFORGE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "ssmforge-cache"))


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running one-node SLURM (slurm/start_local_cluster.sh, once per session), or a skip with the reason."""
    if shutil.which("bash") is None:
        pytest.skip("no SLURM: bash is missing")
    try:
        proc = subprocess.run(["bash", str(START_SCRIPT)], capture_output=True, text=True, timeout=600,
                              env={**os.environ, "SSMFORGE_SLURM_QUIET": "1"})
    except subprocess.TimeoutExpired:
        pytest.skip("no SLURM: slurm/start_local_cluster.sh did not finish in 10 minutes")
    if proc.returncode != 0:
        reason = (proc.stderr.strip() or proc.stdout.strip() or f"exit code {proc.returncode}").splitlines()[-1]
        pytest.skip(f"no SLURM could be started here: {reason}")
    return subprocess.run(["hostname", "-s"], capture_output=True, text=True).stdout.strip()


def clean_env(**extra) -> dict:
    """The environment without any launcher's rank variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "LOCAL_", "WORLD_", "MASTER_"))}
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
