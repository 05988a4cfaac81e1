"""Graceful stop: SIGUSR1 (SLURM's warning before the time limit) or SIGTERM on any rank sets a flag;
the ranks agree on it at the next step boundary (an all-reduce), save together and exit with
REQUEUE_EXIT_CODE, which the job script turns into a requeue. Torch loads only when a stop is agreed on,
so `ssmforge submit` can read REQUEUE_EXIT_CODE without it."""
from __future__ import annotations

import logging
import os
import signal
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later"
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
REQUEUE_MARKER_ENV = "SSMFORGE_REQUEUE_MARKER"  # a file the job script names: touched on a stop for a requeue


def mark_requeue() -> None:
    """Touch the job script's requeue marker (when it named one): every rank has saved and will exit with
    REQUEUE_EXIT_CODE, whatever exit status the launcher reports for ranks it ends while they tear down."""
    path = os.environ.get(REQUEUE_MARKER_ENV)
    if path:
        try:
            with open(path, "w"):
                pass
        except OSError as e:
            log.warning("could not write the requeue marker %s (%s); the exit code still asks for a requeue", path, e)


class StopRequest:
    """Installed once per process; `agreed()` is collective and must be called by every rank."""

    def __init__(self):
        self.signum: int | None = None
        self._previous = {signum: signal.signal(signum, self._handle) for signum in STOP_SIGNALS}

    def close(self) -> None:
        """Give the signals back to the handlers that were there before."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame) -> None:
        self.signum = self.signum or signum

    def agreed(self, device: torch.device) -> bool:
        """True on every rank when any rank has been signalled."""
        from .collectives import any_rank

        # Said only once every rank has answered: a launcher's SIGTERM to the survivors of a lost rank
        # makes this collective fail instead, and is reported as that loss, not as a stop.
        agreed = any_rank(self.signum is not None, device)
        if agreed and self.signum is not None:
            log.warning("received %s: checkpointing and stopping for a requeue", signal.Signals(self.signum).name)
        return agreed
