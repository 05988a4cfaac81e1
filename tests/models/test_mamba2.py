"""The Mamba-2 language model: decoding, initialisation, shapes checked by config validation, parameter and
FLOP counts, what ZeRO-3 must gather, and learning through the pretrain command."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from ssmforge.errors import ConfigError

from ssmforge.models import LanguageModel, ModelConfig
from ssmforge.models.hf import cast_model
from ssmforge.models.mamba2 import Mamba2Mixer

from ..conftest import seed_kernel_cache
from .contracts import assert_causal, assert_steps_match_forward, model_config

ROOT = Path(__file__).resolve().parents[2]


def config(**overrides) -> ModelConfig:
    kwargs = dict(family="mamba2", d_model=32, n_layer=2, vocab_size=101,
                  mamba2=dict(d_state=8, headdim=16, ngroups=2, chunk_size=16))
    return model_config(kwargs, overrides)


def build(cfg: ModelConfig, seed: int = 0) -> LanguageModel:
    torch.manual_seed(seed)
    return LanguageModel(cfg).eval()


@pytest.mark.parametrize("prefill", [0, 13])
def test_step_decoding_equals_parallel_forward(prefill):
    ids = torch.randint(0, 101, (2, 24), generator=torch.Generator().manual_seed(3))  # crosses a chunk boundary
    assert_steps_match_forward(build(config()), ids, prefill)


def test_causal():
    assert_causal(build(config()), length=40, position=20)  # the change and its effects cross chunks


def test_initialisation_and_fp32_parameters():
    cfg = config(n_layer=4)
    model = cast_model(build(cfg), torch.bfloat16)
    mixer = model.layers[0].mixer
    assert mixer.nheads == 4 and mixer.A_log.shape == mixer.D.shape == mixer.dt_bias.shape == (4,)
    A = torch.exp(mixer.A_log)
    assert A.min() >= 1 and A.max() <= 16  # -A uniform in [1, 16]
    dt = F.softplus(mixer.dt_bias)
    assert dt.min() >= cfg.mamba2.dt_min * 0.999 and dt.max() <= cfg.mamba2.dt_max * 1.001
    assert torch.equal(mixer.D, torch.ones(4))
    assert mixer.A_log.dtype == mixer.D.dtype == mixer.dt_bias.dtype == torch.float32
    assert mixer.in_proj.weight.dtype == torch.bfloat16
    # kaiming-uniform, rescaled by 1/sqrt(n_layer)
    bound = 1 / math.sqrt(cfg.mamba2.d_inner(cfg.d_model)) / math.sqrt(cfg.n_layer)
    assert 0.9 * bound < mixer.out_proj.weight.float().abs().max() <= bound
    logits = model(torch.randint(0, 101, (1, 8)))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


@pytest.mark.parametrize("overrides, message", [
    (dict(mamba2=dict(headdim=24)), r"model.mamba2.headdim=24 is invalid: must divide expand \* d_model \(64\)"),
    (dict(mamba2=dict(ngroups=3)), r"model.mamba2.ngroups=3 is invalid: must divide the number of heads"),
    (dict(mamba2=dict(chunk_size=48)), r"model.mamba2.chunk_size=48 is invalid: must be a power of two >= 16"),
    (dict(mamba2=dict(d_state=0)), r"model.mamba2.d_state=0 is invalid: must be a positive integer"),
])
def test_impossible_shapes_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config(**overrides).validate()


@pytest.mark.parametrize("bias, conv_bias, tie", [(False, True, True), (True, False, False)])
def test_parameter_count(bias, conv_bias, tie):
    cfg = config(bias=bias, mamba2=dict(conv_bias=conv_bias), tie_embeddings=tie, vocab_size=100)
    d, di, n, g, w = cfg.d_model, 2 * cfg.d_model, cfg.mamba2.d_state, cfg.mamba2.ngroups, cfg.mamba2.d_conv
    heads = di // cfg.mamba2.headdim
    conv_channels = di + 2 * g * n
    per_layer = (
        d * (2 * di + 2 * g * n + heads) + bias * (2 * di + 2 * g * n + heads)  # in_proj -> z, x, B, C, dt
        + conv_channels * w + conv_channels * conv_bias  # depthwise conv over x, B, C
        + 3 * heads  # dt_bias, A_log, D
        + di  # gated norm
        + di * d + bias * d  # out_proj
        + d  # the block's pre-norm
    )
    vocab = 104  # padded to a multiple of 8
    want = vocab * d * (1 if tie else 2) + cfg.n_layer * per_layer + d
    assert build(cfg).num_parameters() == want


@pytest.mark.parametrize("seq_len", [64, 10])  # several chunks; shorter than one chunk
def test_forward_flops_match_a_flop_counter(seq_len):
    """The matmul FLOPs torch counts on the PyTorch chunked path, plus the conv (which may run in a fused
    kernel that the counter cannot see), equal the model's count."""
    model = build(config(mamba2=dict(chunk_size=16 if seq_len == 64 else 32)))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.randint(0, 101, (1, seq_len)))
    counted = sum(v for op, v in counter.get_flop_counts()["Global"].items() if "convolution" not in str(op))
    mixer = model.layers[0].mixer
    conv = 2 * mixer.conv_dim * mixer.d_conv * seq_len * len(model.layers)
    assert counted + conv == model.forward_flops_per_token(seq_len) * seq_len


def test_external_parameters_are_what_forward_reads_outside_child_forwards():
    """Every parameter is the mixer's own, belongs to a child whose forward runs, or is listed for ZeRO-3."""
    mixer = build(config()).layers[0].mixer
    called = set()
    hooks = [m.register_forward_hook(lambda mod, *_: called.add(mod)) for m in mixer.children()]
    mixer(torch.randn(1, 5, 32))
    for h in hooks:
        h.remove()
    gathered = {id(p) for p in mixer.parameters(recurse=False)}
    gathered |= {id(p) for mod in called for p in mod.parameters()}
    external = {id(p) for p in mixer.external_parameters()}
    assert external.isdisjoint(gathered) and external | gathered == {id(p) for p in mixer.parameters()}
    assert isinstance(mixer, Mamba2Mixer)


@pytest.mark.slow
def test_tiny_config_trains_through_the_pretrain_command(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "SSMFORGE_CACHE_DIR": str(seed_kernel_cache(tmp_path / "cache"))}
    command = [sys.executable, "-m", "ssmforge", "pretrain", str(ROOT / "configs" / "mamba2-tiny.yaml"),
               f"run_dir={run_dir}", "data.sources=[{kind: synthetic, max_documents: 40}]", "data.num_workers=0",
               "train.max_steps=8", "train.log_every=1", "train.eval_every=100", "train.save_every=100"]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < losses[0] - 0.2
