"""The attention and SwiGLU mixers against independent hand-written computations: explicit softmax with a
mask, rotary via complex rotations, kv heads repeated; the KV cache, validation, parameters and FLOPs."""
import math

import pytest
import torch

from ssmforge.errors import ConfigError

from ssmforge.models import MLPConfig, ModelConfig
from ssmforge.models.attention import CausalSelfAttention
from ssmforge.models.mlp import SwiGLU

from .contracts import model_config


def config(**kw) -> ModelConfig:
    base = dict(family="transformer", d_model=32, n_layer=1, vocab_size=64, attention=dict(heads=4))
    return model_config(base, kw).validate()


def mlp_hidden_size(cfg: ModelConfig) -> int:
    return cfg.mlp.resolved_hidden(cfg.d_model)


def mixer(seed=0, **kw) -> CausalSelfAttention:
    torch.manual_seed(seed)
    return CausalSelfAttention(config(**kw), 0).eval()


def rotate(x: torch.Tensor, theta: float) -> torch.Tensor:
    """x (batch, heads, L, hd): pair (i, i + hd/2) as one complex number, turned by pos * theta^(-2i/hd)."""
    L, hd = x.shape[-2], x.shape[-1]
    half = hd // 2
    freq = 1.0 / theta ** (2 * torch.arange(half, dtype=torch.float64) / hd)
    turn = torch.polar(torch.ones(L, half, dtype=torch.float64), torch.arange(L, dtype=torch.float64)[:, None] * freq)
    z = torch.complex(x[..., :half].double(), x[..., half:].double()) * turn
    return torch.cat([z.real, z.imag], dim=-1)


def naive_attention(m: CausalSelfAttention, x: torch.Tensor, window: int | None) -> torch.Tensor:
    """The mixer's output computed from its weights in float64 by explicit loops over heads."""
    b, L, d = x.shape
    H, Hkv, hd = m.n_heads, m.n_kv_heads, d // m.n_heads
    x = x.double()

    def heads(w, n):
        return (x @ w.weight.double().T).view(b, L, n, hd).transpose(1, 2)

    q, k, v = rotate(heads(m.q_proj, H), m.rope_theta), rotate(heads(m.k_proj, Hkv), m.rope_theta), heads(m.v_proj, Hkv)
    out = torch.zeros(b, H, L, hd, dtype=torch.float64)
    for h in range(H):
        g = h // (H // Hkv)  # the kv head serving query head h
        for i in range(L):
            lo = 0 if window is None else max(0, i - window + 1)
            scores = torch.einsum("bd,bnd->bn", q[:, h, i], k[:, g, lo:i + 1]) / math.sqrt(hd)
            p = torch.exp(scores - scores.max(-1, keepdim=True).values)
            out[:, h, i] = torch.einsum("bn,bnd->bd", p / p.sum(-1, keepdim=True), v[:, g, lo:i + 1])
    return out.transpose(1, 2).reshape(b, L, H * hd) @ m.o_proj.weight.double().T


@pytest.mark.parametrize("kv_heads, window", [(None, None), (2, None), (1, None), (2, 3), (4, 1), (2, 12)])
def test_forward_equals_naive_attention(kv_heads, window):
    m = mixer(attention=dict(kv_heads=kv_heads, window=window))
    x = torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(m(x).double(), naive_attention(m, x, window), rtol=1e-5, atol=1e-5)


def test_rotary_scores_depend_only_on_relative_position():
    m = mixer()
    x = torch.randn(1, 1, 32).expand(1, 12, 32)  # the same token everywhere
    q, k, _ = m._heads(x, torch.arange(12))
    scores = q @ k.transpose(-1, -2)
    # every diagonal (fixed distance i - j) is constant, and the diagonals differ from one another
    for offset in range(-11, 12):
        diag = scores[0, 0].diagonal(offset)
        torch.testing.assert_close(diag, diag[:1].expand_as(diag), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(scores[0, 0].diagonal(0)[0], scores[0, 0].diagonal(-3)[0])


@pytest.mark.parametrize("kv_heads, window, prefill", [(2, None, 0), (2, None, 6), (1, 4, 0), (2, 4, 7), (4, 4, 2)])
def test_kv_cache_steps_equal_the_parallel_forward(kv_heads, window, prefill):
    m = mixer(attention=dict(kv_heads=kv_heads, window=window))
    x = torch.randn(2, 15, 32, generator=torch.Generator().manual_seed(2))
    full = m(x)
    state = m.allocate_state(2, x.device, x.dtype)
    outs = [m(x[:, :prefill], state)] if prefill else []
    outs += [m.step(x[:, t], state)[:, None] for t in range(prefill, 15)]
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-5)
    assert state.length == 15
    # a sliding window keeps O(window) memory: the ring buffer never outgrows it
    assert state.k.shape == (2, kv_heads, window or state.k.shape[2], 8) and state.k.shape[2] >= (window or 15)


@pytest.mark.parametrize("kw, message", [
    (dict(attention=dict(heads=5)),
     r"model\.attention\.heads=5 is invalid: must be a positive divisor of d_model \(32\)"),
    (dict(attention=dict(kv_heads=3)),
     r"model\.attention\.kv_heads=3 is invalid: must be a positive divisor of heads \(4\)"),
    (dict(attention=dict(heads=32)),
     r"model\.attention\.heads=32 is invalid: the head dimension .* \(1\) must be even"),
    (dict(attention=dict(window=0)), r"model\.attention\.window=0 is invalid: must be >= 1 or null"),
    (dict(mlp=dict(hidden=0)), r"model\.mlp\.hidden=0 is invalid: must be a positive integer"),
])
def test_impossible_shapes_are_one_line_config_errors(kw, message):
    with pytest.raises(ConfigError, match=message):
        config(**kw)


def test_parameter_count_and_flops_match_the_formulas():
    d, H, Hkv, hd, W, L = 32, 4, 2, 8, 5, 16
    m = mixer(attention=dict(kv_heads=Hkv, window=W))
    assert sum(p.numel() for p in m.parameters()) == 2 * d * H * hd + 2 * d * Hkv * hd
    with_bias = CausalSelfAttention(config(attention=dict(kv_heads=Hkv), bias=True), 0)
    assert sum(p.numel() for p in with_bias.parameters()) == 2 * d * H * hd + 2 * d * Hkv * hd + H * hd + 2 * Hkv * hd + d
    # keys attended, counted on the mask: query i sees min(i + 1, W) keys
    i = torch.arange(L)
    visible = ((i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < W)).sum().item()
    matmul_weights = sum(p.numel() for p in m.parameters())
    assert m.forward_flops_per_token(L) == int(2 * matmul_weights + 4 * H * hd * visible / L)
    # without a window, (L + 1) / 2 keys on average
    assert mixer().forward_flops_per_token(L) == int(2 * 4 * d * d + 4 * d * (L + 1) / 2)


def test_out_projections_are_scaled_by_the_number_of_residual_blocks():
    cfg = config(n_layer=3, rescale_out_proj=True)  # transformer: 3 x "*-" = 6 residual blocks
    torch.manual_seed(0)
    attn, mlp = CausalSelfAttention(cfg, 0), SwiGLU(cfg, 1)
    for weight, fan_in in ((attn.o_proj.weight, 32), (mlp.down_proj.weight, mlp_hidden_size(cfg))):
        bound = 1 / math.sqrt(fan_in) / math.sqrt(6)  # kaiming-uniform bound, rescaled
        assert 0.9 * bound < weight.abs().max() <= bound


def test_swiglu_equals_the_hand_computation():
    cfg = config(mlp=dict(hidden=24))
    torch.manual_seed(0)
    m = SwiGLU(cfg, 0)
    x = torch.randn(3, 5, 32, dtype=torch.float64)
    gate, up, down = (w.weight.double() for w in (m.gate_proj, m.up_proj, m.down_proj))
    a = x @ gate.T
    want = (a / (1 + torch.exp(-a)) * (x @ up.T)) @ down.T
    torch.testing.assert_close(m.double()(x), want)
    torch.testing.assert_close(m.step(x[:, 0], m.allocate_state(3, x.device, x.dtype)), want[:, 0])
    assert m.allocate_state(3, x.device, x.dtype) is None
    assert sum(p.numel() for p in m.parameters()) == 3 * 32 * 24
    assert m.forward_flops_per_token(100) == 2 * 3 * 32 * 24


@pytest.mark.parametrize("d_model, hidden", [(32, 128), (48, 128), (96, 256), (768, 2048), (2048, 5504)])
def test_swiglu_default_width_is_8_thirds_rounded_up_to_64(d_model, hidden):
    assert mlp_hidden_size(ModelConfig(d_model=d_model)) == hidden
    assert mlp_hidden_size(ModelConfig(d_model=d_model, mlp=MLPConfig(hidden=100))) == 100


def test_bf16_autocast_keeps_attention_finite_and_close():
    m = mixer(attention=dict(kv_heads=2, window=4))
    x = torch.randn(2, 12, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), m(x), rtol=0.05, atol=0.05)
