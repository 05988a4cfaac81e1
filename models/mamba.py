"""Mamba (selective SSM) mixer, as in Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective
State Spaces" (2023): in_proj -> causal depthwise conv + SiLU -> input-dependent (dt, B, C) ->
selective scan gated by SiLU(z) -> out_proj. Parameter names match Hugging Face's MambaMixer so that
weights move between the two without renaming inside the block.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssmforge import kernels

from .config import MambaConfig, ModelConfig
from .context_parallel import ContextParallel
from .layers import (Projection, depthwise_causal_conv, dt_bias_init, in_first_document, keep_fp32, kernel_backend,
                     recomputed)
from .registry import register_mixer


DECAY_FLOOR = -60.0  # exp(-60) = 8.8e-27


def _carried_block(h0, cum, A, C):
    """C_t exp(A cum_t) h0 over a block: (batch, d, T) from h0 (batch, d, n), cum (batch, d, T), C (batch, n, T).
    Exponents are floored at DECAY_FLOOR: the terms it raises stay below 1e-26 of |C h0|, far under fp32's
    resolution of any output, and the decays under it would otherwise be denormal numbers, whose arithmetic
    is several times slower on CPUs."""
    with torch.autocast(device_type=cum.device.type, enabled=False):  # fp32, as the scan's own state
        decay = torch.exp((cum[..., None] * A[:, None, :]).clamp_min(DECAY_FLOOR))  # (batch, d, T, n)
        return torch.einsum("bdtn,bdn,bnt->bdt", decay, h0.float(), C.float())


@dataclass
class MambaState:
    """Decoding cache of one Mamba layer: O(1) in the sequence length."""

    conv: torch.Tensor  # (batch, d_inner, d_conv) last conv inputs, oldest first
    ssm: torch.Tensor  # (batch, d_inner, d_state) fp32
    fresh: bool = True  # nothing consumed yet: a forward starts from zeros rather than continuing


class DtProjection(nn.Linear):
    """dt_rank -> d_inner, Mamba's init in its own constructor (see layers.Projection): weights uniform in
    +-dt_rank^-0.5 * dt_scale, the float32 bias from `dt_bias_init`."""

    def __init__(self, dt_rank: int, d_inner: int, cfg: MambaConfig):
        super().__init__(dt_rank, d_inner, bias=True)
        std = dt_rank ** -0.5 * cfg.dt_scale
        nn.init.uniform_(self.weight, -std, std)
        with torch.no_grad():
            self.bias.copy_(dt_bias_init(d_inner, cfg.dt_min, cfg.dt_max, cfg.dt_init_floor))
        keep_fp32(self.bias)


@register_mixer("mamba")
class MambaMixer(nn.Module):
    """The Mamba block's mixer; its shapes come from `config.mamba` (models.config.MambaConfig)."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        cfg = config.mamba
        self.layer_idx = layer_idx
        self.d_inner = d_inner = cfg.d_inner(config.d_model)
        self.d_state = cfg.d_state
        self.d_conv = cfg.d_conv
        self.dt_rank = dt_rank = cfg.resolved_dt_rank(config.d_model)
        self.kernel_backend = kernel_backend(config)

        self.in_proj = Projection(config.d_model, 2 * d_inner, config)
        self.conv1d = nn.Conv1d(d_inner, d_inner, cfg.d_conv, groups=d_inner, padding=cfg.d_conv - 1,
                                bias=cfg.conv_bias)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * cfg.d_state, bias=False)
        self.dt_proj = DtProjection(dt_rank, d_inner, cfg)
        self.out_proj = Projection(d_inner, config.d_model, config, residual=True)
        # S4D-real initialisation: A = -(1, 2, ..., n) for every channel; stored as log(-A).
        A = torch.arange(1, cfg.d_state + 1, dtype=torch.float32).repeat(d_inner, 1)
        self.A_log = keep_fp32(nn.Parameter(torch.log(A)))
        self.D = keep_fp32(nn.Parameter(torch.ones(d_inner)))


    def external_parameters(self) -> list[nn.Parameter]:
        """Parameters of child modules that forward reads directly (not through the child's forward):
        ZeRO-3 must gather them together with this module."""
        params = [self.conv1d.weight, self.dt_proj.weight, self.dt_proj.bias]
        return params + ([self.conv1d.bias] if self.conv1d.bias is not None else [])

    def forward_flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs per token: the four projections, the conv, and the scan (about 9 per state
        element: discretise A and B, update the state, contract with C)."""
        d, n, r = self.d_inner, self.d_state, self.dt_rank
        d_model = self.in_proj.in_features
        matmuls = d_model * 2 * d + d * (r + 2 * n) + r * d + d * d_model
        return 2 * matmuls + 2 * d * self.d_conv + 9 * d * n

    def _ssm_inputs(self, x: torch.Tensor):
        """x (..., d_inner) after the conv -> dt (..., d_inner) before bias/softplus, B, C (..., d_state)."""
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        return F.linear(dt, self.dt_proj.weight), B, C

    def forward(self, hidden: torch.Tensor, state: MambaState | None = None,
                seq_idx: torch.Tensor | None = None, context: ContextParallel | None = None) -> torch.Tensor:
        """hidden (batch, L, d_model) -> (batch, L, d_model). seq_idx (batch, L): document index of a packed
        row; each document starts from a zero state (kernels.documents). With `state`, the sequence
        continues from it (unless fresh) and it is left holding the conv inputs and SSM state after the
        last position, so decoding or the next chunk can continue. With `context`, hidden is one chunk of
        the rows and the conv halo and the entering state come from the group (models.context_parallel)."""
        # (batch, d_inner, L) views of the (batch, L, d_inner) halves: the kernels read them in place, and
        # the halves' gradients join into the projection's layout with no transposed copy
        x, z = (half.transpose(1, 2) for half in self.in_proj(hidden).chunk(2, dim=-1))
        continuing = state is not None and not state.fresh
        x = depthwise_causal_conv(self.conv1d, self.kernel_backend, x, seq_idx, state, context, activation="silu")
        dt, B, C = self._ssm_inputs(x.transpose(1, 2))
        A = -torch.exp(self.A_log.float())
        y = kernels.selective_scan(
            x, dt.transpose(1, 2), A, B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous(),
            D=self.D.float(), z=z, delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True, return_last_state=state is not None or context is not None,
            backend=self.kernel_backend, seq_idx=seq_idx,
        )
        if state is not None or context is not None:
            y, last_state = y
        if continuing or context is not None:
            # the scan started from zeros: add what the entering state contributes (by linearity, gated like
            # the rest); the large intermediates are recomputed in backward from inputs the scan keeps anyway
            dt, C = dt.transpose(1, 2), C.transpose(1, 2)
            transfer = recomputed(self._transfer, dt, A, seq_idx)  # (batch, d, n)
            h0 = state.ssm if continuing else context.entering_state(last_state, transfer, x.shape[-1])
            y = y + recomputed(self._carried_gated, z, dt, A, C, h0, seq_idx).to(y.dtype)
            last_state = last_state + transfer * h0
        if state is not None:
            state.ssm, state.fresh = last_state, False
        return self.out_proj(y.transpose(1, 2))

    def _cumulative_steps(self, dt, seq_idx):
        """dt (batch, d, L) before bias and softplus -> the summed steps dt_1 + .. + dt_t (batch, d, L) fp32,
        and the positions an entering state reaches (batch, L): those of the row's first document."""
        batch, d, L = dt.shape
        reach = in_first_document(seq_idx, batch, L, dt.device)
        return torch.cumsum(F.softplus(dt.float() + self.dt_proj.bias.float()[:, None]), dim=-1), reach

    def _transfer(self, dt, A, seq_idx):
        """(batch, d, n): what carries a state entering the row to its end, exp(A (dt_1 + .. + dt_L)), zero where
        a document starts in the row."""
        cum, reach = self._cumulative_steps(dt, seq_idx)
        return torch.exp(cum[..., -1:] * A) * reach[:, -1, None, None]

    def _carried_gated(self, z, dt, A, C, h0, seq_idx, block: int = 256):
        """What an entering state h0 (batch, d, n) adds by linearity to the gated outputs (batch, d, L) of a scan
        from zeros: C_t exp(A (dt_1 + .. + dt_t)) h0 over the first document, times SiLU(z). Computed `block`
        positions at a time, each recomputed in backward: (batch, d, block, n) at most, where keeping them
        would hold the state of every position."""
        cum, reach = self._cumulative_steps(dt, seq_idx)
        carried = torch.cat([recomputed(_carried_block, h0, cum[..., t0:t0 + block], A, C[..., t0:t0 + block])
                             for t0 in range(0, cum.shape[-1], block)], dim=-1)
        return carried * reach[:, None, :] * F.silu(z.float())

    def allocate_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> MambaState:
        return MambaState(
            conv=torch.zeros(batch, self.d_inner, self.d_conv, device=device, dtype=dtype),
            ssm=torch.zeros(batch, self.d_inner, self.d_state, device=device, dtype=torch.float32),
        )

    def step(self, hidden: torch.Tensor, state: MambaState) -> torch.Tensor:
        """One token: hidden (batch, d_model) -> (batch, d_model), advancing `state` (to new tensors)."""
        x, z = self.in_proj(hidden).chunk(2, dim=-1)  # (batch, d_inner)
        x, state.conv = kernels.causal_conv1d_step(state.conv, x, self.conv1d.weight.squeeze(1), self.conv1d.bias,
                                                   activation="silu")
        dt, B, C = self._ssm_inputs(x)
        y, state.ssm = kernels.selective_state_step(
            state.ssm, x, dt, -torch.exp(self.A_log.float()), B, C, D=self.D.float(), z=z,
            delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
        )
        state.fresh = False
        return self.out_proj(y)
