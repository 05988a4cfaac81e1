"""A lost rank: recognising the failure it causes on the others, and naming it.

When a rank dies (killed, its node gone) or stops answering (SIGSTOP, a hang outside any collective), the
next collective on every other rank fails: at once with a reset connection, or after
train.collective_timeout_s. A launcher (torchrun, the deepspeed launcher, srun with --kill-on-bad-exit)
then sends SIGTERM to the survivors, so whatever they were doing fails too, in whatever way it can: none
of that is a preemption. Each survivor checks in under a key of the rendezvous store (a TCP store that
outlives the process group) and names the ranks that have not checked in within a few seconds.
"""
from __future__ import annotations

import os
import re
import signal
import threading
import time
from datetime import timedelta
from typing import Iterable, Iterator, TypeVar

CHECK_IN_PREFIX = "ssmforge/alive/"
CHECK_IN_SECONDS = 5.0  # how long the survivors of a failed collective wait for each other to check in

Item = TypeVar("Item")


class PeerWaitTimeout(RuntimeError):
    """A wait outside any collective that another rank can make endless ran past train.collective_timeout_s."""


def bounded(items: Iterable[Item], what: str, timeout_s: float) -> Iterator[Item]:
    """`items`, each taken within timeout_s or PeerWaitTimeout. The data loader can wait on the other ranks
    of its node outside any collective: streaming's ranks of a node meet at a file-lock barrier at the start of
    every pass over a split (each validation), and wait on each other's preparation of remote shards under one
    shared lock. A rank stopped there (SIGSTOP, a hang) stalls the others in their loaders, where no collective
    timeout reaches them. The deadline is a SIGALRM timer, which interrupts those polling waits in the main
    thread; elsewhere (no signals) the items come unbounded."""
    iterator = iter(items)
    if threading.current_thread() is not threading.main_thread():
        yield from iterator
        return

    def expire(signum, frame):
        raise PeerWaitTimeout(f"no {what} within train.collective_timeout_s={timeout_s:g} s: the data loader "
                              "waits on another rank of this node or on its storage")

    while True:
        try:
            item = _take(iterator, timeout_s, expire)
        except StopIteration:
            return
        yield item


def _take(iterator: Iterator[Item], timeout_s: float, expire) -> Item:
    previous = signal.signal(signal.SIGALRM, expire)
    earlier, interval = signal.setitimer(signal.ITIMER_REAL, timeout_s)
    if earlier:  # the embedding program's own timer (a test harness's) runs: it stands, and this wait is unbounded
        signal.setitimer(signal.ITIMER_REAL, earlier, interval)
        signal.signal(signal.SIGALRM, previous)
        return next(iterator)
    try:
        return next(iterator)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def lost_peer(error: BaseException) -> str | None:
    """The first line of the error in `error`'s chain (its causes and the errors it was raised while
    handling) that is a collective failed because another rank died, hung past the timeout or dropped its
    connection, without the C++ source location; None when there is none."""
    import torch

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        text = str(error).strip()
        message = text.splitlines()[0] if text else type(error).__name__
        distributed = isinstance(error, (PeerWaitTimeout, getattr(torch.distributed, "DistError", ())))
        transport = re.search(r"gloo|nccl|c10d|ProcessGroup|connection (reset|closed|refused)|broken pipe|timed? ?out",
                              message, re.IGNORECASE)
        if distributed or (isinstance(error, RuntimeError) and transport):
            message = re.sub(r"\[[^\]]*\.(cc|cpp|h|hpp):\d+\]\s*", "", message)
            return message.split(". This is typically")[0][:300]  # gloo's advice would double the line
        error = error.__cause__ or error.__context__
    return None


def store_host() -> str:
    """Who serves the rendezvous store: torchrun's agent, or rank 0 (deepspeed's launcher, srun)."""
    return "the launcher" if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true" else "rank 0"


def silent_ranks(rank: int, world_size: int, wait_s: float = CHECK_IN_SECONDS) -> list[int] | None:
    """Check in, then return the ranks that have not checked in within wait_s (the lost ones); None when
    the store itself does not answer (its host is lost). Called once per process, after a failed collective."""
    import torch.distributed as dist

    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(timedelta(seconds=wait_s))
        store.set(f"{CHECK_IN_PREFIX}{rank}", "1")
        arrived = store.add(f"{CHECK_IN_PREFIX}count", 1)
        deadline = time.monotonic() + wait_s
        while arrived < world_size and time.monotonic() < deadline:
            time.sleep(0.2)
            arrived = store.add(f"{CHECK_IN_PREFIX}count", 0)
        return [r for r in range(world_size) if not store.check([f"{CHECK_IN_PREFIX}{r}"])]
    except Exception:  # noqa: BLE001 - any failure to reach the store means its host is gone
        return None


def describe_lost_ranks(rank: int, world_size: int, detail: str) -> str:
    """`rank R lost rank(s) ...` for the one line a survivor ends with."""
    silent = silent_ranks(rank, world_size)
    if silent is None:
        who = f"{store_host()}, whose rendezvous store no longer answers"
    elif silent:
        who = ("rank " if len(silent) == 1 else "ranks ") + ", ".join(map(str, silent))
    else:
        who = "no rank (every rank checked in: what failed lies between them, the network or shared storage)"
    return f"rank {rank} lost {who} ({detail})"
