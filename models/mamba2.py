"""Mamba-2 mixer, as in Dao & Gu, "Transformers are SSMs: Generalized Models and Efficient Algorithms
Through Structured State Space Duality" (2024): one in_proj gives the gate z, the conv input xBC and
dt per head; a causal depthwise conv + SiLU over xBC; the SSD scan (a scalar decay A per head, B and C
shared by groups of heads); a gated RMSNorm of y * SiLU(z); out_proj. Parameter names and layouts
match Hugging Face's Mamba2Mixer so that weights move between the two without renaming in the block.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssmforge import kernels

from .config import ModelConfig
from .context_parallel import ContextParallel
from .layers import (Projection, depthwise_causal_conv, dt_bias_init, in_first_document, keep_fp32, kernel_backend,
                     recomputed)
from .registry import register_mixer

A_INIT_RANGE = (1.0, 16.0)  # -A is drawn uniformly from this range per head (the paper's code)


@dataclass
class Mamba2State:
    """Decoding cache of one Mamba-2 layer: O(1) in the sequence length."""

    conv: torch.Tensor  # (batch, conv_dim, d_conv) last conv inputs (x, B, C), oldest first
    ssm: torch.Tensor  # (batch, nheads, headdim, d_state) fp32
    fresh: bool = True  # nothing consumed yet: a forward starts from zeros rather than continuing


class GatedRMSNorm(nn.Module):
    """RMSNorm of y * SiLU(z), normalised over groups of `group_size` channels (one group per B/C group,
    as Mamba-2 does so that a tensor-parallel split of the heads needs no communication). fp32 inside,
    returned in y's dtype."""

    def __init__(self, d: int, group_size: int, eps: float):
        super().__init__()
        self.group_size = group_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))
        self.weight._no_weight_decay = True

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        h = y.float() * F.silu(z.float())
        groups = h.view(*h.shape[:-1], -1, self.group_size)
        groups = groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * groups.view(h.shape).to(y.dtype)


@register_mixer("mamba2")
class Mamba2Mixer(nn.Module):
    """The Mamba-2 block's mixer; its shapes come from `config.mamba2` (models.config.Mamba2Config)."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        cfg = config.mamba2
        self.layer_idx = layer_idx
        self.d_inner = d_inner = cfg.d_inner(config.d_model)
        self.d_state = cfg.d_state
        self.d_conv = cfg.d_conv
        self.headdim = cfg.headdim
        self.nheads = d_inner // self.headdim
        self.ngroups = cfg.ngroups
        self.chunk_size = cfg.chunk_size
        self.conv_dim = d_inner + 2 * self.ngroups * self.d_state
        self.kernel_backend = kernel_backend(config)

        self.in_proj = Projection(config.d_model, d_inner + self.conv_dim + self.nheads, config)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, cfg.d_conv, groups=self.conv_dim,
                                padding=cfg.d_conv - 1, bias=cfg.conv_bias)
        dt_bias = dt_bias_init(self.nheads, cfg.dt_min, cfg.dt_max, cfg.dt_init_floor)
        self.dt_bias = keep_fp32(nn.Parameter(dt_bias))
        A = torch.empty(self.nheads).uniform_(*A_INIT_RANGE)
        self.A_log = keep_fp32(nn.Parameter(torch.log(A)))
        self.D = keep_fp32(nn.Parameter(torch.ones(self.nheads)))
        self.norm = GatedRMSNorm(d_inner, d_inner // self.ngroups, config.rms_norm_eps)
        self.out_proj = Projection(d_inner, config.d_model, config, residual=True)

    def external_parameters(self) -> list[nn.Parameter]:
        """Parameters of child modules that forward reads directly (not through the child's forward):
        ZeRO-3 must gather them together with this module."""
        return [self.conv1d.weight] + ([self.conv1d.bias] if self.conv1d.bias is not None else [])

    def forward_flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs per token: the two projections, the conv, and the four matmuls of the chunked
        SSD (scores C.B over a chunk, those scores times x, the chunk states, the carried states times
        C), with chunks of min(chunk_size, seq_len) steps counted in full. Elementwise work is left out."""
        d_model = self.in_proj.in_features
        chunk = min(self.chunk_size, seq_len)
        matmuls = d_model * self.in_proj.out_features + self.d_inner * d_model
        ssd = chunk * (self.ngroups * self.d_state + self.d_inner) + 2 * self.d_inner * self.d_state
        return 2 * matmuls + 2 * self.conv_dim * self.d_conv + 2 * ssd

    def _split(self, projected: torch.Tensor):
        return projected.split([self.d_inner, self.conv_dim, self.nheads], dim=-1)  # z, xBC, dt

    def _split_conv_out(self, xBC: torch.Tensor):
        """(..., conv_dim) -> x (..., nheads, headdim), B and C (..., ngroups, d_state)."""
        x, B, C = xBC.split([self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        lead = xBC.shape[:-1]
        return (x.reshape(*lead, self.nheads, self.headdim), B.reshape(*lead, self.ngroups, self.d_state),
                C.reshape(*lead, self.ngroups, self.d_state))

    def forward(self, hidden: torch.Tensor, state: Mamba2State | None = None,
                seq_idx: torch.Tensor | None = None, context: ContextParallel | None = None) -> torch.Tensor:
        """hidden (batch, L, d_model) -> (batch, L, d_model). seq_idx (batch, L): document index of a packed
        row; each document starts from a zero state (kernels.documents). With `state`, the sequence
        continues from it (unless fresh) and it is left holding the conv inputs and SSM state after the
        last position, so decoding or the next chunk can continue. With `context`, hidden is one chunk of
        the rows and the conv halo and the entering state come from the group (models.context_parallel)."""
        batch, L, _ = hidden.shape
        z, xBC, dt = self._split(self.in_proj(hidden))
        xBC = xBC.transpose(1, 2)  # (batch, conv_dim, L)
        continuing = state is not None and not state.fresh
        xBC = depthwise_causal_conv(self.conv1d, self.kernel_backend, xBC, seq_idx, state, context, activation="silu")
        x, B, C = self._split_conv_out(xBC.transpose(1, 2))
        A = -torch.exp(self.A_log.float())
        y = kernels.ssd_scan(x, dt, A, B, C, chunk_size=self.chunk_size,
                             D=self.D.float(), dt_bias=self.dt_bias.float(), dt_softplus=True,
                             initial_state=state.ssm if continuing else None, seq_idx=seq_idx,
                             return_final_state=state is not None or context is not None, backend=self.kernel_backend)
        if context is not None:
            y, last_state = y
            y = y + self._entering_state_outputs(last_state, dt, A, C, seq_idx, context).to(y.dtype)
        elif state is not None:
            y, state.ssm = y
            state.fresh = False
        return self.out_proj(self.norm(y.reshape(batch, L, self.d_inner), z))

    def _entering_state_outputs(self, last_state, dt, A, C, seq_idx, context: ContextParallel) -> torch.Tensor:
        """What the state entering this rank's chunk adds, by linearity, to the scan from zeros:
        C_t exp(A_h (dt_1 + .. + dt_t)) h0 (batch, L, nheads, headdim) over the chunk's first document;
        h0 from the group's exchange of (last_state, total decay). One contraction over the state instead of a
        second chunked scan from h0 (benchmarks/context_parallel.py times both)."""
        batch, L, _ = dt.shape
        reach = in_first_document(seq_idx, batch, L, dt.device)
        cum = torch.cumsum(F.softplus(dt.float() + self.dt_bias.float()), dim=1)  # (batch, L, nheads)
        decay = torch.exp(cum * A) * reach[..., None]
        h0 = context.entering_state(last_state, decay[:, -1, :, None, None], L)  # (batch, nheads, headdim, n)
        return recomputed(self._contract, C, h0, decay)

    def _contract(self, C, h0, decay):
        """C (batch, L, ngroups, n), h0 (batch, nheads, headdim, n), decay (batch, L, nheads) -> the entering
        state's outputs (batch, L, nheads, headdim), in fp32 (under recomputed: nothing of size L is kept)."""
        batch, L = C.shape[:2]
        groups, per_group = self.ngroups, self.nheads // self.ngroups
        with torch.autocast(device_type=C.device.type, enabled=False):
            h0 = h0.float().view(batch, groups, per_group, self.headdim, self.d_state)
            y = torch.einsum("blgn,bgrpn,blgr->blgrp", C.float(), h0, decay.float().view(batch, L, groups, per_group))
        return y.reshape(batch, L, self.nheads, self.headdim)

    def allocate_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> Mamba2State:
        return Mamba2State(
            conv=torch.zeros(batch, self.conv_dim, self.d_conv, device=device, dtype=dtype),
            ssm=torch.zeros(batch, self.nheads, self.headdim, self.d_state, device=device, dtype=torch.float32),
        )

    def step(self, hidden: torch.Tensor, state: Mamba2State) -> torch.Tensor:
        """One token: hidden (batch, d_model) -> (batch, d_model), advancing `state` (to new tensors)."""
        z, xBC, dt = self._split(self.in_proj(hidden))
        xBC, state.conv = kernels.causal_conv1d_step(state.conv, xBC, self.conv1d.weight.squeeze(1),
                                                     self.conv1d.bias, activation="silu")
        x, B, C = self._split_conv_out(xBC)
        y, state.ssm = kernels.ssd_state_step(state.ssm, x, dt, -torch.exp(self.A_log.float()), B, C,
                                              D=self.D.float(), dt_bias=self.dt_bias.float(), dt_softplus=True)
        state.fresh = False
        return self.out_proj(self.norm(y.reshape(-1, self.d_inner), z))
