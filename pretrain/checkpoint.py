"""Checkpoints of a run: DeepSpeed's save_checkpoint for model, optimizer and scheduler, plus our own
state (step, tokens, loader position, RNG, config, wandb id) beside it.

Layout: run_dir/checkpoints/step_00000100/ holds DeepSpeed's files, `trainer_state.json` and one
`rng_rank{r}.json` per rank. The file `checkpoints/latest` names the newest complete checkpoint; it is
replaced atomically, by rank 0, only after every rank has finished writing (a barrier), so a crash in
the middle of a save leaves the previous checkpoint as `latest`. Nothing here is unpickled.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ssmforge.errors import CheckpointError

from .collectives import any_rank, barrier

log = logging.getLogger(__name__)

LATEST = "latest"
STATE_FILE = "trainer_state.json"


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done
    tokens: int = 0  # training tokens seen, all ranks
    loader: dict = field(default_factory=dict)  # StreamingDataLoader.state_dict()
    wandb_run_id: str | None = None
    config_yaml: str = ""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def rng_state() -> dict:
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = numpy_state["state"]["key"].tolist()
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    numpy_state["state"]["key"] = np.array(numpy_state["state"]["key"], dtype=np.uint32)
    np.random.set_state(numpy_state)
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def save(engine, checkpoint_dir: Path, state: TrainerState, rank: int, keep: int) -> Path:
    """Save on every rank; returns the checkpoint folder. Marks it latest once all ranks are done.
    A write that fails (a full disk, an I/O error) on any rank raises CheckpointError on every rank,
    with `latest` still naming the previous complete checkpoint."""
    tag = tag_for(state.step)
    folder = checkpoint_dir / tag
    error = None
    try:
        engine.save_checkpoint(str(checkpoint_dir), tag=tag, save_latest=False)
        _write_atomic(folder / f"rng_rank{rank}.json", json.dumps(rng_state()))
        if rank == 0:
            _write_atomic(folder / STATE_FILE, json.dumps(asdict(state)))
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        error = e
    if any_rank(error is not None, engine.device):  # a barrier that carries one rank's failure to all
        previous = (checkpoint_dir / LATEST).read_text().strip() if (checkpoint_dir / LATEST).exists() else None
        reason = str(error).strip().splitlines()[0] if error is not None else "failed on another rank"
        raise CheckpointError(f"{folder}: checkpoint not saved ({reason}); latest is still "
                              f"{checkpoint_dir / previous if previous else 'none'}, the partial folder is "
                              f"removed at the next successful save")
    if rank == 0:
        _write_atomic(checkpoint_dir / LATEST, tag)
        _prune(checkpoint_dir, keep, tag)
    barrier()
    log.info("saved checkpoint %s", folder)
    return folder


def _prune(checkpoint_dir: Path, keep: int, latest: str) -> None:
    """Keep the newest `keep` complete checkpoints; remove older ones and any partial folder."""
    tags = sorted(p.name for p in checkpoint_dir.glob("step_*") if p.is_dir())
    complete = [t for t in tags if (checkpoint_dir / t / STATE_FILE).exists() and t <= latest]
    for tag in tags:
        if tag not in complete[-keep:] and tag != latest:
            shutil.rmtree(checkpoint_dir / tag, ignore_errors=True)
            if tag not in complete:
                log.warning("removed partial checkpoint %s (a save that did not finish)", checkpoint_dir / tag)


def latest_tag(checkpoint_dir: Path) -> str | None:
    path = checkpoint_dir / LATEST
    if not path.exists():
        return None
    tag = path.read_text().strip()
    if not (checkpoint_dir / tag / STATE_FILE).exists():
        raise CheckpointError(f"{path}: names {tag!r}, which is missing or incomplete")
    partial = [p.name for p in checkpoint_dir.glob("step_*") if p.is_dir() and p.name > tag]
    if partial:
        log.warning("ignoring partial checkpoint(s) newer than %s: %s (removed at the next save)", tag,
                    ", ".join(sorted(partial)))
    return tag


def deepspeed_safe_globals() -> list:
    """The plain classes DeepSpeed pickles into its checkpoint files beside tensors and containers (its
    loss-scaler records, the ZeRO stage enum, fragment addresses): data only, no code runs to rebuild them."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_torch_load(path, map_location=None):
    """torch.load of a DeepSpeed checkpoint file without unpickling arbitrary objects: weights_only, with
    only the few plain classes DeepSpeed stores (`deepspeed_safe_globals`) allowed besides tensors."""
    import pickle

    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{path}: refused to load: it holds objects that are not weights or plain "
                                  f"values ({reason[:200]})") from None


def load(engine, checkpoint_dir: Path, rank: int) -> TrainerState | None:
    """Restore the latest complete checkpoint into the engine; None when the run has none yet. DeepSpeed's
    files are read through `safe_torch_load`."""
    tag = latest_tag(checkpoint_dir)
    if tag is None:
        return None
    folder = checkpoint_dir / tag
    engine.checkpoint_engine.load = safe_torch_load  # DeepSpeed's own load unpickles anything
    path, _ = engine.load_checkpoint(str(checkpoint_dir), tag=tag)
    if path is None:
        raise CheckpointError(f"{folder}: DeepSpeed could not load this checkpoint")
    try:
        state = TrainerState(**json.loads((folder / STATE_FILE).read_text()))
        rng_file = folder / f"rng_rank{rank}.json"
        if rng_file.exists():
            set_rng_state(json.loads(rng_file.read_text()))
        else:
            log.warning("%s: no RNG state for rank %d (world size changed?); keeping the current one", folder, rank)
    except (json.JSONDecodeError, TypeError, KeyError, ValueError) as e:
        raise CheckpointError(f"{folder}: unreadable trainer state ({e})") from None
    log.info("resumed from %s (step %d, %d tokens)", folder, state.step, state.tokens)
    return state
