"""DSS mixer, as in Gupta, Gu & Berant, "Diagonal State Spaces are as Effective as Structured State Spaces" (2022):
per channel h a diagonal complex SSM with N modes Lambda_n, a step dt and complex weights W_n, whose kernel is

    DSS-EXP:      K_l = Re(sum_n W_n (exp(dt Lambda_n) - 1) / Lambda_n exp(dt Lambda_n l)),  Re(Lambda) = -exp(.) < 0
    DSS-softmax:  K_l = Re(sum_n W_n / Lambda_n exp(dt Lambda_n l) / sum_{j < L} exp(dt Lambda_n j)),  Re(Lambda) free

(the softmax variant normalises each mode over a kernel length L, here the fixed `model.dss.softmax_length`, so the
kernel, and decoding, do not depend on the input's length). Both are diagonal systems x_t = exp(dt Lambda) x_{t-1}
+ u_t, y_t = Re(sum_n w_n x_t,n) with the weights above (models.diagonal), applied by FFT convolution in training
and by the recurrence in decoding; then y + D u, GELU and a GLU output projection, the S4 block the paper's
experiments use. GSS (models.gss) runs DSS-EXP inside a gated block.

Initialisation (the paper's): Lambda_n = -1/2 + i pi n (the skew-HiPPO approximation DSS starts from), W complex
normal, dt log-uniform in [dt_min, dt_max], D normal; these stay float32 whatever the training precision. DSS-softmax
takes the paper's regularised reciprocal conj(S) / (|S|^2 + 1e-7) of the normaliser S (a complex sum can vanish);
a mode whose real part training makes positive grows in decoding as the paper's kernel does, and its powers
overflow float32 once Re(dt Lambda) L passes about 88. Semantics checked against the paper's Proposition 1 and
the DSS chapter of srush/annotated-s4 (`s4/dss.py`: dss_kernel, dss_ssm).
Keys: `model.dss.*`.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .config import ModelConfig
from .diagonal import zoh_weights
from .layers import keep_fp32
from .registry import register_mixer
from .s4d import DiagonalSSMBlock

SOFTMAX_EPS = 1e-7  # the DSS paper's regularised reciprocal: softmax over C can have a vanishing denominator


class DSSKernel(nn.Module):
    """The DSS SSM of `channels` channels with N complex modes each, DSS-EXP or DSS-softmax."""

    def __init__(self, channels: int, d_state: int, dt_min: float, dt_max: float, variant: str, softmax_length: int):
        super().__init__()
        self.variant, self.softmax_length = variant, softmax_length
        re = math.log(0.5) if variant == "exp" else -0.5  # exp: the log of -Re(Lambda)
        self.Lambda_re = keep_fp32(nn.Parameter(torch.full((channels, d_state), re)))
        self.Lambda_im = keep_fp32(nn.Parameter(math.pi * torch.arange(d_state, dtype=torch.float32).repeat(channels, 1)))
        self.W = keep_fp32(nn.Parameter(torch.randn(channels, d_state, 2) * math.sqrt(0.5)))  # (re, im)
        log_lo, log_hi = math.log(dt_min), math.log(dt_max)
        self.log_dt = keep_fp32(nn.Parameter(torch.rand(channels) * (log_hi - log_lo) + log_lo))

    def discrete(self):
        """(w, dt Lambda), each (channels, N) complex: the output weights of the variant and the exponent of the
        per-step decay."""
        re = -torch.exp(self.Lambda_re) if self.variant == "exp" else self.Lambda_re
        lam = torch.complex(re, self.Lambda_im)
        dt_lam = torch.exp(self.log_dt)[:, None] * lam
        W = torch.view_as_complex(self.W)
        if self.variant == "exp":
            return zoh_weights(W, lam, dt_lam), dt_lam
        normaliser = torch.expm1(dt_lam * self.softmax_length) / torch.expm1(dt_lam)  # sum_{j < L} exp(dt Lambda j)
        reciprocal = normaliser.conj() / (normaliser.abs() ** 2 + SOFTMAX_EPS)
        return W / lam * reciprocal, dt_lam

    def num_modes(self) -> int:
        return self.Lambda_im.shape[1]


@register_mixer("dss")
class DSSMixer(DiagonalSSMBlock):
    """The DSS mixer over d_model channels; its shapes come from `config.dss` (models.config.DSSConfig)."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        cfg = config.dss
        kernel = DSSKernel(config.d_model, cfg.d_state, cfg.dt_min, cfg.dt_max, cfg.variant, cfg.softmax_length)
        super().__init__(config, layer_idx, kernel)
