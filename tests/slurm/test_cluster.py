"""On a real one-node SLURM (slurm/start_local_cluster.sh): `ssmforge submit` a 2-task CPU pretraining job,
preempt it mid-run with the warning signal SLURM sends before the time limit, and check that the job
requeued itself, resumed from its checkpoint, finished, and matches an uninterrupted run."""
import re
import subprocess
import sys

import pytest

from .conftest import ROOT, TINY, clean_env, pretrain_command, train_losses, wait_for

STEPS = ("train.max_steps=60", "train.log_every=1", "train.eval_every=1000", "train.save_every=1000")


def _job(job_id: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    return dict(item.split("=", 1) for item in out.split() if "=" in item)


def _logged_steps(run_dir) -> int:
    try:
        return max(train_losses(run_dir), default=0)
    except (FileNotFoundError, ValueError):
        return 0


@pytest.mark.slow
def test_preempted_job_requeues_resumes_and_matches_an_uninterrupted_run(slurm_cluster, tmp_path):
    run_dir = tmp_path / "slurm_run"
    submit = subprocess.run(
        [sys.executable, "-m", "ssmforge", "submit", str(ROOT / "configs" / "tiny.yaml"), f"run_dir={run_dir}",
         *TINY, *STEPS, "--gpus-per-node", "0", "--tasks-per-node", "2", "--cpus-per-task", "1", "--time", "15:00",
         "--max-requeues", "2", "--job-name", "ssmforge-test"],
        cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert submit.returncode == 0, submit.stderr
    job_id = re.search(r"submitted job (\d+)", submit.stdout).group(1)
    try:
        # the job trains; once it is past step 10, send what SLURM sends before the time limit
        # generous limits: the job may queue behind others, and a loaded 2-core machine starts DeepSpeed slowly
        wait_for(lambda: _logged_steps(run_dir) >= 10, 900, "the job to start and train 10 steps")
        subprocess.run(["scancel", "--signal=USR1", job_id], check=True)
        # the ranks checkpoint and exit with 75; the job script requeues the job
        job = wait_for(lambda: (j := _job(job_id)).get("Restarts", "0") != "0" and j.get("JobState") == "PENDING" and j,
                       300, "the job to be requeued (PENDING, Restarts 1)")
        assert job["Restarts"] == "1"
        stopped_at = _logged_steps(run_dir)
        assert 10 <= stopped_at < 60
        assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{stopped_at:08d}"
        # SLURM holds a requeued job for cred_expire + 1 s (11 s on the test cluster) before it starts again;
        # releasing it sooner races the revocation of the old job's credential
        job = wait_for(lambda: (j := _job(job_id)).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED",
                                                                        "TIMEOUT", "NODE_FAIL") and j,
                       900, "the requeued job to finish")
    finally:
        if _job(job_id).get("JobState") in ("RUNNING", "PENDING", "REQUEUED", "COMPLETING"):
            subprocess.run(["scancel", job_id], capture_output=True)
    log_text = "\n".join(p.read_text() for p in (run_dir / "logs").glob("*.out"))
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", log_text[-3000:]
    assert f"requeueing job {job_id} (restart 1)" in log_text
    assert f"job {job_id} start" in log_text and "restart 1 nodes" in log_text
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{stopped_at:08d}'} (step {stopped_at}" in log_text
    assert "done: step 60" in log_text

    # the same run, uninterrupted, on two ranks started directly
    from ssmforge.pretrain.launch import free_port

    straight = tmp_path / "straight"
    env = clean_env(WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                    OMP_NUM_THREADS="1")
    procs = [subprocess.Popen(pretrain_command(straight, *STEPS), cwd=ROOT, text=True,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in range(2)]
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-3000:]
    resumed, reference = train_losses(run_dir), train_losses(straight)
    assert sorted(resumed) == sorted(reference) == list(range(1, 61))
    for step in reference:
        assert resumed[step] == pytest.approx(reference[step], abs=1e-6), step
    assert resumed[60] == pytest.approx(reference[60], abs=1e-6) and reference[60] < reference[1]

    status = subprocess.run([sys.executable, "-m", "ssmforge", "submit", "--status", str(run_dir)],
                            capture_output=True, text=True, env=clean_env())
    assert status.returncode == 0, status.stderr
    assert status.stdout.splitlines()[1].split() == [str(run_dir), job_id, "COMPLETED", "1", "60", "step_00000060"]
