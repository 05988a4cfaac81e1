"""DSS mixer, as in Gupta, Gu & Berant, "Diagonal State Spaces are as Effective as Structured State Spaces" (2022):
per channel h a diagonal complex SSM with N modes Lambda_n, a step dt and complex weights W_n, whose kernel is

    DSS-EXP:      K_l = Re(sum_n W_n (exp(dt Lambda_n) - 1) / Lambda_n exp(dt Lambda_n l)),  Re(Lambda) = -exp(.) < 0
    DSS-softmax:  K_l = Re(sum_n W_n / Lambda_n exp(dt Lambda_n l) / sum_{j < L} exp(dt Lambda_n j)),  Re(Lambda) free

(the softmax variant normalises each mode over a kernel length L, here the fixed `model.dss.softmax_length`, so the
kernel, and decoding, do not depend on the input's length). Both are diagonal systems x_t = exp(dt Lambda) x_{t-1}
+ u_t, y_t = Re(sum_n w_n x_t,n) with the weights above (models.diagonal), applied by FFT convolution in training
and by the recurrence in decoding; then y + D u, GELU and a GLU output projection, the S4 block the paper's
experiments use. GSS (models.gss) runs DSS-EXP inside a gated block.

Initialisation (the paper's): Lambda_n = -1/2 + i w_n, the eigenvalues of the skew-HiPPO matrix (the normal part
of HiPPO-LegS of size 2N, the N with w > 0: models.s4.hippo_legs_nplr), W complex normal, dt log-uniform in
[dt_min, dt_max], D normal; these stay float32 whatever the training precision. Lambda is per channel here (the
reference shares one Lambda between the channels). DSS-softmax takes the paper's regularised reciprocal
conj(S) / (|S|^2 + 1e-7) of the normaliser S (a complex sum can vanish). Its Re(Lambda) is free as in the paper,
but Re(dt Lambda) is capped at 60 / softmax_length: the weights carry exp(-dt Lambda (L - 1)) and the powers
exp(dt Lambda l), which beyond that cap under- and overflow float32 (0 times inf); a growing mode then decodes
up to about 1.4 softmax_length positions before its powers overflow. Semantics checked
against the paper's Proposition 1 and the DSS chapter of srush/annotated-s4 (`s4/dss.py`: dss_kernel, dss_ssm).
Keys: `model.dss.*`.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .config import ModelConfig
from .diagonal import zoh_weights
from .layers import cap_lr, keep_fp32
from .registry import register_mixer
from .s4 import hippo_legs_nplr
from .s4d import DiagonalSSMBlock

SOFTMAX_EPS = 1e-7  # the DSS paper's regularised reciprocal: softmax over C can have a vanishing denominator
SOFTMAX_MAX_EXPONENT = 60.0  # largest Re(dt Lambda) softmax_length: exp(+-60) stays inside float32's range


class DSSKernel(nn.Module):
    """The DSS SSM of `channels` channels with N complex modes each, DSS-EXP or DSS-softmax."""

    def __init__(self, channels: int, d_state: int, dt_min: float, dt_max: float, variant: str, softmax_length: int):
        super().__init__()
        self.variant, self.softmax_length = variant, softmax_length
        self.modes = d_state  # an int: under ZeRO-3 a partitioned parameter's shape is empty
        re = math.log(0.5) if variant == "exp" else -0.5  # exp: the log of -Re(Lambda)
        self.Lambda_re = keep_fp32(nn.Parameter(torch.full((channels, d_state), re)))
        skew_hippo = hippo_legs_nplr(2 * d_state)[0].imag.to(torch.float32)  # (N,) ascending
        self.Lambda_im = keep_fp32(nn.Parameter(skew_hippo.repeat(channels, 1)))
        self.W = keep_fp32(nn.Parameter(torch.randn(channels, d_state, 2) * math.sqrt(0.5)))  # (re, im)
        log_lo, log_hi = math.log(dt_min), math.log(dt_max)
        self.log_dt = keep_fp32(nn.Parameter(torch.rand(channels) * (log_hi - log_lo) + log_lo))

    def discrete(self):
        """(w, dt Lambda), each (channels, N) complex: the output weights of the variant and the exponent of the
        per-step decay."""
        dt = torch.exp(self.log_dt)[:, None]
        re = -torch.exp(self.Lambda_re) if self.variant == "exp" else torch.minimum(
            self.Lambda_re, SOFTMAX_MAX_EXPONENT / self.softmax_length / dt)
        lam = torch.complex(re, self.Lambda_im)
        dt_lam = dt * lam
        W = torch.view_as_complex(self.W)
        if self.variant == "exp":
            return zoh_weights(W, lam, dt_lam), dt_lam
        normaliser = torch.expm1(dt_lam * self.softmax_length) / torch.expm1(dt_lam)  # sum_{j < L} exp(dt Lambda j)
        reciprocal = normaliser.conj() / (normaliser.abs() ** 2 + SOFTMAX_EPS)
        return W / lam * reciprocal, dt_lam

    def num_modes(self) -> int:
        return self.modes


@register_mixer("dss")
class DSSMixer(DiagonalSSMBlock):
    """The DSS mixer over d_model channels; its shapes come from `config.dss` (models.config.DSSConfig)."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        cfg = config.dss
        kernel = DSSKernel(config.d_model, cfg.d_state, cfg.dt_min, cfg.dt_max, cfg.variant, cfg.softmax_length)
        super().__init__(config, layer_idx, kernel)
        cap_lr([kernel.Lambda_re, kernel.Lambda_im, kernel.log_dt], cfg.ssm_lr)
