"""Building blocks shared by the mixers and the stack."""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def keep_fp32(param: nn.Parameter) -> nn.Parameter:
    """Mark a parameter that must stay float32 whatever the training precision (see pretrain.engine)."""
    param._ssmforge_fp32 = True
    param._no_weight_decay = True
    return param


def dt_bias_init(n: int, dt_min: float, dt_max: float, floor: float) -> torch.Tensor:
    """n biases b with softplus(b) log-uniform in [dt_min, dt_max], floored at `floor` (Mamba paper,
    section 3.6): the step sizes a selective SSM starts from."""
    dt = torch.exp(torch.rand(n) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))  # the inverse of softplus


def kernel_backend(config) -> str | None:
    """The `backend=` every kernel call of a mixer passes: None lets each kernel pick by device
    (model.kernel_backend auto), else the named backend ("ref", "triton")."""
    return None if config.kernel_backend == "auto" else config.kernel_backend


class Projection(nn.Linear):
    """A mixer's linear projection with the init every mixer shares: bias (config.bias) zeroed and, for the
    projection back into the residual stream, the weights scaled by 1/sqrt(number of blocks) when
    config.rescale_out_proj (GPT-2, mamba_ssm: each block adds to the stream). Done in its own constructor,
    because under DeepSpeed's ZeRO-3 a module's parameters are partitioned as soon as it is built."""

    def __init__(self, in_features: int, out_features: int, config, residual: bool = False):
        super().__init__(in_features, out_features, bias=config.bias)
        with torch.no_grad():
            if residual and config.rescale_out_proj:
                self.weight /= math.sqrt(len(config.layer_kinds))
            if self.bias is not None:
                self.bias.zero_()


def fill_conv_state(conv_state: torch.Tensor, conv_inputs: torch.Tensor) -> None:
    """Leave the last d_conv conv inputs (batch, channels, L) in a decoding cache (batch, channels, d_conv),
    oldest first, zeros in front when L < d_conv: what the next `step` convolves with."""
    tail = conv_inputs[..., -conv_state.shape[-1]:]
    conv_state.zero_()
    conv_state[..., conv_state.shape[-1] - tail.shape[-1]:] = tail


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
