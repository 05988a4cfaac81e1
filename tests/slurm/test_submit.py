"""The rendered job script, run under stand-ins for srun and scontrol: ranks of a 2-node x 8-GPU job,
requeue on the requeue code only and within the limit, quoting of hostile values, CLI errors, status."""
import dataclasses
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from ssmforge.errors import ConfigError
from ssmforge.cli import main
from ssmforge.pretrain.launch import world_from_env
from ssmforge.slurm.submit import SubmitOptions, prepare_job, render, run_status, time_limit_seconds

from .conftest import ROOT, TINY

# srun's stand-in: starts nodes x tasks-per-node copies of the command with the variables srun sets
FAKE_SRUN = r"""#!/usr/bin/env python3
import os, subprocess, sys
args = sys.argv[1:]
opts = {}
while args and args[0].startswith("--"):
    key, _, value = args.pop(0)[2:].partition("=")
    opts[key] = value
nodes, per_node = int(opts["nodes"]), int(opts["ntasks-per-node"])
assert int(opts["ntasks"]) == nodes * per_node, opts
procs = []
for node in range(nodes):
    for local in range(per_node):
        env = dict(os.environ, SLURM_PROCID=str(node * per_node + local), SLURM_LOCALID=str(local),
                   SLURM_NODEID=str(node), SLURM_NTASKS=str(nodes * per_node), SLURM_STEP_ID="0",
                   SLURM_NTASKS_PER_NODE=str(per_node))
        procs.append(subprocess.Popen(args, env=env))
sys.exit(max(p.wait() for p in procs))
"""
FAKE_SCONTROL = r"""#!/usr/bin/env bash
echo "$*" >> "$FAKE_LOG/scontrol.calls"
if [ "$1 $2" = "show hostnames" ]; then echo node01; echo node02; exit 0; fi
exit 0
"""
# the training command's stand-in: maps srun's variables as the ssmforge command does before it joins the
# process group (launcher_env, in this environment's Python), records the rank variables, exits with $FAKE_EXIT
FAKE_PYTHON = f"#!{sys.executable}\n" + r"""
import json, os, sys
from ssmforge.launcher_env import export_launcher_env
export_launcher_env()
keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
        "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
with open(os.path.join(os.environ["FAKE_LOG"], "ranks.jsonl"), "a") as f:
    f.write(json.dumps({**{k: os.environ.get(k) for k in keys}, "argv": sys.argv[1:], "cwd": os.getcwd()}) + "\n")
if os.environ.get("FAKE_MARK") and os.environ["RANK"] == "0":  # a stop for a requeue, as the trainer marks it
    open(os.environ["SSMFORGE_REQUEUE_MARKER"], "w").close()
sys.exit(int(os.environ.get("FAKE_EXIT", "0")))
"""


def _executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def fake_slurm(tmp_path):
    """PATH with stand-ins for srun and scontrol; returns run(script, **env) -> (returncode, ranks, scontrol calls)."""
    bin_dir = tmp_path / "fakebin"
    _executable(bin_dir / "srun", FAKE_SRUN)
    _executable(bin_dir / "scontrol", FAKE_SCONTROL)
    log = tmp_path / "fakelog"
    log.mkdir()

    def run(script: str, **env):
        path = tmp_path / "job.sbatch"
        path.write_text(script)
        base = {k: v for k, v in os.environ.items()
                if not k.startswith(("SLURM_", "RANK", "LOCAL_", "WORLD_", "MASTER_"))}
        base.update(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(log), SLURM_JOB_ID="4242",
                    SLURM_JOB_NODELIST="node[01-02]", SLURM_JOB_NUM_NODES="2", SLURM_CPUS_PER_TASK="8")
        base.update({k: str(v) for k, v in env.items()})
        proc = subprocess.run(["bash", str(path)], env=base, capture_output=True, text=True, timeout=60)
        ranks_file, calls_file = log / "ranks.jsonl", log / "scontrol.calls"
        ranks = [json.loads(line) for line in ranks_file.read_text().splitlines()] if ranks_file.exists() else []
        calls = calls_file.read_text().splitlines() if calls_file.exists() else []
        for f in (ranks_file, calls_file):
            f.unlink(missing_ok=True)
        return proc, ranks, calls

    return run


def _script(tmp_path, python: Path, **options) -> str:
    options = {"nodes": 2, "gpus_per_node": 8, "cpus_per_task": 8, "time": "1-00:00:00", **options}
    run_dir = tmp_path / "run"
    return render(run_dir, run_dir / "slurm" / "config.yaml", SubmitOptions(**options), workdir=tmp_path,
                  python=str(python))


def test_two_nodes_of_eight_gpus_start_sixteen_ranks(tmp_path, fake_slurm):
    python = _executable(tmp_path / "py" / "python", FAKE_PYTHON)
    script = _script(tmp_path, python, partition="gpu", account="proj1", qos="high")
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --requeue", "#SBATCH --signal=USR1@120", "#SBATCH --partition=gpu",
                 "#SBATCH --account=proj1", "#SBATCH --qos=high", "#SBATCH --time=1-00:00:00",
                 f"#SBATCH --output={tmp_path / 'run' / 'logs'}/%x-%j.out"):
        assert line in script.splitlines(), line
    proc, ranks, calls = fake_slurm(script)
    assert proc.returncode == 0, proc.stderr
    assert sorted(int(r["RANK"]) for r in ranks) == list(range(16))
    for r in ranks:
        rank = int(r["RANK"])
        assert (int(r["LOCAL_RANK"]), int(r["NODE_RANK"])) == (rank % 8, rank // 8)
        assert r["WORLD_SIZE"] == "16" and r["LOCAL_WORLD_SIZE"] == "8"
        assert r["MASTER_ADDR"] == "node01" and r["MASTER_PORT"] == str(20000 + 4242 % 20000)
        assert r["argv"] == ["-m", "ssmforge", "pretrain", str(tmp_path / "run" / "slurm" / "config.yaml")]
        assert r["cwd"] == str(tmp_path)
        world = world_from_env({k: v for k, v in r.items() if v is not None and k != "argv" and k != "cwd"})
        assert (world.rank, world.world_size, world.local_rank, world.local_world_size) == (rank, 16, rank % 8, 8)
    assert not any(c.startswith("requeue") for c in calls)  # finished: no requeue


def test_requeue_code_requeues_and_other_failures_do_not(tmp_path, fake_slurm):
    python = _executable(tmp_path / "py" / "python", FAKE_PYTHON)
    script = _script(tmp_path, python, nodes=1, gpus_per_node=0, tasks_per_node=2, max_requeues=3)
    assert "--gpus-per-node" not in script and "#SBATCH --ntasks-per-node=2" in script.splitlines()
    env = {"SLURM_JOB_NUM_NODES": 1, "SLURM_JOB_NODELIST": "node01"}

    proc, ranks, calls = fake_slurm(script, FAKE_EXIT=75, SLURM_RESTART_COUNT=1, **env)
    assert proc.returncode == 0 and len(ranks) == 2
    assert "requeue 4242" in calls

    proc, ranks, calls = fake_slurm(script, FAKE_EXIT=2, **env)  # a usage or config error is not retried
    assert proc.returncode == 2 and len(ranks) == 2 and not any(c.startswith("requeue") for c in calls)
    assert "exit code 2, a usage or config error" in proc.stderr

    proc, ranks, calls = fake_slurm(script, FAKE_EXIT=75, SLURM_RESTART_COUNT=3, **env)  # limit reached
    assert proc.returncode == 75 and not any(c.startswith("requeue") for c in calls)
    assert "limit of 3 requeues is reached" in proc.stderr

    proc, ranks, calls = fake_slurm(script, SLURM_RESTART_COUNT=4, **env)  # requeued past it (node failures)
    assert proc.returncode == 1 and ranks == [] and "giving up" in proc.stderr

    # every rank saved and rank 0 marked the stop, but srun ended the others as they tore down (137): a requeue
    (tmp_path / "run" / "slurm").mkdir(parents=True, exist_ok=True)
    proc, ranks, calls = fake_slurm(script, FAKE_EXIT=137, FAKE_MARK=1, SLURM_RESTART_COUNT=1, **env)
    assert proc.returncode == 0 and "requeue 4242" in calls, proc.stdout + proc.stderr
    assert not list((tmp_path / "run" / "slurm").glob("requeue-*"))  # the marker is consumed


def test_failures_are_requeued_until_they_repeat_from_the_same_checkpoint(tmp_path, fake_slurm, capsys,
                                                                         monkeypatch):
    python = _executable(tmp_path / "py" / "python", FAKE_PYTHON)
    script = _script(tmp_path, python, nodes=1, gpus_per_node=0, tasks_per_node=2, max_requeues=20,
                     max_failures_without_progress=3)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "slurm").mkdir()
    (run / "slurm" / "jobs.jsonl").write_text(json.dumps({"job_id": "4242"}) + "\n")
    env = {"SLURM_JOB_NUM_NODES": 1, "SLURM_JOB_NODELIST": "node01"}

    def attempt(restart: int, latest: str, code: int, job: str = "4242"):
        (run / "checkpoints" / "latest").write_text(latest)
        proc, ranks, calls = fake_slurm(script, FAKE_EXIT=code, SLURM_RESTART_COUNT=restart, SLURM_JOB_ID=job, **env)
        return proc, ranks, [c for c in calls if c.startswith("requeue")]

    # a lost rank (3) twice from step 10, then progress: each failure is requeued
    for restart, latest in ((0, "step_00000010"), (1, "step_00000010"), (2, "step_00000020")):
        proc, ranks, calls = attempt(restart, latest, 3)
        assert proc.returncode == 0 and calls == ["requeue 4242"], proc.stdout + proc.stderr
    assert "training failed with exit code 3 (failure 1 of at most 3 from step_00000020)" in proc.stdout
    # then a crash every time before a new checkpoint: the third failure in a row from step 20 ends the job
    proc, ranks, calls = attempt(3, "step_00000020", 1)
    assert proc.returncode == 0 and calls == ["requeue 4242"]
    proc, ranks, calls = attempt(4, "step_00000020", 1)
    assert proc.returncode == 1 and not calls and len(ranks) == 2
    reason = ("crash loop: training failed 3 times in a row from checkpoint step_00000020 (exit codes 3, 1, 1): "
              "not requeued; once the cause is fixed, ssmforge submit resumes from step_00000020")
    assert proc.stderr.strip().splitlines()[-1] == f"ssmforge: {reason}"
    # another job of the same run (submitted again) counts its own failures
    proc, ranks, calls = attempt(0, "step_00000020", 1, job="4343")
    assert proc.returncode == 0 and calls == ["requeue 4343"]
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no scontrol: the state is unknown, the reason is not
    assert run_status(run).stopped == reason
    assert main(["submit", "--status", str(run)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"{run}: stopped: {reason}"



def test_a_rank_killed_by_a_signal_is_named_from_sruns_report_of_this_restart(tmp_path, fake_slurm):
    python = _executable(tmp_path / "py" / "python", FAKE_PYTHON)
    script = _script(tmp_path, python, nodes=1, gpus_per_node=0, tasks_per_node=2, max_requeues=3)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step_00000030")
    (run / "logs").mkdir()
    env = {"SLURM_JOB_NUM_NODES": 1, "SLURM_JOB_NODELIST": "node01", "SLURM_JOB_NAME": "pile",
           "SLURM_RESTART_COUNT": 1, "FAKE_EXIT": 137}

    def stopped_lines(*reports: str) -> list[str]:
        """The job's lines saying why it stopped, after srun wrote `reports` into the job log (as SLURM does,
        after the lines of an earlier restart)."""
        (run / "logs" / "pile-4242.out").write_text(
            "ssmforge: job 4242 start 2026-12-01T00:00:00Z restart 0 nodes node01\n"
            "srun: error: node01: task 0: Killed\n"
            "ssmforge: job 4242 start 2026-12-01T01:00:00Z restart 1 nodes node01\nstep 31 loss 4.2\n"
            + "".join(f"srun: error: {report}\n" for report in reports))
        (run / "slurm" / "failures-4242").unlink(missing_ok=True)  # each a first failure, never a crash loop
        proc, _, calls = fake_slurm(script, **env)
        assert proc.returncode == 0 and "requeue 4242" in calls, proc.stdout + proc.stderr
        return [line for line in proc.stderr.splitlines() if line.startswith("ssmforge: training stopped")]

    assert stopped_lines("node01: task 1: Killed", "node01: task 0: Killed") == [
        "ssmforge: training stopped: srun lost rank 1 (node01: task 1: Killed) and ended the other ranks; "
        "the checkpoint to resume from is step_00000030"]
    assert stopped_lines("node01: tasks 0-1: Segmentation fault") == [
        "ssmforge: training stopped: srun lost ranks 0-1 (node01: tasks 0-1: Segmentation fault) and ended the "
        "other ranks; the checkpoint to resume from is step_00000030"]
    # a rank that exited with a code printed its own line; nothing reported in this restart: nothing to add
    assert stopped_lines("node01: task 0: Exited with exit code 3", "node01: task 1: Killed") == []
    assert stopped_lines() == []

def test_the_job_ends_a_crashed_step_at_once_and_binds_a_gpu_to_each_rank(tmp_path):
    python = tmp_path / "python"
    gpu = _script(tmp_path, python)
    assert "srun --kill-on-bad-exit=1 --gpus-per-task=1 --nodes=" in gpu and "#SBATCH --mem=0" in gpu.splitlines()
    shared = _script(tmp_path, python, bind_gpus=False, mem="480G")
    assert "srun --kill-on-bad-exit=1 --nodes=" in shared and "#SBATCH --mem=480G" in shared.splitlines()
    cpu = _script(tmp_path, python, gpus_per_node=0, tasks_per_node=2)
    assert "--gpus-per-task" not in cpu and "--mem" not in cpu


FAKE_SINFO = """#!/usr/bin/env bash
echo "$*" >> "$FAKE_LOG/sinfo.calls"
printf '112\n112\n96\n'
"""


def test_cpus_per_task_come_from_the_partitions_nodes_and_are_said(tmp_path, monkeypatch, capsys):
    _executable(tmp_path / "fakebin" / "sinfo", FAKE_SINFO)
    code, calls, out = _submit(tmp_path, monkeypatch, capsys, *TINY, "stages.run=[pretrain]", "--gpus-per-node", "8",
                               "--partition", "gpu", cpus=None)
    assert code == 0, out.err
    script = Path(calls[0].split()[-1]).read_text()
    assert "#SBATCH --cpus-per-task=12" in script.splitlines()  # the smallest node: 96 CPUs / 8 tasks
    assert (tmp_path / "fakelog" / "sinfo.calls").read_text().split() == ["-h", "-N", "-o", "%c", "-p", "gpu"]
    assert out.err.splitlines() == [  # no slurm.gpu: no memory plan, and it says so
        "ssmforge: warning: no memory plan (set slurm.gpu or pass --gpu NAME to have ssmforge plan check that the "
        "run fits its GPUs)",
        "ssmforge: job shape: 1 node x 8 tasks and 8 GPUs; 12 CPUs per task (96 CPUs per node of gpu (sinfo) / 8 "
        "tasks); memory per node: all of it (--mem=0)"]
    from ssmforge.pretrain.config import load_config

    assert load_config(tmp_path / "run" / "slurm" / "config.yaml").slurm.cpus_per_task == 12  # frozen as used


def test_a_multi_node_run_dir_on_storage_of_one_machine_is_a_warning(tmp_path, monkeypatch, capsys):
    from ssmforge.slurm import resources

    shared = tmp_path / "shared"
    (shared / "tmp").mkdir(parents=True)
    mounts = [("/", "ext4"), (str(shared), "lustre"), (str(shared / "tmp"), "tmpfs")]
    monkeypatch.setattr(resources, "_mounts", lambda: mounts)
    # run folders that do not exist yet: judged by their nearest existing parent's filesystem
    assert resources.node_local_storage(shared / "project" / "runs" / "x") is None
    assert resources.node_local_storage(shared / "tmp" / "runs" / "x") == f"{shared / 'tmp'} (tmpfs)"
    assert resources.node_local_storage(shared.parent / "elsewhere" / "x") == "/ (ext4)"
    run_dir = tmp_path / "run"
    mounts.append((str(tmp_path), "xfs"))
    code, calls, out = _submit(tmp_path, monkeypatch, capsys, *TINY, "stages.run=[pretrain]", "--nodes", "2")
    assert code == 0 and len(calls) == 1
    warning = [line for line in out.err.splitlines() if "warning" in line]
    assert warning == [f"ssmforge: warning: run_dir={run_dir} is on {tmp_path} (xfs), storage of this machine "
                       f"alone: the 2 nodes of the job will not share its checkpoints and shards; put run_dir on a "
                       f"shared filesystem"]
    mounts[-1] = (str(tmp_path), "nfs4")
    code, calls, out = _submit(tmp_path, monkeypatch, capsys, *TINY, "stages.run=[pretrain]", "--nodes", "2")
    assert code == 0 and "warning" not in out.err


def test_hostile_paths_are_quoted_and_hostile_directives_refused(tmp_path, fake_slurm):
    evil = tmp_path / "x $(touch PWNED1) `touch PWNED2`; touch PWNED3 'q\" y"
    python = _executable(evil / "python", FAKE_PYTHON)
    workdir = evil / "work"
    workdir.mkdir()
    run_dir = tmp_path / "run"
    script = render(run_dir, run_dir / "slurm" / "config.yaml",
                    SubmitOptions(nodes=1, gpus_per_node=0, tasks_per_node=1, cpus_per_task=1, time="10:00"),
                    workdir=workdir, python=str(python))
    proc, ranks, _ = fake_slurm(script, SLURM_JOB_NUM_NODES=1, SLURM_JOB_NODELIST="node01")
    assert proc.returncode == 0, proc.stderr
    assert len(ranks) == 1 and ranks[0]["cwd"] == str(workdir)
    assert not list(tmp_path.rglob("PWNED*")) and not list(Path.cwd().glob("PWNED*"))
    for bad in ({"job_name": "x\n#SBATCH --wrap=rm"}, {"partition": "gpu;rm -rf /"}, {"account": "a b"},
                {"qos": "$(id)"}):
        with pytest.raises(ConfigError, match="#SBATCH line"):
            render(run_dir, run_dir / "c.yaml", SubmitOptions(time="10:00", **bad))
    with pytest.raises(ConfigError, match="cannot go into an #SBATCH line"):
        render(tmp_path / "a b", tmp_path / "c.yaml", SubmitOptions(time="10:00"))


def test_flags_override_the_config_slurm_section_and_are_frozen_with_the_run(tmp_path):
    from ssmforge.pretrain.config import SlurmConfig, load_config

    # the job's fields are SlurmConfig's, declared once; only the job name is the command line's own
    assert [f.name for f in dataclasses.fields(SubmitOptions)] == \
        [f.name for f in dataclasses.fields(SlurmConfig)] + ["job_name"]
    config = load_config(ROOT / "configs" / "tiny.yaml", [f"run_dir={tmp_path / 'r'}", "slurm.partition=cpu",
                                                          "slurm.max_requeues=4"])
    options = SubmitOptions.from_config(config.slurm, nodes=3, gpus_per_node=0, time="10:00", partition=None,
                                        signal_seconds_before_end=30, job_name="j1", cpus_per_task=4)
    assert (options.nodes, options.gpus_per_node, options.time, options.signal_seconds_before_end) == \
        (3, 0, "10:00", 30)
    assert (options.partition, options.max_requeues, options.job_name) == ("cpu", 4, "j1")  # not given: config's
    run_dir, frozen, script = prepare_job(str(ROOT / "configs" / "tiny.yaml"),
                                          [f"run_dir={tmp_path / 'r'}", "slurm.partition=cpu", "slurm.max_requeues=4",
                                           *TINY], options)
    assert "#SBATCH --nodes=3" in script.splitlines() and "#SBATCH --partition=cpu" in script.splitlines()
    assert load_config(frozen).slurm == SlurmConfig(partition="cpu", time="10:00", nodes=3, gpus_per_node=0,
                                                    signal_seconds_before_end=30, max_requeues=4, cpus_per_task=4)


@pytest.mark.parametrize("value, seconds", [("30", 1800), ("10:30", 630), ("24:00:00", 86400), ("2-00", 172800),
                                            ("1-02:03:04", 93784)])
def test_time_limits(value, seconds):
    assert time_limit_seconds(value) == seconds


@pytest.mark.parametrize("value", ["", "1h", "1:2:3:4", "0", "-5", "10:00; rm"])
def test_bad_time_limits_are_one_line_errors(value):
    with pytest.raises(ConfigError, match="--time"):
        time_limit_seconds(value)


def test_cli_dry_run_and_errors(tmp_path, capsys, monkeypatch):
    config = str(ROOT / "configs" / "tiny.yaml")
    assert main(["submit", config, f"run_dir={tmp_path / 'r'}", *TINY, "stages.run=[prepare,pretrain]", "--nodes",
                 "2", "--gpus-per-node", "8", "--time", "2:00:00", "--signal-seconds", "300", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("#!/bin/bash") and "#SBATCH --signal=USR1@300" in out and "#SBATCH --nodes=2" in out
    # a dry run submits nothing, but the script it prints can be: what it names exists
    assert (tmp_path / "r" / "slurm" / "config.yaml").is_file() and (tmp_path / "r" / "logs").is_dir()
    assert not list((tmp_path / "r" / "slurm").glob("job-*")) and not (tmp_path / "r" / "slurm" / "jobs.jsonl").exists()
    assert main(["submit", config, "--time", "forever", "--dry-run"]) == 2
    assert main(["submit", config, "--gpus-per-node", "0", "--tasks-per-node", "0", "--dry-run"]) == 2
    assert main(["submit", config, "--time", "1:00", "--signal-seconds", "120", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("ssmforge: error: ") for line in err)
    assert "--time='forever'" in err[0] and "--tasks-per-node=0" in err[1] and "does not fit" in err[2]
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert main(["submit", config, f"run_dir={tmp_path / 'r'}", *TINY]) == 2
    assert "sbatch not found" in capsys.readouterr().err


def test_status_of_a_run_folder(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    (run / "slurm").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "latest").write_text("step_00000020")
    (run / "slurm" / "jobs.jsonl").write_text(json.dumps({"job_id": "17"}) + "\n")
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in (
        {"step": 10, "kind": "train", "loss": 3.0}, {"step": 20, "kind": "train", "loss": 2.5},
        {"step": 20, "kind": "val", "loss": 2.6})) + "\n")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no scontrol, no sacct: state unknown
    status = run_status(run)
    assert (status.job_id, status.state, status.last_step, status.last_checkpoint) == ("17", "UNKNOWN", 20,
                                                                                        "step_00000020")
    assert main(["submit", "--status", str(run)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["RUN", "JOB", "STATE", "RESTARTS", "STEP", "CHECKPOINT"]
    assert lines[1].split() == [str(run), "17", "UNKNOWN", "-", "20", "step_00000020"]
    assert main(["submit", "--status", str(tmp_path / "nope")]) == 2


# sbatch's stand-in: records its arguments and answers with job ids 101, 102, ...
FAKE_SBATCH = r"""#!/usr/bin/env bash
echo "$*" >> "$FAKE_LOG/sbatch.calls"
echo $((100 + $(wc -l < "$FAKE_LOG/sbatch.calls")))
"""
HUB = "data.sources=[{kind: hub, name: monology/pile-uncopyrighted}]"


def _submit(tmp_path, monkeypatch, capsys, *args, cpus: str | None = "2") -> tuple[int, list[str], str]:
    bin_dir, log = tmp_path / "fakebin", tmp_path / "fakelog"
    _executable(bin_dir / "sbatch", FAKE_SBATCH)
    log.mkdir(exist_ok=True)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LOG", str(log))
    code = main(["submit", str(ROOT / "configs" / "tiny.yaml"), f"run_dir={tmp_path / 'run'}", "--gpus-per-node",
                 "0", "--time", "1:00:00", *(["--cpus-per-task", cpus] if cpus else []), *args])
    calls = (log / "sbatch.calls").read_text().splitlines() if (log / "sbatch.calls").exists() else []
    return code, calls, capsys.readouterr()


def test_missing_large_shards_are_prepared_by_a_job_of_their_own_before_training(tmp_path, monkeypatch, capsys):
    code, calls, out = _submit(tmp_path, monkeypatch, capsys, HUB, "--cpus-per-task", "16",
                               "stages.run=[prepare,pretrain,export,eval_ppl,finetune_glue]")
    assert code == 0, out.err
    run_dir = tmp_path / "run"
    scripts = sorted((run_dir / "slurm").glob("job-*.sbatch"))
    assert [c.split()[-1] for c in calls] == [str(s) for s in scripts] and len(scripts) == 3
    assert calls[0] == f"--parsable {scripts[0]}"  # the preparation first, free to start
    assert calls[1] == f"--parsable --dependency=afterok:101 --kill-on-invalid-dep=yes {scripts[1]}"
    assert calls[2] == f"--parsable --dependency=afterok:102 --kill-on-invalid-dep=yes {scripts[2]}"
    prepare, train, evaluate = (s.read_text() for s in scripts)
    assert "#SBATCH --cpus-per-task=16" in prepare and "#SBATCH --nodes=1" in prepare and "--array" not in prepare
    assert "gpus" not in prepare and '"${COMMAND[@]}" "$CONFIG"\n' in prepare
    assert "-m ssmforge prepare)" in prepare and "-m ssmforge pretrain)" in train
    # the evaluation stages, after training succeeded, through `ssmforge run` on the frozen config
    assert "-m ssmforge run)" in evaluate and '"$CONFIG" --only export,eval_ppl,finetune_glue' in evaluate
    assert out.out.splitlines() == ["submitted prepare job 101", "submitted pretrain job 102 (starts after job 101 "
                                    "succeeded)", "submitted evaluate job 103 (starts after job 102 succeeded)",
                                    f"follow the run with: ssmforge submit --status {run_dir}"]
    records = [json.loads(line) for line in (run_dir / "slurm" / "jobs.jsonl").read_text().splitlines()]
    assert [(r["job_id"], r["stage"]) for r in records] == [("101", "prepare"), ("102", "pretrain"),
                                                            ("103", "evaluate")]
    assert run_status(run_dir).job_id == "102"  # the training job tells the run's state


def test_a_prepare_in_parts_is_an_array_after_the_tokenizer_it_needs(tmp_path, monkeypatch, capsys):
    code, calls, out = _submit(tmp_path, monkeypatch, capsys, HUB, "tokenizer.kind=sentencepiece", "model.vocab_size=8192",
                               "stages.run=[prepare,pretrain]", "--prepare-parts", "8")
    assert code == 0, out.err
    scripts = [Path(c.split()[-1]).read_text() for c in calls]
    assert [c.split()[1:-1] for c in calls] == [[], ["--dependency=afterok:101", "--kill-on-invalid-dep=yes"],
                                                ["--dependency=afterok:102", "--kill-on-invalid-dep=yes"]]
    assert '"$CONFIG" --train-tokenizer' in scripts[0] and "--array" not in scripts[0]
    assert "#SBATCH --array=0-7" in scripts[1] and '"$CONFIG" --parts 8 --part "$SLURM_ARRAY_TASK_ID"' in scripts[1]
    assert "-%A_%a.out" in scripts[1] and "-m ssmforge pretrain)" in scripts[2]


def test_small_or_prepared_shards_need_no_preparation_job(tmp_path, monkeypatch, capsys):
    code, calls, out = _submit(tmp_path, monkeypatch, capsys, *TINY)  # 300 synthetic documents: in the job
    assert code == 0 and len(calls) == 2, out.err
    assert "-m ssmforge pretrain)" in Path(calls[0].split()[-1]).read_text()
    assert "-m ssmforge run)" in Path(calls[1].split()[-1]).read_text()  # stages.run's export and eval_ppl


def test_the_eval_harness_stage_runs_in_the_evaluation_job_after_training(tmp_path, monkeypatch, capsys):
    code, calls, out = _submit(tmp_path, monkeypatch, capsys, *TINY,
                               "stages.run=[prepare,pretrain,export,eval_ppl,eval_harness]", "harness.limit=10")
    assert code == 0 and len(calls) == 2, out.err
    assert calls[1].split()[1] == "--dependency=afterok:101"
    evaluate = Path(calls[1].split()[-1]).read_text()
    assert "-m ssmforge run)" in evaluate and '"$CONFIG" --only export,eval_ppl,eval_harness' in evaluate
    frozen = (tmp_path / "run" / "slurm" / "config.yaml").read_text()
    assert "harness:" in frozen and "limit: 10" in frozen  # the job reads the run's harness section


@pytest.mark.parametrize("args, message", [
    ((HUB.replace("}]", ", max_tokens: 1000000}]"), "--prepare-parts", "4"),
     "--prepare-parts=4: data.sources.0.max_tokens=1000000 cannot be split over parts"),
    ((HUB, "--prepare-parts", "0"), "--prepare-parts=0 is invalid: must be a positive integer"),
])
def test_preparation_jobs_that_cannot_work_are_refused_before_anything_is_submitted(tmp_path, monkeypatch, capsys,
                                                                                     args, message):
    code, calls, out = _submit(tmp_path, monkeypatch, capsys, *args)
    assert code == 2 and calls == [] and not (tmp_path / "run").exists()  # nothing written
    assert out.err.startswith(f"ssmforge: error: {message}") and len(out.err.splitlines()) == 1


def test_a_dry_run_prints_every_job_in_order(tmp_path, capsys):
    assert main(["submit", str(ROOT / "configs" / "tiny.yaml"), f"run_dir={tmp_path / 'run'}", HUB,
                 "--gpus-per-node", "0", "--cpus-per-task", "2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# ---- job 1 of 3: prepare ----\n#!/bin/bash")
    assert "\n# ---- job 2 of 3: pretrain, after job 1 succeeded ----\n#!/bin/bash" in out
    assert "\n# ---- job 3 of 3: evaluate, after job 2 succeeded ----\n#!/bin/bash" in out
