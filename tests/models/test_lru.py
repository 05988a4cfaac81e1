"""The LRU mixer: its forward and every parameter's gradient against the paper's recurrence run step by step in
float64 (plain, with document resets, continuing a state); decoding and chunked feeding against the parallel
forward; packed documents against each document alone; context parallelism on 4 simulated ranks
(tests/models/test_context_parallel.py runs it on gloo); the ring initialisation; parameter and FLOP counts;
fp32 parameters; config errors and the tiny config. Its scan, both backends, against a sequential loop:
tests/kernels/test_ssm_kernels.py; on the fused Triton scan: tests/models/test_fused_kernels.py."""
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ssmforge.errors import ConfigError
from ssmforge.kernels.documents import document_index
from ssmforge.models import LanguageModel, ModelConfig
from ssmforge.models.hf import cast_model

from .contracts import assert_causal, assert_chunks_then_steps_match_forward, assert_steps_match_forward, model_config
from .test_document_resets import assert_documents_run_alone, documents

ROOT = Path(__file__).resolve().parents[2]
EOS = 0


def lru_config(**overrides) -> ModelConfig:
    # r_min 0.5: eigenvalues with a memory of a few to a few hundred steps, so the tests' sequences see
    # both the decay and long carries
    base = dict(family="lru", d_model=16, n_layer=2, vocab_size=101, lru=dict(d_state=8, r_min=0.5, r_max=0.99))
    return model_config(base, overrides)


def build(config: ModelConfig, seed: int = 0) -> LanguageModel:
    torch.manual_seed(seed)
    return LanguageModel(config).eval()


def oracle_mixer(mixer, hidden, seq_idx=None, h0=None):
    """The LRU layer from the paper's equations, one position at a time, with dense complex matrices built from
    the mixer's own parameters (differentiable): lambda = exp(-exp(nu_log) + i exp(theta_log)),
    x_t = lambda x_{t-1} + exp(gamma_log) (B u_t) with x = 0 at each document start (h0 before position 0),
    y_t = Re(C x_t) + D u_t, out = GLU(W GELU(y) + bias). Returns out (batch, L, d_model), the final states."""
    lam = torch.exp(-torch.exp(mixer.nu_log) + 1j * torch.exp(mixer.theta_log))  # (N,)
    B = (mixer.B_re + 1j * mixer.B_im) * torch.exp(mixer.gamma_log)[:, None]  # (N, H)
    C = mixer.C_re + 1j * mixer.C_im  # (H, N)
    batch, L, _ = hidden.shape
    rows, finals = [], []
    for r in range(batch):
        x = torch.zeros(mixer.d_state, dtype=lam.dtype) if h0 is None else h0[r]
        ys = []
        for t in range(L):
            if seq_idx is not None and t > 0 and seq_idx[r, t] != seq_idx[r, t - 1]:
                x = torch.zeros_like(x)
            u = hidden[r, t]
            x = lam * x + B @ u.to(B.dtype)
            ys.append((C @ x).real + mixer.D * u)
        rows.append(torch.stack(ys))
        finals.append(x)
    y = torch.stack(rows)
    proj = mixer.out.proj
    out = F.glu(F.linear(F.gelu(y), proj.weight, proj.bias), dim=-1)
    return out, torch.stack(finals)


@pytest.mark.parametrize("case", ["plain", "documents", "continuing"])
def test_forward_and_every_gradient_equal_the_sequential_oracle_in_float64(case):
    model = build(lru_config(bias=True)).double()
    mixer = model.layers[0].mixer
    g = torch.Generator().manual_seed(1)
    batch, L, H, N = 2, 40, 16, 8
    hidden = torch.randn(batch, L, H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(batch, L, H, generator=g, dtype=torch.float64)
    with torch.no_grad():
        mixer.out.proj.bias.normal_(generator=g)
    seq_idx = h0 = state = None
    if case != "plain":  # documents of 1, 9, 13, 17 positions and 23, 17 positions
        seq_idx = torch.tensor([[0] * 1 + [1] * 9 + [2] * 13 + [3] * 17, [4] * 23 + [5] * 17])
    if case == "continuing":
        h0 = torch.randn(batch, N, generator=g, dtype=torch.complex128)
        state = mixer.allocate_state(batch, hidden.device, hidden.dtype)
        state.ssm, state.fresh = h0.clone(), False
    params = dict(mixer.named_parameters())
    out = mixer(hidden, state, seq_idx=seq_idx)
    want, finals = oracle_mixer(mixer, hidden, seq_idx, h0)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert (out - want).abs().max() < 1e-10  # float64: far below the tolerance asked for
    inputs = list(params.values()) + [hidden]
    got = torch.autograd.grad((out * weight).sum(), inputs)
    expected = torch.autograd.grad((want * weight).sum(), inputs)
    for name, a, b in zip(list(params) + ["hidden"], got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item(), msg=name)
        assert b.abs().max() > 0, name
    if state is not None:
        torch.testing.assert_close(state.ssm, finals.detach(), rtol=1e-9, atol=1e-9)


def test_the_state_is_not_a_transient():
    """The default ring reaches |lambda| = 0.99 here: a state built in 40 steps still shows after 40 more."""
    mixer = build(lru_config()).layers[0].mixer
    with torch.no_grad():
        hidden = torch.randn(1, 40, 16, generator=torch.Generator().manual_seed(0))
        state = mixer.allocate_state(1, hidden.device, hidden.dtype)
        mixer(hidden, state)
        continued = mixer(torch.zeros(1, 40, 16), state)
        fresh = mixer(torch.zeros(1, 40, 16))
    assert (continued[:, -1] - fresh[:, -1]).abs().max() > 1e-3


@pytest.mark.parametrize("prefill", [0, 7])
def test_step_decoding_equals_parallel_forward(prefill):
    ids = torch.randint(0, 101, (2, 30), generator=torch.Generator().manual_seed(3))
    assert_steps_match_forward(build(lru_config()), ids, prefill)


def test_chunks_through_a_state_equal_the_whole_sequence():
    model = build(lru_config())
    ids = torch.randint(1, 101, (2, 40), generator=torch.Generator().manual_seed(5))
    assert_chunks_then_steps_match_forward(model, ids, cuts=(0, 1, 3, 11, 29, 37), tol=1e-5)


def test_a_carried_state_reaches_only_the_first_document():
    model = build(lru_config())
    ids = torch.cat(documents([7, 9, 8], seed=8))[None]
    seq_idx = document_index(ids, EOS)
    with torch.no_grad():
        whole = model(ids, seq_idx=seq_idx)
        state = model.allocate_state(1)
        first = model(ids[:, :4], state=state, seq_idx=seq_idx[:, :4])
        rest = model(ids[:, 4:12], state=state, seq_idx=seq_idx[:, 4:12])  # the carried state ends at 7
        last = model(ids[:, 12:], state=state, seq_idx=seq_idx[:, 12:])  # carries document 2's state
    torch.testing.assert_close(torch.cat([first, rest, last], dim=1), whole, rtol=1e-5, atol=1e-5)


def test_causal():
    assert_causal(build(lru_config()), length=20, position=9)


def test_a_packed_row_equals_each_document_run_alone():
    model = build(lru_config())
    # length-1 documents, one on the scan's power-of-two span (16)
    assert_documents_run_alone(model, [[5, 1, 9, 17], [12, 2, 2, 1, 15]])
    with torch.no_grad():  # the negative: without seq_idx the second document sees the first
        docs = documents([6, 10], seed=3)
        flowing, alone = model(torch.cat(docs)[None]), model(docs[1][None])
    assert (flowing[0, 6:] - alone[0]).abs().max() > 1e-3


@pytest.mark.parametrize("bias", [False, True])
def test_parameter_count(bias):
    d, n_layer, N = 16, 3, 5
    config = lru_config(n_layer=n_layer, lru=dict(d_state=N), bias=bias)
    mixer_params = (3 * N  # nu_log, theta_log, gamma_log
                    + 2 * N * d + 2 * d * N + d  # B (re, im), C (re, im), D
                    + d * 2 * d + bias * 2 * d)  # the GLU output's linear map to 2d
    model = build(config)
    assert sum(p.numel() for p in model.layers[0].mixer.parameters()) == mixer_params
    want = 104 * d + n_layer * (mixer_params + d) + d  # padded embedding (tied head), layers and norms, final norm
    assert model.num_parameters() == want


def test_flops_count_the_matmuls_the_scan_levels_and_the_glu():
    mixer = build(lru_config(kernel_backend="ref")).layers[0].mixer
    d, N = 16, 8

    def want(levels):
        return 2 * (N * d * 2) + 2 * (2 * N * d) + 14 * N * levels + 2 * d + (2 * d * 2 * d + d)

    assert mixer.forward_flops_per_token(64) == want(6)  # Hillis-Steele spans 1, 2, .., 32
    assert mixer.forward_flops_per_token(65) == want(7)
    assert mixer.forward_flops_per_token(1) == want(0)
    assert mixer.external_parameters() == []
    # the fused Triton scan: one composition per position (14 N) and the carried state applied (8 N), any length
    fused = build(lru_config(kernel_backend="triton")).layers[0].mixer
    assert fused.forward_flops_per_token(64) == fused.forward_flops_per_token(4096) == want(1) + 8 * N
    # the C kernel, CPU's default: one complex multiply-add per state and position
    on_cpu = build(lru_config()).layers[0].mixer
    assert on_cpu.forward_flops_per_token(64) == on_cpu.forward_flops_per_token(4096) == want(0) + 8 * N


NAMES = ("nu_log", "theta_log", "gamma_log", "B_re", "B_im", "C_re", "C_im", "D")


@pytest.mark.parametrize("r_min,r_max,max_phase", [(0.0, 1.0, 6.283), (0.9, 0.999, math.pi / 10), (0.4, 0.9, 3.14)])
def test_ring_initialisation(r_min, r_max, max_phase):
    N, d = 4096, 16
    torch.manual_seed(0)
    config = lru_config(d_model=d, lru=dict(d_state=N, r_min=r_min, r_max=r_max, max_phase=max_phase))
    mixer = LanguageModel(config).layers[0].mixer
    with torch.no_grad():
        lam = torch.exp(-torch.exp(mixer.nu_log.double()) + 1j * torch.exp(mixer.theta_log.double()))
        radius, phase = lam.abs(), torch.exp(mixer.theta_log.double())  # the phase unwrapped (arg mod 2 pi)
        assert radius.min() >= r_min - 1e-6 and radius.max() <= r_max + 1e-6
        assert phase.min() >= 0 and phase.max() <= max_phase * (1 + 1e-6)
        torch.testing.assert_close(torch.angle(lam), torch.remainder(phase + math.pi, 2 * math.pi) - math.pi)
        torch.testing.assert_close(torch.exp(mixer.gamma_log.double()), torch.sqrt(1 - radius ** 2),
                                   rtol=1e-5, atol=1e-7)
        # uniform on the ring (in area): |lambda|^2 and the phase uniform, so their means sit mid-range
        mean_sq, spread = (r_min ** 2 + r_max ** 2) / 2, (r_max ** 2 - r_min ** 2) / math.sqrt(12 * N)
        assert abs((radius ** 2).mean() - mean_sq) < 5 * spread
        assert abs(phase.mean() - max_phase / 2) < 5 * max_phase / math.sqrt(12 * N)
        # B ~ N(0, 1/(2H)), C ~ N(0, 1/N), D ~ N(0, 1) (real and imaginary parts each)
        for name, std in [("B_re", 1 / math.sqrt(2 * d)), ("B_im", 1 / math.sqrt(2 * d)),
                          ("C_re", 1 / math.sqrt(N)), ("C_im", 1 / math.sqrt(N))]:
            assert abs(getattr(mixer, name).std() / std - 1) < 0.03, name
        assert 0.4 < mixer.D.std() < 1.6


def test_fp32_parameters_survive_a_bf16_cast():
    model = build(lru_config())
    mixer = model.layers[0].mixer
    for name in NAMES:
        param = getattr(mixer, name)
        assert param._ssmforge_fp32 and param._no_weight_decay, name
    model = cast_model(model, torch.bfloat16)
    for name in NAMES:
        assert getattr(mixer, name).dtype == torch.float32, name
    assert mixer.out.proj.weight.dtype == torch.bfloat16
    logits = model(torch.randint(0, 101, (1, 8)))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    state = model.allocate_state(1)
    model(torch.randint(0, 101, (1, 5)), state=state)
    assert state.layers[0].ssm.dtype == torch.complex64
    assert torch.isfinite(model.step(torch.tensor([3]), state)).all()


@pytest.mark.parametrize("setting,named", [("d_state=0", "d_state=0"), ("r_min=1.0", "r_min=1.0"),
                                           ("r_min=-0.1", "r_min=-0.1"), ("max_phase=0.0", "max_phase=0.0"),
                                           ("r_max=1.5", "r_max=1.5"), ("r_min=0.995", "r_min=0.995")])
def test_impossible_settings_name_the_key(setting, named):
    key, value = setting.split("=")
    with pytest.raises(ConfigError, match=rf"^model\.lru\.{named} is invalid"):
        lru_config(lru={key: float(value) if "." in value else int(value)}).validate()


def test_tiny_config_loads_and_builds():
    from ssmforge.pretrain.config import load_config

    config = load_config(ROOT / "configs" / "lru-tiny.yaml")
    assert config.model.family == "lru"
    model = LanguageModel(config.model)
    assert model.layers[0].mixer.d_state == config.model.lru.d_state
