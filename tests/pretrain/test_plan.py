"""`ssmforge plan`: memory traced on fake tensors against memory measured, the micro-batch search, the
verdict and its exit codes, and submit's pre-flight."""
import sys

import pytest
import torch

from ssmforge.cli import main
from ssmforge.pretrain.config import load_config
from ssmforge.pretrain.plan import Target, gpu_target, make_plan, step_memory

from .conftest import ROOT, SYNTHETIC

TINY = str(ROOT / "configs" / "tiny.yaml")


def test_plan_prints_the_terms_and_exits_0_when_it_fits_3_when_not(capsys):
    assert main(["plan", TINY, "--gpus", "2", "--gpu", "H100"]) == 0
    out = capsys.readouterr().out
    for term in ("parameters", "gradients", "optimizer states", "activations", "peak", "GFLOP per token",
                 "GPU-hours", "fits: peak"):
        assert term in out, term
    assert main(["plan", TINY, "--gpus", "2", "--gpu-memory-gb", "0.0001"]) == 3
    assert "does NOT fit" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--gpus", "2", "--gpu", "Quantum 9000"], "not in the datasheet table"),
    (["--gpus", "0", "--gpu", "H100"], "--gpus=0 is invalid"),
    (["--gpus", "2"], "--gpu NAME or --gpu-memory-gb"),
    (["--gpus", "2", "--gpu", "A100"], "add --gpu-memory-gb"),  # 40 or 80 GB: the name does not say
])
def test_bad_plan_requests_are_one_line(capsys, argv, message):
    assert main(["plan", TINY, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_the_largest_micro_batch_is_the_last_that_fits():
    """With the memory set between the traced peaks of micro-batches 3 and 4, the search must answer 3."""
    config = load_config(TINY, ["run_dir=unused", "train.micro_batch_size=1", "train.max_steps=10"])
    probe = Target(2, "cpu", "probe", None, 1e12, "")
    peaks = {b: step_memory(config, probe, b, False)[0].peak for b in (3, 4)}
    assert peaks[4] > peaks[3]
    memory = int((peaks[3] + peaks[4]) / 2 / 0.9)
    plan = make_plan(config, Target(2, "cpu", "probe", memory, 1e12, ""), mfu=0.5)
    assert plan.fits and plan.largest_micro_batch == 3
    assert plan.largest_micro_batch_checkpointed >= 3  # recomputing blocks never needs more


@pytest.mark.parametrize("memory", [10**6, 3 * 10**6, 10**7])
def test_the_micro_batch_search_traces_log_many_steps_where_memory_outgrows_the_line(monkeypatch, memory):
    """A step whose memory grows faster than the line through micro-batches 1 and 2 (as a layer's blocks of
    work do): the search answers what tracing every candidate answers, in a number of traces logarithmic in the
    candidates (it once traced them one by one downwards from the line's bound, thousands at a small model)."""
    from types import SimpleNamespace

    from ssmforge.pretrain import plan as plan_module

    def peak(batch):
        return 1000 + 100 * batch + batch ** 2

    traced = []
    monkeypatch.setattr(plan_module, "step_memory",
                        lambda config, target, batch, checkpointing: (traced.append(batch) or
                                                                      SimpleNamespace(peak=peak(batch)), 0))
    candidates = list(range(1, 4097))
    target = Target(1, "cuda", "probe", memory, 1e12, "")
    want = max(b for b in candidates if peak(b) <= plan_module.USABLE_FRACTION * memory)
    assert plan_module.largest_micro_batch(None, target, False, candidates) == want
    assert len(traced) == len(set(traced)) <= 3 + 12  # 1, 2, the line's bound, then bisection of < 4096


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_plan_searches_once_per_checkpointing_setting(monkeypatch, checkpointing):
    """The plan's two answers (the config's own setting, and with activation checkpointing) come from one search
    each, and from a single search where the config already checkpoints."""
    from ssmforge.pretrain import plan as plan_module

    searches = []
    monkeypatch.setattr(plan_module, "largest_micro_batch",
                        lambda config, target, use, candidates: searches.append(use) or (7 if use else 5))
    config = load_config(TINY, ["run_dir=unused", f"train.activation_checkpointing={checkpointing}"])
    plan = make_plan(config, gpu_target(1, "H100", None, torch.bfloat16), 0.4)
    assert searches == ([True] if checkpointing else [False, True])
    assert (plan.largest_micro_batch, plan.largest_micro_batch_checkpointed) == ((7, 7) if checkpointing else (5, 7))


def test_time_follows_the_token_budget_and_the_mfu():
    config = load_config(TINY, ["run_dir=unused", "train.max_steps=1000"])
    fast = make_plan(config, gpu_target(8, "H100", None, torch.bfloat16), mfu=0.5, search=False)
    slow = make_plan(config, gpu_target(8, "H100", None, torch.bfloat16), mfu=0.25, search=False)
    assert fast.tokens == 1000 * config.train.sequences_per_step(8) * config.data.seq_len
    assert slow.hours == pytest.approx(2 * fast.hours)
    assert fast.tokens_per_s == pytest.approx(8 * 989e12 * 0.5 / fast.flops_per_token)


@pytest.mark.slow
@pytest.mark.parametrize("name, stage, context_parallel", [("tiny", 0, 1), ("hybrid-tiny", 3, 1), ("hybrid-tiny", 2, 2)])
def test_planned_peak_is_within_15_percent_of_the_measured_one(name, stage, context_parallel):
    """Two ranks under DeepSpeed on this CPU, each process's peak resident memory above what it held before
    the model was built (benchmarks/measure_step_memory.py), against the plan of the same run; also with the
    two ranks splitting every sequence (train.context_parallel=2)."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.plan_accuracy import measured_peak, planned_peak

    config = ROOT / "configs" / f"{name}.yaml"
    overrides = ["model.d_model=384", "data.seq_len=512", "train.micro_batch_size=4", "model.vocab_size=50280",
                 f"deepspeed.zero_stage={stage}", f"train.context_parallel={context_parallel}"]
    planned, measured = planned_peak(config, overrides), measured_peak(config, overrides)
    assert measured > 300 * 2**20  # training memory, not the interpreter, dominates
    assert abs(planned / measured - 1) < 0.15, (planned / 2**20, measured / 2**20)


def test_context_parallelism_divides_the_traced_activations(capsys):
    """Each of K ranks holds 1/K of every sequence: at a length where the activations dominate, a Mamba stack's
    traced activations shrink close to K-fold (3.42 for K = 4 at 16k tokens), and the plan prints the split."""
    activations = {}
    for k in (1, 4):
        config = load_config(TINY, ["run_dir=unused", "data.seq_len=16384", f"train.context_parallel={k}"])
        activations[k] = step_memory(config, Target(4, "cpu", "probe", None, 1e12, ""), 4, False)[0].activations
    assert 3.2 < activations[1] / activations[4] <= 4, activations
    assert main(["plan", TINY, "data.seq_len=16384", "train.context_parallel=4", "--gpus", "8", "--gpu", "H100"]) == 0
    assert "x 2 ranks x 4 context-parallel (each rank holds 4096 tokens of every sequence)" in capsys.readouterr().out


def test_submit_refuses_a_run_that_cannot_fit(tmp_path, capsys):
    common = ["submit", TINY, f"run_dir={tmp_path / 'r'}", SYNTHETIC, "stages.run=[prepare,pretrain]",
              "--gpus-per-node", "2", "--dry-run"]
    assert main([*common, "--gpu-memory-gb", "0.0001"]) == 2
    err = capsys.readouterr().err
    assert "does not fit on 2 x" in err and "--no-plan-check" in err and not (tmp_path / "r").exists()
    assert main([*common, "--gpu-memory-gb", "0.0001", "--no-plan-check"]) == 0
    capsys.readouterr()
    assert main([*common, "--gpu", "H100"]) == 0
    captured = capsys.readouterr()
    assert "fits: peak" in captured.err and captured.out.startswith("#!/bin/bash")  # stdout: the script alone


@pytest.mark.parametrize("name", ["s4", "liquid-s4", "s4d", "dss", "h3", "hyena", "lru"])
def test_the_survey_families_plan_on_fake_tensors(name):
    """Each Mamba-360 family's tiny config traces on fake tensors (S4's HiPPO initialisation included) to the real
    model's parameter count and a positive activation peak."""
    from ssmforge.models import LanguageModel

    config = load_config(ROOT / "configs" / f"{name}-tiny.yaml", ["run_dir=unused"])
    memory, parameters = step_memory(config, Target(1, "cpu", "probe", None, 1e12, ""), 2, False)
    assert parameters == LanguageModel(config.model).num_parameters()
    assert memory.activations > 0


def test_a_plan_counts_the_flops_of_the_targets_kernels():
    """A plan builds its model on fake CPU tensors; with model.kernel_backend auto a GPU target must still count
    the Triton kernels' FLOPs (the LRU's fused scan: 22 N per token), a CPU target the C kernel's (8 N), neither
    PyTorch's doubling scan (log2 L levels of 14 N)."""
    import dataclasses

    from ssmforge.models import LanguageModel

    config = load_config(ROOT / "configs" / "lru-tiny.yaml", ["run_dir=unused", "data.seq_len=1024"])
    assert config.model.kernel_backend == "auto"
    flops = {name: 3 * LanguageModel(dataclasses.replace(config.model, kernel_backend=name))
             .forward_flops_per_token(1024) for name in ("ref", "triton", "auto")}  # auto: the C kernel here
    assert flops["ref"] > flops["triton"] > flops["auto"]
    gpu = make_plan(config, gpu_target(1, "H100", None, torch.bfloat16), mfu=0.5, search=False)
    cpu = make_plan(config, Target(1, "cpu", "probe", None, 1e12, ""), mfu=0.5, search=False)
    assert gpu.flops_per_token == flops["triton"]
    assert cpu.flops_per_token == flops["auto"]
