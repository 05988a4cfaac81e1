"""S4D mixer, as in Gu, Gupta, Goel & Re, "On the Parameterization and Initialization of Diagonal State Space
Models" (2022): per channel h a diagonal complex SSM with N/2 modes A_n and their conjugates,

    x'(t) = A x(t) + B u(t),   y(t) = 2 Re(C x(t)) + D u(t),   B = 1
    zero-order hold with step dt:  Abar = exp(dt A),  Bbar = (exp(dt A) - 1) / A
    K_l = 2 Re(sum_n C_n Bbar_n Abar_n^l)   (a Vandermonde product, models.diagonal)
    y = K * u + D u,   out = GLU(W GELU(y))   (the S4 block: GELU, linear to 2 d_model, GLU)

Initialisation (the paper's defaults): S4D-Lin A_n = -1/2 + i pi n or S4D-Inv A_n = -1/2 + i N/pi (N/(2n+1) - 1),
with Re(A) kept negative through -exp of a learned log; C complex normal (variance 1 per mode); dt log-uniform in
[dt_min, dt_max]; D normal. A, C, dt and D stay float32 whatever the training precision. Semantics checked
against state-spaces/s4 (`models/s4/s4d.py`, the minimal S4D, and the "diag" kernel of `models/s4/s4.py`).
The decoding state is models.diagonal's (batch, d_model, N/2) complex state. Keys: `model.s4d.*`.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ssmforge.kernels.fftconv import fft_conv_flops

from .config import ModelConfig
from .context_parallel import ContextParallel
from .diagonal import DiagonalState, allocate_diagonal_state, diagonal_conv, diagonal_step, zoh_weights
from .layers import GLUOutput, cap_lr, keep_fp32, kernel_backend, kernel_block_bytes
from .registry import register_mixer

class S4DKernel(nn.Module):
    """The S4D SSM of `channels` channels with N/2 complex modes each: parameters and their discretisation."""

    def __init__(self, channels: int, d_state: int, dt_min: float, dt_max: float, init: str = "lin"):
        super().__init__()
        half = d_state // 2
        n = torch.arange(half, dtype=torch.float32)
        imag = math.pi * n if init == "lin" else d_state / math.pi * (d_state / (2 * n + 1) - 1)
        self.log_A_real = keep_fp32(nn.Parameter(torch.full((channels, half), math.log(0.5))))
        self.A_imag = keep_fp32(nn.Parameter(imag.repeat(channels, 1)))
        self.C = keep_fp32(nn.Parameter(torch.randn(channels, half, 2) * math.sqrt(0.5)))  # (re, im)
        log_lo, log_hi = math.log(dt_min), math.log(dt_max)
        self.log_dt = keep_fp32(nn.Parameter(torch.rand(channels) * (log_hi - log_lo) + log_lo))
        self.modes = half  # sizes as ints: under ZeRO-3 a partitioned parameter's shape is empty

    def discrete(self):
        """(w, dt A), each (channels, N/2) complex: the output weights 2 C Bbar (the factor 2 stands for the
        conjugate modes) and the exponent of the per-step decay Abar = exp(dt A)."""
        A = torch.complex(-torch.exp(self.log_A_real), self.A_imag)
        dt_A = torch.exp(self.log_dt)[:, None] * A
        return zoh_weights(2 * torch.view_as_complex(self.C), A, dt_A), dt_A

    def num_modes(self) -> int:
        return self.modes


class DiagonalSSMBlock(nn.Module):
    """The S4 block over a diagonal SSM `kernel` of d_model channels (a module with `discrete()` -> (w, dt A) and
    `num_modes()`): y = K * u + D u, out = GLU(W GELU(y)). S4D and DSS differ only in the kernel."""

    def __init__(self, config: ModelConfig, layer_idx: int, kernel: nn.Module):
        super().__init__()
        self.layer_idx = layer_idx
        self.channels = config.d_model  # an int: under ZeRO-3 a partitioned parameter's shape is empty
        self.kernel = kernel
        self.kernel_backend = kernel_backend(config)
        self.kernel_block_bytes = kernel_block_bytes(config)
        self.D = keep_fp32(nn.Parameter(torch.randn(config.d_model)))
        self.output = GLUOutput(config.d_model, config)

    def external_parameters(self) -> list[nn.Parameter]:
        """The kernel's parameters: forward reads them through `kernel.discrete()`, not the kernel's forward."""
        return list(self.kernel.parameters())

    def forward_flops_per_token(self, seq_len: int) -> int:
        """The FFT convolution and D skip per channel, and the GLU output; the kernel is built once per batch."""
        d = self.channels
        return round(d * (fft_conv_flops(seq_len) + 2)) + self.output.flops_per_token()

    def ssm(self, u: torch.Tensor, seq_idx=None, state=None, context=None) -> torch.Tensor:
        """u (batch, d_model, L) -> y = K * u + D u (batch, d_model, L) in the parameters' precision."""
        with torch.autocast(device_type=u.device.type, enabled=False):
            u = u.to(self.D.dtype)
            y = diagonal_conv(u, *self.kernel.discrete(), seq_idx, state, context, backend=self.kernel_backend,
                              block_bytes=self.kernel_block_bytes)
            return y + self.D[:, None] * u

    def forward(self, hidden: torch.Tensor, state: DiagonalState | None = None, seq_idx: torch.Tensor | None = None,
                context: ContextParallel | None = None) -> torch.Tensor:
        """hidden (batch, L, d_model) -> (batch, L, d_model); state, seq_idx and context as models.diagonal."""
        y = self.ssm(hidden.transpose(1, 2), seq_idx, state, context).transpose(1, 2)
        return self.output(y.to(hidden.dtype))

    def allocate_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> DiagonalState:
        return allocate_diagonal_state(batch, self.channels, self.kernel.num_modes(), device, self.D.dtype)

    def step(self, hidden: torch.Tensor, state: DiagonalState) -> torch.Tensor:
        """One token: hidden (batch, d_model) -> (batch, d_model), updating `state` in place."""
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            u = hidden.to(self.D.dtype)
            y = diagonal_step(u, *self.kernel.discrete(), state) + self.D * u
        return self.output(y.to(hidden.dtype))


@register_mixer("s4d")
class S4DMixer(DiagonalSSMBlock):
    """The S4D mixer over d_model channels; its shapes come from `config.s4d` (models.config.S4DConfig)."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        cfg = config.s4d
        super().__init__(config, layer_idx, S4DKernel(config.d_model, cfg.d_state, cfg.dt_min, cfg.dt_max, cfg.init))
        cap_lr([self.kernel.log_A_real, self.kernel.A_imag, self.kernel.log_dt], cfg.ssm_lr)
