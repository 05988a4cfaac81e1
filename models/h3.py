"""H3 mixer ("Hungry Hungry Hippos"), as in Fu, Dao, Saab, Thomas, Rudra & Re, "Hungry Hungry Hippos: Towards
Language Modeling with State Space Models" (2023):

    q, k, v = W_q x, W_k x, W_v x                         (batch, L, d_model) each
    k' = SSM_shift(k) + D_k k                            a shift SSM: a learned causal filter of d_state taps
    per head h (d_model / head_dim heads of head_dim channels):
        kv_t[i, j] = k'_t[h, i] v_t[h, j]                 (head_dim x head_dim outer products)
        s = SSM_diag(kv) + D kv                           one S4D-Lin SSM per head, shared by its products
        y_t[h, j] = sum_i q_t[h, i] s_t[i, j]
    out = W_o y

The shift SSM has A the shift matrix and B = e_1, so its kernel is its C: tap l is C_l for l < d_state (a
length-d_state FIR filter, applied by FFT; decoding keeps its last d_state inputs). The diagonal SSM is S4D-Lin
(models.s4d.S4DKernel: zero-order hold, N/2 complex modes and conjugates), applied by FFT convolution in training and
by its recurrence in decoding (models.diagonal). head_dim 1 (the default, as the reference's) makes kv = k' v.

Initialisation: shift filter and both D skips standard normal, the S4D-Lin SSM as S4D's, projections as every
mixer's (models.layers.Projection). The SSM parameters stay float32 whatever the training precision. Semantics
checked against HazyResearch/safari (`src/models/sequence/h3.py`, H3; the shift kernel of its `ss/kernel.py`).
Keys: `model.h3.*`. With context parallelism each chunk needs at least d_state - 1 positions (the shift filter's
halo comes from the previous rank only). With head_dim > 1 the head_dim^2 products of a head share its SSM: its
kernel and state summaries are built once per head (models.diagonal's `groups`), not once per product.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ssmforge import kernels
from ssmforge.kernels.fftconv import fft_causal_conv, fft_conv_flops

from .config import ModelConfig
from .context_parallel import ContextParallel
from .diagonal import DiagonalState, allocate_diagonal_state, diagonal_conv, diagonal_step
from .layers import Projection, cap_lr, continued_conv, keep_fp32, kernel_backend, kernel_block_bytes
from .registry import register_mixer
from .s4d import S4DKernel


@dataclass
class H3State:
    """Decoding cache of one H3 layer: the shift SSM's last d_state inputs and the diagonal SSM's state."""

    conv: torch.Tensor  # (batch, d_model, d_state), oldest first
    diag: DiagonalState  # over (head_dim, head_dim, heads) channels
    fresh: bool = True


@register_mixer("h3")
class H3Mixer(nn.Module):
    """The H3 mixer; its shapes come from `config.h3` (models.config.H3Config)."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        cfg = config.h3
        d = config.d_model
        self.layer_idx = layer_idx
        self.kernel_backend = kernel_backend(config)
        self.kernel_block_bytes = kernel_block_bytes(config)
        # sizes as ints: under ZeRO-3 a partitioned parameter's shape is empty
        self.d_model, self.head_dim, self.heads, self.d_state = d, cfg.head_dim, d // cfg.head_dim, cfg.d_state
        self.in_proj = Projection(d, 3 * d, config)  # q, k, v
        self.out_proj = Projection(d, d, config, residual=True)
        self.shift_C = keep_fp32(nn.Parameter(torch.randn(d, cfg.d_state)))  # the shift SSM's kernel taps
        self.D_k = keep_fp32(nn.Parameter(torch.randn(d)))
        self.kernel = S4DKernel(self.heads, cfg.d_state, cfg.dt_min, cfg.dt_max, "lin")
        cap_lr([self.kernel.log_A_real, self.kernel.A_imag, self.kernel.log_dt], cfg.ssm_lr)
        self.D = keep_fp32(nn.Parameter(torch.randn(self.heads)))

    def external_parameters(self) -> list[nn.Parameter]:
        """The kernel's parameters: forward reads them through `kernel.discrete()`, not the kernel's forward."""
        return list(self.kernel.parameters())

    def forward_flops_per_token(self, seq_len: int) -> int:
        """The q/k/v and output projections; the shift filter (an FFT convolution per channel) and its skip; the
        outer products, the diagonal SSM's FFT convolution and skip on d_model * head_dim channels; the products
        with q and their sum. The kernels are built once per batch and left out."""
        d, p = self.d_model, self.head_dim
        fft = fft_conv_flops(seq_len)
        return 2 * 4 * d * d + round(d * (fft + 2) + d * p * (1 + fft + 2) + 2 * d * p)

    def _shift(self, k: torch.Tensor, seq_idx, state, context) -> torch.Tensor:
        """k (batch, d_model, L) -> the shift SSM's output plus its skip."""
        taps = self.shift_C

        def conv(inputs, inputs_seq_idx):
            return fft_causal_conv(inputs, taps[:, :inputs.shape[-1]], seq_idx=inputs_seq_idx)

        return continued_conv(conv, self.d_state, k, seq_idx, state, context) + self.D_k[:, None] * k

    def _heads(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """k', v (batch, d_model, ...) -> kv (batch, head_dim * head_dim * heads, ...): kv[i, j, h] = k'[h, i] v[h, j]."""
        batch, rest = k.shape[0], k.shape[2:]
        k = k.reshape(batch, self.heads, self.head_dim, *rest).transpose(1, 2)  # (batch, i, h, ...)
        v = v.reshape(batch, self.heads, self.head_dim, *rest).transpose(1, 2)  # (batch, j, h, ...)
        return (k[:, :, None] * v[:, None]).reshape(batch, -1, *rest)

    def _read(self, s: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """s (batch, (i, j, h), ...), q (batch, d_model, ...) -> y (batch, d_model, ...): y[h, j] = sum_i q[h, i] s[i, j, h]."""
        batch, rest, p = s.shape[0], s.shape[2:], self.head_dim
        s = s.reshape(batch, p, p, self.heads, *rest)
        q = q.reshape(batch, self.heads, p, *rest).transpose(1, 2)  # (batch, i, h, ...)
        y = (s * q[:, :, None]).sum(1)  # (batch, j, h, ...)
        return y.transpose(1, 2).reshape(batch, -1, *rest)

    def forward(self, hidden: torch.Tensor, state: H3State | None = None, seq_idx: torch.Tensor | None = None,
                context: ContextParallel | None = None) -> torch.Tensor:
        """hidden (batch, L, d_model) -> (batch, L, d_model). With `state`, the sequence continues from it (unless
        fresh: the shift filter's history and the diagonal SSM's state) and it is left ready for the next chunk or
        `step`; seq_idx keeps documents apart; with `context`, the shift filter takes its halo from the previous
        rank and the diagonal SSM's state enters from the earlier ranks (models.context_parallel)."""
        dtype = self.D.dtype
        q, k, v = self.in_proj(hidden).transpose(1, 2).chunk(3, dim=1)  # (batch, d_model, L) each
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
            kv = self._heads(self._shift(k, seq_idx, state, context), v)
            s = diagonal_conv(kv, *self.kernel.discrete(), seq_idx, None if state is None else state.diag, context,
                              groups=self.head_dim ** 2, backend=self.kernel_backend,
                              block_bytes=self.kernel_block_bytes)
            s = s + self.D.repeat(self.head_dim ** 2)[:, None] * kv
            y = self._read(s, q)
        if state is not None:
            state.fresh = False
        return self.out_proj(y.transpose(1, 2).to(hidden.dtype))

    def allocate_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> H3State:
        return H3State(conv=torch.zeros(batch, self.d_model, self.d_state, device=device, dtype=self.D.dtype),
                       diag=allocate_diagonal_state(batch, self.head_dim ** 2 * self.heads, self.kernel.num_modes(),
                                                    device, self.D.dtype))

    def step(self, hidden: torch.Tensor, state: H3State) -> torch.Tensor:
        """One token: hidden (batch, d_model) -> (batch, d_model), updating `state` in place."""
        dtype = self.D.dtype
        q, k, v = self.in_proj(hidden).chunk(3, dim=-1)  # (batch, d_model) each
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
            shifted, state.conv = kernels.causal_conv1d_step(state.conv, k, self.shift_C.flip(-1))
            shifted = shifted + self.D_k * k
            kv = self._heads(shifted, v)
            s = diagonal_step(kv, *self.kernel.discrete(), state.diag, groups=self.head_dim ** 2)
            s = s + self.D.repeat(self.head_dim ** 2) * kv
            y = self._read(s, q)
        state.fresh = False
        return self.out_proj(y.to(hidden.dtype))
