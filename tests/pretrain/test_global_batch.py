"""Global batch semantics: `train.global_batch_size` fixes the samples of every optimizer step, so one config
gives the same loss at every step on 1, 2 and 4 ranks; the accumulation is derived from it, and a global batch
that the ranks cannot split is refused with one line before anything starts."""
import json
import os
import subprocess

import pytest

from ssmforge.errors import ConfigError
from ssmforge.pretrain.config import TrainConfig, load_config
from ssmforge.pretrain.engine import deepspeed_config

from .conftest import ROOT, pretrain_command, run_pretrain, train_losses

# 16 sequences per step: micro-batch 4 x accumulation 4 / 2 / 1 on 1 / 2 / 4 ranks
SAME_BATCH = ("train.global_batch_size=16", "train.micro_batch_size=4", "train.max_steps=6", "train.log_every=1",
              "train.warmup_steps=2", "train.eval_every=100", "train.save_every=100", "train.eval_batches=1",
              "train.precision=fp32", "deepspeed.zero_stage=1")


@pytest.mark.slow
def test_same_losses_on_1_2_and_4_ranks(tmp_path):
    shards = f"data.shard_dir={tmp_path / 'data'}"  # prepared by the first run, read by the others
    losses, records = {}, {}
    for ranks in (1, 2, 4):
        run_dir = tmp_path / f"ranks{ranks}"
        run_pretrain(run_dir, *SAME_BATCH, shards, ranks=ranks, timeout=900)
        losses[ranks] = train_losses(run_dir)
        records[ranks] = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        state = json.loads((run_dir / "checkpoints" / "step_00000006" / "trainer_state.json").read_text())
        assert state["loader"]["sample_in_epoch"] == 6 * 16  # the same position in the data on every rank count
        assert state["loader"]["num_canonical_nodes"] == 1 and state["tokens"] == 6 * 16 * 64
    print("\nstep  " + "  ".join(f"{r} rank{'s' if r > 1 else ' '}".rjust(12) for r in losses))
    for step in sorted(losses[1]):
        print(f"{step:4d}  " + "  ".join(f"{losses[r][step]:12.8f}" for r in losses))
    assert sorted(losses[1]) == list(range(1, 7))
    for ranks in (2, 4):
        assert sorted(losses[ranks]) == sorted(losses[1])
        for step in losses[1]:
            assert losses[ranks][step] == pytest.approx(losses[1][step], abs=1e-5), (ranks, step)
        tokens = [r["tokens"] for r in records[ranks] if r["kind"] == "train"]
        assert tokens == [r["tokens"] for r in records[1] if r["kind"] == "train"]
    assert losses[1][6] < losses[1][1]


@pytest.mark.slow
def test_a_resumed_run_keeps_the_canonical_nodes_of_its_checkpoint(tmp_path):
    """The data order is a function of num_canonical_nodes: a resume with another value in the config keeps the
    checkpoint's (and says so), so the resumed steps see the samples the uninterrupted run saw."""
    shards = f"data.shard_dir={tmp_path / 'data'}"
    run_pretrain(tmp_path / "straight", *SAME_BATCH, shards)
    run_pretrain(tmp_path / "resumed", *SAME_BATCH, shards, "train.stop_at_step=3", expect=75)
    proc = run_pretrain(tmp_path / "resumed", *SAME_BATCH, shards, "train.num_canonical_nodes=2")
    assert "resuming with the checkpoint's num_canonical_nodes=1, not train.num_canonical_nodes=2" in proc.stderr
    assert "num_canonical_nodes: 1" in (tmp_path / "resumed" / "config.yaml").read_text()
    straight, resumed = train_losses(tmp_path / "straight"), train_losses(tmp_path / "resumed")
    assert sorted(resumed) == sorted(straight) == list(range(1, 7))
    for step in straight:
        assert resumed[step] == pytest.approx(straight[step], abs=1e-6), step


def step_samples(num_samples, canonical, nodes, ranks_per_node, workers, micro, global_batch, steps, drop_first=0,
                 initial_nodes=None) -> list[list[int]]:
    """The sample ids of each optimizer step as the trainer draws them from streaming's partition of an epoch
    (before the shuffle, which maps every id alike whatever the layout): rank r's k-th batch comes from its
    worker k % workers (the DataLoader takes them in turn), and a step is `accumulation` batches of every rank."""
    from streaming.base.partition import get_partitions

    ranks = nodes * ranks_per_node
    ids = get_partitions("relaxed", num_samples, canonical, nodes, ranks_per_node, workers, micro, drop_first,
                         initial_nodes)  # (nodes, ranks per node, workers, batches per worker, micro)
    batches = ids.reshape(ranks, workers, -1, micro).transpose(0, 2, 1, 3).reshape(ranks, -1, micro)
    accumulation = global_batch // (micro * ranks)
    return [sorted(batches[:, s * accumulation:(s + 1) * accumulation].flatten().tolist()) for s in range(steps)]


# (nodes, ranks per node, loader workers, micro-batch) at one global batch of 256 sequences
LAYOUTS = [(1, 1, 1, 4), (1, 8, 8, 4), (1, 8, 2, 32), (2, 8, 4, 4), (8, 8, 1, 4), (8, 8, 3, 2), (2, 4, 1, 16)]


@pytest.mark.parametrize("canonical", [1, 8])
def test_every_step_draws_the_same_samples_on_any_layout(canonical):
    """The real-scale claim behind the 1/2/4-rank test, on streaming's own partitioning: 1 to 64 ranks, 1 to 8
    nodes, any worker count and micro-batch, the same samples in every optimizer step, also after a resume."""
    samples, steps = 256 * 30 + 37, 30
    reference = step_samples(samples, canonical, *LAYOUTS[0], 256, steps)
    drawn = sum(reference, [])
    assert len(set(drawn)) == len(drawn) == steps * 256 and min(drawn) >= 0  # each sample at most once
    for layout in LAYOUTS[1:]:
        assert step_samples(samples, canonical, *layout, 256, steps) == reference, layout
        # resumed at step 10 on another layout than the one the run started on
        assert step_samples(samples, canonical, *layout, 256, steps - 10, drop_first=2560,
                            initial_nodes=2) == reference[10:], layout


def test_the_canonical_nodes_must_be_fixed_for_that():
    """streaming's default, one canonical node per physical node, makes the order depend on the node count."""
    one_node = step_samples(256 * 10, 1, 1, 8, 1, 4, 256, 10)
    two_nodes = step_samples(256 * 10, 2, 2, 8, 1, 4, 256, 10)
    assert one_node != two_nodes
    assert step_samples(256 * 10, 1, 2, 8, 1, 4, 256, 10) == one_node


@pytest.mark.parametrize("global_batch, micro, ranks, accumulation", [
    (16, 4, 1, 4), (16, 4, 2, 2), (16, 4, 4, 1), (256, 4, 8, 8), (256, 4, 16, 4), (256, 4, 64, 1), (256, 32, 8, 1),
    (24, 2, 3, 4),
])
def test_accumulation_is_derived_from_the_global_batch(global_batch, micro, ranks, accumulation):
    train = TrainConfig(global_batch_size=global_batch, micro_batch_size=micro)
    assert train.accumulation_steps(ranks) == accumulation
    assert train.sequences_per_step(ranks) == global_batch
    config = load_config(None, ["run_dir=x", f"train.global_batch_size={global_batch}",
                                f"train.micro_batch_size={micro}"])
    ds = deepspeed_config(config, ranks)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
        global_batch, micro, accumulation)


def test_without_a_global_batch_the_accumulation_is_as_given():
    assert TrainConfig(micro_batch_size=4).accumulation_steps(2) == 1  # null: 1, as before
    train = TrainConfig(micro_batch_size=4, grad_accum_steps=3)
    assert train.accumulation_steps(2) == 3 and train.sequences_per_step(2) == 24  # grows with the ranks


@pytest.mark.parametrize("global_batch, micro, ranks", [(16, 4, 3), (256, 32, 16), (256, 4, 128), (10, 4, 1)])
def test_a_global_batch_that_does_not_divide_is_one_line(global_batch, micro, ranks):
    train = TrainConfig(global_batch_size=global_batch, micro_batch_size=micro)
    with pytest.raises(ConfigError) as info:
        train.accumulation_steps(ranks)
    message = str(info.value)
    assert "\n" not in message
    for number in (f"global_batch_size={global_batch}", f"micro_batch_size={micro}", f"{ranks} data-parallel ranks"):
        assert number in message


@pytest.mark.parametrize("overrides, message", [
    (["train.global_batch_size=16", "train.grad_accum_steps=2"],
     r"train\.grad_accum_steps=2 is invalid: set it or train\.global_batch_size=16, not both"),
    (["train.global_batch_size=10"], r"train\.global_batch_size=10 is invalid: must be a multiple of "
                                     r"train\.micro_batch_size=4"),
    (["train.global_batch_size=0"], r"train\.global_batch_size=0 is invalid: must be a positive integer or null"),
    (["train.num_canonical_nodes=0"], r"train\.num_canonical_nodes=0 is invalid: must be a positive integer"),
])
def test_inconsistent_batch_keys_are_refused_at_load(overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(ROOT / "configs" / "tiny.yaml", overrides)
    assert "\n" not in str(info.value)


def test_pretrain_refuses_a_global_batch_its_ranks_cannot_split_before_starting(tmp_path):
    """Rank 0 of 3 alone: the check comes before the process group (it would wait for the others) and before
    anything is written."""
    from ssmforge.pretrain.launch import free_port

    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "LOCAL_", "WORLD_", "MASTER_"))}
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="3", LOCAL_WORLD_SIZE="3", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()))
    proc = subprocess.run(pretrain_command(run_dir, "train.global_batch_size=16"), cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("ssmforge:")]
    assert lines == ["ssmforge: error: train.global_batch_size=16 is not divisible by train.micro_batch_size=4 x 3 "
                     "data-parallel ranks (= 12): change the micro-batch or the number of ranks"], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not run_dir.exists()  # no lock, no config.yaml, no shards


def test_num_canonical_nodes_that_the_node_count_cannot_share_is_refused():
    from ssmforge.pretrain.launch import World
    from ssmforge.pretrain.trainer import check_batch_layout

    config = load_config(ROOT / "configs" / "tiny.yaml", ["train.num_canonical_nodes=4"])
    for nodes in (1, 2, 4, 8):
        check_batch_layout(config, World(0, nodes, 0, 1))  # divides 4, or 4 divides it
    check_batch_layout(config, World(0, 16, 0, 8))  # 16 ranks on 2 nodes
    for world in (World(0, 3, 0, 1), World(0, 6, 0, 2)):  # 3 nodes
        with pytest.raises(ConfigError, match=r"train\.num_canonical_nodes=4 and 3 nodes: one must divide the other"):
            check_batch_layout(config, world)


def test_submit_refuses_a_job_whose_ranks_cannot_split_the_global_batch(capsys, tmp_path):
    from ssmforge.cli import main

    recipe = str(ROOT / "configs" / "mamba-130m-pile.yaml")  # 256 sequences, micro-batch 4
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text('{"model": {}}')  # the recipe's tokenizer file must exist (submit checks it)
    local = [f"run_dir={tmp_path / 'run'}", f"variables.tokenizer_json={tokenizer}", "--cpus-per-task", "8"]
    assert main(["submit", recipe, *local, "--nodes", "2", "--gpus-per-node", "8", "--dry-run"]) == 0  # accumulation 4
    capsys.readouterr()
    assert main(["submit", recipe, *local, "--nodes", "3", "--gpus-per-node", "8", "--dry-run"]) == 2
    assert capsys.readouterr().err.strip() == (
        "ssmforge: error: train.global_batch_size=256 is not divisible by train.micro_batch_size=4 x 24 "
        "data-parallel ranks (= 96): change the micro-batch or the number of ranks")
