"""The Mamba language model: shapes, the paper's initialisation, decoding, fp32 parameters, learning."""
import math

import pytest
import torch
import torch.nn.functional as F

from ssmforge.models import LanguageModel, MambaConfig, ModelConfig, generate
from ssmforge.models.hf import cast_model

from .contracts import assert_causal, assert_steps_match_forward


def build(config: ModelConfig, seed: int = 0) -> LanguageModel:
    torch.manual_seed(seed)
    return LanguageModel(config).eval()


def test_logits_shape_dtype_and_padded_vocab(tiny_config):
    model = build(tiny_config)
    assert tiny_config.padded_vocab_size == 104  # 101 padded to a multiple of 8
    logits = model(torch.randint(0, 101, (3, 11)))
    assert logits.shape == (3, 11, 104) and logits.dtype == torch.float32
    assert model.lm_head.weight.data_ptr() == model.embedding.weight.data_ptr()  # tied


def test_paper_initialisation(tiny_config):
    model = build(tiny_config)
    mixer = model.layers[0].mixer
    n, d_inner = tiny_config.mamba.d_state, tiny_config.mamba.d_inner(tiny_config.d_model)
    torch.testing.assert_close(-torch.exp(mixer.A_log), -torch.arange(1, n + 1.0).repeat(d_inner, 1))
    assert torch.equal(mixer.D, torch.ones(d_inner))
    dt = F.softplus(mixer.dt_proj.bias)
    assert dt.min() >= tiny_config.mamba.dt_min * 0.999 and dt.max() <= tiny_config.mamba.dt_max * 1.001
    # out_proj: kaiming-uniform bound 1/sqrt(fan_in), rescaled by 1/sqrt(n_layer)
    bound = 1 / math.sqrt(d_inner) / math.sqrt(tiny_config.n_layer)
    assert mixer.out_proj.weight.abs().max() <= bound
    assert mixer.out_proj.weight.abs().max() > 0.9 * bound
    assert mixer.A_log.dtype == mixer.D.dtype == mixer.dt_proj.bias.dtype == torch.float32


def test_causal(tiny_config):
    assert_causal(build(tiny_config), length=12, position=7)


@pytest.mark.parametrize("prefill", [0, 5])
def test_step_decoding_equals_parallel_forward(tiny_config, prefill):
    ids = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(3))
    assert_steps_match_forward(build(tiny_config), ids, prefill)


def test_generate_greedy_is_argmax_of_the_parallel_forward(tiny_config):
    model = build(tiny_config)
    prompt = torch.randint(0, 101, (2, 4), generator=torch.Generator().manual_seed(4))
    out = generate(model, prompt, max_new_tokens=6, temperature=0, vocab_size=101)
    assert out.shape == (2, 10) and torch.equal(out[:, :4], prompt)
    # each new token is the argmax (over real tokens) of a fresh full forward on the prefix
    for t in range(4, 10):
        want = model(out[:, :t])[:, -1, :101].argmax(-1)
        assert torch.equal(out[:, t], want)


def test_fp32_parameters_survive_a_bf16_cast(tiny_config):
    model = cast_model(build(tiny_config), torch.bfloat16)
    mixer = model.layers[0].mixer
    assert mixer.A_log.dtype == mixer.D.dtype == mixer.dt_proj.bias.dtype == torch.float32
    assert mixer.in_proj.weight.dtype == torch.bfloat16
    logits = model(torch.randint(0, 101, (1, 8)))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_untied_head_and_biases():
    config = ModelConfig(d_model=16, n_layer=1, vocab_size=64, mamba=MambaConfig(d_state=4), tie_embeddings=False,
                         bias=True)
    model = build(config)
    assert model.lm_head.weight.data_ptr() != model.embedding.weight.data_ptr()
    assert model(torch.randint(0, 64, (1, 5))).shape == (1, 5, 64)


def test_training_reduces_loss_on_a_repeating_pattern(tiny_config):
    model = build(tiny_config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.tensor([[1, 5, 9, 13, 2, 7] * 6])
    losses = []
    for _ in range(40):
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]
