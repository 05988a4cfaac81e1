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
from .layers import (Projection, dt_bias_init, fill_conv_state, in_first_document, keep_fp32, kernel_backend,
                     with_conv_history)
from .registry import register_mixer


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
                seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        """hidden (batch, L, d_model) -> (batch, L, d_model). seq_idx (batch, L): document index of a packed
        row; each document starts from a zero state (kernels.documents). With `state`, the sequence
        continues from it (unless fresh) and it is left holding the conv inputs and SSM state after the
        last position, so decoding or the next chunk can continue."""
        # (batch, d_inner, L) views of the (batch, L, d_inner) halves: the kernels read them in place, and
        # the halves' gradients join into the projection's layout with no transposed copy
        x, z = (half.transpose(1, 2) for half in self.in_proj(hidden).chunk(2, dim=-1))
        continuing = state is not None and not state.fresh
        conv_in, conv_seq_idx = with_conv_history(state.conv, x, seq_idx) if continuing else (x, seq_idx)
        if state is not None:
            fill_conv_state(state.conv, conv_in, conv_seq_idx)
        x = kernels.causal_conv1d(conv_in, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu",
                                  backend=self.kernel_backend, seq_idx=conv_seq_idx)[..., conv_in.shape[-1] - x.shape[-1]:]
        dt, B, C = self._ssm_inputs(x.transpose(1, 2))
        A = -torch.exp(self.A_log.float())
        y = kernels.selective_scan(
            x, dt.transpose(1, 2), A, B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous(),
            D=self.D.float(), z=None if continuing else z, delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True, return_last_state=state is not None, backend=self.kernel_backend, seq_idx=seq_idx,
        )
        if state is not None:
            y, last_state = y
            if continuing:  # the scan started from zeros: add what the carried state contributes
                carried, last_carried = self._carried_state(state.ssm, dt.transpose(1, 2), A, C.transpose(1, 2),
                                                            seq_idx)
                y = ((y.float() + carried) * F.silu(z.float())).to(y.dtype)
                last_state = last_state + last_carried
            state.ssm.copy_(last_state)
            state.fresh = False
        return self.out_proj(y.transpose(1, 2))

    def _carried_state(self, h0, dt, A, C, seq_idx, block: int = 256):
        """What an initial state h0 (batch, d, n) adds, by linearity, to a scan that started from zeros: the
        outputs C_t exp(A (dt_1 + .. + dt_t)) h0 (batch, d, L) over the first document, and the last state's
        share (batch, d, n), zero when a later document starts in the row. dt (batch, d, L) before bias and
        softplus; C (batch, n, L). Computed `block` positions at a time: (batch, d, block, n) at most."""
        batch, d, L = dt.shape
        reach = in_first_document(seq_idx, batch, L, dt.device)
        cum = torch.cumsum(F.softplus(dt.float() + self.dt_proj.bias.float()[:, None]), dim=-1)  # (batch, d, L)
        outs = []
        for t0 in range(0, L, block):
            decay = torch.exp(cum[..., t0:t0 + block, None] * A[:, None, :])  # (batch, d, T, n)
            outs.append(torch.einsum("bdtn,bdn,bnt->bdt", decay, h0, C[..., t0:t0 + block].float()))
        carried = torch.cat(outs, dim=-1) * reach[:, None, :]
        last = torch.exp(cum[..., -1:] * A) * h0 * reach[:, -1, None, None]
        return carried, last

    def allocate_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> MambaState:
        return MambaState(
            conv=torch.zeros(batch, self.d_inner, self.d_conv, device=device, dtype=dtype),
            ssm=torch.zeros(batch, self.d_inner, self.d_state, device=device, dtype=torch.float32),
        )

    def step(self, hidden: torch.Tensor, state: MambaState) -> torch.Tensor:
        """One token: hidden (batch, d_model) -> (batch, d_model), updating `state` in place."""
        x, z = self.in_proj(hidden).chunk(2, dim=-1)  # (batch, d_inner)
        x = kernels.causal_conv1d_update_ref(state.conv, x, self.conv1d.weight.squeeze(1), self.conv1d.bias,
                                             activation="silu")
        dt, B, C = self._ssm_inputs(x)
        y = kernels.selective_state_update_ref(
            state.ssm, x, dt, -torch.exp(self.A_log.float()), B, C, D=self.D.float(), z=z,
            delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
        )
        state.fresh = False
        return self.out_proj(y)
