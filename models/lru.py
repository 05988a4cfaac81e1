"""Linear Recurrent Unit (LRU) mixer, as in Orvieto, Smith, Gu, Fernando, Gulcehre, Pascanu & De,
"Resurrecting Recurrent Neural Networks for Long Sequences" (2023):

    lambda = exp(-exp(nu_log) + i exp(theta_log))              (N,) complex diagonal, |lambda| < 1
    x_t    = lambda * x_{t-1} + exp(gamma_log) * (B u_t)       (N,) complex state, B = B_re + i B_im (N, H)
    y_t    = Re(C x_t) + D * u_t                                (H,), C = C_re + i C_im (H, N)
    out    = GLU(W GELU(y))                                     the S4 block's output (layers.GLUOutput)

with H = d_model and N = d_state (one state shared by the channels: B and C are dense). The exponential
parameterisation keeps |lambda| < 1 for any nu_log and the phase positive; the learned gamma normalises
the state's variance (it starts at sqrt(1 - |lambda|^2)), so eigenvalues near the unit circle do not blow
the state up.

Training runs the recurrence as a PARALLEL SCAN over pairs (a_t, b_t) = (lambda, gamma B u_t) with the
associative operator (a1, b1) o (a2, b2) = (a1 a2, a2 b1 + b2) (`kernels.linear_scan`; `model.kernel_backend`
chooses): on CUDA a fused Triton kernel that scans tiles of positions in registers and carries the state between
them (one pass over a and b), on CPU a C kernel that walks the positions in order (one pass too), and with
model.kernel_backend=ref PyTorch's Hillis-Steele doubling, ceil(log2 L) levels of O(L N) torch ops. Each one's
backward is the same recurrence run backwards in time over conj(a), and keeps only a and the states.
Document resets (seq_idx): a_t = 0 where a document starts, so no state crosses a boundary. An entering
state h0 (a decoding state, or the state gathered from the earlier chunks under context parallelism)
adds lambda^(t+1) h0 to the state at position t of the first document (it is the scan's linear input).
Decoding runs the recurrence one token at a time.

Initialisation (the paper's appendix A, its defaults are the config's): u1, u2 ~ U(0, 1),
nu_log = log(-1/2 log(u1 (r_max^2 - r_min^2) + r_min^2)), so |lambda| is uniform on the ring
r_min <= |lambda| <= r_max in the area sense; theta_log = log(max_phase u2); gamma_log =
log(sqrt(1 - |lambda|^2)); B_re, B_im ~ N(0, 1/(2H)); C_re, C_im ~ N(0, 1/N); D ~ N(0, 1). u1 and u2 are
kept at least 1e-12 (a draw of exactly 0 would give an infinite nu_log or theta_log). All of these are
float32 parameters (keep_fp32) and the SSM arithmetic runs in float32 / complex64 (float64 / complex128
when the model is .double()).

Reference whose SEMANTICS were checked (no code copied): the paper's appendix A pseudocode
(init_lru_parameters, binary_operator_diag, forward with jax.lax.associative_scan) and
NicolasZucchet/minimal-LRU lru/model.py (same initialisation, B_norm = (B_re + i B_im) exp(gamma_log),
y = Re(C x) + D u, then GELU and a GLU). The keys are `model.lru.*` (models.config.LRUConfig).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from ssmforge.kernels import linear_scan, linear_scan_default_backend
from ssmforge.kernels.documents import document_starts

from .config import ModelConfig
from .context_parallel import ContextParallel
from .diagonal import complex_of
from .layers import GLUOutput, in_first_document, keep_fp32, kernel_backend, recomputed, scale_lr
from .registry import register_mixer


@dataclass
class LRUState:
    """Decoding cache of one LRU layer: the complex state, O(1) in the sequence length."""

    ssm: torch.Tensor  # (batch, N) complex64 (complex128 in a float64 model)
    fresh: bool = True  # nothing consumed yet: a forward starts from zeros rather than continuing


@register_mixer("lru")
class LRUMixer(nn.Module):
    """The LRU layer; its shapes come from `config.lru` (models.config.LRUConfig)."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        cfg = config.lru
        self.layer_idx = layer_idx
        self.d_model = H = config.d_model
        self.d_state = N = cfg.d_state

        # ring initialisation, drawn in float64 so that the logs are exact before rounding to float32
        u1 = torch.rand(N, dtype=torch.float64).clamp_min(1e-12)
        u2 = torch.rand(N, dtype=torch.float64).clamp_min(1e-12)
        radius2 = u1 * (cfg.r_max ** 2 - cfg.r_min ** 2) + cfg.r_min ** 2  # |lambda|^2
        nu_log = torch.log(-0.5 * torch.log(radius2)).float()
        theta_log = torch.log(cfg.max_phase * u2).float()
        # 1 - |lambda|^2 = -expm1(-2 nu) from the stored nu_log, exact even when |lambda| rounds to 1
        gamma_log = 0.5 * torch.log(-torch.expm1(-2 * torch.exp(nu_log.double())))
        self.nu_log = keep_fp32(nn.Parameter(nu_log))
        self.theta_log = keep_fp32(nn.Parameter(theta_log))
        self.gamma_log = keep_fp32(nn.Parameter(gamma_log.float()))
        self.B_re = keep_fp32(nn.Parameter(torch.randn(N, H) / math.sqrt(2 * H)))
        self.B_im = keep_fp32(nn.Parameter(torch.randn(N, H) / math.sqrt(2 * H)))
        self.C_re = keep_fp32(nn.Parameter(torch.randn(H, N) / math.sqrt(N)))
        self.C_im = keep_fp32(nn.Parameter(torch.randn(H, N) / math.sqrt(N)))
        self.D = keep_fp32(nn.Parameter(torch.randn(H)))
        scale_lr([self.nu_log, self.theta_log, self.gamma_log, self.B_re, self.B_im], cfg.ssm_lr_factor)
        self.out = GLUOutput(H, config)
        self.kernel_backend = kernel_backend(config)

    def external_parameters(self) -> list[nn.Parameter]:
        """The GLU output is called through its forward and the SSM parameters belong to this module: ZeRO-3
        has nothing extra to gather."""
        return []

    def forward_flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs per token, counting what the code runs: gamma B u as one real matmul H -> 2N (the re
        and im parts), 4 N H; Re(C x) as one real matmul over (re, im) of x, 2N -> H, 4 N H; D u 2 H; the GLU
        output; and the scan, where one composition of pairs is a complex multiply-add for x (8) and a complex
        product for the prefix of a (6), 14 N. PyTorch's scan runs ceil(log2 L) Hillis-Steele levels of at most
        one composition per state (an upper bound: positions t < d are copied); the Triton kernel composes each
        position into its tile's prefix once and applies the carried state (a complex multiply-add, 8 N); the C
        kernel only applies the recurrence, one complex multiply-add per state (8 N).
        Building lambda and gamma B happens once per batch and is left out, as is the entering state's
        lambda^(t+1) h0 (only when a state is carried in)."""
        H, N = self.d_model, self.d_state
        backend = self.kernel_backend or linear_scan_default_backend(self.nu_log.device)
        if backend == "triton":
            scan = 14 * N + 8 * N
        elif backend == "cpu":
            scan = 8 * N
        else:
            scan = 14 * N * max(seq_len - 1, 0).bit_length()  # ceil(log2 L) levels
        return 8 * N * H + scan + 2 * H + self.out.flops_per_token()

    def _ssm(self):
        """(log lambda (N,) complex, the input weights (2N, H) real, the output weights (H, 2N) real). The input
        weights are gamma B with its re and im rows interleaved, so u @ W^T viewed as complex is gamma B u;
        the output weights [C_re, -C_im] interleaved, so (re, im) of x @ W^T is Re(C x)."""
        log_lam = torch.complex(-torch.exp(self.nu_log), torch.exp(self.theta_log))
        gamma = torch.exp(self.gamma_log)[:, None]
        w_in = torch.stack([self.B_re * gamma, self.B_im * gamma], dim=1).flatten(0, 1)
        w_out = torch.stack([self.C_re, -self.C_im], dim=-1).flatten(1, 2)
        return log_lam, w_in, w_out

    @staticmethod
    def _drive(u: torch.Tensor, w_in: torch.Tensor) -> torch.Tensor:
        """gamma B u: u (..., H) real -> (..., N) complex (a view of one real matmul's output)."""
        bu = u @ w_in.T
        return torch.view_as_complex(bu.unflatten(-1, (-1, 2)))

    def _readout(self, x: torch.Tensor, u: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
        """Re(C x) + D u: x (..., N) complex, u (..., H) -> (..., H) real."""
        return torch.view_as_real(x).flatten(-2) @ w_out.T + self.D * u

    def forward(self, hidden: torch.Tensor, state: LRUState | None = None,
                seq_idx: torch.Tensor | None = None, context: ContextParallel | None = None) -> torch.Tensor:
        """hidden (batch, L, d_model) -> (batch, L, d_model). seq_idx (batch, L): document index of a packed
        row; the recurrence restarts from zero at each document start. With `state`, the sequence continues
        from it (unless fresh) over the row's first document and it is left holding the state after the last
        position. With `context`, hidden is one chunk of the rows: the chunk is scanned from zero, the chunk
        summaries (final state, lambda^L or 0 where a document starts in the chunk) are exchanged in the
        group, and the entering state's share is added (models.context_parallel)."""
        batch, L, _ = hidden.shape
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            log_lam, w_in, w_out = self._ssm()
            lam = torch.exp(log_lam)
            u = hidden.to(self.nu_log.dtype)
            bu = self._drive(u, w_in)  # (batch, L, N)
            if seq_idx is None:
                a = lam.expand(1, L, -1)
            else:  # a_t = 0 where a document starts: the state before it is dropped
                a = lam * (~document_starts(seq_idx))[..., None].to(lam.real.dtype)
            x = linear_scan(a, bu, self.kernel_backend)  # (batch, L, N) from a zero state
            h0 = None
            if context is not None:
                # lambda^L, zero in rows where a document starts inside the chunk: (batch, N)
                reaches_end = in_first_document(seq_idx, batch, L, hidden.device)[:, -1:].to(lam.real.dtype)
                transfer = torch.exp(log_lam * L) * reaches_end
                h0 = context.entering_state(x[:, -1], transfer, L)
            elif state is not None and not state.fresh:
                h0 = state.ssm
            if h0 is not None:
                x = x + recomputed(self._carried, log_lam, h0, seq_idx, L)
            y = self._readout(x, u, w_out)
        if state is not None:
            state.ssm, state.fresh = x[:, -1].clone(), False  # a copy: a view would keep all of x alive
        return self.out(y.to(hidden.dtype))

    @staticmethod
    def _carried(log_lam: torch.Tensor, h0: torch.Tensor, seq_idx: torch.Tensor | None, L: int) -> torch.Tensor:
        """What an entering state h0 (batch, N) adds to the states (batch, L, N): lambda^(t+1) h0 over the row's
        first document, zero after (the scan's a_t = 0 at a start cuts it there)."""
        steps = torch.arange(1, L + 1, device=h0.device, dtype=log_lam.real.dtype)
        powers = torch.exp(log_lam[None, :] * steps[:, None])  # lambda^(t+1), (L, N)
        reach = in_first_document(seq_idx, h0.shape[0], L, h0.device).to(log_lam.real.dtype)
        return powers * reach[..., None] * h0[:, None, :]

    def allocate_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> LRUState:
        return LRUState(ssm=torch.zeros(batch, self.d_state, device=device, dtype=complex_of(self.nu_log.dtype)))

    def step(self, hidden: torch.Tensor, state: LRUState) -> torch.Tensor:
        """One token: hidden (batch, d_model) -> (batch, d_model), updating `state` in place."""
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            log_lam, w_in, w_out = self._ssm()
            u = hidden.to(self.nu_log.dtype)
            # a new tensor, not in place, so that gradients can flow through a run of steps
            state.ssm = torch.exp(log_lam) * state.ssm + self._drive(u, w_in)
            y = self._readout(state.ssm, u, w_out)
        state.fresh = False
        return self.out(y.to(hidden.dtype))
