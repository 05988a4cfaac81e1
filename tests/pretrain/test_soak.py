"""The fault soak (`make soak`, about 9 minutes on two cores; not part of `make test`): 3,000 steps on 2 ranks,
killed (SIGKILL of one rank) or stopped for a requeue (SIGUSR1 to one rank) at seeded random steps 200-400
apart and restarted by a supervising loop, as a requeueing job script would. The final weights and every
logged loss must equal an uninterrupted run's, and nothing may be left behind: no partial or damaged
checkpoint folder, no held run lock, no shared-memory segment."""
import random
import signal
import time

import pytest
import torch

from ssmforge.data_pipeline.shared_memory import stale_shared_memory
from ssmforge.pretrain import integrity
from ssmforge.pretrain.runlock import RunLock

from ..processes import logged_step
from .conftest import pretrain_command, run_pretrain, start_ranks, train_losses

pytestmark = pytest.mark.nightly

STEPS = 3000
SETTINGS = (f"train.max_steps={STEPS}", "train.log_every=10", "train.eval_every=500", "train.save_every=100",
            "train.keep_checkpoints=2", "train.collective_timeout_s=60", "train.precision=fp32")
FAULT_GAP = (200, 400)
SEED = 23


def fault_plan(seed: int = SEED) -> list[tuple[int, str, int]]:
    """(step, "kill" or "stop", rank): the faults, FAULT_GAP steps apart, before the last step."""
    rng, plan, step = random.Random(seed), [], 0
    while (step := step + rng.randint(*FAULT_GAP)) < STEPS:
        plan.append((step, rng.choice(["kill", "stop"]), rng.randrange(2)))
    return plan


def supervise(run_dir, plan) -> list[str]:
    """Start the 2 ranks again until they finish, injecting each planned fault once its step is logged; a
    line per attempt."""
    attempts, pending = [], list(plan)
    while True:
        ranks = start_ranks(pretrain_command(run_dir, *SETTINGS), ranks=2)
        fault = None
        try:
            while ranks[0].poll() is None and ranks[1].poll() is None:
                if pending and logged_step(run_dir) >= pending[0][0]:
                    fault = pending.pop(0)
                    _, kind, rank = fault
                    ranks[rank].send_signal(signal.SIGKILL if kind == "kill" else signal.SIGUSR1)
                    break
                time.sleep(0.2)
            outputs = [proc.communicate(timeout=180) for proc in ranks]
        finally:
            for proc in ranks:
                if proc.poll() is None:
                    proc.kill()
                    proc.communicate()
        codes = [proc.returncode for proc in ranks]
        attempts.append(f"{fault or 'no fault'}: exit codes {codes}, logged step {logged_step(run_dir)}")
        print(attempts[-1], flush=True)
        if fault is None:
            assert codes == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
            return attempts
        _, kind, rank = fault
        expected = [75, 75] if kind == "stop" else [3 if r != rank else -signal.SIGKILL for r in range(2)]
        assert codes == expected, f"{fault}: {codes}\n" + outputs[0][1][-3000:] + outputs[1][1][-3000:]


@pytest.mark.slow
def test_a_run_killed_and_requeued_at_random_ends_with_the_uninterrupted_weights(tmp_path):
    from ssmforge.pretrain.export import load_run_model

    plan = fault_plan()
    assert len(plan) >= 7 and {kind for _, kind, _ in plan} == {"kill", "stop"}
    segments_before = set(stale_shared_memory())
    started = time.monotonic()
    attempts = supervise(tmp_path / "faulted", plan)
    faulted_s = time.monotonic() - started
    run_pretrain(tmp_path / "straight", *SETTINGS, ranks=2, timeout=3600)

    faulted, straight = train_losses(tmp_path / "faulted"), train_losses(tmp_path / "straight")
    assert sorted(faulted) == sorted(straight) and max(straight) == STEPS
    for step in straight:  # the last logged value of each step: the one of the attempt that went on from it
        assert faulted[step] == pytest.approx(straight[step], abs=1e-6), step
    a, _, tag_a = load_run_model(tmp_path / "faulted")
    b, _, tag_b = load_run_model(tmp_path / "straight")
    assert tag_a == tag_b == f"step_{STEPS:08d}"
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6, msg=name)

    checkpoints = tmp_path / "faulted" / "checkpoints"
    entries = sorted(p.name for p in checkpoints.iterdir())
    assert entries == ["latest", f"step_{STEPS - 100:08d}", f"step_{STEPS:08d}"], entries
    assert all(integrity.verify(checkpoints / name) is None for name in entries[1:])
    lock = RunLock(tmp_path / "faulted")
    lock.acquire(env={})  # no process holds it
    lock.release()
    assert set(stale_shared_memory()) - segments_before == set()
    print(f"fault soak: {STEPS} steps, {len(plan)} faults, {len(attempts)} attempts in {faulted_s:.0f} s; "
          f"final weights equal the uninterrupted run's to 1e-6")
