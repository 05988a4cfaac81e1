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
D skip and normalises the DSS input; both are kept. The keys are `model.gss.*` (models.config.GSSConfig).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssmforge.kernels.fftconv import fft_causal_conv

from .config import ModelConfig
from .context_parallel import ContextParallel
from .layers import Projection, RMSNorm, in_first_document, keep_fp32, recomputed
from .registry import register_mixer


@dataclass
class GSSState:
    """Decoding cache of one GSS layer: the DSS state, O(1) in the sequence length."""

    ssm: torch.Tensor  # (batch, H, N) complex64
    fresh: bool = True  # nothing consumed yet: a forward starts from zeros rather than continuing


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

        self.in_proj = Projection(config.d_model, gate + H, config)
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

    def external_parameters(self) -> list[nn.Parameter]:
        """Every child module is called through its forward, so ZeRO-3 has nothing extra to gather
        (the DSS parameters belong to this module itself)."""
        return []

    def forward_flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs per token: the projections, the gate product, and per SSM channel the FFT
        convolution (a real FFT of size n = 2L costs about 2.5 n log2 n: one forward transform of the
        input and one inverse, so 10 log2(2L) per token, plus 6 for the complex product of spectra and
        2 for the D skip). The kernel itself is built once per batch, not per token, and is left out."""
        d_model, gate, H = self.in_proj.in_features, self.gate_dim, self.ssm_dim
        matmuls = d_model * (gate + H) + H * gate + gate * d_model
        fft = 10 * math.log2(2 * max(seq_len, 1)) + 6 + 2
        return 2 * matmuls + gate + round(H * fft)

    def _discrete(self):
        """(z, Ct, dt Lambda), each (H, N) complex64: the per-step decay exp(dt Lambda) and the output
        weights with the zero-order-hold input factor."""
        dt = torch.exp(self.log_dt.float())  # (H,)
        lam = torch.complex(-torch.exp(self.Lambda_re_log.float()), self.Lambda_im.float())  # (N,)
        dt_lam = dt[:, None] * lam  # (H, N)
        z = torch.exp(dt_lam)
        return z, torch.view_as_complex(self.C.float()) * (z - 1) / lam, dt_lam

    def dss_kernel(self, length: int) -> torch.Tensor:
        """K (H, length) float32: K_l = Re(sum_n Ct_n exp(dt Lambda_n l)). Built from (H, N, length)
        powers; under autograd they are recomputed in backward rather than kept (N times the size of K)."""
        return recomputed(self._kernel, length)

    def _kernel(self, length: int) -> torch.Tensor:
        with torch.autocast(device_type=self.C.device.type, enabled=False):
            _, Ct, dt_lam = self._discrete()
            return torch.einsum("hn,hnl->hl", Ct, self._powers(dt_lam, length)).real

    @staticmethod
    def _powers(dt_lam: torch.Tensor, length: int) -> torch.Tensor:
        """exp(dt Lambda l) for l = 0..length-1, (H, N, length) complex64."""
        steps = torch.arange(length, device=dt_lam.device, dtype=torch.float32)
        return torch.exp(dt_lam[..., None] * steps)

    def _branches(self, hidden: torch.Tensor):
        gate, v = F.gelu(self.in_proj(hidden)).split([self.gate_dim, self.ssm_dim], dim=-1)
        return gate, self.ssm_norm(v)

    def _output(self, y: torch.Tensor, v: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        y = (y + self.D.float() * v.float()).to(gate.dtype)
        return self.out_proj(self.up_proj(y) * gate)

    def forward(self, hidden: torch.Tensor, state: GSSState | None = None,
                seq_idx: torch.Tensor | None = None, context: ContextParallel | None = None) -> torch.Tensor:
        """hidden (batch, L, d_model) -> (batch, L, d_model). seq_idx (batch, L): document index of a packed
        row; the convolution never reaches across a document boundary (kernels.documents). With `state`, the
        sequence continues from it (unless fresh) and it is left holding the DSS state after the last
        position (closed form: x_L = sum_s exp(dt Lambda (L-1-s)) v_s over the last document, plus the
        carried state decayed over L steps when no document starts in the row). With `context`, hidden is
        one chunk of the rows: the earlier chunks' share of the convolution enters as the DSS state
        exchanged in the group (models.context_parallel)."""
        gate, v = self._branches(hidden)  # (batch, L, gate), (batch, L, H)
        batch, L = hidden.shape[:2]
        v_t = v.transpose(1, 2)  # (batch, H, L)
        y = fft_causal_conv(v_t, self.dss_kernel(L), seq_idx=seq_idx)  # (batch, H, L) float32
        if state is not None or context is not None:
            with torch.autocast(device_type=hidden.device.type, enabled=False):
                last, transfer = recomputed(self._summary, v_t, seq_idx)
                h0 = context.entering_state(last, transfer, L) if context is not None else (
                    None if state.fresh else state.ssm)
                if h0 is not None:
                    y = y + recomputed(self._carried, h0, seq_idx, L)
                    last = last + transfer * h0
            if state is not None:
                state.ssm, state.fresh = last, False
        return self._output(y.transpose(1, 2), v, gate)

    def _summary(self, v_t, seq_idx):
        """The DSS state after the last position from a zero start (batch, H, N): the inputs of the row's last
        document, each decayed to the end; and the transfer (batch, H, N) that carries an entering state to
        the end (exp(dt Lambda L), zero where a document starts in the row)."""
        batch, _, L = v_t.shape
        _, _, dt_lam = self._discrete()
        powers = self._powers(dt_lam, L + 1)  # exp(dt Lambda l), l = 0..L: (H, N, L + 1)
        last_doc = torch.ones(batch, L, device=v_t.device) if seq_idx is None else (seq_idx == seq_idx[:, -1:]).float()
        inputs = (v_t.float() * last_doc[:, None]).to(powers.dtype)
        last = torch.einsum("bhl,hnl->bhn", inputs, powers[..., :L].flip(-1))
        reach = in_first_document(seq_idx, batch, L, v_t.device)
        return last, powers[..., L] * reach[:, -1, None, None]

    def _carried(self, h0, seq_idx, L: int):
        """What an entering state h0 (batch, H, N) adds to the outputs (batch, H, L) over the first document:
        Re(sum_n Ct_n exp(dt Lambda_n (t + 1)) h0_n)."""
        _, Ct, dt_lam = self._discrete()
        powers = self._powers(dt_lam, L + 1)[..., 1:]  # exp(dt Lambda (t + 1)), t = 0..L-1
        reach = in_first_document(seq_idx, h0.shape[0], L, h0.device)
        return torch.einsum("bhn,hnl->bhl", h0 * Ct, powers).real * reach[:, None, :]

    def allocate_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> GSSState:
        return GSSState(ssm=torch.zeros(batch, self.ssm_dim, self.d_state, device=device, dtype=torch.complex64))

    def step(self, hidden: torch.Tensor, state: GSSState) -> torch.Tensor:
        """One token: hidden (batch, d_model) -> (batch, d_model), updating `state` in place."""
        gate, v = self._branches(hidden)  # (batch, gate), (batch, H)
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            z, Ct, _ = self._discrete()
            # a new tensor, not in place, so that gradients can flow through a run of steps
            state.ssm = z * state.ssm + v.float()[..., None]
            y = (state.ssm * Ct).sum(-1).real
        state.fresh = False
        return self._output(y, v, gate)
