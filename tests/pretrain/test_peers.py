"""Naming a lost rank: the failed collective found in an exception's chain, the survivors' check-in, and the
deadline on waits outside any collective."""
import signal
import subprocess
import sys
import time

import pytest
import torch

from ssmforge.pretrain.peers import PeerWaitTimeout, bounded, lost_peer

from .conftest import ROOT


def test_a_failed_collective_is_found_behind_what_it_caused():
    """A launcher's SIGTERM after a lost rank interrupts whatever runs: the error that surfaces can be any
    (a loader worker's, say) raised while handling the collective's."""
    try:
        try:
            raise RuntimeError("[/src/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:40001: Connection reset "
                               "by peer. This is typically caused by a remote worker hanging")
        except RuntimeError:
            raise RuntimeError("DataLoader worker (pid 12) is killed by signal: Terminated.")
    except RuntimeError as error:
        assert lost_peer(error) == "Read error [127.0.0.1]:40001: Connection reset by peer"
    assert lost_peer(RuntimeError("DataLoader worker (pid 12) is killed by signal: Terminated.")) is None
    assert lost_peer(ValueError("shape mismatch")) is None
    assert lost_peer(torch.distributed.DistError("Timed out waiting 20000ms for recv")) == \
        "Timed out waiting 20000ms for recv"


CHECK_IN = """
import datetime, os, sys, torch.distributed as dist
from ssmforge.pretrain.peers import describe_lost_ranks, silent_ranks
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
dist.init_process_group("gloo", rank=0, world_size=1)
print(silent_ranks(0, 3, wait_s=0.5))
print(describe_lost_ranks(0, 3, "Connection reset by peer"))
dist.destroy_process_group()
"""


def test_ranks_that_do_not_check_in_are_named():
    """Rank 0 checks in on the store of a group it believes to be 3 ranks: ranks 1 and 2 never do."""
    from ssmforge.pretrain.launch import free_port

    result = subprocess.run([sys.executable, "-c", CHECK_IN, str(free_port())], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines()[-2:] == ["[1, 2]", "rank 0 lost ranks 1, 2 (Connection reset by peer)"]


HOLD_LOCK = """
import sys, time
from filelock import FileLock
with FileLock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_wait_on_a_lock_another_process_holds_ends_after_the_deadline(tmp_path):
    """streaming's node-wide cache lock held by a stopped rank: the next item fails after the deadline with an
    error that names the wait and counts as a lost peer; the items before it came through unchanged, and the
    previous SIGALRM handler is back afterwards with no timer left running."""
    from filelock import FileLock

    lock_path = str(tmp_path / "cache.lock")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, lock_path], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"

        def items():
            yield from (1, 2)
            with FileLock(lock_path):  # polls in Python, as streaming's prepare_shard does
                yield 3

        before = signal.getsignal(signal.SIGALRM)
        taken, started = [], time.monotonic()
        with pytest.raises(PeerWaitTimeout) as caught:
            for item in bounded(items(), "training batch", 1.5):
                taken.append(item)
        waited = time.monotonic() - started
    finally:
        holder.kill()
        holder.communicate()
    assert taken == [1, 2] and 1.5 <= waited < 10, (taken, waited)
    assert lost_peer(caught.value) == str(caught.value) == (
        "no training batch within train.collective_timeout_s=1.5 s: the data loader waits on another rank of "
        "this node or on its storage")
    assert signal.getsignal(signal.SIGALRM) is before and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_a_timer_the_program_already_runs_stands():
    """A harness's own SIGALRM timer (pytest-timeout's signal method): bounded leaves it and its handler be."""
    fired = []

    def harness(signum, frame):
        fired.append(signum)

    previous = signal.signal(signal.SIGALRM, harness)
    try:
        signal.setitimer(signal.ITIMER_REAL, 30)
        assert list(bounded(iter([1, 2, 3]), "training batch", 0.5)) == [1, 2, 3]
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 25 < remaining <= 30 and not fired and signal.getsignal(signal.SIGALRM) is harness
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_a_loader_worker_gets_sigalrms_default_action_back():
    """A worker forked during a bounded wait inherits the deadline's handler; its grace alarm must end it."""
    from ssmforge.data_pipeline.loader import _leave_stop_signals_to_the_trainer

    saved = {s: signal.getsignal(s) for s in (signal.SIGALRM, signal.SIGUSR1, signal.SIGTERM)}
    try:
        signal.signal(signal.SIGALRM, lambda signum, frame: None)
        _leave_stop_signals_to_the_trainer(0)
        assert signal.getsignal(signal.SIGALRM) is signal.SIG_DFL
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
