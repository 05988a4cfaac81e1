"""The Hyena mixer: the whole mixer (forward and every parameter's gradient) against a direct O(L^2) oracle in
float64, the implicit filter against a direct evaluation, decoding and chunked feeding against the parallel
forward, document resets, context parallelism on a group of threads, parameter and FLOP counts, fp32 parameters,
the initialisation, and the refusals."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from ssmforge.errors import ConfigError

from ssmforge.kernels.documents import document_index
from ssmforge.models import LanguageModel, ModelConfig
from ssmforge.models.hf import cast_model

from .contracts import assert_causal, assert_chunks_then_steps_match_forward, assert_steps_match_forward, model_config
from .test_document_resets import EOS, assert_documents_run_alone, documents

D, FO, EMB, LMAX = 12, 16, 5, 48


def hyena_config(**overrides) -> ModelConfig:
    # l_max close to the tests' lengths: the window's decay is seen (channel 0 falls to 1/100 at 1.5 l_max,
    # the last at 0.3 l_max); emb_dim 5: two bands, one with a real frequency (f = 1e-4, 1)
    base = dict(family="hyena", d_model=D, n_layer=2, vocab_size=101,
                hyena=dict(order=2, filter_order=FO, emb_dim=EMB, l_max=LMAX))
    return model_config(base, overrides)


def build(config: ModelConfig, seed: int = 0) -> LanguageModel:
    torch.manual_seed(seed)
    return LanguageModel(config).eval()


def mixer64(order=3, bias=True, seed=0):
    """A float64 mixer of order 3 (two long convs: the (v o) channel layout matters), biases everywhere and
    the reference conv backend (float64 throughout)."""
    config = hyena_config(hyena=dict(order=order), bias=bias, kernel_backend="ref")
    return build(config, seed).layers[0].mixer.double()


def oracle(mixer, hidden, seq_idx=None):
    """The Hyena operator from its definition, one position at a time, on the mixer's own parameters
    (differentiable): in_proj; the short conv by explicit taps (none across a document boundary); split
    into x_0 .. x_{N-1}, v; for each long conv o (gating with x_{N-1-o} first) y_t = sum_{s <= t, same
    document} h_o[t - s] u_s + b_o u_t with the mixer's filter(); y = v x_0; out_proj."""
    batch, L, d = hidden.shape
    N, width = mixer.order, mixer.short_filter_order
    p = F.linear(hidden, mixer.in_proj.weight, mixer.in_proj.bias)  # (batch, L, (N + 1) d)
    same = (lambda t, s: torch.ones(batch, 1, dtype=p.dtype)) if seq_idx is None else \
        (lambda t, s: (seq_idx[:, t] == seq_idx[:, s]).to(p.dtype)[:, None])
    W, c = mixer.short_filter.weight[:, 0, :], mixer.short_filter.bias  # (channels, width): tap width-1 is x_t
    conv = []
    for t in range(L):
        acc = c.expand(batch, -1)
        for j in range(width):
            if t - j >= 0:
                acc = acc + W[:, width - 1 - j] * p[:, t - j] * same(t, t - j)
        conv.append(acc)
    conv = torch.stack(conv, 1)  # (batch, L, (N + 1) d)
    xs = [conv[..., i * d:(i + 1) * d] for i in range(N)]
    v = conv[..., N * d:]
    h, b = mixer.filter(L), mixer.filter_bias.view(d, N - 1).t()  # (N - 1, d, L), (N - 1, d)
    for o in range(N - 1):
        v = v * xs[N - 1 - o]
        out = []
        for t in range(L):
            acc = b[o] * v[:, t]
            for s in range(t + 1):
                acc = acc + h[o, :, t - s] * v[:, s] * same(t, s)
            out.append(acc)
        v = torch.stack(out, 1)
    return F.linear(v * xs[0], mixer.out_proj.weight, mixer.out_proj.bias)


def assert_matches_oracle(mixer, hidden, seq_idx, tol, oracle_mixer=None):
    """Output and the gradient of every parameter (of a random-weighted sum of the outputs) against the
    oracle (run on `oracle_mixer`, default the mixer itself), compared in float64 to `tol` of each tensor's
    largest entry; returns those relative errors."""
    oracle_mixer = oracle_mixer or mixer
    params, oracle_params = dict(mixer.named_parameters()), list(oracle_mixer.parameters())
    hidden64 = hidden.double()
    weight = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    out = mixer(hidden, seq_idx=seq_idx).double()
    want = oracle(oracle_mixer, hidden64, seq_idx)
    got_grads = torch.autograd.grad((out * weight).sum(), list(params.values()))
    want_grads = torch.autograd.grad((want * weight).sum(), oracle_params)
    errors = {"out": ((out - want).abs().max() / want.abs().max()).item()}
    torch.testing.assert_close(out, want, rtol=tol, atol=tol * want.abs().max().item())
    for name, a, b in zip(params, got_grads, want_grads):
        scale = b.abs().max().item()
        assert scale > 0, name  # every parameter takes part
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol * scale, msg=name)
        errors[name] = ((a.double() - b).abs().max() / scale).item()
    return errors


@pytest.mark.parametrize("resets", [False, True])
def test_forward_and_every_gradient_equal_the_direct_oracle_in_float64(resets):
    """The mixer as it runs (kernels.fftconv, the conv kernel), in float64, to 1e-10."""
    mixer = mixer64()
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 20, D, generator=g, dtype=torch.float64)
    seq_idx = torch.tensor([[0] * 7 + [1] * 1 + [2] * 12, [3] * 20]) if resets else None
    assert_matches_oracle(mixer, hidden, seq_idx, tol=1e-10)


def test_the_float32_mixer_stays_within_1e5_of_the_float64_oracle():
    """The same in float32 (the training precision of the filters and convs; the default CPU conv kernel)
    against the oracle on a float64 copy of its parameters."""
    mixer32 = build(hyena_config(hyena=dict(order=3), bias=True)).layers[0].mixer
    mixer = copy.deepcopy(mixer32).double()
    hidden = torch.randn(2, 24, D, generator=torch.Generator().manual_seed(2))
    seq_idx = torch.tensor([[0] * 9 + [1] * 15, [0] * 24])
    errors = assert_matches_oracle(mixer32, hidden, seq_idx, tol=1e-5, oracle_mixer=mixer)
    assert max(errors.values()) < 1e-5


def direct_filter(mixer, cfg, L):
    """The implicit filter from its definition, position by position: z_t = [t / (l_max - 1), cos(2 pi f_k
    t / l_max) for each band, -sin(...) for each band] with f = linspace(1e-4, B - 1, B); three sines of
    the shared frequency w around the Linear layers; the last Linear; the window exp(-t' |delta_j|) with
    delta_j linear from log(target) / slow_pct to log(target) / fast_pct over the (N - 1) d channels; channel
    j = v (N - 1) + o."""
    sd = {k: v.detach().double() for k, v in mixer.state_dict().items()}
    n, B = cfg.order - 1, (cfg.emb_dim - 1) // 2
    f = [1e-4 + k * (B - 1 - 1e-4) / (B - 1) for k in range(B)] if B > 1 else [1e-4]
    channels = n * mixer.d_model
    lo, hi = math.log(cfg.decay_target) / cfg.slow_decay_pct, math.log(cfg.decay_target) / cfg.fast_decay_pct
    deltas = torch.tensor([lo + j * (hi - lo) / (channels - 1) for j in range(channels)], dtype=torch.float64)
    w = sd["filter_freq"]
    h = torch.zeros(n, mixer.d_model, L, dtype=torch.float64)
    for t in range(L):
        tn = t / (cfg.l_max - 1)
        z = torch.tensor([tn] + [math.cos(2 * math.pi * fk * t / cfg.l_max) for fk in f]
                         + [-math.sin(2 * math.pi * fk * t / cfg.l_max) for fk in f], dtype=torch.float64)
        a = torch.sin(w * (sd["filter_in.weight"] @ z + sd["filter_in.bias"]))
        for i in range(2):
            a = torch.sin(w * (sd[f"filter_hidden.{i}.weight"] @ a + sd[f"filter_hidden.{i}.bias"]))
        out = sd["filter_out.weight"] @ a * torch.exp(-tn * deltas.abs())
        for j in range(channels):
            h[j % n, j // n, t] = out[j]
    return h


@pytest.mark.parametrize("order,emb_dim", [(2, 3), (3, 5), (4, 7)])
def test_the_filter_equals_a_direct_evaluation_of_features_ffn_and_window(order, emb_dim):
    config = hyena_config(hyena=dict(order=order, emb_dim=emb_dim))
    mixer = build(config).layers[0].mixer.double()
    with torch.no_grad():
        mixer.filter_freq.uniform_(0.5, 2.0)  # per-feature frequencies that differ
    h = mixer.filter(LMAX).detach()
    want = direct_filter(mixer, config.hyena, LMAX)
    torch.testing.assert_close(h, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mixer.filter(10).detach(), want[..., :10], rtol=1e-12, atol=1e-12)  # prefixes agree


@pytest.mark.parametrize("prefill", [0, 7])
def test_step_decoding_equals_parallel_forward(prefill):
    ids = torch.randint(0, 101, (2, 30), generator=torch.Generator().manual_seed(3))
    assert_steps_match_forward(build(hyena_config(hyena=dict(order=3))), ids, prefill)


def test_chunk_by_chunk_through_a_state_equals_the_whole_sequence():
    """Chunks shorter than the short conv's width and longer, then steps; the long-conv cache holds every
    input so far (it grows like a KV cache)."""
    model = build(hyena_config(hyena=dict(order=3)))
    ids = torch.randint(0, 101, (2, 40), generator=torch.Generator().manual_seed(5))
    state = assert_chunks_then_steps_match_forward(model, ids, cuts=(0, 1, 3, 11, 29, 37), tol=1e-5)
    assert state.layers[0].inputs.shape == (2, 2, D, 40)


def test_a_carried_state_reaches_only_the_first_document_and_leaves_the_last_one():
    model = build(hyena_config())
    docs = documents([7, 9, 8], seed=8)
    ids = torch.cat(docs)[None].repeat(2, 1)
    seq_idx = document_index(ids, EOS)
    seq_idx[1] = 0  # row 1: one document
    with torch.no_grad():
        whole = model(ids, seq_idx=seq_idx)
        state = model.allocate_state(2)
        first = model(ids[:, :4], state=state, seq_idx=seq_idx[:, :4])
        rest = model(ids[:, 4:], state=state, seq_idx=seq_idx[:, 4:])
    torch.testing.assert_close(torch.cat([first, rest], 1), whole, rtol=1e-5, atol=1e-5)
    # continuing by steps after a packed prefill: row 0 continues its last document, as if run alone
    more = torch.randint(1, 61, (2, 5), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        steps = torch.stack([model.step(more[:, t], state) for t in range(5)], 1)
        alone = model(torch.cat([docs[2][None], more[:1]], 1))[:, -5:]
        row1 = model(torch.cat([ids[1:], more[1:]], 1))[:, -5:]
    torch.testing.assert_close(steps[:1], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(steps[1:], row1, rtol=1e-5, atol=1e-5)
    assert state.layers[0].inputs.shape[-1] == 24 + 5  # row 1's last document is the whole row
    state = model.allocate_state(1)
    with torch.no_grad():
        model(ids[:1], state=state, seq_idx=seq_idx[:1])
    assert state.layers[0].inputs.shape[-1] == 8  # only the last document is kept


def test_a_packed_row_equals_each_document_run_alone():
    model = build(hyena_config(d_model=16, hyena=dict(order=3, l_max=64)))
    assert_documents_run_alone(model, [[5, 1, 9, 17], [12, 2, 2, 1, 15]])
    # the negative: without seq_idx the second document sees the first
    docs = documents([6, 10], seed=3)
    with torch.no_grad():
        flowing, alone = model(torch.cat(docs)[None]), model(docs[1][None])
    assert (flowing[0, 6:] - alone[0]).abs().max() > 1e-3


def test_causal():
    assert_causal(build(hyena_config()), length=20, position=9)


@pytest.mark.parametrize("bias,order", [(False, 2), (True, 3)])
def test_parameter_count(bias, order):
    d, n_layer, fo, emb, w = 16, 3, 24, 7, 4
    config = hyena_config(d_model=d, n_layer=n_layer, bias=bias,
                          hyena=dict(order=order, filter_order=fo, emb_dim=emb, short_filter_order=w))
    n = order - 1
    per_mixer = (d * (order + 1) * d + d * d + bias * ((order + 1) * d + d)  # in_proj, out_proj
                 + (order + 1) * d * (w + 1)  # the short depthwise conv, with bias
                 + emb * fo + fo + 2 * (fo * fo + fo) + fo * n * d  # the filter FFN (last layer without bias)
                 + fo  # the sines' shared frequencies
                 + n * d)  # the long convs' skip b
    model = build(config)
    assert sum(p.numel() for p in model.layers[0].mixer.parameters()) == per_mixer
    assert model.num_parameters() == 104 * d + n_layer * (per_mixer + d) + d  # embedding, blocks + norms, final norm


def test_flops_count_the_ffts_gates_and_convs():
    mixer = build(hyena_config(hyena=dict(order=3, short_filter_order=4))).layers[0].mixer
    d, N = D, 3
    base = 2 * (d * (N + 1) * d + d * d) + 2 * (N + 1) * d * 4 + N * d  # projections, short conv, gates
    assert mixer.forward_flops_per_token(64) == base + (N - 1) * d * (10 * 7 + 8)  # log2(128) = 7
    assert mixer.forward_flops_per_token(128) - mixer.forward_flops_per_token(64) == 10 * (N - 1) * d


def test_filter_parameters_stay_fp32_through_a_bf16_cast():
    model = build(hyena_config())
    mixer = model.layers[0].mixer
    kept = ["filter_in.weight", "filter_in.bias", "filter_hidden.0.weight", "filter_hidden.0.bias",
            "filter_hidden.1.weight", "filter_hidden.1.bias", "filter_out.weight", "filter_freq", "filter_bias"]
    params = dict(mixer.named_parameters())
    for name in kept:
        assert params[name]._ssmforge_fp32 and params[name]._no_weight_decay, name
    assert not getattr(mixer.in_proj.weight, "_ssmforge_fp32", False)
    assert mixer.external_parameters() == [mixer.short_filter.weight, mixer.short_filter.bias]
    model = cast_model(model, torch.bfloat16)
    assert all(params[name].dtype == torch.float32 for name in kept)
    assert mixer.in_proj.weight.dtype == mixer.short_filter.weight.dtype == torch.bfloat16
    ids = torch.randint(0, 101, (2, 16))
    logits = model(ids)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    with torch.autocast("cpu", torch.bfloat16):  # fp32 model under autocast: the filter and convs stay fp32
        fp32 = build(hyena_config())
        assert torch.isfinite(fp32(ids)).all()
        assert fp32.layers[0].mixer.filter(16).dtype == torch.float32


def test_initialisation():
    config = hyena_config(n_layer=4, hyena=dict(order=3, w=1.5))
    mixer = build(config).layers[0].mixer
    cfg = config.hyena
    torch.testing.assert_close(mixer.filter_freq.detach(), torch.full((FO,), 1.5))  # Sin(w), shared
    # the window: channel 0 falls to decay_target at t' = slow_decay_pct, the last channel at fast_decay_pct
    lo, hi = mixer.decay_range
    assert math.exp(-abs(lo) * cfg.slow_decay_pct) == pytest.approx(cfg.decay_target)
    assert math.exp(-abs(hi) * cfg.fast_decay_pct) == pytest.approx(cfg.decay_target)
    assert abs(lo) < abs(hi)
    # positional features at t = 0: [t' = 0, cos 0 = 1 (two bands), -sin 0 = 0]; t' = 1 at l_max - 1
    z, t = mixer.positional_features(LMAX)
    torch.testing.assert_close(z[0], torch.tensor([0.0, 1, 1, 0, 0]))
    assert t[-1].item() == pytest.approx(1.0)
    # torch's default inits (safari): uniform within 1/sqrt(fan_in); the skip b standard normal
    assert mixer.short_filter.weight.abs().max() <= 1 / math.sqrt(cfg.short_filter_order)
    assert mixer.filter_in.weight.abs().max() <= 1 / math.sqrt(EMB)
    assert mixer.filter_hidden[0].weight.abs().max() <= 1 / math.sqrt(FO)
    assert 0.5 < mixer.filter_bias.std().item() < 1.5 and mixer.filter_bias.numel() == 2 * D
    bound = 1 / math.sqrt(D) / math.sqrt(4)  # out_proj rescaled by 1/sqrt(n_layer)
    assert 0.8 * bound < mixer.out_proj.weight.abs().max() <= bound


def test_sequences_longer_than_l_max_are_refused():
    model = build(hyena_config(hyena=dict(l_max=16)))
    match = r"longer than model\.hyena\.l_max=16"
    with pytest.raises(ValueError, match=match):
        model(torch.randint(0, 101, (1, 17)))
    state = model.allocate_state(1)
    with torch.no_grad():
        model(torch.randint(0, 101, (1, 10)), state=state)
        with pytest.raises(ValueError, match=match):
            model(torch.randint(0, 101, (1, 7)), state=state)
        model(torch.randint(0, 101, (1, 6)), state=state)
        with pytest.raises(ValueError, match=match):
            model.step(torch.randint(0, 101, (1,)), state)
    with pytest.raises(ConfigError, match=r"^model\.hyena\.order=1 is invalid"):
        build(hyena_config(hyena=dict(order=1)))


def test_tiny_config_loads():
    from pathlib import Path

    from ssmforge.pretrain.config import load_config

    config = load_config(Path(__file__).resolve().parents[2] / "configs" / "hyena-tiny.yaml")
    assert config.model.family == "hyena" and config.data.seq_len <= config.model.hyena.l_max
