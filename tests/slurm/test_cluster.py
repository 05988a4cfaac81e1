"""On a real SLURM of two nodes on this machine (slurm/start_local_cluster.sh): `ssmforge submit` a 2-task CPU
pretraining job, preempt it mid-run with the warning signal SLURM sends before the time limit, then kill a rank of
the requeued run, and check that the job named the lost rank, requeued itself each time, resumed from its
checkpoint, finished, and matches an uninterrupted run; and a job
requeued onto fewer nodes than it started on, which continues the same run."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from ..processes import logged_step, training_process
from .conftest import ROOT, TINY, clean_env, pretrain_command, train_losses, wait_for

STEPS = ("train.max_steps=60", "train.log_every=1", "train.eval_every=1000", "train.save_every=1000")


def _job(job_id: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    return dict(item.split("=", 1) for item in out.split() if "=" in item)


FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")


def _finished(job_id: str, timeout: float, what: str) -> dict:
    """The job's fields once it has ended, whichever way."""
    return wait_for(lambda: (j := _job(job_id)).get("JobState") in FINISHED and j, timeout, what)


def _cancel_unfinished(*job_ids: str) -> None:
    for job_id in job_ids:
        if _job(job_id).get("JobState") in ("RUNNING", "PENDING", "REQUEUED", "COMPLETING"):
            subprocess.run(["scancel", job_id], capture_output=True)


def _submit(run_dir, cwd, *args) -> str:
    """`ssmforge submit` of tiny.yaml into run_dir; its output (the job ids)."""
    proc = subprocess.run([sys.executable, "-m", "ssmforge", "submit", str(ROOT / "configs" / "tiny.yaml"),
                           f"run_dir={run_dir}", *args], cwd=cwd, env=clean_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.slow
def test_preempted_job_requeues_resumes_and_matches_an_uninterrupted_run(slurm_cluster, tmp_path):
    run_dir = tmp_path / "slurm_run"
    submitted = _submit(run_dir, tmp_path, *TINY, *STEPS, "--gpus-per-node", "0", "--tasks-per-node", "2",
                        "--cpus-per-task", "1", "--time", "15:00", "--max-requeues", "3", "--job-name", "ssmforge-test")
    job_id = re.search(r"submitted pretrain job (\d+)", submitted).group(1)
    # tiny.yaml's stages end with export and eval_ppl (synthetic-heldout): one job after training succeeded
    eval_id = re.search(rf"submitted evaluate job (\d+) \(starts after job {job_id} succeeded\)",
                        submitted).group(1)
    try:
        # the job trains; once it is past step 10, send what SLURM sends before the time limit
        # generous limits: the job may queue behind others, and a loaded 2-core machine starts DeepSpeed slowly
        wait_for(lambda: logged_step(run_dir) >= 10, 900, "the job to start and train 10 steps")
        subprocess.run(["scancel", "--signal=USR1", job_id], check=True)
        # the ranks checkpoint and exit with 75; the job script requeues the job
        job = wait_for(lambda: (j := _job(job_id)).get("Restarts", "0") != "0" and j.get("JobState") == "PENDING" and j,
                       300, "the job to be requeued (PENDING, Restarts 1)")
        assert job["Restarts"] == "1"
        stopped_at = logged_step(run_dir)
        assert 10 <= stopped_at < 60
        assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{stopped_at:08d}"
        # 2 steps into the requeued run, rank 1 is killed as the OOM killer would: srun ends rank 0 at once.
        # It is frozen first, which holds rank 0 at its next collective: the run cannot reach its last step and
        # final checkpoint while the test checks it has not (a kill after that would be a different story)
        wait_for(lambda: logged_step(run_dir) >= stopped_at + 2, 900, "the requeued job to train 2 steps", 0.1)
        victim = wait_for(lambda: training_process(run_dir, 1), 60, "rank 1's training process", 0.1)
        os.kill(victim, signal.SIGSTOP)
        time.sleep(1.0)  # a step rank 1 had finished ends on rank 0 too
        frozen_at = logged_step(run_dir)
        assert stopped_at + 2 <= frozen_at < 60, f"the requeued run was at step {frozen_at} when rank 1 froze"
        assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{stopped_at:08d}"
        os.kill(victim, signal.SIGKILL)
        # Restarts 2 or more in any state: the requeued job may leave PENDING (or, on a loaded host, be requeued
        # a third time, see below) between two polls
        wait_for(lambda: int(_job(job_id).get("Restarts", "0")) >= 2, 300, "the job to be requeued again (Restarts 2)")
        job = _finished(job_id, 900, "the requeued job to finish")
        evaluation = _finished(eval_id, 900, "the evaluation job to finish")
    finally:
        _cancel_unfinished(job_id, eval_id)
    log_text = "\n".join(p.read_text() for p in (run_dir / "logs").glob("*.out"))
    # Restarts 2, or 3: on a loaded host a step kill can reach slurmd late (its messages time out there)
    # and hit the requeued job's step, which has the same step id. The ranks take it for a preemption: they
    # checkpoint and the job requeues once more, which is what must happen
    assert job["JobState"] == "COMPLETED" and job["Restarts"] in ("2", "3"), log_text[-3000:]
    if job["Restarts"] == "3":
        restart_2 = log_text[log_text.index("restart 2 nodes"):log_text.index("restart 3 nodes")]
        assert "received SIGTERM: checkpointing and stopping for a requeue" in restart_2, restart_2[-3000:]
    # the evaluation waited through the requeue for the training job's success, then exported and scored
    assert evaluation["JobState"] == "COMPLETED" and evaluation["StartTime"] >= job["EndTime"], log_text[-3000:]
    scored = json.loads((run_dir / "eval" / "ppl-synthetic-heldout-L64-S64.json").read_text())
    assert scored["checkpoint"] == str(run_dir / "export") and scored["nats_above_floor"] > 0
    assert f"requeueing job {job_id} (restart 1)" in log_text and f"requeueing job {job_id} (restart 2)" in log_text
    assert f"job {job_id} start" in log_text and "restart 1 nodes" in log_text and "restart 2 nodes" in log_text
    # the lost rank named by the job script from srun's report; rank 0 may have named it too, before srun's
    # --kill-on-bad-exit ended it
    lost = re.findall(r"^ssmforge: training stopped: .*$", log_text, re.MULTILINE)
    by_srun = [line for line in lost if re.fullmatch(
        r"ssmforge: training stopped: srun lost rank 1 \([^:]+: task 1: Killed\) and ended the other ranks; "
        rf"the checkpoint to resume from is step_{stopped_at:08d}", line)]
    by_rank_0 = [line for line in lost if line.startswith("ssmforge: training stopped: rank 0 lost rank 1 (")]
    assert len(by_srun) == 1 and len(by_srun) + len(by_rank_0) == len(lost) <= 2, lost
    # both requeued runs resumed from the checkpoint of the stop
    assert log_text.count(f"resumed from {run_dir / 'checkpoints' / f'step_{stopped_at:08d}'} (step {stopped_at}") >= 2
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
    assert status.stdout.splitlines()[1].split() == [str(run_dir), job_id, "COMPLETED", job["Restarts"], "60",
                                                     "step_00000060"]


@pytest.mark.slow
def test_a_job_requeued_onto_fewer_nodes_continues_the_same_run(local_cluster, tmp_path):
    """Elastic resume through SLURM: a 2-node job loses a node (drained, as after a hardware fault) while it
    trains; it checkpoints at step 4 under ZeRO-2 and requeues, and waits for two nodes until it is shrunk to
    the one left (`scontrol update JobId=.. NumNodes=1 NumTasks=1`). It restarts there: 2 ranks become 1, the
    ZeRO shards are converted, the global batch and the data order stay, and every step's loss equals an
    uninterrupted single-rank run's."""
    run_dir, second = tmp_path / "elastic_run", local_cluster.nodes[1]
    settings = ("train.max_steps=8", "train.log_every=1", "train.eval_every=1000", "train.save_every=1000",
                "train.global_batch_size=8", "train.micro_batch_size=4", "deepspeed.zero_stage=2",
                "train.precision=fp32")
    submitted = _submit(run_dir, tmp_path, *TINY, *settings, "train.stop_at_step=4", "stages.run=[prepare,pretrain]",
                        "--gpus-per-node", "0", "--tasks-per-node", "1", "--cpus-per-task", "1", "--nodes", "2",
                        "--time", "15:00", "--max-requeues", "2", "--job-name", "ssmforge-elastic")
    job_id = re.search(r"submitted pretrain job (\d+)", submitted).group(1)
    try:
        job = wait_for(lambda: (j := _job(job_id)).get("JobState") == "RUNNING" and j, 900, "the job to start")
        assert job["NumNodes"] == "2", job
        # the job keeps running on a draining node; once requeued it cannot start on two nodes again
        subprocess.run(["scontrol", "update", f"NodeName={second}", "State=DRAIN", "Reason=ssmforge-test"], check=True)
        wait_for(lambda: (j := _job(job_id)).get("Restarts", "0") == "1" and j.get("JobState") == "PENDING", 900,
                 "the job to checkpoint at step 4 and requeue")
        time.sleep(5)
        assert _job(job_id)["JobState"] == "PENDING"  # waiting for a second node
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "NumNodes=1", "NumTasks=1"], check=True)
        job = _finished(job_id, 1200, "the job to stop at step 4, requeue and finish on one node")
    finally:
        _cancel_unfinished(job_id)
        subprocess.run(["scontrol", "update", f"NodeName={second}", "State=RESUME"], capture_output=True)
    log_text = "\n".join(p.read_text() for p in sorted((run_dir / "logs").glob("*.out")))
    # on failure: every line of the job script and every warning of every attempt, not only the last's tail
    story = "\n".join(line for line in log_text.splitlines()
                      if line.startswith("ssmforge:") or re.search(r"WARNING ssmforge|ERROR|error|Traceback", line))
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1" and job["NumNodes"] == "1", story[-6000:]
    assert f"requeueing job {job_id} (restart 1)" in log_text
    step4 = run_dir / "checkpoints" / "step_00000004"
    assert "x 1 accumulation x 2 ranks" in log_text and "x 2 accumulation x 1 ranks" in log_text, log_text[-3000:]
    assert f"{step4} was saved on 2 data-parallel ranks: converting it" in log_text
    assert f"resumed from {step4} (step 4" in log_text and "done: step 8" in log_text
    assert len(list(step4.glob("zero_pp_rank_*_optim_states.pt"))) == 2 and (step4 / "universal" / "zero").is_dir()

    straight = tmp_path / "straight"  # one rank, started directly, on the job's shards
    proc = subprocess.run(pretrain_command(straight, *settings, f"data.shard_dir={run_dir / 'data'}"), cwd=ROOT,
                          env=clean_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed, reference = train_losses(run_dir), train_losses(straight)
    assert sorted(resumed) == sorted(reference) == list(range(1, 9))
    for step in reference:
        assert resumed[step] == pytest.approx(reference[step], abs=1e-5), step
    assert reference[8] < reference[1]



@pytest.mark.slow
def test_shards_too_large_for_the_training_job_are_prepared_by_an_array_first(local_cluster, tmp_path):
    """`ssmforge submit` of a run whose shards are missing and too large to prepare inside the training job
    (more synthetic documents than it prepares itself): an array of two preparation tasks writes the parts,
    the last merges them, and the training job, held until then by its dependency, trains on them."""
    run_dir = tmp_path / "prepared_run"
    submitted = _submit(run_dir, tmp_path, "data.sources=[{kind: synthetic, max_documents: 100001}]",
                        "data.num_workers=0", "train.max_steps=3", "train.log_every=1", "train.eval_every=1000",
                        "stages.run=[prepare,pretrain]", "--gpus-per-node", "0", "--tasks-per-node", "1",
                        "--cpus-per-task", "1", "--time", "15:00", "--prepare-parts", "2", "--job-name", "ssmforge-prep")
    prepare_id = re.search(r"submitted prepare job (\d+)", submitted).group(1)
    train_id = re.search(rf"submitted pretrain job (\d+) \(starts after job {prepare_id} succeeded\)",
                         submitted).group(1)
    try:
        job = _finished(train_id, 1200, "the preparation array and then the training job to finish")
    finally:
        _cancel_unfinished(prepare_id, train_id)
    logs = {p.name: p.read_text() for p in (run_dir / "logs").glob("*.out")}
    assert job["JobState"] == "COMPLETED", "\n".join(logs.values())[-3000:]
    tasks = [_job(f"{prepare_id}_{task}") for task in (0, 1)]
    assert all(t["JobState"] == "COMPLETED" for t in tasks), tasks
    assert job["StartTime"] >= max(t["EndTime"] for t in tasks)  # held by its dependency until both were done
    assert sorted(name for name in logs if "-prepare-" in name) == [f"ssmforge-prep-prepare-{prepare_id}_{t}.out"
                                                                    for t in (0, 1)]
    manifest = json.loads((run_dir / "data" / "manifest.json").read_text())
    assert manifest["parts"]["count"] == 2 and manifest["splits"]["train"]["documents"] > 90_000
    assert sorted(train_losses(run_dir)) == [1, 2, 3]
