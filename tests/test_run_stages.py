"""`ssmforge run CONFIG`: the config's stages in order, each the ssmforge command of that name in a process of
its own; a finished stage is skipped when run again, one whose inputs changed runs again; a failing stage
ends the run with its exit code; a stop signal reaches the training stage, which checkpoints."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from ssmforge.errors import ConfigError
from ssmforge.pretrain.config import load_config

from .pretrain.conftest import ROOT, SYNTHETIC, train_losses

TINY_RUN = (SYNTHETIC, "data.num_workers=0", "train.log_every=1", "train.eval_every=100", "train.save_every=100",
            "stages.run=[prepare,pretrain,export,eval_ppl]")


def _run(run_dir, *overrides, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ssmforge", "run", str(ROOT / "configs" / "tiny.yaml"),
                           f"run_dir={run_dir}", *TINY_RUN, *overrides], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def _stage_lines(proc) -> list[str]:
    return [line for line in proc.stdout.splitlines() if line.startswith("stage ")]


@pytest.mark.slow
def test_a_run_ends_with_its_evaluation_and_continues_where_it_stopped(tmp_path):
    run_dir = tmp_path / "run"
    first = _run(run_dir, "train.max_steps=4", "eval.dataset=synthetic-heldout")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert [line.split(":")[0] for line in _stage_lines(first) if "done in" in line] == [
        "stage 1/4 prepare", "stage 2/4 pretrain", "stage 3/4 export", "stage 4/4 eval_ppl"]
    result = run_dir / "eval" / "ppl-synthetic-heldout-L64-S64.json"  # the window is the training length
    scored = json.loads(result.read_text())
    assert scored["checkpoint"] == str(run_dir / "export") and scored["documents"] == 200
    # the floor of exactly the held-out documents: the synthetic source's documents 300-499 (training read
    # 0-299), byte tokens plus each document's EOS
    from ssmforge.data_pipeline.synthetic import SyntheticCorpus

    corpus = SyntheticCorpus(seed=load_config(ROOT / "configs" / "tiny.yaml", ["run_dir=x"]).seed)
    docs = [corpus.document(300 + i) for i in range(200)]
    tokens = sum(len(doc.text.encode()) + 1 for doc in docs)
    assert scored["tokens"] == tokens
    assert scored["entropy_floor_nats_per_token"] == pytest.approx(sum(d.surprisal_nats for d in docs) / tokens,
                                                                   rel=1e-12)
    assert scored["nats_above_floor"] == pytest.approx(scored["nll"] / tokens - scored["entropy_floor_nats_per_token"])
    assert scored["nats_above_floor"] > 0
    assert "nats above the best possible" in first.stdout
    assert sorted(train_losses(run_dir)) == [1, 2, 3, 4]
    assert (run_dir / "stages" / "config.yaml").is_file()
    assert set(json.loads((run_dir / "stages" / "state.json").read_text())) == {"export", "eval_ppl"}

    again = _run(run_dir, "train.max_steps=4", "eval.dataset=synthetic-heldout")  # nothing left to do
    assert again.returncode == 0, again.stderr[-3000:]
    skipped = _stage_lines(again)
    assert skipped[:2] == [f"stage 1/4 prepare: skipped, {run_dir / 'data'} holds this config's shards",
                           "stage 2/4 pretrain: skipped, checkpoint step_00000004 is at step 4 of 4"]
    assert all(": skipped, " in line for line in skipped) and len(skipped) == 4, skipped
    assert json.loads(result.read_text()) == scored

    longer = _run(run_dir, "train.max_steps=6", "eval.dataset=synthetic-heldout")  # more steps: later stages again
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert [line.split(":")[0] for line in _stage_lines(longer) if "skipped" in line] == ["stage 1/4 prepare"]
    assert sorted(train_losses(run_dir)) == [1, 2, 3, 4, 5, 6]
    rescored = json.loads(result.read_text())
    assert rescored["tokens"] == tokens and rescored["nll"] != scored["nll"]  # the same documents, a newer model


def test_a_failing_stage_ends_the_run_with_its_code_and_is_not_recorded(tmp_path):
    run_dir = tmp_path / "run"
    proc = _run(run_dir, "train.max_steps=2", "stages.run=[prepare,pretrain,export,eval_ppl]",
                f"eval.dataset={tmp_path / 'missing' / '*.txt'}")
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _stage_lines(proc)[-1] == ("stage 4/4 eval_ppl: failed with exit code 2; run the same command again to "
                                      "continue from this stage")
    assert "eval_ppl" not in json.loads((run_dir / "stages" / "state.json").read_text())


@pytest.mark.parametrize("stages, message", [
    ("[pretrain,prepare]", r"stages\.run=\['pretrain', 'prepare'\] is invalid: in pipeline order"),
    ("[prepare,train]", r"stages\.run='train' is invalid: each one of prepare, pretrain, export, eval_ppl"),
    ("[]", r"stages\.run=\[\] is invalid: a non-empty list"),
    ("[export,export]", r"stages\.run=\['export', 'export'\] is invalid: each stage at most once"),
])
def test_stage_lists_that_cannot_run_are_refused_at_load(stages, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "configs" / "tiny.yaml", [f"stages.run={stages}"])


def test_refusals_of_the_command_write_nothing(tmp_path):
    run_dir = tmp_path / "run"
    only = subprocess.run([sys.executable, "-m", "ssmforge", "run", str(ROOT / "configs" / "tiny.yaml"),
                           f"run_dir={run_dir}", "stages.run=[prepare,pretrain]", "--only", "eval_ppl"],
                          capture_output=True, text=True, timeout=120)
    assert only.returncode == 2 and only.stderr.strip() == (
        "ssmforge: error: --only eval_ppl: eval_ppl not in stages.run (prepare, pretrain)")
    launched = subprocess.run([sys.executable, "-m", "ssmforge", "run", str(ROOT / "configs" / "tiny.yaml"),
                               f"run_dir={run_dir}"], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert launched.returncode == 2 and "ssmforge run starts its stages itself, not under a launcher" in launched.stderr
    assert not run_dir.exists()


@pytest.mark.slow
def test_a_stop_signal_reaches_the_training_stage_which_checkpoints(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "ssmforge", "run", str(ROOT / "configs" / "tiny.yaml"),
                             f"run_dir={run_dir}", *TINY_RUN, "train.max_steps=100000"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (run_dir / "metrics.jsonl").exists():
            time.sleep(0.5)
        time.sleep(2)
        proc.send_signal(signal.SIGTERM)  # what SLURM or a user sends the run
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 75, out[-3000:] + err[-3000:]
    assert "stage 2/4 pretrain: stopped for a requeue; run the same command again" in out
    steps = max(train_losses(run_dir))
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{steps:08d}"


@pytest.mark.slow
def test_several_processes_of_one_machine_train_through_torchrun(tmp_path):
    run_dir = tmp_path / "run"
    proc = _run(run_dir, "stages.run=[prepare,pretrain]", "train.max_steps=3", "train.global_batch_size=8",
                "--nproc-per-node", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "-m torch.distributed.run --standalone --nproc-per-node=2 -m ssmforge pretrain" in proc.stdout
    assert "(8 sequences: micro-batch 4 x 1 accumulation x 2 ranks)" in proc.stderr
    assert sorted(train_losses(run_dir)) == [1, 2, 3]
