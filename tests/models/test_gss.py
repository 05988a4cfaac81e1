"""The GSS mixer, without and with its optional short conv (model.gss.d_conv): the FFT forward against a
sequential DSS oracle, decoding against the parallel forward, the state left by a prefill, gradients, the
parameter and FLOP counts, fp32 parameters, config errors, and a pretraining run."""
import cmath
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ssmforge.errors import ConfigError

from ssmforge.models import LanguageModel, ModelConfig
from ssmforge.models.hf import cast_model

from ..conftest import seed_kernel_cache
from .contracts import assert_causal, assert_steps_match_forward, model_config

ROOT = Path(__file__).resolve().parents[2]


def gss_config(**overrides) -> ModelConfig:
    # dt up to 1: the kernel's memory is a few dozen steps, so the tests' sequences see it decay and not
    # only its first taps
    base = dict(family="gss", d_model=32, n_layer=2, vocab_size=101,
                gss=dict(expand=2, ssm_dim=12, d_state=6, dt_min=0.05, dt_max=1.0))
    return model_config(base, overrides)


def build(config: ModelConfig, seed: int = 0) -> LanguageModel:
    torch.manual_seed(seed)
    return LanguageModel(config).eval()


def oracle_mixer(mixer, hidden):
    """The GSS block from the definitions, one step at a time in float64 with Python complex numbers:
    the DSS in its zero-order-hold form x_t = exp(dt lam) x_{t-1} + (exp(dt lam) - 1)/lam v_t,
    y_t = Re(C x_t) + D v_t (the input factor on the state, where the mixer folds it into C).
    Returns the output (batch, L, d_model) and the final states x_L (batch, H, N) as nested lists."""
    w = {k: v.detach().double() for k, v in mixer.state_dict().items()}
    gate_dim, H, N = mixer.gate_dim, mixer.ssm_dim, mixer.d_state
    proj = hidden.double() @ w["in_proj.weight"].T
    gate, v = F.gelu(proj[..., :gate_dim]), proj[..., gate_dim:]
    if "conv1d.weight" in w:  # the short conv: out_t = bias + sum_k taps_k v_{t - (K-1) + k}, zeros before the start
        taps, K = w["conv1d.weight"][:, 0], w["conv1d.weight"].shape[-1]
        v = torch.stack([w["conv1d.bias"] + sum(taps[:, k] * v[:, t - (K - 1) + k] for k in range(K)
                                                if t - (K - 1) + k >= 0) for t in range(v.shape[1])], dim=1)
    v = F.gelu(v)
    v = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-5) * w["ssm_norm.weight"]
    lam = [complex(-math.exp(w["Lambda_re_log"][n]), w["Lambda_im"][n]) for n in range(N)]
    batch, L = hidden.shape[:2]
    y = torch.zeros(batch, L, H, dtype=torch.float64)
    finals = []
    for b in range(batch):
        finals.append([])
        for h in range(H):
            dt = math.exp(w["log_dt"][h])
            z = [cmath.exp(dt * lam[n]) for n in range(N)]
            b_bar = [(z[n] - 1) / lam[n] for n in range(N)]
            c = [complex(w["C"][h, n, 0], w["C"][h, n, 1]) for n in range(N)]
            x = [0j] * N
            for t in range(L):
                u = float(v[b, t, h])
                x = [z[n] * x[n] + b_bar[n] * u for n in range(N)]
                y[b, t, h] = sum(c[n] * x[n] for n in range(N)).real + w["D"][h] * u
            finals[-1].append(x)
    out = ((y @ w["up_proj.weight"].T) * gate) @ w["out_proj.weight"].T
    return out, finals


@pytest.mark.parametrize("d_conv", [0, 4])
def test_fft_forward_and_prefill_state_equal_the_sequential_oracle(d_conv):
    model = build(gss_config(gss=dict(d_conv=d_conv)))
    mixer = model.layers[0].mixer
    if d_conv:  # taps far from the identity, so that a shifted or flipped conv cannot pass
        torch.nn.init.normal_(mixer.conv1d.weight, std=0.5, generator=torch.Generator().manual_seed(4))
        torch.nn.init.normal_(mixer.conv1d.bias, std=0.5, generator=torch.Generator().manual_seed(5))
    hidden = torch.randn(2, 40, 32, generator=torch.Generator().manual_seed(1))
    state = mixer.allocate_state(2, hidden.device, hidden.dtype)
    with torch.no_grad():
        out = mixer(hidden, state)
    want, finals = oracle_mixer(mixer, hidden)
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-5)
    # the model keeps x without the input factor b_bar = (z - 1)/lam; the oracle keeps it on the state
    dt, lam = mixer.log_dt.exp().double(), torch.complex(-mixer.Lambda_re_log.exp(), mixer.Lambda_im).detach()
    b_bar = (torch.exp(dt[:, None] * lam) - 1) / lam
    torch.testing.assert_close((state.diag.ssm * b_bar).to(torch.complex128),
                               torch.tensor(finals, dtype=torch.complex128), rtol=1e-4, atol=1e-5)
    assert state.diag.ssm.abs().max() > 0.1  # a real state, not decayed to nothing
    if d_conv:  # the conv's last inputs, oldest first, for decoding to continue
        branch = (hidden @ mixer.in_proj.weight.T)[..., mixer.gate_dim:]
        torch.testing.assert_close(state.conv, branch[:, -d_conv:].transpose(1, 2))


@pytest.mark.parametrize("d_conv", [0, 4])
@pytest.mark.parametrize("prefill", [0, 7])
def test_step_decoding_equals_parallel_forward(prefill, d_conv):
    ids = torch.randint(0, 101, (2, 30), generator=torch.Generator().manual_seed(3))
    assert_steps_match_forward(build(gss_config(gss=dict(d_conv=d_conv))), ids, prefill)


@pytest.mark.parametrize("d_conv", [0, 4])
def test_causal(d_conv):
    assert_causal(build(gss_config(gss=dict(d_conv=d_conv))), length=20, position=9)


def sequential_mixer(mixer, hidden):
    """The mixer with its short conv from the parameters, one position at a time (the conv as a sum over its taps,
    the DSS as its recurrence): autograd through it gives every gradient independently of the FFT and conv
    kernels."""
    proj = mixer.in_proj(hidden)
    gate, v = F.gelu(proj[..., :mixer.gate_dim]), proj[..., mixer.gate_dim:]
    taps, K = mixer.conv1d.weight[:, 0], mixer.d_conv
    padded = F.pad(v, (0, 0, K - 1, 0))
    v = torch.stack([mixer.conv1d.bias + (padded[:, t:t + K] * taps.T).sum(1) for t in range(v.shape[1])], dim=1)
    v = mixer.ssm_norm(F.gelu(v))
    w, dt_lam = mixer._discrete()
    x, ys = torch.zeros(hidden.shape[0], mixer.ssm_dim, mixer.d_state, dtype=w.dtype), []
    for t in range(v.shape[1]):
        x = torch.exp(dt_lam) * x + v[:, t, :, None]
        ys.append((x * w).sum(-1).real)
    return mixer._output(torch.stack(ys, dim=1), v, gate)


def test_short_conv_gradients_equal_the_sequential_computation():
    mixer = build(gss_config(gss=dict(d_conv=3))).layers[0].mixer.train()
    g = torch.Generator().manual_seed(6)
    hidden, weight = torch.randn(2, 24, 32, generator=g, requires_grad=True), torch.randn(2, 24, 32, generator=g)
    params = [hidden, *mixer.parameters()]
    fast = torch.autograd.grad((mixer(hidden) * weight).sum(), params)
    slow = torch.autograd.grad((sequential_mixer(mixer, hidden) * weight).sum(), params)
    names = ["hidden", *(name for name, _ in mixer.named_parameters())]
    assert "conv1d.weight" in names and "conv1d.bias" in names
    for name, a, b in zip(names, fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
        assert b.abs().max() > 0, name


@pytest.mark.parametrize("bias", [False, True])
def test_parameter_count(bias):
    d, n_layer, V, gate, H, N = 32, 3, 101, 96, 16, 5
    config = gss_config(n_layer=n_layer, gss=dict(expand=3, ssm_dim=H, d_state=N), bias=bias)
    per_layer = (d * (gate + H) + H * gate + gate * d  # in_proj (gate and SSM branches), up_proj, out_proj
                 + bias * (gate + H + gate + d)
                 + 2 * N + 2 * H * N + H + H  # Lambda (re, im), C (complex), log_dt, D
                 + H + d)  # the SSM-branch norm, the block's norm
    want = 104 * d + n_layer * per_layer + d  # padded embedding (tied head), layers, final norm
    assert build(config).num_parameters() == want
    with_conv = gss_config(n_layer=n_layer, gss=dict(expand=3, ssm_dim=H, d_state=N, d_conv=4), bias=bias)
    assert build(with_conv).num_parameters() == want + n_layer * (H * 4 + H)  # depthwise taps and bias per layer
    assert build(gss_config(d_model=40, gss=dict(ssm_dim=None))).layers[0].mixer.ssm_dim == 20  # unset: d_model // 2


def test_initialisation_and_fp32_parameters_survive_a_bf16_cast():
    model = build(gss_config(gss=dict(dt_min=0.001, dt_max=0.1), n_layer=4))
    mixer = model.layers[0].mixer
    lam = torch.complex(-mixer.Lambda_re_log.exp(), mixer.Lambda_im).detach()
    torch.testing.assert_close(lam, torch.complex(torch.full((6,), -0.5), math.pi * torch.arange(6.0)))  # S4D-Lin
    dt = mixer.log_dt.exp()
    assert dt.min() >= 0.001 * 0.999 and dt.max() <= 0.1 * 1.001
    bound = 1 / math.sqrt(mixer.gate_dim) / math.sqrt(4)  # out_proj rescaled by 1/sqrt(n_layer)
    assert 0.9 * bound < mixer.out_proj.weight.abs().max() <= bound
    model = cast_model(model, torch.bfloat16)
    for name in ("Lambda_re_log", "Lambda_im", "log_dt", "C", "D"):
        assert getattr(mixer, name).dtype == torch.float32 and getattr(mixer, name)._no_weight_decay
    assert mixer.in_proj.weight.dtype == torch.bfloat16
    logits = model(torch.randint(0, 101, (1, 8)))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_the_short_conv_is_gathered_with_the_mixer_and_runs_in_bf16():
    """Its taps are read by the conv kernel, not through the Conv1d's forward: ZeRO-3 gathers them with the mixer."""
    model = build(gss_config(gss=dict(d_conv=4)))
    mixer = model.layers[0].mixer
    assert mixer.external_parameters() == [mixer.conv1d.weight, mixer.conv1d.bias]
    assert build(gss_config()).layers[0].mixer.external_parameters() == []
    model = cast_model(model, torch.bfloat16)
    assert mixer.conv1d.weight.dtype == torch.bfloat16 and mixer.C.dtype == torch.float32
    logits = model(torch.randint(0, 101, (2, 16)))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_flops_count_the_fft_per_token():
    mixer = build(gss_config()).layers[0].mixer
    d, gate, H = 32, 64, 12
    matmuls = 2 * (d * (gate + H) + H * gate + gate * d) + gate
    assert mixer.forward_flops_per_token(64) == matmuls + round(H * (10 * 7 + 8))  # log2(128) = 7
    # doubling the context adds one FFT level: 10 flops per SSM channel and token
    assert mixer.forward_flops_per_token(128) - mixer.forward_flops_per_token(64) == 10 * H
    with_conv = build(gss_config(gss=dict(d_conv=4))).layers[0].mixer
    assert with_conv.forward_flops_per_token(64) == mixer.forward_flops_per_token(64) + 2 * 4 * H


@pytest.mark.parametrize("key,value", [("ssm_dim", 0), ("d_state", 0), ("expand", 0), ("d_conv", 1), ("d_conv", 9)])
def test_impossible_shapes_name_the_key(key, value):
    with pytest.raises(ConfigError, match=rf"^model\.gss\.{key}={value} is invalid"):
        gss_config(gss={key: value}).validate()


def test_the_triton_conv_widths_bound_the_short_conv():
    with pytest.raises(ConfigError, match=r"^model\.gss\.d_conv=5 is invalid: must be between 2 and 4 with"):
        gss_config(gss=dict(d_conv=5), kernel_backend="triton").validate()
    gss_config(gss=dict(d_conv=4), kernel_backend="triton").validate()
    gss_config(gss=dict(d_conv=0), kernel_backend="triton").validate()


def test_gss_tiny_pretrains_with_decreasing_loss(tmp_path):
    command = [sys.executable, "-m", "ssmforge", "pretrain", str(ROOT / "configs" / "gss-tiny.yaml"),
               f"run_dir={tmp_path}", "data.sources=[{kind: synthetic, max_documents: 300}]", "data.num_workers=0",
               "train.max_steps=8", "train.log_every=1", "train.eval_every=100", "train.save_every=100"]
    env = {**os.environ, "SSMFORGE_CACHE_DIR": str(seed_kernel_cache(tmp_path / "cache"))}  # not the user's cache
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["kind"] == "train"]
    assert len(losses) == 8 and all(map(math.isfinite, losses))
    assert losses[-1] < losses[0] - 0.3
    config = (tmp_path / "config.yaml").read_text()
    assert "family: gss" in config


def test_fft_backward_equals_the_recurrence_backward():
    """Gradients through the FFT path (the kernel recomputed in backward) equal those through step()."""
    mixer = build(gss_config()).layers[0].mixer.train()
    g = torch.Generator().manual_seed(2)
    hidden, weight = torch.randn(2, 24, 32, generator=g), torch.randn(2, 24, 32, generator=g)
    params = dict(mixer.named_parameters())
    fft_grads = torch.autograd.grad((mixer(hidden) * weight).sum(), list(params.values()))
    state = mixer.allocate_state(2, hidden.device, hidden.dtype)
    out = torch.stack([mixer.step(hidden[:, t], state) for t in range(24)], 1)
    step_grads = torch.autograd.grad((out * weight).sum(), list(params.values()))
    for name, a, b in zip(params, fft_grads, step_grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=name)
    assert all(grad.abs().max() > 0 for grad in fft_grads)
