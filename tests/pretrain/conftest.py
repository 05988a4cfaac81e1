import os
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import seed_kernel_cache

ROOT = Path(__file__).resolve().parents[2]
SYNTHETIC = "data.sources=[{kind: synthetic, max_documents: 300}]"


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """ssmforge's caches (measured CPU peaks, the compiled scan) go to a per-session folder, not the user's."""
    monkeypatch.setenv("SSMFORGE_CACHE_DIR", str(seed_kernel_cache(tmp_path_factory.getbasetemp() / "ssmforge-cache")))


def pretrain_command(run_dir, *overrides) -> list[str]:
    """The `ssmforge pretrain` command line on the tiny config."""
    return [sys.executable, "-m", "ssmforge", "pretrain", str(ROOT / "configs" / "tiny.yaml"),
            f"run_dir={run_dir}", SYNTHETIC, "data.num_workers=0", *overrides]


def clean_env() -> dict:
    """The environment without any launcher's rank variables."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "LOCAL_", "WORLD_", "MASTER_"))}


def start_ranks(command: list[str], ranks: int, rank_0_command: list[str] | None = None) -> list[subprocess.Popen]:
    """One process per rank with the variables a launcher sets (as srun's tasks get them), so that each
    rank's own exit code is visible; rank 0 runs rank_0_command when one is given."""
    from ssmforge.pretrain.launch import free_port

    base = clean_env()
    base.update(WORLD_SIZE=str(ranks), LOCAL_WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    return [subprocess.Popen(rank_0_command if r == 0 and rank_0_command else command, cwd=ROOT,
                             env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(ranks)]


def run_pretrain(run_dir, *overrides, ranks: int = 1, expect: int = 0, timeout: int = 300):
    """Run to completion on `ranks` processes; every rank must exit with `expect`. Returns rank 0's output."""
    procs = start_ranks(pretrain_command(run_dir, *overrides), ranks)
    outputs = [p.communicate(timeout=timeout) for p in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == expect, out[-3000:] + err[-3000:]
    return subprocess.CompletedProcess(procs[0].args, procs[0].returncode, *outputs[0])


def train_losses(run_dir) -> dict[int, float]:
    import json

    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"}


# 30 steps, a checkpoint every 10, and collectives that give up on a silent peer after 20 s
FAULT_STEPS = ("train.max_steps=30", "train.log_every=1", "train.eval_every=1000", "train.save_every=10",
               "train.collective_timeout_s=20")


@pytest.fixture(scope="session")
def uninterrupted_losses(tmp_path_factory) -> dict[int, float]:
    """Per-step losses of the 2-rank FAULT_STEPS run that the faulted runs resume."""
    run = tmp_path_factory.mktemp("uninterrupted")
    with pytest.MonkeyPatch.context() as patch:  # the private caches of the function-scoped fixture
        patch.setenv("SSMFORGE_CACHE_DIR", str(seed_kernel_cache(tmp_path_factory.getbasetemp() / "ssmforge-cache")))
        run_pretrain(run, *FAULT_STEPS, ranks=2)
    return train_losses(run)
