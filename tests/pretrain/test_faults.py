"""Faults a long run meets, injected on purpose: a second job on the same run folder, a job killed
mid-run. Each must end with a clear message and lose nothing beyond the last checkpoint."""
import json
import os
import signal
import subprocess
import threading
import time

import pytest

from ssmforge.errors import ConfigError
from ssmforge.pretrain import runlock
from ssmforge.pretrain.runlock import RunLock

from .conftest import pretrain_command, run_pretrain, start_ranks, train_losses


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


def wait_for_step(run_dir, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        path = run_dir / "metrics.jsonl"
        if path.exists() and any(json.loads(line).get("step", 0) >= step
                                 for line in path.read_text().splitlines() if line.strip()):
            return
        time.sleep(0.2)
    raise AssertionError(f"no step {step} within {timeout} s")


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
# the save of checkpoint step_<step>; `enospc` makes that save's model-state write fail as on a full disk.
FAULTY_PRETRAIN = r"""
import errno, os, signal, sys
import torch
import ssmforge.pretrain.checkpoint as checkpoint

fault, tag = sys.argv[1], "step_%08d" % int(sys.argv[2])
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
    import sys

    from .conftest import ROOT

    command = [sys.executable, "-c", FAULTY_PRETRAIN, fault, str(step)] + pretrain_command(run_dir, *overrides)[3:]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "LOCAL_", "WORLD_", "MASTER_"))}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


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
def test_a_rank_killed_mid_run_ends_the_other_and_the_run_resumes_as_if_uninterrupted(tmp_path):
    steps = ("train.max_steps=30", "train.log_every=1", "train.eval_every=1000", "train.save_every=10",
             "train.collective_timeout_s=30")
    run_pretrain(tmp_path / "straight", *steps, ranks=2)
    run = tmp_path / "killed"
    ranks = start_ranks(pretrain_command(run, *steps), ranks=2)
    try:
        wait_for_step(run, 14, ranks[0])
        ranks[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        _, err = ranks[0].communicate(timeout=60)  # no hang: the survivor ends within the minute
        assert time.monotonic() - killed < 60
    finally:
        for proc in ranks:
            if proc.poll() is None:
                proc.kill()
    assert ranks[0].returncode not in (0, None), err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("ssmforge: training stopped: rank 0 lost another rank") and "step_00000010" in last, last
    resumed = run_pretrain(run, *steps, ranks=2)
    assert f"resumed from {run / 'checkpoints' / 'step_00000010'}" in resumed.stdout + resumed.stderr
    straight, after = train_losses(tmp_path / "straight"), train_losses(run)
    for step in range(11, 31):
        assert after[step] == pytest.approx(straight[step], abs=1e-6), step


def process_usage(pid: int) -> tuple[float, int]:
    """(resident memory in MiB, open file descriptors) of a live process."""
    with open(f"/proc/{pid}/status") as f:
        rss_kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return rss_kib / 1024, len(os.listdir(f"/proc/{pid}/fd"))


def latest_step(run_dir) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


@pytest.mark.slow
def test_soak_2000_steps_with_checkpoints_grows_neither_memory_nor_open_files(tmp_path):
    steps = ("train.max_steps=2000", "train.log_every=50", "train.eval_every=100000", "train.save_every=100",
             "train.keep_checkpoints=2")
    (proc,) = start_ranks(pretrain_command(tmp_path, *steps), ranks=1)
    samples = []  # (step, rss MiB, open files)
    try:
        while proc.poll() is None:
            try:
                samples.append((latest_step(tmp_path), *process_usage(proc.pid)))
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
    proc = subprocess.run(pretrain_command(tmp_path, "train.max_steps=20", *steps[1:]), capture_output=True,
                          text=True, timeout=300)
    assert not marker.exists()  # the payload never ran
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert f"{states}: refused to load: it holds objects that are not weights or plain values" in last, last
