"""Building blocks shared by the mixers and the stack."""
from __future__ import annotations

import torch
import torch.nn as nn


def keep_fp32(param: nn.Parameter) -> nn.Parameter:
    """Mark a parameter that must stay float32 whatever the training precision (see pretrain.engine)."""
    param._ssmforge_fp32 = True
    param._no_weight_decay = True
    return param


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32, returned in the input dtype."""

    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))
        self.weight._no_weight_decay = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)
