"""Checkpoints of a run: DeepSpeed's save_checkpoint for model, optimizer and scheduler, plus our own
state (step, tokens, loader position, RNG, config, wandb id) beside it.

Layout: run_dir/checkpoints/step_00000100/ holds DeepSpeed's files, `trainer_state.json`, one
`rng_rank{r}.json` per rank and `integrity.json` (every file's size and content hash, see integrity.py).
The file `checkpoints/latest` names the newest complete checkpoint; it is replaced atomically, by rank 0,
only after every rank has finished writing and the manifest is written (barriers), so a crash in the
middle of a save leaves the previous checkpoint as `latest`. A resume verifies the manifest first
(`choose_intact`). Nothing here is unpickled.
"""
from __future__ import annotations

import contextlib
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

from . import integrity
from .collectives import any_rank, barrier, gather_objects

log = logging.getLogger(__name__)

LATEST = "latest"
STATE_FILE = "trainer_state.json"
UNIVERSAL_DIR = "universal"  # inside a checkpoint folder: its DeepSpeed universal layout, for another rank count


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done
    tokens: int = 0  # training tokens seen, all ranks
    skipped_steps: int = 0  # optimizer steps dropped for a non-finite loss or gradient
    loader: dict = field(default_factory=dict)  # StreamingDataLoader.state_dict()
    wandb_run_id: str | None = None
    config_yaml: str = ""
    # what a resume must keep for the data order to hold (elastic.check_resume); 0 / None in older checkpoints
    global_batch_size: int = 0  # sequences per optimizer step
    seed: int | None = None
    zero_stage: int | None = None
    data_fingerprint: str | None = None


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
    _raise_if_any_rank_failed(error, folder, checkpoint_dir, engine.device)
    try:  # after every rank's files: the manifest lists them all
        integrity.write_manifest(folder, rank, _world_size())
    except OSError as e:
        error = e
    _raise_if_any_rank_failed(error, folder, checkpoint_dir, engine.device)
    if rank == 0:
        _write_atomic(checkpoint_dir / LATEST, tag)
        _prune(checkpoint_dir, keep, tag)
    barrier()
    log.info("saved checkpoint %s", folder)
    return folder


def _world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def _raise_if_any_rank_failed(error: Exception | None, folder: Path, checkpoint_dir: Path, device) -> None:
    """A barrier that carries one rank's failed write to every rank, as one CheckpointError naming the first
    rank that failed and why."""
    if any_rank(error is not None, device):
        previous = latest_name(checkpoint_dir)
        reasons = gather_objects(None if error is None else str(error).strip().splitlines()[0])
        rank, reason = next((r, why) for r, why in enumerate(reasons) if why is not None)
        raise CheckpointError(f"{folder}: checkpoint not saved (rank {rank}: {reason}); latest is still "
                              f"{checkpoint_dir / previous if previous else 'none'}, the partial folder is "
                              f"removed at the next successful save")


def _prune(checkpoint_dir: Path, keep: int, latest: str) -> None:
    """Keep the newest `keep` complete checkpoints; remove older ones and any partial folder."""
    tags = sorted(p.name for p in checkpoint_dir.glob("step_*") if p.is_dir())
    complete = [t for t in tags if (checkpoint_dir / t / STATE_FILE).exists() and t <= latest]
    for tag in tags:
        if tag not in complete[-keep:] and tag != latest:
            shutil.rmtree(checkpoint_dir / tag, ignore_errors=True)
            if tag not in complete:
                log.warning("removed partial checkpoint %s (a save that did not finish)", checkpoint_dir / tag)


def latest_name(checkpoint_dir: Path) -> str | None:
    """The tag `latest` names, unchecked; None without one."""
    path = checkpoint_dir / LATEST
    return path.read_text().strip() if path.exists() else None


def latest_tag(checkpoint_dir: Path) -> str | None:
    """The tag `latest` names, which must be a complete checkpoint; None without one."""
    tag = latest_name(checkpoint_dir)
    if tag is None:
        return None
    if not (checkpoint_dir / tag / STATE_FILE).exists():
        raise CheckpointError(f"{checkpoint_dir / LATEST}: names {tag!r}, which is missing or incomplete")
    partial = [p.name for p in checkpoint_dir.glob("step_*") if p.is_dir() and p.name > tag]
    if partial:
        log.warning("ignoring partial checkpoint(s) newer than %s: %s (removed at the next save)", tag,
                    ", ".join(sorted(partial)))
    return tag


def choose_intact(checkpoint_dir: Path, rank: int = 0, world_size: int = 1) -> str | None:
    """The checkpoint to resume from: `latest` if its files match its integrity manifest, else the newest
    older one that does, which becomes `latest` (one warning line naming the damaged file; the refused folder
    is renamed corrupt_<tag>, kept for inspection). None when the run has no checkpoint. Raises
    CheckpointError when no checkpoint is intact: weights that fail their check are never loaded. A
    collective: every rank verifies its share and all agree."""
    tag = latest_name(checkpoint_dir)
    if tag is None:
        return None
    if not (checkpoint_dir / tag / integrity.INTEGRITY_FILE).exists():
        latest_tag(checkpoint_dir)  # saved before manifests: its own checks (a missing folder or state file)
    # newest first; a folder whose state file went missing is still checked, so that the file is named
    candidates = [p.name for p in sorted(checkpoint_dir.glob("step_*"), reverse=True) if p.name <= tag and
                  ((p / STATE_FILE).exists() or (p / integrity.INTEGRITY_FILE).exists())]
    refused = []
    for candidate in candidates:
        problem = integrity.verify(checkpoint_dir / candidate, rank, world_size)
        if problem is None:
            break
        refused.append((candidate, problem))
    else:
        candidate = None
    if refused and candidate is None:
        raise CheckpointError(f"{refused[0][1]}; no older checkpoint is intact either: restore the file, or move "
                              f"{checkpoint_dir} away to start over")
    if refused:
        if rank == 0:
            _write_atomic(checkpoint_dir / LATEST, candidate)  # first: a crash in between leaves a valid latest
            for name, _ in refused:
                _set_aside(checkpoint_dir / name)
            log.warning("%s; resuming from %s instead (refused: %s, kept as corrupt_*)", refused[0][1],
                        checkpoint_dir / candidate, ", ".join(name for name, _ in refused))
        barrier()
    return candidate


def _set_aside(folder: Path) -> Path:
    """Rename a refused checkpoint folder to corrupt_<tag> (corrupt_<tag>.2, ... when taken)."""
    target, n = folder.with_name(f"corrupt_{folder.name}"), 1
    while target.exists():
        n += 1
        target = folder.with_name(f"corrupt_{folder.name}.{n}")
    os.replace(folder, target)
    return target


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
    return _safe_load(torch.load, path, map_location)


def _safe_load(torch_load, path, map_location):
    import pickle

    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        try:
            return torch_load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{path}: refused to load: it holds objects that are not weights or plain "
                                  f"values ({reason[:200]})") from None


def read_state(folder: Path) -> TrainerState:
    try:
        return TrainerState(**json.loads((folder / STATE_FILE).read_text()))
    except (json.JSONDecodeError, TypeError, KeyError, ValueError) as e:
        raise CheckpointError(f"{folder / STATE_FILE}: unreadable trainer state ({e})") from None


def latest_state(checkpoint_dir: Path) -> TrainerState | None:
    """The trainer state of the latest complete checkpoint, read without DeepSpeed; None when there is none."""
    tag = latest_tag(checkpoint_dir)
    return None if tag is None else read_state(checkpoint_dir / tag)


@contextlib.contextmanager
def weights_only_loading():
    """DeepSpeed's universal-checkpoint conversion and loading call torch.load(weights_only=False); inside
    this block every torch.load reads weights and plain values only, as `safe_torch_load` does."""
    original = torch.load
    torch.load = lambda f, map_location=None, **_: _safe_load(original, f, map_location)
    try:
        yield
    finally:
        torch.load = original


def _repair_universal_zero3_load(optimizer, weight_decays: list[float], lrs: list[float]) -> None:
    """Two slips of DeepSpeed's ZeRO-3 universal loader that would change the run after the resume: it gives
    every parameter group the first group's hyperparameters (weight decay on A_log, D, norms and biases; the
    uncapped rate on the S4 families' SSM parameters), and one `step` tensor to every group's state, which
    AdamW then advances once per group each step (wrong bias correction). Restore each group's weight decay and
    rate (the restored scheduler's last, per group) and give each state its own step."""
    for group, weight_decay, lr in zip(optimizer.param_groups, weight_decays, lrs):
        group["weight_decay"], group["lr"] = weight_decay, lr
    inner = getattr(optimizer, "optimizer", optimizer)
    for state in inner.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def load(engine, checkpoint_dir: Path, rank: int, universal: bool = False) -> TrainerState | None:
    """Restore the latest complete checkpoint into the engine; None when the run has none yet. DeepSpeed's
    files are read through `safe_torch_load`. With `universal`, from the checkpoint's DeepSpeed universal
    layout (elastic.convert_for_resume wrote it) into an engine configured to load that."""
    tag = latest_tag(checkpoint_dir)
    if tag is None:
        return None
    folder = checkpoint_dir / tag
    engine.checkpoint_engine.load = safe_torch_load  # DeepSpeed's own load unpickles anything
    weight_decays = [group["weight_decay"] for group in engine.optimizer.param_groups]
    with weights_only_loading():  # the universal loader calls torch.load itself
        path, _ = (engine.load_checkpoint(str(folder), tag=UNIVERSAL_DIR) if universal
                   else engine.load_checkpoint(str(checkpoint_dir), tag=tag))
    if universal:
        _repair_universal_zero3_load(engine.optimizer, weight_decays, engine.lr_scheduler.get_last_lr())
    if path is None:
        raise CheckpointError(f"{folder}: DeepSpeed could not load this checkpoint")
    state = read_state(folder)
    rng_file = folder / f"rng_rank{rank}.json"
    try:
        if rng_file.exists():
            set_rng_state(json.loads(rng_file.read_text()))
        else:  # a resume on more ranks: nothing in training draws from it (no dropout; data order is seeded)
            log.info("%s: no RNG state for rank %d (saved on fewer ranks); keeping its seeded one", folder, rank)
    except (json.JSONDecodeError, TypeError, KeyError, ValueError) as e:
        raise CheckpointError(f"{rng_file}: unreadable RNG state ({e})") from None
    log.info("resumed from %s (step %d, %d tokens)", folder, state.step, state.tokens)
    return state
