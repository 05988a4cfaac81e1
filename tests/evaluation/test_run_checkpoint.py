"""benchmarks/run_checkpoint.py through synthetic.train (the zoo's loop): a run stopped midway and started again
ends exactly where the same run trained in one go ends, losses and weights bit for bit; a checkpoint of another
run is refused; zoo.py --checkpoint-dir resumes each of its runs and records where."""
import json
import math
import subprocess
import sys

import pytest
import torch

from .conftest import ROOT
from .test_zoo_benchmark import BlowsUp, constant_batch

sys.path.insert(0, str(ROOT))
from benchmarks.run_checkpoint import CheckpointMismatch, RunCheckpoint  # noqa: E402
from benchmarks.synthetic import train  # noqa: E402

STEPS = 9


class Dropped(torch.nn.Module):
    """Draws from the torch RNG every step (dropout): a resume that did not restore it would train differently."""

    def __init__(self):
        super().__init__()
        self.embed, self.drop, self.head = torch.nn.Embedding(6, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 6)

    def forward(self, ids):
        return self.head(self.drop(self.embed(ids)))


class Stopped(Exception):
    """The process killed between two steps."""


def trained(checkpoint=None, stop_after_batches=None):
    """A fresh model (the same init each time) trained STEPS steps on a seeded stream; (model, losses)."""
    torch.manual_seed(0)
    model = Dropped()
    g = torch.Generator().manual_seed(1)
    drawn = []

    def batch():
        if stop_after_batches is not None and len(drawn) == stop_after_batches:
            raise Stopped
        drawn.append(1)
        return torch.randint(0, 6, (4, 5), generator=g), torch.randint(0, 6, (4, 5), generator=g)

    return model, train(model, batch, STEPS, 1e-2, 0, "dropped", checkpoint)


def test_a_stopped_run_resumes_to_the_same_losses_and_weights_as_one_trained_in_one_go(tmp_path):
    whole, whole_losses = trained()
    path = tmp_path / "run.pt"
    with pytest.raises(Stopped):  # stopped in its sixth step: the last save is step 4's
        trained(RunCheckpoint(path, dict(run="dropped"), every=2), stop_after_batches=5)
    assert len(torch.load(path, weights_only=True)["losses"]) == 4
    torch.manual_seed(123)  # a new process: its RNG is wherever its own start left it
    checkpoint = RunCheckpoint(path, dict(run="dropped"), every=2)
    resumed, losses = trained(checkpoint)
    assert checkpoint.resumed_at == [4] and checkpoint.seconds > 0
    assert losses == whole_losses and len(losses) == STEPS
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    # run again once finished: nothing trained, the same result, the sitting recorded
    again = RunCheckpoint(path, dict(run="dropped"), every=2)
    model, losses = trained(again, stop_after_batches=STEPS)  # it draws the consumed batches, and no more
    assert losses == whole_losses and again.resumed_at == [4, STEPS]
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), model.state_dict().values()))


def test_a_checkpoint_of_another_run_is_refused(tmp_path):
    path = tmp_path / "run.pt"
    trained(RunCheckpoint(path, dict(run="dropped", lr=1e-2), every=3))
    with pytest.raises(CheckpointMismatch, match=r"run.pt: written by a run with another lr;"):
        trained(RunCheckpoint(path, dict(run="dropped", lr=3e-3), every=3))
    with pytest.raises(ValueError, match="positive"):
        RunCheckpoint(path, {}, every=0)


def zoo(tmp_path, name, *argv):
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "zoo.py"), "--smoke", "--threads", "1",
                           "--families", "mamba", "--tasks", "copying", "--steps", "4", "--sweep-steps", "4",
                           "--lrs", "3e-3", "--out", str(tmp_path / name), *argv],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)


def test_zoo_resumes_its_runs_from_the_checkpoint_folder(tmp_path):
    plain = zoo(tmp_path, "plain.json")
    first = zoo(tmp_path, "first.json", "--checkpoint-dir", "saved", "--checkpoint-every", "2")
    again = zoo(tmp_path, "again.json", "--checkpoint-dir", "saved")
    assert plain.returncode == first.returncode == again.returncode == 0, first.stderr + again.stderr
    assert [p.name for p in (tmp_path / "saved").iterdir()] == ["mamba-copying-lr0.003-4steps.pt"]
    assert "resumed at step 4/4" in again.stdout and "resumed" not in first.stdout
    rows = [json.loads((tmp_path / n).read_text())["rows"][0] for n in ("plain.json", "first.json", "again.json")]
    assert "resumed_at_steps" not in rows[0] and "resumed_at_steps" not in rows[1]
    assert rows[2]["resumed_at_steps"] == [4] and rows[2]["sweep"][0]["resumed_at_steps"] == [4]
    for row in rows[1:]:  # saving and resuming change no result
        for key in ("accuracy", "loss_curve", "final_train_loss", "sweep"):
            strip = lambda v: [{k: x for k, x in p.items() if k not in ("seconds", "resumed_at_steps")}  # noqa
                               for p in v] if key == "sweep" else v
            assert strip(row[key]) == strip(rows[0][key]), key
    # the folder where it saved is not a setting of the run, nor in its recorded command
    report = json.loads((tmp_path / "again.json").read_text())
    assert "checkpoint" not in report["command"] and "checkpoint_dir" not in report["settings"]
    # the same folder for a run of another batch size: refused in one line, exit 2
    other = zoo(tmp_path, "other.json", "--checkpoint-dir", "saved", "--batch", "8")
    assert other.returncode == 2 and other.stderr.strip().splitlines() == [
        "zoo.py: saved/mamba-copying-lr0.003-4steps.pt: written by a run with another batch; "
        "remove it or save this run's checkpoints in another folder"]


def test_a_run_saved_after_diverging_is_not_trained_again(tmp_path):
    first = train(BlowsUp(), constant_batch, 10, 1e-2, 0, "blows up", RunCheckpoint(tmp_path / "run.pt", {}, every=1))
    assert len(first) == 3 and math.isnan(first[-1])
    model = BlowsUp()
    again = train(model, constant_batch, 10, 1e-2, 0, "blows up", RunCheckpoint(tmp_path / "run.pt", {}, every=1))
    assert model.calls == 0 and again[:2] == first[:2] and len(again) == 3 and math.isnan(again[-1])
