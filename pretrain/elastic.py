"""Resume on another rank count. The data order is already independent of it (a fixed global batch and
num_canonical_nodes, see TrainConfig.check_layout); what depends on it are DeepSpeed's ZeRO files, one
optimizer shard per data-parallel rank (and one weight shard under ZeRO-3). A checkpoint saved on N ranks
and resumed on M != N is converted once, by rank 0, into DeepSpeed's universal layout (one file per
parameter and optimizer state, whatever the rank count, `step_N/universal/`) and loaded from there.
Without ZeRO (stage 0) the single model file holds everything and loads on any rank count as it is.

Also here: what a resume must keep (the global batch, the seed and the data, which fix the samples of every
step, and the ZeRO stage, which fixes the file layout), refused with one line before anything starts."""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import re
import shutil
import time
from pathlib import Path

from ssmforge.errors import CheckpointError, ConfigError

from .checkpoint import UNIVERSAL_DIR, latest_tag, read_state, weights_only_loading
from .collectives import any_rank

log = logging.getLogger(__name__)

_CONVERTED = "converted"  # written last: a universal folder without it is an interrupted conversion
_ZERO_SHARD = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")


def saved_data_parallel_size(folder: Path) -> int | None:
    """The data-parallel rank count a checkpoint's ZeRO optimizer shards were written by; None without ZeRO
    (stage 0), whose files load on any rank count."""
    ranks = {int(m.group(1)) for p in folder.iterdir() if (m := _ZERO_SHARD.match(p.name))}
    return len(ranks) or None


def needs_universal(folder: Path, world_size: int) -> bool:
    """Whether the ZeRO files in `folder` were written by another data-parallel rank count than this one,
    so that they must be converted before it can load them."""
    saved = saved_data_parallel_size(folder)
    return saved is not None and saved != world_size


def to_universal(folder: Path) -> Path:
    """Convert the checkpoint in `folder` to DeepSpeed's universal layout in folder/universal, once (a
    finished conversion is reused; an interrupted one is redone). Call on one rank; returns the folder."""
    from deepspeed.checkpoint import ds_to_universal

    out = folder / UNIVERSAL_DIR
    if (out / _CONVERTED).exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(folder), output_folder=str(out), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    log.info("%s was saved on %d data-parallel ranks: converting it to DeepSpeed's universal layout in %s",
             folder, saved_data_parallel_size(folder), out)
    started = time.perf_counter()
    chatter = io.StringIO()  # the converter prints its progress bars and steps: not for the job log
    try:
        # one worker: DeepSpeed's worker processes would not inherit weights_only_loading under spawn
        with weights_only_loading(), contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            ds_to_universal.main(args)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of the converter is one line naming the checkpoint
        shutil.rmtree(out, ignore_errors=True)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{folder}: could not convert it for a resume on another rank count ({reason[:300]})"
                              ) from None
    (out / _CONVERTED).write_text("")
    log.info("converted %s in %.1fs", folder, time.perf_counter() - started)
    return out


def ready_to_resume(checkpoint_dir: Path, fingerprint: str, shard_dir: str, world, device) -> bool:
    """Before a resume (when the run has a checkpoint): refuse other data than the checkpoint's run trained on
    (check_same_data), and convert a checkpoint of another rank count (convert_for_resume). Returns whether
    the engine must load DeepSpeed's universal layout."""
    tag = latest_tag(checkpoint_dir)
    if tag is None:
        return False
    folder = checkpoint_dir / tag
    check_same_data(read_state(folder).__dict__, fingerprint, shard_dir)
    if not needs_universal(folder, world.world_size):
        return False
    convert_for_resume(folder, world.rank, device)
    return True


def convert_for_resume(folder: Path, rank: int, device) -> None:
    """Rank 0 converts (to_universal) while the others wait; a failure stops every rank with its line."""
    error = None
    if rank == 0:
        try:
            to_universal(folder)
        except CheckpointError as e:
            error = e
    if any_rank(error is not None, device):
        raise error or CheckpointError(f"{folder}: rank 0 could not convert it (its error says why)")


def check_resume(config, saved: dict, world_size: int) -> None:
    """Refuse, with one line, a resume whose optimizer steps would see other samples than the run's so far:
    another global batch or shuffle seed than the checkpoint's (`saved`, its trainer state); and another ZeRO
    stage, whose files DeepSpeed cannot read.
    Checkpoints written before these were recorded (value 0 or None) are not checked."""
    train = config.train
    recorded = saved.get("global_batch_size") or 0
    now = train.sequences_per_step(world_size)
    if recorded and recorded != now:
        how = ("train.global_batch_size" if train.global_batch_size is None else
               f"train.global_batch_size={train.global_batch_size}")
        raise ConfigError(f"the checkpoint's run has {recorded} sequences per optimizer step, this resume would "
                          f"have {now} (micro-batch {train.micro_batch_size} x {train.accumulation_steps(world_size)} "
                          f"accumulation x {train.data_parallel_ranks(world_size)} data-parallel ranks): set {how.split('=')[0]}={recorded} to keep it")
    if saved.get("seed") is not None and saved["seed"] != config.seed:
        raise ConfigError(f"seed={config.seed} but the checkpoint's run has seed={saved['seed']}, which orders its "
                          f"data: resume with seed={saved['seed']}")
    stage, was = config.deepspeed.zero_stage, saved.get("zero_stage")
    if was is not None and was != stage:  # each stage lays out its files differently
        raise ConfigError(f"deepspeed.zero_stage={stage} but the checkpoint was saved at ZeRO-{was}: resume with "
                          f"deepspeed.zero_stage={was}")


def check_same_data(saved: dict, fingerprint: str, shard_dir: str) -> None:
    was = saved.get("data_fingerprint")
    if was and was != fingerprint:
        raise ConfigError(f"data.shard_dir={shard_dir} holds other data (fingerprint {fingerprint[:12]}) than the "
                          f"checkpoint's run was trained on ({was[:12]}): resume on the same prepared shards")
