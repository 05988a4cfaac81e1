"""Naming a lost rank: the failed collective found in an exception's chain, and the survivors' check-in."""
import subprocess
import sys

import torch

from ssmforge.pretrain.peers import lost_peer

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
