"""Pretraining under DeepSpeed on CPU: exact resume across ZeRO stages and ranks, graceful stop,
non-finite losses, export, and the precision policy."""
import json
import signal
import time
from pathlib import Path

import pytest
import torch

from ssmforge.models import LanguageModel, load_pretrained
from ssmforge.pretrain.engine import autocast, lr_lambda, param_groups
from ssmforge.pretrain.export import consolidated_state_dict
from ssmforge.pretrain.config import TrainConfig

from .conftest import ROOT, pretrain_command, run_pretrain, start_ranks, train_losses

STEPS = ("train.max_steps=8", "train.log_every=1", "train.warmup_steps=2", "train.eval_every=100",
         "train.save_every=100")


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2])  # ZeRO-3: test_resume_is_exact_under_the_settings_real_runs_use
def test_stopped_and_resumed_run_equals_an_uninterrupted_one(tmp_path, stage):
    zero = f"deepspeed.zero_stage={stage}"
    run_pretrain(tmp_path / "straight", *STEPS, zero, ranks=2)
    run_pretrain(tmp_path / "resumed", *STEPS, zero, "train.stop_at_step=4", ranks=2, expect=75)
    assert sorted(train_losses(tmp_path / "resumed")) == [1, 2, 3, 4]
    run_pretrain(tmp_path / "resumed", *STEPS, zero, ranks=2)
    straight, resumed = train_losses(tmp_path / "straight"), train_losses(tmp_path / "resumed")
    assert sorted(resumed) == list(range(1, 9))
    for step in straight:
        assert resumed[step] == pytest.approx(straight[step], abs=1e-6), step
    assert straight[8] < straight[1]
    a = consolidated_state_dict(tmp_path / "straight" / "checkpoints", "step_00000008")
    b = consolidated_state_dict(tmp_path / "resumed" / "checkpoints", "step_00000008")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)


# `ssmforge pretrain` sending itself SIGUSR1 (SLURM's warning signal) at a chosen moment: argv[1] is
# `RANK:micro:N` (during this process's N-th training micro-batch) or `RANK:validation:N` (right after its
# N-th validation), on rank RANK only
SIGNALLED_PRETRAIN = r"""
import os, signal, sys
import ssmforge.pretrain.trainer as trainer

rank, moment, count = sys.argv[1].split(":")
armed = os.environ.get("RANK", "0") == rank
seen = {"micro": 0, "validation": 0}
real_loss, real_evaluate = trainer.lm_loss, trainer.evaluate

def tick(kind):
    seen[kind] += 1
    if armed and kind == moment and seen[kind] == int(count):
        os.kill(os.getpid(), signal.SIGUSR1)

def lm_loss(engine, *args, **kwargs):
    loss = real_loss(engine, *args, **kwargs)
    if engine.module.training:
        tick("micro")
    return loss

def evaluate(*args, **kwargs):
    loss = real_evaluate(*args, **kwargs)
    tick("validation")
    return loss

trainer.lm_loss, trainer.evaluate = lm_loss, evaluate
from ssmforge.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_resume_is_exact_under_the_settings_real_runs_use(tmp_path):
    """Accumulation 4, two loader workers, two weighted sources, activation checkpointing, ZeRO-3 with the
    optimizer offloaded; stopped by a signal in the middle of an accumulation window (after a validation
    that came after the last save) and again right after a validation."""
    import sys

    text = tmp_path / "local.jsonl"
    rng = torch.Generator().manual_seed(0)
    words = ["state", "space", "model", "scan", "token", "gate", "conv", "decay"]
    text.write_text("".join(json.dumps({"text": " ".join(words[i] for i in torch.randint(0, 8, (60,),
                                                                                          generator=rng))}) + "\n"
                            for _ in range(200)))
    settings = ("train.max_steps=12", "train.log_every=1", "train.warmup_steps=2", "train.eval_every=3",
                "train.eval_batches=2", "train.save_every=4", "train.grad_accum_steps=4", "data.num_workers=2",
                f"data.sources=[{{kind: synthetic, max_documents: 300, weight: 2}}, "
                f"{{kind: local, paths: ['{text}'], weight: 1}}]",
                "train.activation_checkpointing=true", "deepspeed.zero_stage=3", "deepspeed.offload_optimizer=true")
    run_pretrain(tmp_path / "straight", *settings, ranks=2)

    def signalled(moment: str) -> str:
        command = pretrain_command(tmp_path / "stopped", *settings)
        procs = start_ranks([sys.executable, "-c", SIGNALLED_PRETRAIN, moment] + command[3:], 2)
        outputs = [p.communicate(timeout=300) for p in procs]
        for proc, (out, err) in zip(procs, outputs):
            assert proc.returncode == 75, out[-3000:] + err[-3000:]
        return outputs[0][0] + outputs[0][1]

    # rank 1, micro-batch 2 of step 7: validations at steps 3 and 6 came after the save of step 4
    assert "stopped at step 7" in signalled(f"1:micro:{6 * 4 + 2}")
    # the resumed process validates first at step 9; rank 0 is signalled right after it
    assert "stopped at step 9" in signalled("0:validation:1")
    run_pretrain(tmp_path / "stopped", *settings, ranks=2)

    records = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
               for name in ("straight", "stopped")}
    losses = {name: {(r["kind"], r["step"]): r["loss"] for r in rs if r["kind"] in ("train", "val")}
              for name, rs in records.items()}
    assert sorted(losses["stopped"]) == sorted(losses["straight"])
    assert {step for kind, step in losses["straight"] if kind == "val"} == {3, 6, 9, 12}
    for key, loss in losses["straight"].items():
        assert losses["stopped"][key] == pytest.approx(loss, abs=1e-6), key
    a = consolidated_state_dict(tmp_path / "straight" / "checkpoints", "step_00000012")
    b = consolidated_state_dict(tmp_path / "stopped" / "checkpoints", "step_00000012")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)


def test_single_process_run_exports_a_loadable_model(tmp_path):
    proc = run_pretrain(tmp_path, "train.max_steps=20", "train.log_every=5", "train.eval_every=10")
    assert "validation loss" in proc.stdout and "entropy floor" in proc.stdout
    losses = train_losses(tmp_path)
    assert losses[20] < losses[5]
    assert (tmp_path / "plots" / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["tokens_per_s"] > 0
    from ssmforge.cli import main

    assert main(["export", str(tmp_path), str(tmp_path / "export")]) == 0
    model = load_pretrained(tmp_path / "export")
    from ssmforge.data_pipeline.tokenizer import ByteTokenizer
    from ssmforge.pretrain.export import find_tokenizer

    assert isinstance(find_tokenizer(tmp_path / "export"), ByteTokenizer)  # the run's tokenizer travels along
    state = consolidated_state_dict(tmp_path / "checkpoints", "step_00000020")
    torch.testing.assert_close(model.state_dict()["layers.0.mixer.A_log"], state["layers.0.mixer.A_log"])
    # running the finished command again resumes at the end and changes nothing
    again = run_pretrain(tmp_path, "train.max_steps=20", "train.log_every=5", "train.eval_every=10")
    assert "done: step 20" in again.stdout
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_00000010", "step_00000020"]


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_both_with_the_requeue_code(tmp_path):
    procs = start_ranks(pretrain_command(tmp_path, "train.max_steps=100000", "train.log_every=1",
                                         "train.save_every=100000", "train.eval_every=100000"), 2)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3) and time.time() < deadline:
        time.sleep(0.5)
    procs[1].send_signal(signal.SIGUSR1)
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 75, out[-3000:] + err[-3000:]
    latest = (tmp_path / "checkpoints" / "latest").read_text()
    stopped_at = int(latest.split("_")[1])
    assert stopped_at == max(train_losses(tmp_path))
    state = json.loads((tmp_path / "checkpoints" / latest / "trainer_state.json").read_text())
    assert state["step"] == stopped_at and state["loader"]["sample_in_epoch"] == stopped_at * 4 * 2


def test_nonfinite_loss_stop_names_the_step(tmp_path, monkeypatch):
    proc = run_pretrain(tmp_path, "train.max_steps=6", "train.save_every=2", "train.lr=1e30", "train.warmup_steps=0",
                        expect=3)
    assert "non-finite loss at step" in proc.stderr and "last good checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_fp32_ssm_parameters_under_bf16_autocast(tiny_config, monkeypatch):
    from ssmforge import kernels

    seen = {}
    real = kernels.selective_scan

    def spy(u, delta, A, B, C, D=None, z=None, delta_bias=None, **kwargs):
        seen.update(u=u.dtype, A=A.dtype, D=D.dtype, delta_bias=delta_bias.dtype)
        return real(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, **kwargs)

    monkeypatch.setattr(kernels, "selective_scan", spy)
    model = LanguageModel(tiny_config)
    with autocast(torch.device("cpu"), torch.bfloat16):
        model(torch.randint(0, 101, (2, 8))).sum().backward()
    assert seen["u"] == torch.bfloat16  # autocast is really on for the projections
    assert seen["A"] == seen["D"] == seen["delta_bias"] == torch.float32
    mixer = model.layers[0].mixer
    assert mixer.A_log.dtype == mixer.D.dtype == mixer.dt_proj.bias.dtype == torch.float32
    assert mixer.A_log.grad.dtype == torch.float32


def test_weight_decay_groups(tiny_config):
    model = LanguageModel(tiny_config)
    decay, no_decay = param_groups(model, 0.1, 6e-4)  # no capped parameters in Mamba: two groups
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {"embedding.weight", "norm_f.weight", "layers.0.mixer.A_log", "layers.0.mixer.D",
            "layers.0.mixer.dt_proj.bias", "layers.0.mixer.conv1d.bias", "layers.0.norm.weight"} <= no_decay_names
    assert {"layers.0.mixer.in_proj.weight", "layers.0.mixer.out_proj.weight",
            "layers.0.mixer.x_proj.weight"} <= decay_names
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))  # tied head once


def test_ssm_parameters_train_at_their_own_rate():
    """model.<family>.ssm_lr: S4's Lambda, P, B and dt, S4D's, H3's and Liquid-S4's A and dt, DSS's Lambda and dt
    and, when set, GSS's (null by default) form a group at min(train.lr, ssm_lr), joined by Hyena's filter FFN
    (model.hyena.filter_lr); LRU's nu, theta, gamma and B one at train.lr * model.lru.ssm_lr_factor; all without
    weight decay. The scheduler scales these groups with the others, and AdamW's first step moves each parameter
    by its group's rate."""
    from ssmforge.models import ModelConfig
    from ssmforge.pretrain.engine import DroppableAdamW

    sections = {name: dict(d_state=8) for name in ("s4", "s4d", "dss", "h3", "liquid_s4", "lru")}
    sections["hyena"] = dict(filter_order=8, l_max=16)
    sections["gss"] = dict(d_state=8, ssm_lr=1e-3)
    config = ModelConfig.from_dict(dict(family="hybrid", layer_pattern="SDEHQYLG-", n_layer=9, d_model=16,
                                        vocab_size=31, **sections))
    torch.manual_seed(0)
    model = LanguageModel(config)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model, 0.1, 3e-3)
    assert [(g["weight_decay"], g.get("lr")) for g in groups] == [(0.1, None), (0.0, None), (0.0, 1e-3), (0.0, 1.5e-3)]
    capped = sorted(names[id(p)] for p in groups[2]["params"])
    scaled = sorted(names[id(p)] for p in groups[3]["params"])
    filter_ffn = ["filter_in.weight", "filter_in.bias", "filter_hidden.0.weight", "filter_hidden.0.bias",
                  "filter_hidden.1.weight", "filter_hidden.1.bias", "filter_out.weight", "filter_freq"]
    expected = sorted([f"layers.0.mixer.{n}" for n in ("Lambda_re_log", "Lambda_im", "P", "B", "log_dt")]
                      + [f"layers.1.mixer.kernel.{n}" for n in ("log_A_real", "A_imag", "log_dt")]
                      + [f"layers.2.mixer.kernel.{n}" for n in ("Lambda_re", "Lambda_im", "log_dt")]
                      + [f"layers.3.mixer.kernel.{n}" for n in ("log_A_real", "A_imag", "log_dt")]
                      + [f"layers.4.mixer.{n}" for n in ("Lambda_re_log", "Lambda_im", "P", "B", "log_dt")]
                      + [f"layers.5.mixer.{n}" for n in filter_ffn]
                      + [f"layers.7.mixer.{n}" for n in ("Lambda_re_log", "Lambda_im", "log_dt")])
    assert capped == expected
    assert scaled == sorted(f"layers.6.mixer.{n}" for n in ("nu_log", "theta_log", "gamma_log", "B_re", "B_im"))
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    # below the cap the capped group keeps train.lr, the scaled one follows it; null puts a family's back
    assert [g.get("lr") for g in param_groups(model, 0.1, 6e-4)] == [None, None, 6e-4, 3e-4]
    sections["s4"]["ssm_lr"], sections["hyena"]["filter_lr"], sections["lru"]["ssm_lr_factor"] = None, None, None
    del sections["gss"]["ssm_lr"]  # GSS's default: no group of its own
    plain = LanguageModel(ModelConfig.from_dict(dict(family="hybrid", layer_pattern="SYLG-", n_layer=5, d_model=16,
                                                     vocab_size=31, **sections)))
    assert len(param_groups(plain, 0.1, 3e-3)) == 2
    # one step: Adam's first update is lr * g / (|g| + eps), about the rate itself, for every parameter
    optimizer = DroppableAdamW(groups, lr=3e-3, betas=(0.9, 0.95), eps=1e-12)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    assert [g["lr"] for g in optimizer.param_groups] == [1.5e-3, 1.5e-3, 0.5e-3, 0.75e-3]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(torch.randint(0, 31, (2, 12)), targets=torch.randint(0, 31, (2, 12))).backward()
    optimizer.step()
    scheduler.step()
    moved = {n: (p.detach() - before[n]).abs() for n, p in model.named_parameters() if p.grad is not None}
    rates = ([(n, 0.5e-3) for n in capped] + [(n, 0.75e-3) for n in scaled]
             + [(f"layers.{i}.mixer.{n}", 1.5e-3)
                for i, n in [(0, "C"), (0, "D"), (5, "filter_bias"), (6, "C_re"), (7, "C"), (7, "D")]])
    for name, rate in rates:
        param = model.get_parameter(name)
        step = moved[name][param.grad.abs() > 1e-9]  # a gradient near eps (1e-12) moves its parameter less
        ulp = torch.finfo(torch.float32).eps * param.detach().abs().max().item()  # the rounding of the new value
        assert step.numel() and torch.allclose(step, torch.full_like(step, rate), rtol=1e-2, atol=ulp), name


def test_warmup_then_cosine_to_the_floor():
    f = lr_lambda(TrainConfig(max_steps=110, warmup_steps=10, min_lr_ratio=0.1))
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)
    assert f(500) == pytest.approx(0.1)


def test_nonfinite_loss_skip_goes_on_without_touching_the_weights(tmp_path):
    proc = run_pretrain(tmp_path, "train.max_steps=3", "train.lr=1e30", "train.warmup_steps=0",
                        "train.nonfinite_loss=skip", "train.log_every=1", "train.eval_every=100")
    assert "update is dropped" in proc.stderr
    losses = train_losses(tmp_path)
    assert losses[1] == losses[1]  # the first step is finite, and its update makes the rest diverge
    state = consolidated_state_dict(tmp_path / "checkpoints", "step_00000003")
    assert all(torch.isfinite(t).all() for t in state.values())


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2])
def test_a_nonfinite_micro_step_drops_the_whole_step_on_every_rank(tmp_path, monkeypatch, stage):
    """Accumulation 4 on 2 ranks; the loss of micro-step 2 of step 2 is NaN on rank 1 only. Step 2 must
    change no weight on either rank, step 3 must train again from there, and the drop is counted."""
    monkeypatch.setenv("INJECT_ACCUMULATION", "4")
    command = pretrain_command(tmp_path, "train.max_steps=3", "train.grad_accum_steps=4", "train.log_every=1",
                               "train.save_every=1", "train.keep_checkpoints=5", "train.eval_every=100",
                               "train.nonfinite_loss=skip", "train.warmup_steps=0", f"deepspeed.zero_stage={stage}")
    command[1:3] = [str(Path(__file__).with_name("inject_nonfinite.py")), "2", "2", "1"]
    procs = start_ranks(command, 2)
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-3000:] + err[-3000:]
    weights = {step: consolidated_state_dict(tmp_path / "checkpoints", f"step_0000000{step}") for step in (1, 2, 3)}
    for name, before in weights[1].items():
        assert torch.equal(weights[2][name], before), name  # the dropped step changed nothing
    assert any(not torch.equal(weights[3][n], weights[2][n]) for n in weights[2])  # the next one trains
    assert all(torch.isfinite(t).all() for t in weights[3].values())
    records = {r["step"]: r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
               if r["kind"] == "train"}
    assert [records[s]["skipped_steps"] for s in (1, 2, 3)] == [0, 1, 1]
    assert records[2]["loss"] != records[2]["loss"] and records[3]["loss"] < records[1]["loss"]
    state = json.loads((tmp_path / "checkpoints" / "step_00000003" / "trainer_state.json").read_text())
    assert state["skipped_steps"] == 1 and state["step"] == 3


def test_offload_and_activation_checkpointing_do_not_change_the_numbers(tmp_path):
    common = ("train.max_steps=4", "train.log_every=1", "train.grad_accum_steps=2", "deepspeed.zero_stage=2",
              "train.eval_every=100")
    run_pretrain(tmp_path / "plain", *common)
    run_pretrain(tmp_path / "lean", *common, "deepspeed.offload_optimizer=true", "train.activation_checkpointing=true")
    plain, lean = train_losses(tmp_path / "plain"), train_losses(tmp_path / "lean")
    assert sorted(plain) == [1, 2, 3, 4]
    for step in plain:
        assert lean[step] == pytest.approx(plain[step], abs=1e-6)


@pytest.mark.slow
def test_bf16_gradient_reduction_is_close_to_fp32_and_really_in_bf16(tmp_path):
    common = ("train.max_steps=3", "train.log_every=1", "train.eval_every=100", "deepspeed.zero_stage=2")
    run_pretrain(tmp_path / "fp32", *common, ranks=2)
    run_pretrain(tmp_path / "bf16", *common, "deepspeed.communication_dtype=bf16", ranks=2)
    exact, rounded = train_losses(tmp_path / "fp32"), train_losses(tmp_path / "bf16")
    assert rounded[1] == exact[1]  # the first loss precedes any reduction
    assert rounded[3] != exact[3] and rounded[3] == pytest.approx(exact[3], rel=1e-2)


def test_fp16_is_refused_in_one_line(tmp_path):
    proc = run_pretrain(tmp_path, "train.precision=fp16", expect=2)
    assert "train.precision='fp16' is invalid" in proc.stderr and "underflow" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("config", ["tiny", "hybrid-tiny", "mamba2-tiny", "gss-tiny"])
def test_zero3_builds_the_model_partitioned_with_the_weights_of_a_whole_one(config):
    """Under ZeRO-3 the model is built by deepspeed.zero.Init: no rank ever holds it whole, each holds about
    half of it, and gathered it equals the model built whole from the same seed, with the same parameters
    under weight decay (every initialisation happens in the constructor of the module that owns it)."""
    from ssmforge.pretrain.launch import free_port
    import os
    import subprocess
    import sys

    script = Path(__file__).with_name("zero_init_check.py")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "LOCAL_", "WORLD_", "MASTER_"))}
    base.update(WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    procs = [subprocess.Popen([sys.executable, str(script), str(ROOT / "configs" / f"{config}.yaml"),
                               "deepspeed.param_persistence_threshold=0"],
                              env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        reports.append(json.loads(out.strip().splitlines()[-1]))
    for report in reports:
        assert report["total"] == report["whole"] and report["local_numel"] == 0
        assert report["held"] <= report["whole"] / 2 + 2 * 64  # its half, up to the padding of each partition
        assert report["equal"] and report["same_decay"] and report["decayed"] > 0
    assert sum(r["held"] for r in reports) >= reports[0]["whole"]


@pytest.mark.slow
def test_a_compiled_model_trains_on_the_same_losses(tmp_path):
    # under ZeRO-3, whose parameter hooks are what torch.compile must trace around; ZeRO-0 adds no path of its own
    common = ("train.max_steps=3", "train.log_every=1", "train.eval_every=100", "deepspeed.zero_stage=3")
    run_pretrain(tmp_path / "eager", *common, ranks=2)
    run_pretrain(tmp_path / "compiled", *common, "train.compile=true", ranks=2)
    eager, compiled = train_losses(tmp_path / "eager"), train_losses(tmp_path / "compiled")
    assert sorted(compiled) == [1, 2, 3]
    for step in eager:
        assert compiled[step] == pytest.approx(eager[step], abs=1e-5), step
