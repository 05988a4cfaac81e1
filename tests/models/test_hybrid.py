"""Hybrid stacks (Mamba, attention, MLP in one pattern) and the Transformer baseline: decoding with mixed
states equals the parallel forward, greedy generation, parameter counts and FLOPs against formulas, the
shipped configs, and a few training steps through `ssmforge pretrain`."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ssmforge.models import LanguageModel, ModelConfig, generate
from ssmforge.models.attention import KVCache
from ssmforge.models.mamba import MambaState
from ssmforge.pretrain.config import load_config

from ..conftest import seed_kernel_cache
from .contracts import assert_causal, assert_steps_match_forward, model_config

ROOT = Path(__file__).resolve().parents[2]


def hybrid_config(**kw) -> ModelConfig:
    base = dict(family="hybrid", layer_pattern="M*-M", n_layer=4, d_model=32, vocab_size=101, mamba=dict(d_state=8),
                attention=dict(heads=4, kv_heads=2))
    return model_config(base, kw)


def transformer_config(**kw) -> ModelConfig:
    return model_config(dict(family="transformer", n_layer=2, d_model=32, vocab_size=101, attention=dict(heads=4)), kw)


def build(config: ModelConfig, seed: int = 0) -> LanguageModel:
    torch.manual_seed(seed)
    return LanguageModel(config).eval()


def test_layer_kinds_and_mixed_states():
    assert transformer_config().layer_kinds == ["attention", "mlp", "attention", "mlp"]
    model = build(hybrid_config())
    state = model.allocate_state(2)
    assert [type(s) for s in state.layers] == [MambaState, KVCache, type(None), MambaState]


@pytest.mark.parametrize("make, prefill", [
    (lambda: hybrid_config(), 0),
    (lambda: hybrid_config(), 5),
    (lambda: hybrid_config(layer_pattern="*M-*", attention=dict(window=4)), 7),  # window shorter than the sequence
    (lambda: transformer_config(), 0),
    (lambda: transformer_config(attention=dict(window=3, kv_heads=1)), 5),
])
def test_step_decoding_equals_parallel_forward(make, prefill):
    ids = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(3))
    assert_steps_match_forward(build(make()), ids, prefill)


def test_generate_greedy_is_argmax_of_the_parallel_forward_on_a_hybrid():
    model = build(hybrid_config(layer_pattern="M*-*", attention=dict(window=5)))
    prompt = torch.randint(0, 101, (2, 4), generator=torch.Generator().manual_seed(4))
    out = generate(model, prompt, max_new_tokens=8, temperature=0, vocab_size=101)
    assert out.shape == (2, 12) and torch.equal(out[:, :4], prompt)
    for t in range(4, 12):
        assert torch.equal(out[:, t], model(out[:, :t])[:, -1, :101].argmax(-1))


def mamba_params(c: ModelConfig) -> int:
    m = c.mamba
    di, n, r = m.d_inner(c.d_model), m.d_state, m.resolved_dt_rank(c.d_model)
    return c.d_model * 2 * di + di * (m.d_conv + 1) + di * (r + 2 * n) + (r + 1) * di + di * c.d_model + di * n + di


def test_parameter_count_and_flops_of_a_hybrid_match_the_formulas():
    c = hybrid_config(layer_pattern="M*-M-", n_layer=5, mlp=dict(hidden=48))
    d, V, hd = c.d_model, c.padded_vocab_size, c.d_model // c.attention.heads
    attention = 2 * d * d + 2 * d * c.attention.kv_heads * hd
    mlp = 3 * d * 48
    expected = V * d + 5 * d + d + 2 * mamba_params(c) + attention + 2 * mlp  # embedding (tied), norms, mixers
    model = build(c)
    assert model.num_parameters() == expected
    L = 64
    attention_flops = 2 * attention + 4 * d * (L + 1) / 2
    mamba_flops = model.layers[0].mixer.forward_flops_per_token(L)
    assert model.forward_flops_per_token(L) == 2 * d * V + 2 * mamba_flops + int(attention_flops) + 2 * 2 * mlp


def test_hybrid_is_causal():
    assert_causal(build(hybrid_config(attention=dict(window=6))), length=12, position=7)


@pytest.mark.parametrize("name, pattern_unit, low, high", [
    ("jamba-1b.yaml", "M-M-M-M-*-M-M-M-", 0.9e9, 1.2e9),
    ("megatron-hybrid-1b.yaml", None, 0.9e9, 1.2e9),
])
def test_real_scale_hybrid_configs_have_about_1b_parameters(name, pattern_unit, low, high):
    c = load_config(ROOT / "configs" / name).model
    if pattern_unit:
        assert c.layer_pattern == pattern_unit * (c.n_layer // len(pattern_unit))
    kinds = c.layer_kinds
    assert {"mamba", "attention", "mlp"} <= set(kinds)
    with torch.device("meta"):
        n = LanguageModel(c).num_parameters()
    assert low < n < high, n


def pretrain(config_name: str, run_dir: Path, shard_dir: Path, cache_dir: Path) -> dict[int, float]:
    """12 steps of `ssmforge pretrain` on a shipped config (synthetic data, one process) -> train losses."""
    command = [sys.executable, "-m", "ssmforge", "pretrain", str(ROOT / "configs" / config_name),
               f"run_dir={run_dir}", f"data.shard_dir={shard_dir}", "data.sources=[{kind: synthetic, max_documents: 60}]",
               "data.num_workers=0", "data.tokenize_workers=1", "train.max_steps=12", "train.log_every=3",
               "train.eval_every=100", "train.save_every=100"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "LOCAL_", "WORLD_", "MASTER_"))}
    env["SSMFORGE_CACHE_DIR"] = str(seed_kernel_cache(cache_dir))  # measured CPU peaks stay private
    env["OMP_NUM_THREADS"] = "1"  # a model this small gains nothing from threads, and loses much on a busy machine
    run_dir.mkdir()  # the shards live outside it, so prepare does not create it
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"training {load_config(ROOT / 'configs' / config_name).model.family}:" in proc.stderr
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"}


@pytest.mark.slow
def test_tiny_hybrid_and_transformer_configs_learn(tmp_path):
    for name in ("hybrid-tiny.yaml", "transformer-tiny.yaml"):
        # one after the other (concurrent StreamingDatasets race for shared memory), on the same shards
        losses = pretrain(name, tmp_path / name, tmp_path / "shards", tmp_path / "cache")
        assert sorted(losses) == [3, 6, 9, 12]
        assert losses[12] < losses[3] - 0.3 and losses[12] < math.log(260), (name, losses)
