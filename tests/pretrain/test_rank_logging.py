"""One log for N ranks: rank 0 logs ssmforge's INFO lines, the other ranks its warnings; third-party libraries
log their warnings, not their INFO notices; --verbose logs DEBUG on every rank."""
import os
import subprocess
import sys

import pytest
import torch

from .conftest import ROOT, pretrain_command, start_ranks

PROBE = """
import logging, sys
from ssmforge.pretrain.launch import configure_logging

configure_logging(verbose=sys.argv[1] == "verbose")
from deepspeed.utils import logger as deepspeed_logger
from deepspeed.utils.logging import set_log_level_from_string

set_log_level_from_string("info")  # the level older DeepSpeed releases set themselves
for name in ("ssmforge.pretrain.trainer", "streaming.base.dataset"):
    logging.getLogger(name).debug(f"{name} debug")
    logging.getLogger(name).info(f"{name} info")
    logging.getLogger(name).warning(f"{name} warning")
deepspeed_logger.info("DeepSpeed info")
deepspeed_logger.warning("DeepSpeed warning")
"""


def probe(rank: int, mode: str) -> subprocess.Popen:
    """A process of rank `rank` of 2 (as the deepspeed launcher starts it) that logs at every level."""
    env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    return subprocess.Popen([sys.executable, "-c", PROBE, mode], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_levels_by_rank_and_library():
    procs = {(rank, mode): probe(rank, mode) for rank, mode in ((0, "normal"), (1, "normal"), (1, "verbose"))}
    libraries = ("ssmforge.pretrain.trainer", "streaming.base.dataset")
    messages = [f"{name} {level}" for name in libraries for level in ("debug", "info", "warning")]
    messages += ["DeepSpeed info", "DeepSpeed warning"]
    shown = {}
    for key, proc in procs.items():
        output = proc.communicate(timeout=240)[0]
        assert proc.returncode == 0, output[-3000:]
        shown[key] = [message for message in messages if message in output]
    warnings = ["ssmforge.pretrain.trainer warning", "streaming.base.dataset warning", "DeepSpeed warning"]
    assert shown[0, "normal"] == ["ssmforge.pretrain.trainer info", *warnings]
    assert shown[1, "normal"] == warnings
    assert shown[1, "verbose"] == messages


@pytest.mark.slow
def test_a_two_rank_run_logs_each_line_once_and_no_library_notices(tmp_path):
    # 28 validation samples, too few for a batch of 16 per rank: a warning that each rank logs
    procs = start_ranks(pretrain_command(tmp_path, "train.max_steps=2", "train.eval_every=100", "train.save_every=100",
                                         "train.micro_batch_size=16", "train.deterministic=true"), 2)
    outputs = [proc.communicate(timeout=300) for proc in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, out[-3000:] + err[-3000:]
    log = "".join(out + err for out, err in outputs)  # what one job log holds
    assert log.count("INFO ssmforge.pretrain.trainer: training mamba") == 1
    assert log.count("INFO ssmforge.pretrain.trainer: kernels: selective scan: cpu, ssd: torch, causal conv1d: cpu, "
                     "vandermonde: ref, cauchy: ref, linear scan: cpu, fft conv: torch (deterministic backwards)") == 1
    assert log.count(f"INFO ssmforge.pretrain.checkpoint: saved checkpoint {tmp_path}/checkpoints/step_00000002") == 1
    assert log.count("WARNING ssmforge.pretrain.trainer: validation split has too few samples") == 2
    for notice in ("INFO streaming", "Because `predownload` was not specified",
                   "Because `shuffle_block_size` was not specified", "deepspeed_shm_comm_op built successfully",
                   "[INFO]", "Setting ds_accelerator to"):
        assert notice not in log
    if not torch.cuda.is_available():  # DeepSpeed's warning that it found no GPU still shows, on each rank
        assert log.count("[WARNING] [real_accelerator.py") == 2
