"""Gated State Space (GSS) mixer, as in Mehta, Gupta, Cutkosky & Neyshabur, "Long Range Language
Modeling via Gated State Spaces" (2022):

    gate = GELU(W_gate x)                      (batch, L, expand * d_model)
    v    = norm(GELU(W_ssm x))                 (batch, L, H)    H = ssm_dim, narrowed
    y    = DSS(v) = K * v + D v                causal convolution with a length-L kernel per channel
    out  = W_out(W_up(y) * gate)               back to d_model

The SSM runs on the narrow branch; the wide multiplicative gate restores capacity (the paper's point:
the FFT convolution works in a low dimension, so GSS trains faster than DSS). `in_proj` computes the
gate and SSM branches in one matmul.

DSS is the DSS-EXP parameterisation of Gupta, Gu & Berant, "Diagonal State Spaces are as Effective as
Structured State Spaces" (2022): per channel h a diagonal complex system with N = d_state states,
eigenvalues Lambda_n (Re < 0 through Re = -exp(Lambda_re_log), shared by the channels), a learned step
dt_h and output weights C_hn. Zero-order hold with input weights 1 gives the recurrence and the kernel

    x_t = exp(dt Lambda) x_{t-1} + v_t,   y_t = Re(sum_n Ct_n x_t,n) + D v_t,   Ct = C (exp(dt Lambda) - 1) / Lambda
    K_l = Re(sum_n Ct_n exp(dt Lambda_n l)),

so the FFT convolution (training, prefill) and the recurrence (decoding) are the same map.
Initialisation: Lambda_n = -1/2 + i pi n (S4D-Lin, the approximation of the skew-HiPPO spectrum that DSS
starts from), dt log-uniform in [dt_min, dt_max], C complex normal, D = 1. The paper's pseudocode uses the
D skip and normalises the DSS input; both are kept. Its pseudocode (appendix A.2) also drops dt (dt = 1, with
Lambda's imaginary part learnt through exp) and starts Lambda at random; here DSS-EXP keeps the learned
per-channel step and the S4D-Lin start, so dt = 1 is one point of this module's family. The keys are `model.gss.*`
(models.config.GSSConfig).

`model.gss.d_conv` > 0 adds what the paper's GSS lacks, a causal depthwise convolution of that many taps (with a
bias) on the SSM branch before its GELU, v = norm(GELU(conv(W_ssm x))), as Mamba puts one before its SiLU.
Without it the long DSS kernel must learn the previous-token shift that induction heads need, and at laptop scale
it does not (README, "The survey's comparison").
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssmforge import kernels
from ssmforge.kernels.fftconv import fft_conv_flops

from .config import ModelConfig
from .context_parallel import ContextParallel
from .diagonal import (DiagonalState, allocate_diagonal_state, diagonal_conv, diagonal_step, vandermonde_kernel,
                       zoh_weights)
from .layers import (Projection, RMSNorm, cap_lr, depthwise_causal_conv, keep_fp32, kernel_backend,
                     kernel_block_bytes)
from .registry import register_mixer


@dataclass
class GSSState:
    """Decoding cache of one GSS layer: the short conv's last inputs (None without one) and the DSS state."""

    conv: torch.Tensor | None  # (batch, ssm_dim, d_conv), oldest first
    diag: DiagonalState

    @property
    def fresh(self) -> bool:
        """Nothing consumed yet (a forward starts from zeros): the DSS state's flag, which every forward and step
        clears, so the conv (read first) and the DSS always agree."""
        return self.diag.fresh


@register_mixer("gss")
class GSSMixer(nn.Module):
    """The GSS mixer; its shapes come from `config.gss` (models.config.GSSConfig)."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        cfg = config.gss
        self.layer_idx = layer_idx
        self.gate_dim = gate = cfg.expand * config.d_model
        self.ssm_dim = H = cfg.resolved_ssm_dim(config.d_model)
        self.d_state = N = cfg.d_state
        self.d_conv = cfg.d_conv
        self.kernel_backend = kernel_backend(config)
        self.kernel_block_bytes = kernel_block_bytes(config)

        self.in_proj = Projection(config.d_model, gate + H, config)
        # the optional short conv of the SSM branch (model.gss.d_conv; None: the paper's GSS)
        self.conv1d = nn.Conv1d(H, H, cfg.d_conv, groups=H, padding=cfg.d_conv - 1) if cfg.d_conv else None
        self.ssm_norm = RMSNorm(H, config.rms_norm_eps)
        self.up_proj = Projection(H, gate, config)
        self.out_proj = Projection(gate, config.d_model, config, residual=True)
        # DSS-EXP parameters, float32 whatever the training precision (exp of them sets the memory)
        self.Lambda_re_log = keep_fp32(nn.Parameter(torch.full((N,), math.log(0.5))))
        self.Lambda_im = keep_fp32(nn.Parameter(math.pi * torch.arange(N, dtype=torch.float32)))
        log_lo, log_hi = math.log(cfg.dt_min), math.log(cfg.dt_max)
        self.log_dt = keep_fp32(nn.Parameter(torch.rand(H) * (log_hi - log_lo) + log_lo))
        self.C = keep_fp32(nn.Parameter(torch.randn(H, N, 2) * math.sqrt(0.5)))  # (re, im): complex normal
        self.D = keep_fp32(nn.Parameter(torch.ones(H)))
        cap_lr([self.Lambda_re_log, self.Lambda_im, self.log_dt], cfg.ssm_lr)

    def external_parameters(self) -> list[nn.Parameter]:
        """The short conv's weight and bias, read directly by the conv kernel (not through its forward); the DSS
        parameters belong to this module itself."""
        return [] if self.conv1d is None else [self.conv1d.weight, self.conv1d.bias]

    def forward_flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs per token: the projections, the gate product, and per SSM channel the FFT
        convolution (a real FFT of size n = 2L costs about 2.5 n log2 n: one forward transform of the
        input and one inverse, so 10 log2(2L) per token, plus 6 for the complex product of spectra and
        2 for the D skip), and the short conv if any (2 per tap). The kernel itself is built once per batch, not
        per token, and is left out."""
        d_model, gate, H = self.in_proj.in_features, self.gate_dim, self.ssm_dim
        matmuls = d_model * (gate + H) + H * gate + gate * d_model
        return 2 * matmuls + gate + round(H * (fft_conv_flops(seq_len) + 2)) + 2 * H * self.d_conv

    def _discrete(self):
        """(w, dt Lambda), each (H, N) complex: the output weights with the zero-order-hold input factor
        (C (exp(dt Lambda) - 1) / Lambda) and the exponent of the per-step decay exp(dt Lambda)."""
        dt = torch.exp(self.log_dt)  # (H,)
        lam = torch.complex(-torch.exp(self.Lambda_re_log), self.Lambda_im)  # (N,)
        dt_lam = dt[:, None] * lam  # (H, N)
        return zoh_weights(torch.view_as_complex(self.C), lam, dt_lam), dt_lam

    def dss_kernel(self, length: int) -> torch.Tensor:
        """K (H, length): K_l = Re(sum_n Ct_n exp(dt Lambda_n l)) (models.diagonal)."""
        with torch.autocast(device_type=self.C.device.type, enabled=False):
            return vandermonde_kernel(*self._discrete(), length, self.kernel_backend,
                                      block_bytes=self.kernel_block_bytes)

    def _branches(self, hidden: torch.Tensor, short_conv=None):
        """(gate, v): the GELU gate and the normalised SSM-branch input, the branch passed through
        short_conv(branch) -> branch before its GELU when the mixer has the short conv."""
        gate, v = self.in_proj(hidden).split([self.gate_dim, self.ssm_dim], dim=-1)
        if self.conv1d is not None:
            v = short_conv(v)
        return F.gelu(gate), self.ssm_norm(F.gelu(v))

    def _short_conv(self, v: torch.Tensor, seq_idx, state: GSSState | None, context) -> torch.Tensor:
        """The short conv of v (batch, L, H), no activation."""
        return depthwise_causal_conv(self.conv1d, self.kernel_backend, v.transpose(1, 2), seq_idx, state,
                                     context).transpose(1, 2)

    def _output(self, y: torch.Tensor, v: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        y = (y + self.D * v.to(self.D.dtype)).to(gate.dtype)
        return self.out_proj(self.up_proj(y) * gate)

    def forward(self, hidden: torch.Tensor, state: GSSState | None = None,
                seq_idx: torch.Tensor | None = None, context: ContextParallel | None = None) -> torch.Tensor:
        """hidden (batch, L, d_model) -> (batch, L, d_model). seq_idx (batch, L): document index of a packed
        row; the convolution never reaches across a document boundary (kernels.documents). With `state`, the
        sequence continues from it (unless fresh) and it is left holding the DSS state after the last
        position (closed form: x_L = sum_s exp(dt Lambda (L-1-s)) v_s over the last document, plus the
        carried state decayed over L steps when no document starts in the row). With `context`, hidden is
        one chunk of the rows: the earlier chunks' share of the convolution enters as the DSS state
        exchanged in the group (models.context_parallel), and the short conv (if any) takes its halo from the
        previous rank. The DSS arithmetic is models.diagonal's."""
        gate, v = self._branches(hidden, lambda v: self._short_conv(v, seq_idx, state, context))
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            y = diagonal_conv(v.transpose(1, 2), *self._discrete(), seq_idx=seq_idx,
                              state=None if state is None else state.diag, context=context,
                              backend=self.kernel_backend, block_bytes=self.kernel_block_bytes)
        return self._output(y.transpose(1, 2), v, gate)

    def allocate_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> GSSState:
        conv = None if self.conv1d is None else torch.zeros(batch, self.ssm_dim, self.d_conv, device=device,
                                                             dtype=dtype)
        diag = allocate_diagonal_state(batch, self.ssm_dim, self.d_state, device, self.C.dtype)
        return GSSState(conv=conv, diag=diag)

    def step(self, hidden: torch.Tensor, state: GSSState) -> torch.Tensor:
        """One token: hidden (batch, d_model) -> (batch, d_model), advancing `state` (to new tensors)."""

        def short_conv(v):  # (batch, H): the conv inputs shift by one
            out, state.conv = kernels.causal_conv1d_step(state.conv, v, self.conv1d.weight.squeeze(1),
                                                         self.conv1d.bias)
            return out

        gate, v = self._branches(hidden, short_conv)  # (batch, gate), (batch, H)
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            y = diagonal_step(v.to(self.C.dtype), *self._discrete(), state.diag)
        return self._output(y, v, gate)
