"""Elastic resume: a run checkpointed on N ranks continues on M != N at every ZeRO stage with the same
global batch and data order (DeepSpeed's ZeRO shards converted to its universal layout), so its losses
equal an uninterrupted run's; and a resume that would change the samples of its steps (another global
batch, seed or data) or the checkpoint's file layout (another ZeRO stage) is one line, exit code 2."""
import json
import subprocess

import pytest
import torch

from ssmforge.errors import CheckpointError, ConfigError
from ssmforge.pretrain.checkpoint import TrainerState, weights_only_loading
from ssmforge.pretrain.config import load_config
from ssmforge.pretrain.elastic import check_resume, check_same_data, needs_universal, saved_data_parallel_size

from .conftest import ROOT, pretrain_command, run_pretrain, train_losses

# 16 sequences per step: micro-batch 4 x accumulation 4 on 1 rank, 2 on 2 ranks
SETTINGS = ("train.global_batch_size=16", "train.micro_batch_size=4", "train.max_steps=6", "train.log_every=1",
            "train.warmup_steps=2", "train.eval_every=100", "train.save_every=100", "train.precision=fp32")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One rank, uninterrupted (ZeRO-1; the stage does not change the arithmetic), and its shards."""
    folder = tmp_path_factory.mktemp("elastic")
    shards = f"data.shard_dir={folder / 'data'}"
    run_pretrain(folder / "straight", *SETTINGS, shards, timeout=600)
    return train_losses(folder / "straight"), shards


@pytest.mark.slow
# ZeRO-1 and ZeRO-2 share a class and file layout (stage_1_and_2.py) and its conversion is ZeRO-3's
# (to_universal): tests/slurm/test_cluster.py converts a ZeRO-2 run from 2 ranks to 1 with these losses
@pytest.mark.parametrize("stage", [0, 3])
def test_two_ranks_then_one_then_two_give_the_uninterrupted_losses(stage, reference, tmp_path):
    losses, shards = reference
    run_dir, settings = tmp_path / "run", (*SETTINGS, shards, f"deepspeed.zero_stage={stage}")
    run_pretrain(run_dir, *settings, "train.stop_at_step=2", ranks=2, expect=75, timeout=600)
    step2 = run_dir / "checkpoints" / "step_00000002"
    assert saved_data_parallel_size(step2) == (None if stage == 0 else 2)
    one = run_pretrain(run_dir, *settings, "train.stop_at_step=4", ranks=1, expect=75, timeout=600)
    assert "x 4 accumulation x 1 ranks" in one.stderr
    two = run_pretrain(run_dir, *settings, ranks=2, timeout=600)
    assert "x 2 accumulation x 2 ranks" in two.stderr
    if stage == 0:  # one model file for any rank count: nothing to convert
        assert "converting" not in one.stderr + two.stderr and not (step2 / "universal").exists()
    else:
        assert f"{step2} was saved on 2 data-parallel ranks: converting" in one.stderr
        assert "step_00000004 was saved on 1 data-parallel ranks: converting" in two.stderr
    resumed = train_losses(run_dir)
    print(f"\nZeRO-{stage}: step, uninterrupted 1 rank, 2 -> 1 -> 2 ranks")
    for step in sorted(losses):
        print(f"{step:4d} {losses[step]:.8f} {resumed[step]:.8f}")
    assert sorted(resumed) == sorted(losses) == list(range(1, 7))
    for step in losses:
        assert resumed[step] == pytest.approx(losses[step], abs=1e-5), step
    state = json.loads((run_dir / "checkpoints" / "step_00000006" / "trainer_state.json").read_text())
    assert state["loader"]["sample_in_epoch"] == 6 * 16  # no sample skipped or repeated across the resumes
    assert state["global_batch_size"] == 16 and state["zero_stage"] == stage


@pytest.mark.slow
def test_capped_and_scaled_rates_survive_a_resume_on_another_rank_count(tmp_path):
    """An S4 layer's SSM parameters train in a group of their own at min(train.lr, ssm_lr) = 1e-3 and an LRU
    layer's at train.lr * ssm_lr_factor = 1.5e-3 (train.lr 3e-3). DeepSpeed's ZeRO-3 universal loader hands
    every group the first group's rate; the resume restores each group's, so 2 ranks then 1 give the
    uninterrupted losses (with the first group's rate on either group they differ)."""
    settings = (*SETTINGS, f"data.shard_dir={tmp_path / 'data'}", "deepspeed.zero_stage=3", "model.family=hybrid",
                "model.layer_pattern=SL", "model.n_layer=2", "model.s4.d_state=8", "model.lru.d_state=8",
                "train.lr=3e-3", "train.max_steps=5")
    run_pretrain(tmp_path / "straight", *settings, timeout=600)
    losses = train_losses(tmp_path / "straight")
    run_dir = tmp_path / "run"
    run_pretrain(run_dir, *settings, "train.stop_at_step=2", ranks=2, expect=75, timeout=600)
    one = run_pretrain(run_dir, *settings, timeout=600)
    assert "step_00000002 was saved on 2 data-parallel ranks: converting" in one.stderr
    resumed = train_losses(run_dir)
    assert sorted(resumed) == sorted(losses) == list(range(1, 6))
    for step in losses:
        assert resumed[step] == pytest.approx(losses[step], abs=1e-5), step


def _run_with_checkpoint(tmp_path, **saved) -> tuple:
    """A run folder whose latest checkpoint records `saved` (only its trainer state: the refusals come first)."""
    run_dir = tmp_path / "run"
    folder = run_dir / "checkpoints" / "step_00000004"
    folder.mkdir(parents=True)
    state = TrainerState(step=4, global_batch_size=16, seed=1234, zero_stage=1, **saved)
    (folder / "trainer_state.json").write_text(json.dumps(state.__dict__))
    (run_dir / "checkpoints" / "latest").write_text(folder.name)
    return run_dir, sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))


@pytest.mark.parametrize("override, message", [
    ("train.global_batch_size=32", "the checkpoint's run has 16 sequences per optimizer step, this resume would have "
                                   "32 (micro-batch 4 x 8 accumulation x 1 data-parallel ranks): set train.global_batch_size=16 "
                                   "to keep it"),
    ("seed=7", "seed=7 but the checkpoint's run has seed=1234, which orders its data: resume with seed=1234"),
    ("deepspeed.zero_stage=3", "deepspeed.zero_stage=3 but the checkpoint was saved at ZeRO-1: resume with "
                               "deepspeed.zero_stage=1"),
])
def test_a_resume_that_would_change_the_run_is_one_line_and_writes_nothing(tmp_path, override, message):
    run_dir, before = _run_with_checkpoint(tmp_path)
    proc = subprocess.run(pretrain_command(run_dir, "train.global_batch_size=16", "seed=1234", override), cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert [line for line in proc.stderr.splitlines() if "error" in line] == [f"ssmforge: error: {message}"]
    assert "Traceback" not in proc.stderr
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before  # no lock, config, shards


def test_without_a_global_batch_another_rank_count_changes_the_batch_and_is_refused():
    config = load_config(ROOT / "configs" / "tiny.yaml", ["run_dir=x", "train.micro_batch_size=4"])
    saved = {"global_batch_size": 8, "seed": config.seed, "zero_stage": config.deepspeed.zero_stage}
    check_resume(config, saved, world_size=2)  # 4 x 1 x 2 = 8, as saved
    with pytest.raises(ConfigError, match=r"has 8 sequences per optimizer step, this resume would have 4 .*: set "
                                          r"train\.global_batch_size=8 to keep it"):
        check_resume(config, saved, world_size=1)
    check_resume(config, {"global_batch_size": 0, "seed": None, "zero_stage": None}, world_size=1)  # older


def test_other_data_than_the_checkpoint_was_trained_on_is_refused():
    check_same_data({"data_fingerprint": "abc123"}, "abc123", "runs/x/data")
    check_same_data({"data_fingerprint": None}, "abc123", "runs/x/data")  # an older checkpoint
    with pytest.raises(ConfigError, match=r"data\.shard_dir=runs/x/data holds other data \(fingerprint def456\) "
                                          r"than the checkpoint's run was trained on \(abc123\)"):
        check_same_data({"data_fingerprint": "abc123"}, "def456", "runs/x/data")


def test_the_rank_count_of_a_checkpoint_is_read_from_its_zero_shards(tmp_path):
    for rank in range(4):
        (tmp_path / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"")
    (tmp_path / "mp_rank_00_model_states.pt").write_bytes(b"")
    assert saved_data_parallel_size(tmp_path) == 4
    assert needs_universal(tmp_path, 2) and not needs_universal(tmp_path, 4)
    plain = tmp_path / "zero0"
    plain.mkdir()
    (plain / "mp_rank_00_model_states.pt").write_bytes(b"")
    assert saved_data_parallel_size(plain) is None and not needs_universal(plain, 3)


class Payload:  # unpickling this runs a call of the file's choosing (a harmless one here)
    def __reduce__(self):
        return (len, ("code ran",))


def test_deepspeeds_own_torch_load_calls_read_only_weights_inside_the_conversion(tmp_path):
    hostile, plain = tmp_path / "hostile.pt", tmp_path / "plain.pt"
    torch.save({"param": torch.ones(2), "hook": Payload()}, hostile)
    torch.save({"param": torch.ones(2)}, plain)
    assert torch.load(hostile, weights_only=False)["hook"] == 8  # what DeepSpeed's tools would do
    original = torch.load
    with weights_only_loading():
        assert torch.load(plain, weights_only=False)["param"].sum() == 2
        with pytest.raises(CheckpointError, match="refused to load"):
            torch.load(hostile, map_location="cpu", weights_only=False)
    assert torch.load is original
