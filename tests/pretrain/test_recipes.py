"""The shipped configs: every one loads and has the size its name says (counted on the meta device, no
weights allocated); the real-scale recipes keep the Mamba paper's batch, token budgets and learning rates and
split their global batch on 8, 16 and 64 GPUs."""
from pathlib import Path

import pytest
import torch

from ssmforge.models import LanguageModel
from ssmforge.pretrain.config import load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
HALF_MILLION = 524_288  # the paper's 0.5M tokens per step: 256 x 2048 (or 128 x 4096)

# config -> (parameters its name says, token budget)
RECIPES = {
    "mamba-130m-pile.yaml": (130e6, 2.5e9),
    "mamba-370m-pile.yaml": (370e6, 7e9),
    "mamba-790m-pile.yaml": (790e6, 15e9),
    "mamba-1.4b-pile.yaml": (1.4e9, 26e9),
    "jamba-1b.yaml": (1.0e9, 20e9),
    "megatron-hybrid-1b.yaml": (1.0e9, 20e9),
}
# the Mamba paper's Table 12 (GPT-3 shapes, two Mamba blocks per Transformer layer): d_model, blocks, GPT-3 lr
MAMBA_PAPER = {
    "mamba-130m-pile.yaml": (768, 24, 6e-4),
    "mamba-370m-pile.yaml": (1024, 48, 3e-4),
    "mamba-790m-pile.yaml": (1536, 48, 2.5e-4),
    "mamba-1.4b-pile.yaml": (2048, 48, 2e-4),
}
SMALL = {"quickstart.yaml", "tiny.yaml", "mamba2-tiny.yaml", "gss-tiny.yaml", "hybrid-tiny.yaml",
         "transformer-tiny.yaml", "s4-tiny.yaml", "liquid-s4-tiny.yaml", "s4d-tiny.yaml", "dss-tiny.yaml",
         "h3-tiny.yaml", "hyena-tiny.yaml", "lru-tiny.yaml"}


def parameters(config) -> int:
    with torch.device("meta"):  # shapes only: a 1.4B model costs nothing
        return LanguageModel(config.model).num_parameters()


def test_every_config_is_either_a_recipe_or_small():
    assert {p.name for p in CONFIGS.glob("*.yaml")} == set(RECIPES) | SMALL


@pytest.mark.parametrize("name", sorted(SMALL))
def test_small_configs_are_small(name):
    config = load_config(CONFIGS / name)
    assert parameters(config) < 1e6
    assert config.train.global_batch_size is None  # grad_accum_steps semantics: a CPU run's batch per rank


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_size_batch_and_budget(name):
    config = load_config(CONFIGS / name)
    size, budget = RECIPES[name]
    train = config.train
    count = parameters(config)
    assert abs(count / size - 1) < 0.10, f"{name}: {count / 1e6:.1f}M parameters"
    assert train.grad_accum_steps is None and train.global_batch_size is not None  # the global batch rules
    tokens_per_step = train.global_batch_size * config.data.seq_len
    assert tokens_per_step == HALF_MILLION
    assert abs(train.max_steps * tokens_per_step / budget - 1) < 0.01, f"{name}: {train.max_steps} steps"
    for gpus in (8, 16, 64):
        accumulation = train.accumulation_steps(gpus)  # raises if the micro-batch does not divide
        assert accumulation >= 1 and train.micro_batch_size * accumulation * gpus == train.global_batch_size
    assert train.precision == "bf16" and config.data.sources[0].name == "monology/pile-uncopyrighted"
    # a hub source carries a token budget, so prepare stops instead of reading the whole corpus; its training
    # share covers the run, and the margin stays small
    hub = [s for s in config.data.sources if s.kind == "hub"]
    assert all(s.max_tokens is not None for s in hub), name
    prepared = sum(s.max_tokens for s in hub) * (1 - config.data.val_fraction)
    assert 1 <= prepared / (train.max_steps * tokens_per_step) < 1.1, f"{name}: prepares {prepared:.3g} tokens"


@pytest.mark.parametrize("name", sorted(MAMBA_PAPER))
def test_mamba_recipes_follow_the_paper(name):
    config = load_config(CONFIGS / name)
    d_model, blocks, gpt3_lr = MAMBA_PAPER[name]
    model, train = config.model, config.train
    assert (model.family, model.d_model, model.n_layer, model.padded_vocab_size) == ("mamba", d_model, blocks, 50280)
    assert (model.mamba.d_state, model.mamba.d_conv, model.mamba.expand) == (16, 4, 2)
    assert config.data.seq_len == 2048 and train.global_batch_size == 256
    assert config.tokenizer.kind == "hf" and config.tokenizer.path.endswith("tokenizer.json")  # GPT-NeoX-20B's
    assert train.lr == pytest.approx(5 * gpt3_lr)  # the paper's improved recipe: 5x the GPT-3 value
    assert train.lr * train.min_lr_ratio == pytest.approx(1e-5, rel=1e-3)  # cosine decay to 1e-5
    assert (train.betas, train.weight_decay, train.grad_clip) == ([0.9, 0.95], 0.1, 1.0)
    assert train.warmup_steps < train.max_steps // 10
    assert "Deviations from the paper" in (CONFIGS / name).read_text()
