"""Distributed set-up from whichever launcher started the process: torchrun / the deepspeed launcher
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) or srun, whose variables
ssmforge.launcher_env maps to those names. A single process with none of them is rank 0 of 1.

torch is imported inside the functions that use it: the CLI sets up logging from the ranks
(configure_logging) before every command, and most commands answer without loading torch.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

from ssmforge.errors import ConfigError
from ssmforge.launcher_env import export_launcher_env

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# A rank that dies makes the others fail their next collective at once (its connections close); one that
# hangs makes them fail after this long instead of waiting forever (train.collective_timeout_s).
DEFAULT_COLLECTIVE_TIMEOUT_S = 600


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _int(env: dict, name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ConfigError(f"environment variable {name}={env[name]!r} is not an integer") from None


def world_from_env(env: dict | None = None) -> World:
    """Read the rank variables (exporting them from SLURM's under srun, see launcher_env); raise
    ConfigError when they disagree. A process with none of them is rank 0 of 1."""
    env = os.environ if env is None else env
    export_launcher_env(env)
    if "RANK" not in env:
        return World(0, 1, 0, 1)
    rank = _int(env, "RANK")
    world_size = _int(env, "WORLD_SIZE") if "WORLD_SIZE" in env else -1
    local_rank = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
    local_world_size = _int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else world_size
    if world_size < 1:
        raise ConfigError("RANK is set but WORLD_SIZE is missing or < 1: start with torchrun, deepspeed or srun")
    if not 0 <= rank < world_size:
        raise ConfigError(f"RANK={rank} is outside WORLD_SIZE={world_size}")
    if not 0 <= local_rank < local_world_size <= world_size:
        raise ConfigError(f"LOCAL_RANK={local_rank} / LOCAL_WORLD_SIZE={local_world_size} disagree with "
                          f"WORLD_SIZE={world_size}")
    if env.get("SLURM_NTASKS") == env["WORLD_SIZE"] and env.get("SLURM_PROCID", env["RANK"]) != env["RANK"]:
        raise ConfigError(f"RANK={rank} disagrees with SLURM_PROCID={env['SLURM_PROCID']} in the same world")
    if world_size > 1:
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in env:
                raise ConfigError(f"{name} is not set for a {world_size}-rank run")
    env.setdefault("LOCAL_WORLD_SIZE", str(local_world_size))
    return World(rank, world_size, local_rank, local_world_size)


def configure_logging(verbose: bool = False) -> None:
    """Rank 0 logs ssmforge's INFO lines and the other ranks only its warnings, so that a 16-rank log does
    not repeat every line 16 times; third-party libraries (streaming, DeepSpeed, torch, the hub) log their
    warnings, not their INFO notices. `verbose`: DEBUG on every rank (DeepSpeed's at the level it sets)."""
    try:
        # a copy: only the commands that start ranks export the launcher's variables
        rank = world_from_env(dict(os.environ)).rank
    except ConfigError:
        rank = 0  # the command that starts ranks reports the broken variables; until then log as rank 0
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ssmforge_level = logging.DEBUG if verbose else logging.INFO if rank == 0 else logging.WARNING
    logging.getLogger("ssmforge").setLevel(ssmforge_level)
    # DeepSpeed logs through a handler of its own, not the root's, and sets its logger's level when it is
    # imported (INFO in releases before late 2025), so a filter on the logger is what holds
    deepspeed_logger = logging.getLogger("DeepSpeed")
    if verbose:
        deepspeed_logger.removeFilter(_warnings_and_above)
    else:
        deepspeed_logger.addFilter(_warnings_and_above)


def _warnings_and_above(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING


def device_for(world: World) -> torch.device:
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(world.local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S) -> tuple[World, torch.device]:
    """Join the process group (NCCL on GPUs, gloo on CPUs) through DeepSpeed, with collectives failing
    after `timeout_s` seconds. A single process with no launcher becomes a group of one on a free
    loopback port, since DeepSpeed always needs a group."""
    import torch

    world = world_from_env()
    device = device_for(world)
    if not world.distributed:
        for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "1"),
                            ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(name, value)
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    # The groups DeepSpeed makes later (data-parallel, ZeRO) get torch's default timeout, 30 minutes, not
    # the world group's: a hang in their collectives must fail after timeout_s too.
    c10d = torch.distributed.distributed_c10d
    c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timedelta(seconds=timeout_s)
    if not torch.distributed.is_initialized():
        import deepspeed
        # torch.distributed.nn.functional binds group.WORLD as a default argument when it is imported, which
        # the first custom-op call does (through torch._dynamo). Imported while the group is up, it keeps the
        # group and its gloo worker threads alive after shutdown(); a worker that frees its last collective
        # while the interpreter exits then aborts the process (std::terminate, exit code -6). Imported now,
        # the defaults are None.
        import torch.distributed.nn.functional  # noqa: F401

        # DeepSpeed print()s "DeepSpeed <op> built successfully" on every rank when it loads its CPU
        # communication op: that notice goes to the DEBUG log, anything else it prints (its warnings) to stdout
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed):
                deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                                           timeout=timedelta(seconds=timeout_s), verbose=False)
        finally:
            for line in printed.getvalue().splitlines():
                if line.endswith(" built successfully"):
                    log.debug("%s", line)
                else:
                    print(line)
    return world, device


def shutdown() -> None:
    import torch

    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def exit_without_teardown(code: int) -> None:
    """End a process whose process group has lost a member, now. Destroying that group and the interpreter's
    teardown join gloo's threads, whose peer is dead: a survivor has been seen to outlast the launcher's grace
    between SIGTERM and SIGKILL (30 s for torchrun and SLURM) in one of them, turning its exit code 3 into a
    kill. Nothing is lost by skipping them: checkpoints are written whole and metrics flushed line by
    line (a wandb run is left as crashed, which it is); the loader's workers still running are killed (they
    outlive SIGTERM by design, data_pipeline.loader) and the shared memory left behind is removed by the next
    start on this node (data_pipeline.shared_memory)."""
    import multiprocessing
    import signal
    import sys

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    for child in multiprocessing.active_children():
        with contextlib.suppress(OSError):
            os.kill(child.pid, signal.SIGKILL)
    os._exit(code)
