"""Faults a long run meets, injected on purpose: a second job on the same run folder, a job killed
mid-run. Each must end with a clear message and lose nothing beyond the last checkpoint."""
import errno
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ssmforge.errors import ConfigError
from ssmforge.pretrain import integrity, runlock
from ssmforge.pretrain.runlock import RunLock

from ..processes import assert_survivor_named_rank_1, kill_rank_1_after, logged_step, wait_for_step
from .conftest import FAULT_STEPS, ROOT, clean_env, pretrain_command, run_pretrain, start_ranks, train_losses


def test_a_second_lock_on_a_run_folder_is_refused_with_its_holder(tmp_path):
    first = RunLock(tmp_path / "run")
    first.acquire(env={})
    with pytest.raises(ConfigError, match=rf"run_dir={tmp_path / 'run'} is in use by a running job \(.*pid {os.getpid()}"):
        RunLock(tmp_path / "run").acquire(env={})
    first.release()
    again = RunLock(tmp_path / "run")
    again.acquire(env={})  # free once released
    assert again.holder()["pid"] == os.getpid()
    again.release()


def test_the_same_slurm_job_waits_for_its_previous_incarnation(tmp_path, monkeypatch):
    monkeypatch.setattr(runlock, "SAME_JOB_WAIT_S", 10.0)
    old = RunLock(tmp_path)
    old.acquire(env={"SLURM_JOB_ID": "77"})
    threading.Timer(1.0, old.release).start()
    start = time.monotonic()
    RunLock(tmp_path).acquire(env={"SLURM_JOB_ID": "77"})  # a requeued job: waits instead of refusing
    assert 0.8 < time.monotonic() - start < 9
    with pytest.raises(ConfigError, match="in use"):
        RunLock(tmp_path).acquire(env={"SLURM_JOB_ID": "78"})  # another job is refused at once


@pytest.mark.slow
def test_a_second_job_on_a_busy_run_folder_is_refused_and_a_killed_job_resumes(tmp_path):
    steps = ("train.max_steps=3000", "train.log_every=1", "train.eval_every=100000", "train.save_every=10")
    (first,) = start_ranks(pretrain_command(tmp_path, *steps), ranks=1)
    try:
        wait_for_step(tmp_path, 12, first)
        second = subprocess.run(pretrain_command(tmp_path, *steps), capture_output=True, text=True, timeout=120)
        assert first.poll() is None  # the first job was still training while the second was refused
        assert second.returncode == 2, second.stderr[-2000:]
        message = second.stderr.strip().splitlines()[-1]
        assert f"run_dir={tmp_path} is in use by a running job" in message and f"pid {first.pid}" in message
        first.send_signal(signal.SIGKILL)  # the first job dies without any chance to clean up
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    first.communicate()
    latest = int((tmp_path / "checkpoints" / "latest").read_text().split("_")[1])
    # the lock died with its holder: the same command takes the folder and resumes
    resumed = run_pretrain(tmp_path, *steps, f"train.stop_at_step={latest + 5}", expect=75)
    assert f"resumed from {tmp_path / 'checkpoints' / f'step_{latest:08d}'}" in resumed.stderr + resumed.stdout
    assert max(train_losses(tmp_path)) == latest + 5


# Runs `ssmforge pretrain` with one fault patched in: `kill:<point>` SIGKILLs the process at that point of
# the save of checkpoint step_<step>; `enospc` makes that save's first write fail as on a full disk;
# `<fault>@R` injects it on rank R only.
FAULTY_PRETRAIN = r"""
import errno, os, signal, sys
import torch
import ssmforge.pretrain.checkpoint as checkpoint

fault, tag = sys.argv[1], "step_%08d" % int(sys.argv[2])
fault, _, only_rank = fault.partition("@")  # fault@R: on rank R only
if only_rank and os.environ.get("RANK", "0") != only_rank:
    fault = "none"
point = fault.split(":")[1] if ":" in fault else None
real_save, real_write = torch.save, checkpoint._write_atomic
saves = []

def torch_save(obj, f, *args, **kwargs):
    if tag in str(f):
        if fault == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        saves.append(f)
        if point == "model-states-written" and len(saves) == 1:
            real_save(obj, f, *args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)

def write_atomic(path, text):
    if fault == "enospc" and path.parent.name == tag:  # a rank that saves no DeepSpeed file fails here
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    if point == "state-written" and path.name == checkpoint.STATE_FILE and path.parent.name == tag:
        real_write(path, text)
        os.kill(os.getpid(), signal.SIGKILL)
    if point == "latest-half-written" and path.name == checkpoint.LATEST and text == tag:
        path.with_name(path.name + ".tmp").write_text(text[:3])
        os.kill(os.getpid(), signal.SIGKILL)
    real_write(path, text)

torch.save, checkpoint._write_atomic = torch_save, write_atomic
from ssmforge.cli import main
sys.exit(main(sys.argv[3:]))
"""


def faulty_pretrain(run_dir, fault: str, step: int, *overrides) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", FAULTY_PRETRAIN, fault, str(step)] + pretrain_command(run_dir, *overrides)[3:]
    return subprocess.run(command, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_kills_and_a_full_disk_during_checkpoint_saves_lose_nothing(tmp_path):
    steps = ("train.max_steps=60", "train.log_every=1", "train.eval_every=1000", "train.save_every=10",
             "train.keep_checkpoints=3")
    run_pretrain(tmp_path / "straight", *steps)
    run = tmp_path / "faulty"
    checkpoints = run / "checkpoints"
    # (fault, at the save of step, resumed from, partial folder named on resume, `latest` afterwards)
    faults = [("kill:model-states-written", 10, None, None, None),
              ("kill:state-written", 20, None, None, "step_00000010"),  # no complete checkpoint yet: a fresh start
              ("kill:latest-half-written", 30, "step_00000010", "step_00000020", "step_00000020"),
              ("enospc", 40, "step_00000020", "step_00000030", "step_00000030")]
    for fault, step, resumed_from, partial, latest in faults:
        proc = faulty_pretrain(run, fault, step, *steps)
        output = proc.stdout + proc.stderr
        if fault == "enospc":  # a clear one-line error, the previous checkpoint intact
            assert proc.returncode == 2, output[-3000:]
            last = proc.stderr.strip().splitlines()[-1]
            assert f"step_{step:08d}: checkpoint not saved" in last and "No space left on device" in last, last
            assert f"latest is still {checkpoints / latest}" in last, last
        else:
            assert proc.returncode == -signal.SIGKILL, output[-3000:]
        assert (f"resumed from {checkpoints / resumed_from}" in output) if resumed_from else "resumed" not in output
        if partial:
            assert f"ignoring partial checkpoint(s) newer than {resumed_from}: {partial}" in output
        assert (checkpoints / "latest").read_text() == latest if latest else not (checkpoints / "latest").exists()
        assert (checkpoints / f"step_{step:08d}").is_dir()  # the partial folder is left behind...
    done = run_pretrain(run, *steps)
    assert f"resumed from {checkpoints / 'step_00000030'}" in done.stdout + done.stderr
    assert "ignoring partial checkpoint(s) newer than step_00000030: step_00000040" in done.stdout + done.stderr
    # ...and replaced or removed by later saves: only the newest three complete checkpoints remain
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_00000040", "step_00000050", "step_00000060"]
    straight, faulty = train_losses(tmp_path / "straight"), train_losses(run)
    for step in range(31, 61):  # from the last checkpoint on, the curve is the uninterrupted one
        assert faulty[step] == pytest.approx(straight[step], abs=1e-6), step


@pytest.mark.slow
def test_a_full_disk_on_one_of_two_ranks_stops_both_with_one_line_and_keeps_latest(tmp_path):
    import sys

    steps = ("train.max_steps=30", "train.log_every=1", "train.eval_every=1000", "train.save_every=10",
             "train.collective_timeout_s=60")
    command = [sys.executable, "-c", FAULTY_PRETRAIN, "enospc@1", "20"] + pretrain_command(tmp_path, *steps)[3:]
    ranks = start_ranks(command, ranks=2)
    outputs = [proc.communicate(timeout=300) for proc in ranks]  # neither hangs
    checkpoints = tmp_path / "checkpoints"
    for proc, (out, err) in zip(ranks, outputs):
        assert proc.returncode == 2, (out + err)[-3000:]
        last = err.strip().splitlines()[-1]
        assert last.startswith("ssmforge: ") and "Traceback" not in err, err[-3000:]
        assert (f"step_00000020: checkpoint not saved (rank 1: [Errno {errno.ENOSPC}] No space left on device" in last
                and f"latest is still {checkpoints / 'step_00000010'}" in last), last
    assert (checkpoints / "latest").read_text() == "step_00000010"
    assert integrity.verify(checkpoints / "step_00000010") is None


# Rank 1 stops (SIGSTOP) as it starts its first validation: rank 0 then waits for it at the node's data-loader
# barrier (streaming's, at the start of every pass over a split), outside any collective.
STOPPED_BEFORE_VALIDATION = r"""
import os, signal, sys
import ssmforge.pretrain.trainer as trainer

evaluate = trainer.evaluate

def stopping_evaluate(*args, **kwargs):
    if os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGSTOP)
    return evaluate(*args, **kwargs)

trainer.evaluate = stopping_evaluate
from ssmforge.cli import main
sys.exit(main(sys.argv[1:]))
"""

# The interpreter's teardown blocks for 10 minutes, as it can on a gloo thread that waits on a dead rank: a
# survivor that leaves through it misses the launcher's 30 s between SIGTERM and SIGKILL.
BLOCKING_TEARDOWN = r"""
import atexit, sys, time

atexit.register(time.sleep, 600)
from ssmforge.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["killed", "hung", "network"])
def test_a_rank_killed_hung_or_cut_off_mid_run_is_named_and_the_run_resumes_as_if_uninterrupted(
        tmp_path, fault, uninterrupted_losses):
    """SIGKILL of rank 1 of 2, SIGSTOP as it starts validating at step 15 (a rank stuck outside any collective,
    which rank 0 waits for in its data loader), or rank 1's node cut off the network (its own network
    namespace, its link taken down: a collective times out): rank 0 leaves, within the minute or within
    train.collective_timeout_s + 30 s, with exit code 3 and one line naming rank 1 and the checkpoint to
    resume from (on which the job script requeues); the rerun's losses equal an uninterrupted run's. After a
    kill, rank 0's interpreter teardown would block for 10 minutes (BLOCKING_TEARDOWN): it leaves without it."""
    from ssmforge.pretrain.launch import free_port

    from .. import network_nodes

    timeout_s = int(FAULT_STEPS[-1].split("=")[1])
    steps = FAULT_STEPS
    run = tmp_path / "faulted"
    if fault == "network":
        if why := network_nodes.unavailable():
            pytest.skip(f"cannot build two nodes with a network between them: {why}")
        nodes = network_nodes.TwoNodes(tmp_path)
        ranks = nodes.start(pretrain_command(run, *steps), clean_env(), free_port(), cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        inject = nodes.cut
    elif fault == "hung":
        nodes, steps = None, (*steps, "train.eval_every=15")  # validation leaves the training losses as they are
        command = [sys.executable, "-c", STOPPED_BEFORE_VALIDATION] + pretrain_command(run, *steps)[3:]
        ranks = start_ranks(command, ranks=2)

        def inject():  # rank 1 stops itself at step 15
            pass
    else:
        nodes = None
        ranks = start_ranks(pretrain_command(run, *steps), ranks=2,
                            rank_0_command=[sys.executable, "-c", BLOCKING_TEARDOWN] + pretrain_command(run, *steps)[3:])

        def inject():
            ranks[1].send_signal(signal.SIGKILL)
    limit = 60 if fault == "killed" else timeout_s + 30
    try:
        wait_for_step(run, 14, ranks[0])
        inject()
        faulted = time.monotonic()
        try:
            _, err = ranks[0].communicate(timeout=limit + 30)
        except subprocess.TimeoutExpired:
            ranks[0].kill()
            raise AssertionError("rank 0 still runs: " + ranks[0].communicate()[1][-3000:]) from None
        elapsed = time.monotonic() - faulted
        assert elapsed < limit, err[-3000:]
    finally:
        for proc in ranks:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        if nodes is not None:
            nodes.close()
    assert ranks[0].returncode == 3, err[-3000:]
    # a cut or kill lands at step 14 or, when it takes effect late, after the save at step 20 (a rank that stops
    # itself at step 15 always before it): the survivor names the newest complete checkpoint on disk
    resume_from = (run / "checkpoints" / "latest").read_text().strip()
    possible = ("step_00000010",) if fault == "hung" else ("step_00000010", "step_00000020")
    assert resume_from in possible, resume_from
    assert_survivor_named_rank_1(err, resume_from=resume_from)
    if fault == "hung":
        assert "lost rank 1 (no validation batch within train.collective_timeout_s=20 s" in err, err[-3000:]
    print(f"\n{fault}: rank 0 left {elapsed:.0f} s after the fault: "
          + next(line for line in err.splitlines() if "training stopped" in line))
    resumed = run_pretrain(run, *steps, ranks=2)
    assert f"resumed from {run / 'checkpoints' / resume_from}" in resumed.stdout + resumed.stderr
    after = train_losses(run)
    for step in range(int(resume_from.split("_")[1]) + 1, 31):
        assert after[step] == pytest.approx(uninterrupted_losses[step], abs=1e-6), step


def launched_command(launcher: str, run_dir, *overrides) -> list[str]:
    """`ssmforge pretrain` on 2 CPU ranks under torchrun or the deepspeed launcher, as a user starts it."""
    from ssmforge.pretrain.launch import free_port

    pretrain = pretrain_command(run_dir, *overrides)[3:]  # from "pretrain" on
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                str(free_port()), "-m", "ssmforge", *pretrain]
    return [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
            "--module", "ssmforge", *pretrain]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_a_rank_killed_under_a_real_launcher_ends_the_survivor_with_one_line(tmp_path, launcher):
    """SIGKILL of rank 1 of 2 (each with 2 loader workers) under torchrun and under the deepspeed launcher,
    which then SIGTERM the survivor and its workers: rank 0 ends with exit code 3 and one line naming
    rank 1 and the checkpoint to resume from; no traceback of ours, no dead loader worker, and the
    launcher's SIGTERM is not taken for a preemption."""
    run = tmp_path / "run"
    launched = subprocess.Popen(launched_command(launcher, run, "train.max_steps=400", "train.log_every=1",
                                                 "train.eval_every=1000", "train.save_every=10",
                                                 "data.num_workers=2", "train.collective_timeout_s=60"),
                                cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
    try:
        output = kill_rank_1_after(launched, run, step=15)
    finally:
        if launched.poll() is None:
            os.killpg(launched.pid, signal.SIGKILL)
            launched.communicate()
    assert launched.returncode != 0
    assert_survivor_named_rank_1(output)
    if launcher == "torchrun":  # its summary gives each rank's exit code
        assert re.search(r"rank\s*: 0 \(local_rank: 0\)\n\s*exitcode\s*: 3 ", output), output[-3000:]

def process_usage(pid: int) -> tuple[float, int]:
    """(resident memory in MiB, open file descriptors) of a live process."""
    with open(f"/proc/{pid}/status") as f:
        rss_kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return rss_kib / 1024, len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.slow
def test_soak_2000_steps_with_checkpoints_grows_neither_memory_nor_open_files(tmp_path):
    steps = ("train.max_steps=2000", "train.log_every=50", "train.eval_every=100000", "train.save_every=100",
             "train.keep_checkpoints=2")
    (proc,) = start_ranks(pretrain_command(tmp_path, *steps), ranks=1)
    samples = []  # (step, rss MiB, open files)
    try:
        while proc.poll() is None:
            try:
                samples.append((logged_step(tmp_path), *process_usage(proc.pid)))
            except (OSError, StopIteration, ValueError):
                pass  # the process is exiting, or a line is half-written
            time.sleep(0.25)
    finally:
        if proc.poll() is None:
            proc.kill()
    out, err = proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    assert "done: step 2000" in out
    warm = [s for s in samples if 400 <= s[0] < 600]  # after warm-up: allocator pools, caches, 4+ checkpoints
    end = [s for s in samples if 1800 <= s[0] < 2000]  # step 2000 adds the final validation and the plot
    assert warm and end, samples[-5:]
    rss_growth = max(s[1] for s in end) - max(s[1] for s in warm)
    files_growth = max(s[2] for s in end) - max(s[2] for s in warm)
    print(f"soak: rss {max(s[1] for s in warm):.0f} -> {max(s[1] for s in end):.0f} MiB, "
          f"open files {max(s[2] for s in warm)} -> {max(s[2] for s in end)}")
    assert rss_growth < 40, f"resident memory grew by {rss_growth:.0f} MiB over 1,400 steps"
    assert files_growth <= 2, f"open files grew by {files_growth}"
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_00001900", "step_00002000"]


class Payload:
    """Unpickling this runs a shell command: what a tampered checkpoint file would carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
def test_a_pickled_object_in_a_checkpoint_file_is_refused_not_run(tmp_path):
    import torch

    steps = ("train.max_steps=10", "train.log_every=5", "train.eval_every=1000", "train.save_every=10")
    run_pretrain(tmp_path, *steps)
    states = tmp_path / "checkpoints" / "step_00000010" / "mp_rank_00_model_states.pt"
    marker = tmp_path / "pwned"
    checkpoint = torch.load(states, weights_only=False)  # written by this test's own run: trusted here
    checkpoint["extra"] = Payload(marker)
    torch.save(checkpoint, states)
    integrity.write_manifest(states.parent)  # an attacker who rewrites the integrity manifest too
    proc = subprocess.run(pretrain_command(tmp_path, "train.max_steps=20", *steps[1:]), capture_output=True,
                          text=True, timeout=300)
    assert not marker.exists()  # the payload never ran
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert f"{states}: refused to load: it holds objects that are not weights or plain values" in last, last
