"""S4 mixer, as in Gu, Goel & Re, "Efficiently Modeling Long Sequences with Structured State Spaces" (ICLR 2022):
the S4 block y = GLU(W GELU(K * u + D u)), with per channel h (the d_model = H channels of the residual stream, no
input projection) an N-state linear system x' = A x + B u, y = C x whose state matrix is normal plus low rank.

HiPPO-LegS initialisation (N = d_state). The LegS matrix A_nk = -sqrt(2n+1) sqrt(2k+1) (n > k), -(n + 1)
(n = k), 0 (n < k), B_n = sqrt(2n+1), and the rank-1 P_n = sqrt(n + 1/2) make S = A + P P^T = -I/2 + skew:
normal, so S = V diag(Lambda) V* with V unitary, Lambda_n = -1/2 + i w_n (w from `eigh` of -i times the skew
part, in float64). The eigenvalues come in conjugate pairs; the N/2 modes with w > 0 are kept and the full
system is each half vector concatenated with its conjugate (conjugate_pairs): in the basis V,

    A = diag(Lambda) - p p*,   p = V* P,   B~ = V* B,   C (complex normal, N/2 per channel, as the reference),

and the output of the full, conjugate-symmetric system is real. The phase of each eigenvector is chosen so that
p is real and positive; then B~ = sqrt(2) p is real too (B = sqrt(2) P for LegS), so the reference's clip of
Im B~ at 2 (which depends on the arbitrary phases `eigh` returns) has nothing to clip and is not applied. Every
channel starts from the same HiPPO values; the trainable float32 parameters per channel are Lambda (Re through
-exp(Lambda_re_log), Im free, as the reference's real_transform "exp"), p, B~, C, log_dt (dt log-uniform in
[dt_min, dt_max]) and D (standard normal, as the reference's D).

Discretisation (`model.s4.discretization`):
  bilinear (the paper's): Abar = (I - dt/2 A)^-1 (I + dt/2 A), Bbar = (I - dt/2 A)^-1 dt B, with
    (I - dt/2 A)^-1 written out by Woodbury (O(N^2)); the kernel K_l = C Abar^l Bbar, l < L, comes from the
    truncated generating function at the L-th roots of unity z_k = exp(-2 pi i k / L):
        G(z) = sum_{l<L} K_l z^l = C~ (I - Abar z)^-1 Bbar,   C~ = C (I - Abar^L)
    (the parameter C stays the output matrix that decoding uses; C~ is computed as -C (Abar - I) (I + Abar + ...
    + Abar^(L-1)), the geometric sum by repeated squaring of the dense (H, N, N) Abar, and Abar - I =
    dt (I - dt/2 A)^-1 A, so nothing cancels where Abar^L is close to I). For the bilinear transform
    (I - Abar z)^-1 Bbar = [(1 - z) I - (1 + z) dt/2 A]^-1 dt B, and with A = Lambda - p p* Woodbury gives
        G(z) = dt [k_CB - s k_Cp k_pB / (1 + s k_pp)],   s = (1 + z) dt / 2,
        k_ab(z) = sum_n a_n b_n / ((1 - z) - (1 + z) dt/2 Lambda_n)      (Cauchy sums over all N states),
    a form without the pole at z = -1 of the paper's 2/(1 + z) form. K = irfft of G at the L/2 + 1 nodes.
    The state summaries below come from the same generating function (models.s4_bilinear).
  zoh: Abar = exp(dt A) (matrix exponential), Bbar = A^-1 (Abar - I) B; the kernel by the Krylov powers
    C Abar^l Bbar (doubling: log2 L batched matmuls). No Cauchy trick: G(z) has no Cauchy form for zoh.
Precision: the discretisation (O(H N^2), zoh O(H N^3)) and the bilinear kernel (the Cauchy sums, O(H L N)) run in
float64 and are cast back to the parameters' precision (float32 in training): Abar - I is of the order of dt, and
near z = 1 the Woodbury term cancels the diagonal Cauchy sum by a factor ~|p|^2 / |Lambda| (up to ~N^2 for LegS),
which in float32 leaves gradient errors of 1e-5..1e-4 at the paper's dt (measured; 1e-7..1e-6 this way); so do
bilinear's state summaries, for the same reason. The convolution, zoh's state summaries and decoding run in the
parameters' precision.
The kernel is built once per call and recomputed in backward (it materialises (H, L, N)), then applied by FFT
convolution (kernels.fftconv, exact with document resets).

Decoding state: x (batch, H, N) complex, all N states (each mode and its conjugate), x_t = Abar x_{t-1} +
Bbar u_t, y_t = Re(C x_t) + D u_t with the dense (H, N, N) Abar (O(N^2) per channel and token; (Abar, Bbar)
cached in the state by the first step). A forward with a state, or a chunk under context parallelism, also
computes the chunk's summary: the final state from zero, sum_s Abar^(L-1-s) Bbar u_s over the row's last
document, and the transfer Abar^L (zero where a document starts in the chunk); an entering state h0 adds
Re(C Abar^(t+1) h0) to the outputs of the first document. bilinear computes the final state and the entering
state's response by Cauchy sums at the roots of unity, like its kernel (models.s4_bilinear: on the fused kernel
no (H, N, L) tensor), from C~ = C (I - Abar^L) (shared with the kernel) and B~ = (I - Abar^L) B, computed once a
forward; zoh by the Krylov powers (doubling).
Under context parallelism the ranks exchange only the final states (batch, H, N) and one flag per row (does a
document start in the chunk?): Abar and the chunk length are the same on every rank, so each computes the
transfer Abar^L itself rather than receiving (batch, H, N, N) of it.
Memory: the bilinear kernel's Cauchy sums need a (H, L/2 + 1, N) complex128 resolvent (2.1 GiB at d_model 2048,
L 2048, N 64), except on the fused Triton kernel (kernels.cauchy, the default on CUDA), which never holds it; C~'s
geometric sum keeps log2 L to 2 log2 L (H, N, N) matrix powers for backward (1.6 GiB there); zoh needs the Krylov
powers (H, N, L). The kernel is built a block of channels at a time, each block recomputed in backward on its own
(models.layers.recomputed_by_channels; model.kernel_block_mib, 256 MiB per block by default), as are C~ and B~
(blocks sized by their matrix powers) and the state summaries (with a carried state or under context
parallelism; blocks sized by their per-row spectra, O(batch L) a channel): bilinear's (H, N, L) resolvent on
PyTorch's path (none on the fused kernel) and zoh's Krylov powers (H, N, L).

Reference whose semantics were checked: state-spaces/s4, models/s4/s4.py (SSMKernelDPLR, the "nplr"/"legs"
kernel: nplr(), the Cauchy + Woodbury kernel, _setup_C, _setup_state/step, forward_state). Differences: C is
kept as the true C (the reference stores C~ for a fixed length), the (1 - z) form of the resolvent, the phase
choice above, one SSM per channel (n_ssm = H), one output channel. The keys are `model.s4.*`
(models.config.S4Config). Liquid-S4 (models.liquid_s4) builds on this module.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn as nn

from ssmforge.kernels import cauchy_default_backend
from ssmforge.kernels.fftconv import fft_causal_conv, fft_conv_flops

from .config import ModelConfig
from .context_parallel import ContextParallel
from .diagonal import complex_of
from .layers import (GLUOutput, cap_lr, in_first_document, in_last_document, keep_fp32, kernel_backend,
                     kernel_block_bytes, recomputed_by_channels)
from .registry import register_mixer
from .s4_bilinear import (bilinear_entering_response, bilinear_final_state, bilinear_kernel, half_step_inverse,
                          matrix_power, truncated_input, truncated_output)


def _legs(N: int):
    """HiPPO-LegS in numpy float64 (A, B, P): computed outside torch, so that a model built on fake or meta tensors
    (the planner) still starts from these constants."""
    n = np.arange(N, dtype=np.float64)
    r = np.sqrt(2 * n + 1)
    A = -(r[:, None] * r[None, :]) * (n[:, None] > n[None, :]) - np.diag(n + 1)
    return A, r, np.sqrt(n + 0.5)


def hippo_legs(N: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The HiPPO-LegS (A (N, N), B (N,)) and the rank-1 correction P (N,) making A + P P^T normal, float64."""
    return tuple(torch.tensor(x) for x in _legs(N))


def hippo_legs_nplr(N: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """LegS in normal-plus-low-rank form, float64 / complex128: (Lambda (N/2,), p (N/2,), B~ (N/2,), V (N, N/2))
    with A_legs = Vf diag(Lambdaf) Vf* - P P^T, Vf = [V, conj V], Lambdaf = [Lambda, conj Lambda], p = V* P,
    B~ = V* B: the N/2 modes with Im Lambda > 0, in increasing Im Lambda, eigenvector phases making p > 0."""
    A, B, P = _legs(N)
    S = A + P[:, None] * P[None, :]  # -I/2 + skew-symmetric
    skew = (S - S.T) / 2
    w, V = np.linalg.eigh(skew * -1j)  # Hermitian: skew V = i w V, w ascending
    keep = w > 0
    w, V = w[keep], V[:, keep]
    p = V.conj().T @ P
    phase = np.where(np.abs(p) > 0, p / np.where(np.abs(p) > 0, np.abs(p), 1), 1)
    V = V * phase  # now V* P = |p|, real and positive
    lam = np.diagonal(S).mean() + 1j * w  # -1/2 + i w
    return tuple(torch.tensor(x) for x in (lam, V.conj().T @ P, V.conj().T @ B, V))


def conjugate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(..., N/2) kept modes -> (..., N): the full state's vector, the modes then their conjugates."""
    return torch.cat([x, x.conj()], dim=-1)


def krylov(M: torch.Tensor, b: torch.Tensor, length: int) -> torch.Tensor:
    """The Krylov powers M^l b, l = 0..length-1, as (..., N, length), from M (..., N, N) and b (..., N):
    by doubling, [X, M^(2^k) X], so log2(length) batched matmuls and squarings."""
    X = b[..., None]
    square = M
    while X.shape[-1] < length:
        X = torch.cat([X, square @ X[..., :length - X.shape[-1]]], dim=-1)
        if X.shape[-1] < length:
            square = square @ square
    return X[..., :length]


def zoh_kernel(c: torch.Tensor, Abar: torch.Tensor, Bbar: torch.Tensor, length: int) -> torch.Tensor:
    """K (H, length) = Re(C Abar^l Bbar) from the Krylov powers: c, Bbar (H, N), Abar (H, N, N)."""
    return torch.einsum("hn,hnl->hl", c, krylov(Abar, Bbar, length)).real


def final_state(w: torch.Tensor, last_doc: torch.Tensor, Abar: torch.Tensor, Bbar: torch.Tensor,
                length: int) -> torch.Tensor:
    """zoh's state after the last of `length` positions from a zero start (bilinear's:
    s4_bilinear.bilinear_final_state), sum_s Abar^(L-1-s) Bbar w_s over the positions where last_doc is 1: w and
    last_doc (H, batch, L), Abar (H, N, N), Bbar (H, N) -> (H, batch, N)."""
    inputs = (w * last_doc).flip(-1).to(Bbar.dtype)  # w_{L-1-j} at j
    return torch.einsum("hbl,hnl->hbn", inputs, krylov(Abar, Bbar, length))


def entering_response(h0: torch.Tensor, reach: torch.Tensor, Abar: torch.Tensor, c: torch.Tensor,
                      length: int) -> torch.Tensor:
    """zoh's Re(C Abar^(t+1) h0) (bilinear's: s4_bilinear.bilinear_entering_response) for t < length where reach
    is 1: h0 (H, batch, N), reach (H, batch, L), Abar (H, N, N), c (H, N) -> (H, batch, L); the rows C Abar^j
    as Krylov powers of Abar^T."""
    rows = krylov(Abar.transpose(-1, -2), c, length + 1)[..., 1:]  # (H, N, L): (C Abar^(t+1))_n
    return torch.einsum("hbn,hnl->hbl", h0, rows).real * reach


def carried_by(power: torch.Tensor, reach: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A state x (batch, H, N) carried through a chunk: Abar^L x with power = Abar^L (H, N, N), times reach
    (batch, 1, 1): 0 where a document starts inside the chunk, 1 where x reaches its end."""
    return reach * torch.einsum("hnm,bhm->bhn", power, x)


@dataclass
class S4State:
    """Decoding cache of one S4 layer: the full N-state x (each mode and its conjugate), O(1) in the length."""

    ssm: torch.Tensor  # (batch, H, N) complex
    fresh: bool = True  # nothing consumed yet: a forward starts from zeros rather than continuing
    discrete: tuple | None = None  # (Abar (H, N, N), Bbar (H, N)), computed by the first step, reused by the next


@register_mixer("s4")
class S4Mixer(nn.Module):
    """The S4 block's mixer; its shapes come from `config.s4` (models.config.S4Config), or from the section of
    the subclass's mixer (Liquid-S4)."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        cfg = config.section(self.mixer_name)
        self.layer_idx = layer_idx
        self.d_model = H = config.d_model
        self.d_state = N = cfg.d_state
        self.discretization = cfg.discretization
        self.kernel_backend = kernel_backend(config)
        self.kernel_block_bytes = kernel_block_bytes(config)
        lam, p, b, _ = hippo_legs_nplr(N)

        def per_channel(x):  # every channel starts from the same HiPPO values
            return x.to(torch.float32).expand(H, *x.shape).clone()

        # SSM parameters, float32 whatever the training precision (they set the memory and its stability)
        self.Lambda_re_log = keep_fp32(nn.Parameter(per_channel(torch.log(-lam.real))))  # (H, N/2)
        self.Lambda_im = keep_fp32(nn.Parameter(per_channel(lam.imag)))  # (H, N/2)
        self.P = keep_fp32(nn.Parameter(per_channel(torch.view_as_real(p))))  # (H, N/2, 2): (re, im)
        self.B = keep_fp32(nn.Parameter(per_channel(torch.view_as_real(b))))  # (H, N/2, 2)
        self.C = keep_fp32(nn.Parameter(torch.randn(H, N // 2, 2) * math.sqrt(0.5)))  # complex normal
        log_lo, log_hi = math.log(cfg.dt_min), math.log(cfg.dt_max)
        self.log_dt = keep_fp32(nn.Parameter(torch.rand(H) * (log_hi - log_lo) + log_lo))
        self.D = keep_fp32(nn.Parameter(torch.randn(H)))
        cap_lr([self.Lambda_re_log, self.Lambda_im, self.P, self.B, self.log_dt], cfg.ssm_lr)
        self.output = GLUOutput(H, config)

    def external_parameters(self) -> list[nn.Parameter]:
        """The GLU output is called through its forward and the SSM parameters are this module's own: nothing
        extra for ZeRO-3 to gather."""
        return []

    def forward_flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs per token: per channel the FFT convolution (kernels.fftconv.fft_conv_flops: 10 log2(2L)
        + 6) and the D skip (2), then the GLU output. The kernel (Cauchy sums, Abar^L) is built once per batch,
        not per token, and is left out."""
        return self.output.flops_per_token() + round(self.d_model * (fft_conv_flops(seq_len) + 2))

    # --- the system ------------------------------------------------------------------------------------------

    def system(self):
        """(dt (H,), Lambda, p, B, C each (H, N)): the continuous system over all N states (the kept modes, then
        their conjugates), complex in the parameters' precision; A = diag(Lambda) - p p*."""
        lam = torch.complex(-torch.exp(self.Lambda_re_log), self.Lambda_im)
        p, b, c = (torch.view_as_complex(x) for x in (self.P, self.B, self.C))
        return torch.exp(self.log_dt), *(conjugate_pairs(x) for x in (lam, p, b, c))

    def discrete(self):
        """(Abar (H, N, N), Bbar (H, N)), the discretised system (bilinear or zoh), in the parameters' precision.
        Computed in float64 (an O(H N^2) or, for zoh, O(H N^3) cost once per call): exp of a dense matrix whose
        norm reaches dt N^2 / 2 (the rank-1 part) loses ~1e-4 in float32 (scaling and squaring), and Abar - I is
        of the order of dt, whose relative precision float32 would cut."""
        dt, lam, p, b, _ = self.system()
        working = lam.dtype
        dt, lam, p, b = dt.double(), *(x.to(torch.complex128) for x in (lam, p, b))
        eye = torch.eye(self.d_state, dtype=lam.dtype, device=lam.device)
        if self.discretization == "zoh":
            A = torch.diag_embed(lam) - p[..., :, None] * p.conj()[..., None, :]
            Abar = torch.linalg.matrix_exp(dt[:, None, None] * A)
            Bbar = torch.linalg.solve(A, (Abar - eye) @ b[..., None])[..., 0]
            return Abar.to(working), Bbar.to(working)
        inverse = half_step_inverse(dt, lam, p)
        Abar, Bbar = 2 * inverse - eye, (inverse @ (dt[:, None] * b)[..., None])[..., 0]
        return Abar.to(working), Bbar.to(working)

    def kernel(self, length: int, Abar: torch.Tensor, Bbar: torch.Tensor,
               c_tilde: torch.Tensor | None = None) -> torch.Tensor:
        """K (H, length): K_l = Re(C Abar^l Bbar). It materialises (H, length, N) (Cauchy nodes or Krylov powers;
        not on the fused Cauchy kernel, CUDA's default) and (H, N, N) matrix powers: a block of channels at a time,
        each recomputed in backward rather than kept (recomputed_by_channels). c_tilde: bilinear's C (I - Abar^L)
        at this length where the caller has it (truncated)."""
        dt, lam, p, b, c = self.system()
        if self.discretization == "zoh":
            return recomputed_by_channels(zoh_kernel, length, self.d_state * length * c.element_size(), c, Abar, Bbar,
                                          block_bytes=self.kernel_block_bytes)
        if c_tilde is None:
            c_tilde = self.truncated(truncated_output, length, c)
        # per channel, in float64: the four Cauchy sums, the spectrum and the kernel, and on PyTorch's path the
        # sums' resolvent
        work = 7 * (length // 2 + 1) * 16 + 8 * length + self._resolvent_bytes(length // 2 + 1, dt.device)
        return recomputed_by_channels(partial(bilinear_kernel, backend=self.kernel_backend), length, work, dt,
                                      c_tilde, lam, p, b, block_bytes=self.kernel_block_bytes)

    def truncated(self, function, length: int, vector: torch.Tensor) -> torch.Tensor:
        """bilinear's C~ = C (I - Abar^L) (function truncated_output, vector c) or B~ = (I - Abar^L) B
        (truncated_input, b), (H, N) complex128: the only O(N^3 log L) work of the kernel and the summaries,
        independent of the batch, done once per forward for all of them, a block of channels at a time (the
        geometric sum's (N, N) powers, recomputed in backward)."""
        dt, lam, p, _, _ = self.system()
        # the powers, and Abar rebuilt from the parameters (its Sherman-Morrison terms: four (N, N) more)
        work = self._powers_bytes(length) + 4 * self.d_state ** 2 * 16
        return recomputed_by_channels(function, length, work, dt, lam, p, vector, block_bytes=self.kernel_block_bytes)

    def _powers_bytes(self, length: int) -> int:
        """Per channel, the complex128 (N, N) matrix powers of a geometric sum up to `length`, kept for backward
        (one per bit of the length and one more for each 1 bit)."""
        return self.d_state ** 2 * (length.bit_length() + bin(length).count("1")) * 16

    def _resolvent_bytes(self, nodes: int, device: torch.device) -> int:
        """Per channel, the complex128 (nodes, N) resolvent of Cauchy sums at `nodes` nodes on PyTorch's path (the
        fused kernel holds none)."""
        return self.d_state * nodes * 16 if (self.kernel_backend or cauchy_default_backend(device)) == "ref" else 0

    # --- the sequence map -------------------------------------------------------------------------------------

    def forward(self, hidden: torch.Tensor, state: S4State | None = None, seq_idx: torch.Tensor | None = None,
                context: ContextParallel | None = None) -> torch.Tensor:
        """hidden (batch, L, d_model) -> (batch, L, d_model). seq_idx (batch, L): document index of a packed row
        (no state or kernel tap crosses a boundary). With `state`, the sequence continues from it (unless fresh)
        and it is left holding the state after the last position; with `context`, hidden is one chunk of the
        rows and the earlier chunks enter as the state exchanged in the group (models.context_parallel)."""
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            u = hidden.transpose(1, 2).to(self.log_dt.dtype)  # (batch, H, L)
            y = self.ssm(u, seq_idx, state, context)
        return self.output(y.transpose(1, 2).to(hidden.dtype))

    def ssm(self, u: torch.Tensor, seq_idx: torch.Tensor | None = None, state: S4State | None = None,
            context: ContextParallel | None = None) -> torch.Tensor:
        """The SSM before the GELU: u (batch, H, L) in the parameters' dtype -> y = K * u + D u (batch, H, L)."""
        Abar, Bbar = self.discrete()
        return self.respond(u, Abar, Bbar, seq_idx, state, context) + self.D[:, None] * u

    def respond(self, w: torch.Tensor, Abar: torch.Tensor, Bbar: torch.Tensor, seq_idx: torch.Tensor | None,
                state: S4State | None, context: ContextParallel | None) -> torch.Tensor:
        """Re(C x_t) of the system fed with w (batch, H, L): K * w, plus what the carried or entering state adds;
        leaves `state` (if any) holding x after the last position."""
        L = w.shape[-1]
        c_tilde = None  # bilinear's C~, shared by the kernel and an entering state's response
        if self.discretization == "bilinear":
            c_tilde = self.truncated(truncated_output, L, self.system()[-1])
        y = fft_causal_conv(w, self.kernel(L, Abar, Bbar, c_tilde), seq_idx=seq_idx).to(w.dtype)
        if state is None and context is None:
            return y
        last, power, reach = self._summary(w, seq_idx, Abar, Bbar)
        if context is not None:
            # Abar and the chunk length are the same on every rank, so each computes Abar^L itself: only the
            # per-row flags (whether a document starts inside the chunk) travel with the final states
            h0 = context.entering_state(last, reach, L, carry=lambda flags, x: carried_by(power, flags, x))
        else:
            h0 = None if state.fresh else state.ssm
        if h0 is not None:
            y = y + self._carried(h0, seq_idx, Abar, L, c_tilde)
            last = last + carried_by(power, reach, h0)
        if state is not None:
            state.ssm, state.fresh = last, False
        return y

    def _summary(self, w, seq_idx, Abar, Bbar):
        """The state after the last position from a zero start (batch, H, N): sum_s Abar^(L-1-s) Bbar w_s over
        the row's last document; Abar^L (H, N, N), which carries an entering state to the end; and reach
        (batch, 1, 1): 0 where a document starts in the row, so that no entering state reaches the end. A block of
        channels at a time, recomputed in backward: bilinear's Cauchy sums over the L nodes (a (L, N) resolvent
        per channel on PyTorch's path, none on the fused kernel), zoh's (N, L) Krylov powers."""
        batch, H, L = w.shape
        last_doc = in_last_document(seq_idx, batch, L, w.device).to(w.dtype).expand(H, batch, L)
        if self.discretization == "zoh":
            last = recomputed_by_channels(final_state, L, self.d_state * L * Bbar.element_size(), w.transpose(0, 1),
                                          last_doc, Abar, Bbar, block_bytes=self.kernel_block_bytes)
        else:
            dt, lam, p, b, _ = self.system()
            b_tilde = self.truncated(truncated_input, L, b)
            # complex128 at the L/2 + 1 nodes: the Woodbury factor's sums (3), and per row the spectrum and its
            # copies (4); per row the reversed inputs in float64 (2); PyTorch's path: two resolvents
            nodes = L // 2 + 1
            work = 16 * nodes * (4 * batch + 3) + 16 * L * batch + 2 * self._resolvent_bytes(nodes, w.device)
            last = recomputed_by_channels(partial(bilinear_final_state, backend=self.kernel_backend), L, work,
                                          w.transpose(0, 1), last_doc, dt, b_tilde, lam, p,
                                          block_bytes=self.kernel_block_bytes)
        reach = in_first_document(seq_idx, batch, L, w.device)[:, -1]
        squarings = self.d_state ** 2 * L.bit_length() * Abar.element_size()  # per channel
        power = recomputed_by_channels(matrix_power, L, squarings, Abar, block_bytes=self.kernel_block_bytes)
        return last.transpose(0, 1), power, reach[:, None, None].to(w.dtype)

    def _carried(self, h0, seq_idx, Abar, L: int, c_tilde):
        """What an entering state h0 (batch, H, N) adds to the outputs (batch, H, L) over the first document:
        bilinear's by Cauchy sums at the nodes, zoh's by the (N, L) Krylov powers of Abar^T."""
        dt, lam, p, _, c = self.system()
        batch, H, _ = h0.shape
        reach = in_first_document(seq_idx, batch, L, h0.device).to(c.real.dtype).expand(H, batch, L)
        if self.discretization == "zoh":
            return recomputed_by_channels(entering_response, L, self.d_state * (L + 1) * c.element_size(),
                                          h0.transpose(0, 1), reach, Abar, c,
                                          block_bytes=self.kernel_block_bytes).transpose(0, 1)
        # complex128 at the L/2 + 1 nodes: the Cauchy sums (two per row, two more) and the Woodbury terms (three per
        # row); per row the response in float64 (2); PyTorch's path: the resolvent
        nodes = L // 2 + 1
        work = 16 * nodes * (5 * batch + 2) + 16 * L * batch + self._resolvent_bytes(nodes, h0.device)
        return recomputed_by_channels(partial(bilinear_entering_response, backend=self.kernel_backend), L, work,
                                      h0.transpose(0, 1), reach, dt, c_tilde, lam, p,
                                      block_bytes=self.kernel_block_bytes).transpose(0, 1)

    # --- decoding -------------------------------------------------------------------------------------------

    def allocate_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> S4State:
        return S4State(ssm=torch.zeros(batch, self.d_model, self.d_state, device=device,
                                       dtype=complex_of(self.log_dt.dtype)))

    def step_discrete(self, state: S4State):
        """(Abar, Bbar), cached in the state by the first step (decoding holds the parameters fixed)."""
        if state.discrete is None:
            state.discrete = self.discrete()
        return state.discrete

    def advance(self, w: torch.Tensor, state: S4State) -> torch.Tensor:
        """One step of the system fed with w (batch, H): x = Abar x + Bbar w, returns Re(C x) (batch, H)."""
        Abar, Bbar = self.step_discrete(state)
        # a new tensor, not in place, so that gradients can flow through a run of steps
        state.ssm = torch.einsum("hnm,bhm->bhn", Abar, state.ssm) + Bbar * w[..., None].to(Bbar.dtype)
        state.fresh = False
        return torch.einsum("hn,bhn->bh", self.system()[-1], state.ssm).real

    def step(self, hidden: torch.Tensor, state: S4State) -> torch.Tensor:
        """One token: hidden (batch, d_model) -> (batch, d_model), updating `state` in place."""
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            y = self.step_ssm(hidden.to(self.log_dt.dtype), state)
        return self.output(y.to(hidden.dtype))

    def step_ssm(self, u: torch.Tensor, state: S4State) -> torch.Tensor:
        """The SSM before the GELU for one position: u (batch, H) -> (batch, H)."""
        return self.advance(u, state) + self.D * u
