"""train.context_parallel: the ranks of a context group read the same rows and each trains on its chunk of them,
so one config gives the losses of one rank holding whole rows on 4 ranks (K = 4), on 4 (2 data-parallel x
K = 2, ZeRO-2) and on 2 (K = 2), and a run stopped on one layout resumes exactly on another."""
import json

import pytest

from ssmforge.errors import ConfigError
from ssmforge.pretrain.config import load_config

from .conftest import run_pretrain, train_losses

# a hybrid (Mamba, attention, MLP) on packed rows with document resets, 8 sequences of 64 tokens per step
HYBRID = ("model.family=hybrid", "model.layer_pattern=M*M-", "model.n_layer=4", "model.attention.heads=4",
          "data.document_boundaries=reset")
STEPS = ("train.global_batch_size=8", "train.micro_batch_size=4", "train.max_steps=4", "train.log_every=1",
         "train.warmup_steps=1", "train.eval_every=2", "train.save_every=100", "train.eval_batches=1",
         "train.precision=fp32", "deepspeed.zero_stage=2", *HYBRID)


def val_losses(run_dir) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if r["kind"] == "val"}


@pytest.mark.slow
def test_context_parallel_gives_the_losses_of_whole_rows_and_resumes_on_another_layout(tmp_path):
    shards = f"data.shard_dir={tmp_path / 'data'}"
    run_pretrain(tmp_path / "whole", *STEPS, shards)
    reference, reference_val = train_losses(tmp_path / "whole"), val_losses(tmp_path / "whole")
    assert sorted(reference) == [1, 2, 3, 4] and sorted(reference_val) == [2, 4]

    def check(run, name: str) -> None:
        losses = train_losses(run)
        print(name, losses)
        assert sorted(losses) == [1, 2, 3, 4]
        for step, loss in reference.items():
            assert losses[step] == pytest.approx(loss, abs=1e-5), (name, step)
        state = json.loads((run / "checkpoints" / "step_00000004" / "trainer_state.json").read_text())
        assert state["loader"]["sample_in_epoch"] == 4 * 8 and state["tokens"] == 4 * 8 * 64

    # one group of K=4 for the whole run: a state passed through three hops
    k4 = tmp_path / "4_ranks_K4"
    proc = run_pretrain(k4, *STEPS, shards, "train.context_parallel=4", ranks=4, timeout=600)
    assert "each sequence split over 4 context-parallel ranks" in proc.stderr
    check(k4, "4 ranks, K=4")
    for step, loss in reference_val.items():  # one data-parallel rank reads the reference's validation batch
        assert val_losses(k4)[step] == pytest.approx(loss, abs=1e-5), step

    # steps 1-2 on 2 data-parallel ranks x K=2 (ZeRO-2), stopped, then steps 3-4 on one group of K=2: each
    # layout gives the reference's losses, and a run stopped on one layout resumes exactly on the other
    resumed = tmp_path / "resumed"
    proc = run_pretrain(resumed, *STEPS, shards, "train.context_parallel=2", "train.stop_at_step=2", ranks=4,
                        expect=75, timeout=600)
    assert "each sequence split over 2 context-parallel ranks" in proc.stderr
    assert sorted(train_losses(resumed)) == [1, 2]
    run_pretrain(resumed, *STEPS, shards, "train.context_parallel=2", ranks=2, timeout=600)
    check(resumed, "2 x K=2, then K=2")
    assert val_losses(resumed)[4] == pytest.approx(reference_val[4], abs=1e-5)  # step 4 ran on one group


@pytest.mark.parametrize("overrides, message", [
    (["train.context_parallel=3"], "train.context_parallel=3 is invalid: must divide data.seq_len=64 into chunks"),
    (["train.context_parallel=8"], "train.context_parallel=8 is invalid: must divide data.seq_len=64 into chunks "
                                   "of at least 16 tokens"),
    (["train.context_parallel=0"], "train.context_parallel=0 is invalid: must be a positive integer"),
    (["train.context_parallel=2", "train.compile=true"], "train.compile=True is invalid: must be false with "
                                                         "train.context_parallel > 1"),
])
def test_a_context_group_that_cannot_split_the_rows_is_refused(overrides, message):
    from .conftest import ROOT
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(ROOT / "configs" / "tiny.yaml", overrides)


def test_the_ranks_must_hold_whole_context_groups():
    from ssmforge.pretrain.config import TrainConfig
    train = TrainConfig(context_parallel=2, global_batch_size=8, micro_batch_size=4)
    assert train.data_parallel_ranks(4) == 2 and train.accumulation_steps(4) == 1
    assert train.sequences_per_step(2) == 8 and train.accumulation_steps(2) == 2
    with pytest.raises(ConfigError, match="train.context_parallel=2 does not divide the 3 ranks"):
        train.accumulation_steps(3)
    with pytest.raises(ConfigError, match="a context group must lie within a node"):
        train.check_layout(4, 4)  # 1 rank per node
    # 6 nodes of 8 ranks, K = 2: streaming partitions 24 data-parallel ranks as 3 nodes of 8, which 2
    # canonical nodes do not divide (the 6 physical nodes alone would pass)
    train.num_canonical_nodes, train.global_batch_size = 2, 4 * 48
    with pytest.raises(ConfigError, match=r"6 nodes \(3 as streaming counts them with train.context_parallel=2\)"):
        train.check_layout(48, 6)
    train.check_layout(32, 4)  # 16 data-parallel ranks = 2 nodes of 8 as streaming counts them
