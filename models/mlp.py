"""SwiGLU feed-forward mixer (Shazeer 2020, "GLU Variants Improve Transformer"), as in Llama:
down(SiLU(gate(x)) * up(x)). Position-wise, so it has no decoding state."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .layers import Projection
from .registry import register_mixer


@register_mixer("mlp")
class SwiGLU(nn.Module):
    """The MLP mixer; its width comes from `config.mlp` (models.config.MLPConfig)."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        hidden = config.mlp.resolved_hidden(config.d_model)
        self.gate_proj = Projection(config.d_model, hidden, config)
        self.up_proj = Projection(config.d_model, hidden, config)
        self.down_proj = Projection(hidden, config.d_model, config, residual=True)

    def external_parameters(self) -> list[nn.Parameter]:
        return []

    def forward_flops_per_token(self, seq_len: int) -> int:
        return 2 * 3 * self.gate_proj.in_features * self.gate_proj.out_features

    def forward(self, hidden: torch.Tensor, state=None, seq_idx=None, context=None) -> torch.Tensor:
        """hidden (..., d_model) -> (..., d_model); `state` (always None), `seq_idx` and `context` are ignored:
        each position is mixed with nothing but itself."""
        return self.down_proj(F.silu(self.gate_proj(hidden)) * self.up_proj(hidden))

    def allocate_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> None:
        return None

    def step(self, hidden: torch.Tensor, state: None) -> torch.Tensor:
        """One token: hidden (batch, d_model) -> (batch, d_model)."""
        return self.forward(hidden)
