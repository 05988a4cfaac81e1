"""The Liquid-S4 mixer: the forward and every gradient against a sequential oracle (S4's dense recurrence fed with
the liquid terms written from their definitions), polyb and kb at degrees 2 and 3; chunks through a state, step
decoding, document resets, context parallelism (ranks simulated by threads), causality, counts, fp32
parameters, config errors and the tiny config."""
import math
from pathlib import Path

import pytest
import torch

from ssmforge.errors import ConfigError
from ssmforge.models import LanguageModel, ModelConfig
from ssmforge.models.hf import cast_model

from .contracts import assert_causal, assert_chunks_then_steps_match_forward, assert_steps_match_forward, model_config
from .test_document_resets import assert_documents_run_alone
from .test_s4 import (SSM_PARAMETERS, VOCAB, assert_grads_match,
                      dense_system, oracle_ssm, packed_seq_idx, run_system)


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def liquid_config(**overrides) -> ModelConfig:
    base = dict(family="liquid_s4", d_model=8, n_layer=2, vocab_size=VOCAB,
                liquid_s4=dict(d_state=8, dt_min=0.05, dt_max=0.5))
    return model_config(base, overrides)


def build(config: ModelConfig, seed: int = 0) -> LanguageModel:
    torch.manual_seed(seed)
    return LanguageModel(config).eval()


def mixer_of(kernel: str, degree: int, discretization: str = "bilinear", double: bool = True, **overrides):
    config = liquid_config(liquid_s4=dict(liquid_kernel=kernel, liquid_degree=degree, discretization=discretization),
                           **overrides)
    mixer = build(config).layers[0].mixer
    return mixer.double() if double else mixer


def oracle_liquid(mixer, u, seq_idx=None, h0=None, before=None):
    """Liquid-S4's SSM output before the GELU, position by position from the definitions: c^(p)_t the product of
    u_t .. u_{t-p+1} when that whole window lies in t's document (`before` (batch, H, W): inputs preceding u, of
    u's first document), sigma = sum over the N states of Bbar, v_t = sum_p sigma^(p-1) c^(p)_t; kb feeds u + v to
    the state, polyb adds Re(C Bbar) v_t. Returns the outputs and the final state."""
    system = dense_system(mixer)
    _, Bbar, c = system
    sigma = Bbar.sum(-1).real
    batch, H, L = u.shape
    W = mixer.liquid_degree - 1
    before = torch.zeros(batch, H, W, dtype=u.dtype) if before is None else before
    series = torch.cat([before, u], -1)  # series[..., W + t] = u_t
    docs = None if seq_idx is None else torch.cat([seq_idx[:, :1].expand(-1, W), seq_idx], 1)
    v = torch.zeros_like(u)
    columns = []
    for t in range(L):
        v_t = torch.zeros(batch, H, dtype=u.dtype)
        for p in range(2, mixer.liquid_degree + 1):
            window = series[..., W + t - p + 1:W + t + 1]  # u_{t-p+1} .. u_t
            inside = torch.ones(batch, dtype=u.dtype) if docs is None else (
                docs[:, W + t - p + 1] == docs[:, W + t]).to(u.dtype)
            v_t = v_t + sigma ** (p - 1) * window.prod(-1) * inside[:, None]
        columns.append(v_t)
    v = torch.stack(columns, -1)
    if mixer.liquid_kernel == "kb":
        y, final = run_system(system, u + v, seq_idx, h0)
    else:
        y, final = run_system(system, u, seq_idx, h0)
        y = y + (c * Bbar).sum(-1).real[:, None] * v
    return y + mixer.D[:, None] * u, final


CASES = [("polyb", 2, "bilinear", True), ("kb", 3, "bilinear", True), ("kb", 2, "bilinear", False),
         ("polyb", 3, "bilinear", False), ("kb", 2, "zoh", True)]


@pytest.mark.parametrize("kernel,degree,discretization,resets", CASES)
def test_ssm_and_gradients_equal_the_sequential_oracle(kernel, degree, discretization, resets):
    mixer = mixer_of(kernel, degree, discretization)
    u = torch.randn(2, 8, 40, generator=torch.Generator().manual_seed(1), dtype=torch.float64, requires_grad=True)
    seq_idx = packed_seq_idx(40, [1, 9, 10, 31]) if resets else None
    fast, (slow, _) = mixer.ssm(u, seq_idx), oracle_liquid(mixer, u, seq_idx)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-10)
    assert assert_grads_match(mixer, fast, slow, u, 1e-9) < 1e-9
    # the liquid terms weigh: plain S4 on the same parameters is far from it
    assert (slow - oracle_ssm(mixer, u, seq_idx)).abs().max() > 1e-2
    hidden = u.detach().transpose(1, 2).requires_grad_()
    fast = mixer(hidden, seq_idx=seq_idx)
    slow = mixer.output(oracle_liquid(mixer, hidden.transpose(1, 2), seq_idx)[0].transpose(1, 2))
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-10)
    assert_grads_match(mixer, fast, slow, hidden, 1e-9)


@pytest.mark.parametrize("kernel,degree", [("polyb", 3), ("kb", 3), ("kb", 2)])
def test_chunks_through_a_state_and_steps_equal_the_oracle(kernel, degree):
    """Chunks of uneven sizes (one shorter than the liquid inputs' reach), boundaries inside chunks, then steps
    (within the last document): the whole row's outputs; the state left holds the oracle's x_L and the last
    inputs."""
    mixer = mixer_of(kernel, degree)
    u = torch.randn(2, 8, 37, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    seq_idx = packed_seq_idx(37, [2, 5, 12, 13, 30])
    state = mixer.allocate_state(2, u.device, u.dtype)
    cuts = [0, 1, 3, 11, 20, 33]
    with torch.no_grad():
        outs = [mixer.ssm(u[..., a:b], seq_idx[:, a:b], state) for a, b in zip(cuts, cuts[1:])]
        outs += [mixer.step_ssm(u[..., t], state)[..., None] for t in range(33, 37)]
        want, final = oracle_liquid(mixer, u, seq_idx)
    torch.testing.assert_close(torch.cat(outs, -1), want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state.ssm, final, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state.inputs, u[..., -(degree - 1):])
    # a chunk that continues the state: the previous inputs enter its first correlations
    more = torch.randn(2, 8, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with torch.no_grad():
        got = mixer.ssm(more, None, state)
        want, _ = oracle_liquid(mixer, more, h0=final, before=u[..., -(degree - 1):])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kernel,degree,prefill", [("polyb", 2, 0), ("polyb", 2, 7), ("kb", 3, 7)])
def test_step_decoding_equals_parallel_forward(kernel, degree, prefill):
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
    model = build(liquid_config(liquid_s4=dict(liquid_kernel=kernel, liquid_degree=degree)))
    assert_steps_match_forward(model, ids, prefill)


@pytest.mark.parametrize("kernel", ["polyb", "kb"])
def test_chunked_feeding_through_the_model_state_equals_the_whole_forward(kernel):
    model = build(liquid_config(liquid_s4=dict(liquid_kernel=kernel, liquid_degree=3)))
    ids = torch.randint(1, VOCAB, (2, 40), generator=torch.Generator().manual_seed(5))
    assert_chunks_then_steps_match_forward(model, ids, cuts=(0, 1, 3, 11, 29, 37))


@pytest.mark.parametrize("kernel,degree", [("polyb", 2), ("kb", 3)])
def test_a_packed_row_equals_each_document_run_alone(kernel, degree):
    model = build(liquid_config(liquid_s4=dict(liquid_kernel=kernel, liquid_degree=degree)))
    assert_documents_run_alone(model, [[5, 1, 2, 9, 15]])


def test_causal():
    for kernel in ("polyb", "kb"):
        model = build(liquid_config(liquid_s4=dict(liquid_kernel=kernel, liquid_degree=3)))
        assert_causal(model, length=20, position=9, vocab=VOCAB)


def test_liquid_scale_and_first_tap_from_the_discretised_system():
    mixer = mixer_of("polyb", 2)
    Abar, Bbar, c = dense_system(mixer)
    _, fast_Bbar = mixer.discrete()
    torch.testing.assert_close(mixer.sigma(fast_Bbar), Bbar.sum(-1).real)
    assert Bbar.sum(-1).imag.abs().max() < 1e-12  # conjugate pairs: the sum over the N states is real
    torch.testing.assert_close(mixer.first_tap(fast_Bbar), mixer.kernel(4, *mixer.discrete())[:, 0])


def test_parameter_count_and_flops():
    d, N, n_layer = 8, 6, 3
    model = build(liquid_config(n_layer=n_layer, liquid_s4=dict(d_state=N)))
    per_mixer = d * (4 * N + 2) + d * 2 * d  # S4's: Lambda, P, B, C (N reals each), log_dt, D; the GLU output
    assert model.num_parameters() == 64 * d + n_layer * (per_mixer + d) + d
    glu = 2 * d * 2 * d + d
    for kernel, degree, entry in (("polyb", 2, 2), ("kb", 4, 1)):
        mixer = build(liquid_config(liquid_s4=dict(liquid_kernel=kernel, liquid_degree=degree))).layers[0].mixer
        fft = 10 * 7 + 6 + 2  # log2(2 * 64) = 7; the D skip
        assert mixer.forward_flops_per_token(64) == glu + d * fft + d * (3 * (degree - 1) + entry)


def test_ssm_parameters_are_kept_fp32_through_a_bf16_cast():
    model = build(liquid_config(liquid_s4=dict(liquid_kernel="kb", liquid_degree=3)))
    mixer = model.layers[0].mixer
    model = cast_model(model, torch.bfloat16)
    for name in SSM_PARAMETERS:
        param = getattr(mixer, name)
        assert param._ssmforge_fp32 and param.dtype == torch.float32, name
    logits = model(torch.randint(0, VOCAB, (1, 8)))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    dt = mixer.log_dt.exp()
    assert dt.min() >= 0.05 * 0.999 and dt.max() <= 0.5 * 1.001
    defaults = ModelConfig().liquid_s4
    assert (defaults.d_state, defaults.liquid_kernel, defaults.liquid_degree) == (64, "polyb", 2)
    assert (defaults.dt_min, defaults.dt_max, defaults.discretization) == (0.001, 0.1, "bilinear")
    assert math.isclose(mixer.Lambda_re_log.exp().mean().item(), 0.5)  # HiPPO-LegS: Re Lambda = -1/2


@pytest.mark.parametrize("key,value", [("liquid_kernel", "poly"), ("liquid_degree", 1), ("liquid_degree", 9),
                                       ("d_state", 5)])
def test_impossible_values_name_the_key(key, value):
    with pytest.raises(ConfigError, match=rf"^model\.liquid_s4\.{key}="):
        liquid_config(liquid_s4={key: value}).validate()


def test_tiny_config_loads():
    from ssmforge.pretrain.config import load_config

    config = load_config(Path(__file__).resolve().parents[2] / "configs" / "liquid-s4-tiny.yaml")
    assert config.model.family == "liquid_s4" and config.model.layer_kinds == ["liquid_s4"] * config.model.n_layer
