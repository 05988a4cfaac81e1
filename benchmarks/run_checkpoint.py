"""A benchmark training run saved every so many steps and resumed exactly where it stopped, so a run longer than
a sitting (the zoo's longest take hours on one core) survives being stopped: the weights, AdamW's moments, the
schedule's step, the torch RNG state, the losses so far and the training time. The batch stream is not saved: the
resumed run draws again, and discards, the batches the stopped one consumed, so its data order is the
uninterrupted run's whatever produces the batches. A checkpoint names the run that wrote it (`identity`); another
run finding it is refused rather than resumed from someone else's weights."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch


class CheckpointMismatch(ValueError):
    """A checkpoint file written by a run with other settings than the one asked to resume from it."""


class RunCheckpoint:
    def __init__(self, path: Path, identity: dict, every: int):
        if every < 1:
            raise ValueError(f"checkpoint interval {every}: must be a positive number of steps")
        # as JSON reads it back (tuples as lists, numpy floats as floats), so what is saved compares equal
        self.path, self.identity, self.every = Path(path), json.loads(json.dumps(identity)), every
        self.seconds = 0.0  # training time of the run so far, over every sitting
        self.resumed_at: list[int] = []  # the steps it resumed from, one per sitting after the first

    def load(self, model, optim, schedule) -> list[float]:
        """The saved run's losses, its state put back into the three objects; [] when there is none yet."""
        if not self.path.exists():
            return []
        state = torch.load(self.path, weights_only=True)
        saved = json.loads(state["identity"])
        if saved != self.identity:
            differ = sorted(k for k in set(saved) | set(self.identity) if saved.get(k) != self.identity.get(k))
            raise CheckpointMismatch(f"{self.path}: written by a run with another {', '.join(differ)}; remove it "
                                     "or save this run's checkpoints in another folder")
        model.load_state_dict(state["model"])
        optim.load_state_dict(state["optim"])
        schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(state["rng"])
        if state["cuda_rng"] is not None:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.seconds, self.resumed_at = state["seconds"], state["resumed_at"] + [len(state["losses"])]
        return list(state["losses"])

    def save(self, model, optim, schedule, losses: list[float], seconds: float) -> None:
        """Written to a temporary file, then renamed: a stop mid-write leaves the last checkpoint whole."""
        self.seconds = seconds
        state = dict(identity=json.dumps(self.identity), losses=list(losses), seconds=seconds,
                     resumed_at=self.resumed_at, model=model.state_dict(), optim=optim.state_dict(),
                     schedule=schedule.state_dict(), rng=torch.get_rng_state(),
                     cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
