"""Hyena mixer, as in Poli, Massaroli, Nguyen, Fu, Dao, Baccus, Bengio, Ermon & Re, "Hyena Hierarchy:
Towards Larger Convolutional Language Models" (2023), following the reference implementation
HazyResearch/safari (src/models/sequence/hyena.py: HyenaOperator, HyenaFilter, PositionalEmbedding,
ExponentialModulation, Sin), whose semantics were read and checked; the code here is our own.

With N = order and d = d_model, one layer maps u (batch, L, d) to y (batch, L, d):

    p = ShortConv(W_in u)                          (batch, (N + 1) d, L); W_in: d -> (N + 1) d; a causal
                                                   depthwise conv of short_filter_order taps (with bias) on
                                                   every channel, NO activation after it (safari)
    x_0, .., x_{N-1}, v = split(p)                 d channels each, in that order (safari's `*x, v = split`)
    for o = 0 .. N - 2, gating with x_{N-1-o}      (safari: `for o, x_i in enumerate(reversed(x[1:]))`)
        v = v * x_{N-1-o}                          the gate, then the long conv with filter h_o:
        v_t = sum_{s <= t} h_o[t - s] v_s + b_o v_t
    y = W_out(v * x_0)                             W_out: d -> d (rescaled like every residual projection)

So order N has N gates and N - 1 implicit long convolutions, as safari runs it (its filter has
d (N - 1) channels; the short convs are the first, explicit filters). The paper's Algorithm 3 writes N long
convolutions with the gate after each; this module keeps safari's sequence and count (order >= 2, as safari
asserts).

Implicit filters (safari HyenaFilter, defaults num_inner_mlps=2, normalized=False, modulate=True, shift=0):

    z_t = [t', Re exp(-i 2 pi f_k t / l_max), Im exp(-i 2 pi f_k t / l_max)]    t = 0 .. L - 1,
          t' = t / (l_max - 1) (safari's linspace(0, 1, l_max)), f = linspace(1e-4, B - 1, B),
          B = (emb_dim - 1) // 2 bands: real parts of every band, then imaginary parts
    h_t = W_4 sin(w * (W_3 sin(w * (W_2 sin(w * (W_1 z_t + c_1)) + c_2)) + c_3))
          W_1: emb_dim -> filter_order, W_2, W_3: filter_order -> filter_order (with biases), W_4:
          filter_order -> (N - 1) d (no bias); w (filter_order,) a learned frequency per feature, ONE vector
          shared by the three sines (safari appends the same Sin module three times), initialised to cfg.w
    h_t,j *= exp(-t' |delta_j|)                    delta_j = linspace(log(decay_target) / slow_decay_pct,
          log(decay_target) / fast_decay_pct, (N - 1) d)[j]: channel 0 decays slowest
    channel j of the FFN output is (v = j // (N - 1), o = j % (N - 1)) (safari's '(v o)' layout); the
    per-channel skip b (safari's filter `bias`, randn init) is laid out the same way.

Initialisation as safari: torch's default Linear and Conv1d inits (uniform +-1/sqrt(fan_in)), b ~ N(0, 1),
w = cfg.w, the projections through models.layers.Projection (bias per model.bias, out_proj rescaled).
Differences from safari: the positional features are fixed here (safari trains them at lr 1e-5, a rate
`model.hyena.filter_lr` does not cover), and the modulation deltas are fixed constants recomputed from the
config (safari: a buffer at lr 0, the same values). The filter FFN and its frequencies train at
min(train.lr, `model.hyena.filter_lr`), safari's filter rate, the skip b at train.lr; all three are kept
float32 without weight decay (keep_fp32; safari trains the FFN at weight decay 0), and the filter, gates and
long convolutions run in the parameters' precision (float32, float64 in tests) whatever the autocast.
Sequences longer than l_max are refused: the filters exist on lags 0 .. l_max - 1 only.

Long convolutions by kernels.fftconv.fft_causal_conv, exact with document resets (seq_idx). Decoding: Hyena
has no finite state. The decoding state keeps, per long conv, every earlier input of it (batch, N - 1, d, T)
(it grows with the length, like a KV cache; with seq_idx only the row's last document is kept) plus the
short conv's last inputs; `step` computes each long conv's output at the new position directly from the
cached inputs and the filter taps (O(T d) per step, and the filter FFN on T + 1 positions). Context
parallelism: the short conv takes its halo from the previous rank; each long conv gathers its inputs from
the whole group (O(L) per layer, like attention's keys and values) and convolves the prefix up to this
rank's chunk. The keys are `model.hyena.*` (models.config.HyenaConfig).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from ssmforge import kernels
from ssmforge.kernels.fftconv import fft_causal_conv, fft_conv_flops

from .config import ModelConfig
from .context_parallel import ContextParallel
from .layers import Projection, cap_lr, depthwise_causal_conv, keep_fp32, kernel_backend
from .registry import register_mixer

INNER_LAYERS = 2  # safari HyenaFilter's num_inner_mlps default: hidden Linear + Sin pairs after the first


@dataclass
class HyenaState:
    """Decoding cache of one Hyena layer. Not finite: `inputs` keeps every earlier input of each long conv
    (of the row's last document), so it grows by one position per token, like a KV cache."""

    conv: torch.Tensor  # (batch, (order + 1) d, short_filter_order) last short-conv inputs, oldest first
    inputs: torch.Tensor  # (batch, order - 1, d, T) the long convs' inputs so far, in the filters' dtype
    fresh: bool = True  # nothing consumed yet: a forward starts from zeros rather than continuing

    def restart(self, rows: torch.Tensor) -> None:
        """The next token of the rows (batch,) bool starts a new document: their short-conv history and cached
        inputs are zeroed, and the leading positions then zero in every row are dropped (one sync): a zero
        input adds nothing to any later output and the lags of the rest are unchanged, so the cache stays as
        long as the longest current document."""
        self.conv = self.conv.masked_fill(rows[:, None, None], 0)
        inputs = self.inputs.masked_fill(rows[:, None, None, None], 0)
        used = inputs.ne(0).flatten(0, 2).any(0)  # (T,)
        self.inputs = inputs[..., int(used.int().argmax()) if bool(used.any()) else used.numel():]


@register_mixer("hyena")
class HyenaMixer(nn.Module):
    """The Hyena operator; its shapes come from `config.hyena` (models.config.HyenaConfig)."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        cfg = config.hyena
        self.layer_idx = layer_idx
        self.d_model = d = config.d_model
        self.order = cfg.order
        self.n_filters = n = cfg.order - 1
        self.l_max = cfg.l_max
        self.emb_dim = cfg.emb_dim
        self.short_filter_order = cfg.short_filter_order
        self.kernel_backend = kernel_backend(config)
        # the modulation rates, safari's ExponentialModulation deltas (fixed): slowest first
        self.decay_range = (math.log(cfg.decay_target) / cfg.slow_decay_pct,
                            math.log(cfg.decay_target) / cfg.fast_decay_pct)

        width = (cfg.order + 1) * d
        self.in_proj = Projection(d, width, config)
        self.short_filter = nn.Conv1d(width, width, cfg.short_filter_order, groups=width,
                                      padding=cfg.short_filter_order - 1)
        self.out_proj = Projection(d, d, config, residual=True)
        # the implicit filter's FFN (safari HyenaFilter.implicit_filter), float32 whatever the precision
        self.filter_in = nn.Linear(cfg.emb_dim, cfg.filter_order)
        self.filter_hidden = nn.ModuleList(nn.Linear(cfg.filter_order, cfg.filter_order) for _ in range(INNER_LAYERS))
        self.filter_out = nn.Linear(cfg.filter_order, n * d, bias=False)
        self.filter_freq = nn.Parameter(torch.full((cfg.filter_order,), float(cfg.w)))
        filter_ffn = [*self.filter_in.parameters(), *self.filter_hidden.parameters(), *self.filter_out.parameters(),
                      self.filter_freq]
        for param in filter_ffn:
            keep_fp32(param)
        cap_lr(filter_ffn, cfg.filter_lr)
        # each long conv's skip term, safari's filter `bias`, laid out (d, n) flattened as safari's '(v o)'
        self.filter_bias = keep_fp32(nn.Parameter(torch.randn(d * n)))

    def external_parameters(self) -> list[nn.Parameter]:
        """The short conv's weight and bias are read directly (the conv kernel), not through its forward."""
        return [self.short_filter.weight, self.short_filter.bias]

    def forward_flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs per token: the two projections, the short conv (2 per tap and channel), per long conv
        and channel the FFT convolution (10 log2(2L) for the forward and inverse real FFTs, 6 for the complex
        product of spectra, 2 for the skip b v), and the `order` gate products per channel. The filter FFN
        runs once per batch, not per token, and is left out."""
        d, n, width = self.d_model, self.n_filters, (self.order + 1) * self.d_model
        matmuls = d * width + d * d
        fft = fft_conv_flops(seq_len) + 2
        return 2 * matmuls + 2 * width * self.short_filter_order + round(n * d * fft) + self.order * d

    # ---- the implicit filters ----

    def _real_dtype(self) -> torch.dtype:
        return self.filter_freq.dtype

    def positional_features(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(z (length, emb_dim), t' (length,)) at positions 0..length-1, in the filters' dtype: safari's
        PositionalEmbedding rows (t', the bands' real parts, then their imaginary parts)."""
        device, dtype = self.filter_freq.device, self._real_dtype()
        pos = torch.arange(length, device=device, dtype=dtype)
        t = pos / (self.l_max - 1) if self.l_max > 1 else torch.zeros_like(pos)
        bands = (self.emb_dim - 1) // 2
        freqs = torch.linspace(1e-4, bands - 1, bands, device=device, dtype=dtype)
        angle = freqs * (2 * math.pi * pos / self.l_max)[:, None]  # (length, bands)
        return torch.cat([t[:, None], torch.cos(angle), -torch.sin(angle)], dim=-1), t

    def filter(self, length: int) -> torch.Tensor:
        """The long convs' taps h (order - 1, d, length) at lags 0..length-1, in the filters' dtype: the FFN
        of the positional features, windowed by the exponential modulation. Refuses length > l_max."""
        self._check_length(length)
        with torch.autocast(device_type=self.filter_freq.device.type, enabled=False):
            z, t = self.positional_features(length)
            h = torch.sin(self.filter_freq * self.filter_in(z))
            for layer in self.filter_hidden:
                h = torch.sin(self.filter_freq * layer(h))
            h = self.filter_out(h)  # (length, d n), channel j = (v = j // n, o = j % n)
            deltas = torch.linspace(*self.decay_range, h.shape[-1], device=h.device, dtype=h.dtype)
            h = h * torch.exp(-t[:, None] * deltas.abs())
            return h.view(length, self.d_model, self.n_filters).permute(2, 1, 0)

    def skip(self) -> torch.Tensor:
        """The long convs' skip weights b (order - 1, d)."""
        return self.filter_bias.view(self.d_model, self.n_filters).t()

    def _check_length(self, length: int) -> None:
        if length > self.l_max:
            raise ValueError(f"hyena: a sequence of {length} positions is longer than model.hyena.l_max="
                             f"{self.l_max}, the filters' length; raise model.hyena.l_max")

    # ---- forward ----

    def forward(self, hidden: torch.Tensor, state: HyenaState | None = None,
                seq_idx: torch.Tensor | None = None, context: ContextParallel | None = None) -> torch.Tensor:
        """hidden (batch, L, d_model) -> (batch, L, d_model). seq_idx (batch, L): document index of a packed
        row; neither conv reaches across a document boundary. With `state`, the sequence continues the inputs
        it holds (unless fresh; they reach only the first document) and it is left holding every long-conv
        input of the row's last document and the short conv's last inputs. With `context`, hidden is one
        chunk of the rows: the short conv takes a halo, each long conv gathers its inputs from the group."""
        batch, L, _ = hidden.shape
        continuing = state is not None and not state.fresh
        history = state.inputs.shape[-1] if continuing else 0
        if context is not None:
            self._check_length(L * context.size)  # the whole row
            span = context.span(L * context.size)
            length = span[1]  # the prefix up to this rank's chunk
        else:
            span, length = None, history + L
        self._check_length(length)  # before the state is touched
        p = self.in_proj(hidden)
        dtype_out = p.dtype
        # the short conv, no activation: halo from the previous rank, a decoding state's inputs, or zeros
        p = depthwise_causal_conv(self.short_filter, self.kernel_backend, p.transpose(1, 2), seq_idx, state,
                                  context)  # (batch, (order + 1) d, L)
        *x, v = p.split(self.d_model, dim=1)
        real = self._real_dtype()
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            h, b = self.filter(length), self.skip()
            v = v.to(real)
            kept = []
            for o, gate in enumerate(reversed(x[1:])):
                v = v * gate.to(real)
                conv, cache = self._long_conv(v, h[o], seq_idx, state.inputs[:, o] if continuing else None,
                                              context, span, keep=state is not None)
                kept.append(cache)
                v = conv + b[o, :, None] * v
            y = v * x[0].to(real)
        if state is not None:
            state.inputs, state.fresh = self._trimmed(torch.stack(kept, 1), seq_idx), False
        return self.out_proj(y.transpose(1, 2).to(dtype_out))

    def _long_conv(self, u, h, seq_idx, cached, context, span, keep: bool):
        """sum_{s <= t} h[t - s] u_s for u (batch, d, L): from zero history, after the `cached` inputs of a
        state (batch, d, T) (which reach only u's first document), or, under `context`, after the inputs of
        the earlier ranks' chunks. Returns the outputs (batch, d, L) and, with `keep`, the inputs to cache:
        the cached ones and u, those of documents before the row's last one zeroed."""
        L = u.shape[-1]
        if context is not None:
            rank = context.rank
            pieces = context.gather(u)[:rank + 1]  # (rank + 1, batch, d, L): differentiable
            prefix = pieces.permute(1, 2, 0, 3).reshape(*u.shape[:2], (rank + 1) * L)
            prefix_seq_idx = None if context.seq_idx is None else context.seq_idx[:, :span[1]]
            return fft_causal_conv(prefix, h, prefix_seq_idx)[..., span[0]:].to(u.dtype), None
        if cached is None:
            full, full_seq_idx = u, seq_idx
        else:
            full = torch.cat([cached.to(u.dtype), u], dim=-1)
            full_seq_idx = None if seq_idx is None else torch.cat(
                [seq_idx[:, :1].expand(-1, cached.shape[-1]), seq_idx], dim=1)
        out = fft_causal_conv(full, h, full_seq_idx)[..., full.shape[-1] - L:].to(u.dtype)
        if not keep:
            return out, None
        if full_seq_idx is not None:
            full = full * (full_seq_idx == full_seq_idx[:, -1:])[:, None, :].to(full.dtype)
        return out, full

    def _trimmed(self, inputs: torch.Tensor, seq_idx) -> torch.Tensor:
        """The cached inputs (batch, n, d, T) less the leading positions that precede every row's last
        document (zeros already): the lags to later positions are unchanged, and the cache stays as long as
        the longest last document. The history before this forward belongs to each row's first document."""
        if seq_idx is None:
            return inputs
        history = inputs.shape[-1] - seq_idx.shape[1]
        full = torch.cat([seq_idx[:, :1].expand(-1, history), seq_idx], dim=1)
        first = int((full == full[:, -1:]).int().argmax(dim=1).min())  # earliest last-document start (one sync)
        return inputs[..., first:]

    # ---- decoding ----

    def allocate_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> HyenaState:
        width = (self.order + 1) * self.d_model
        return HyenaState(
            conv=torch.zeros(batch, width, self.short_filter_order, device=device, dtype=dtype),
            inputs=torch.zeros(batch, self.n_filters, self.d_model, 0, device=device, dtype=self._real_dtype()),
        )

    def step(self, hidden: torch.Tensor, state: HyenaState) -> torch.Tensor:
        """One token: hidden (batch, d_model) -> (batch, d_model), advancing `state` to new tensors (its long-conv
        inputs grow by one position). Each long conv's output at the new position T is
        sum_{s <= T} h[T - s] u_s + b u_T, read from the cached inputs."""
        length = state.inputs.shape[-1] + 1
        self._check_length(length)  # before the state is touched
        p = self.in_proj(hidden)
        dtype_out = p.dtype
        p, state.conv = kernels.causal_conv1d_step(state.conv, p, self.short_filter.weight.squeeze(1),
                                                   self.short_filter.bias)
        *x, v = p.split(self.d_model, dim=-1)
        real = self._real_dtype()
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            h, b = self.filter(length), self.skip()
            taps = h.flip(-1)  # (n, d, length): the tap for cached position s is h[T - s]
            v = v.to(real)
            kept = []
            for o, gate in enumerate(reversed(x[1:])):
                v = v * gate.to(real)
                inputs = torch.cat([state.inputs[:, o], v[..., None]], dim=-1)  # (batch, d, T + 1)
                kept.append(inputs)
                v = (inputs * taps[o]).sum(-1) + b[o] * v
            y = v * x[0].to(real)
        # a new tensor, not in place, so that gradients can flow through a run of steps
        state.inputs, state.fresh = torch.stack(kept, 1), False
        return self.out_proj(y.to(dtype_out))
