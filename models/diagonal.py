"""Diagonal complex state space systems: the SSM core of S4D, DSS, GSS and H3's second SSM.

Per channel h, N complex modes with the discrete decay z_hn = exp(dt_lam_hn) and output weights w_hn (the
discretised input and output matrices folded together, so the state takes the input with weight 1):

    x_t,n = z_n x_{t-1},n + u_t,      y_t = Re(sum_n w_n x_t,n)

whose impulse response is the Vandermonde product K_l = Re(sum_n w_n z_n^l) (kernels.vandermonde: a fused Triton
kernel on CUDA, `model.kernel_backend` choosing). Training and prefill apply K by FFT convolution (kernels.fftconv,
exact with document resets); decoding runs the recurrence. A state carried in (decoding, chunked scoring) or
entering from earlier ranks (context parallelism) adds Re(sum_n w_n z_n^(t+1) h0_n) over the first document, and
the state after the last position is a closed form over the last document.
Channels may share their parameters in `groups` (H3's head_dim^2 products of a head share its SSM): the powers of
z, the costly part, are then built once per distinct channel, the groups folded into the batch.
Arithmetic runs in the parameters' precision (float32, or float64 in tests) whatever the autocast.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ssmforge.kernels import vandermonde, vandermonde_default_backend, vandermonde_summary
from ssmforge.kernels.fftconv import fft_causal_conv
from ssmforge.kernels.ref import mode_powers

from .context_parallel import ContextParallel
from .layers import in_first_document, in_last_document, recomputed_by_channels


@dataclass
class DiagonalState:
    """Decoding cache of one diagonal SSM: its state, O(1) in the sequence length."""

    ssm: torch.Tensor  # (batch, H, N) complex
    fresh: bool = True  # nothing consumed yet: a forward starts from zeros rather than continuing


def allocate_diagonal_state(batch: int, channels: int, modes: int, device, real_dtype: torch.dtype) -> DiagonalState:
    return DiagonalState(ssm=torch.zeros(batch, channels, modes, device=device, dtype=complex_of(real_dtype)))


def complex_of(real_dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if real_dtype == torch.float64 else torch.complex64


def zoh_weights(C: torch.Tensor, A: torch.Tensor, dt_A: torch.Tensor) -> torch.Tensor:
    """Output weights w = C Bbar of a diagonal system with input weight 1 under zero-order hold with step dt:
    Bbar = (exp(dt A) - 1) / A. C, A, dt_A complex, broadcastable."""
    return C * torch.expm1(dt_A) / A


def tiled(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(heads, ...) per-channel parameters or kernels -> (groups * heads, ...): channel c uses row c mod heads."""
    return x if groups == 1 else x.repeat(groups, *[1] * (x.dim() - 1))


def grouped(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(batch, groups * heads, ...) -> (heads, groups, batch, ...), a view: the distinct channels first (the axis
    recomputed_by_channels blocks over), the channels that share their parameters beside the batch."""
    batch, H, rest = x.shape[0], x.shape[1], x.shape[2:]
    return x.reshape(batch, groups, H // groups, *rest).permute(2, 1, 0, *range(3, 3 + len(rest)))


def ungrouped(x: torch.Tensor) -> torch.Tensor:
    """The inverse of `grouped`: (heads, groups, batch, ...) -> (batch, groups * heads, ...)."""
    heads, groups, batch, rest = *x.shape[:3], x.shape[3:]
    return x.permute(2, 1, 0, *range(3, 3 + len(rest))).reshape(batch, groups * heads, *rest)


def over_powers(function, length: int, x: torch.Tensor, dt_lam: torch.Tensor, backend: str | None, *,
                block_bytes: int) -> torch.Tensor:
    """function(x, dt_lam, backend), a product of x (H, ...) with the (H, N, length) powers of exp(dt_lam) (the
    kernel, the state summary, an entering state's response). A fused backend (Triton on CUDA; backend None: the
    device's default) runs it whole and never materialises the powers; PyTorch's path builds them a block of
    channels (at most block_bytes of powers) at a time and recomputes them in backward rather than keeps them."""
    if (backend or vandermonde_default_backend(x.device)) != "ref":
        return function(x, dt_lam, backend)
    return recomputed_by_channels(lambda x, dt_lam, _: function(x, dt_lam, "ref"), length,
                                  dt_lam.shape[-1] * length * dt_lam.element_size(), x, dt_lam,
                                  block_bytes=block_bytes)


def vandermonde_kernel(w: torch.Tensor, dt_lam: torch.Tensor, length: int, backend: str | None = None, *,
                       block_bytes: int) -> torch.Tensor:
    """K (H, ..., length) real: K_l = Re(sum_n w_n exp(dt_lam_n l)) from w (H, ..., N) (kernels.vandermonde),
    over_powers."""
    return over_powers(lambda w, dt_lam, backend: vandermonde(w, dt_lam, length, backend), length, w, dt_lam,
                       backend, block_bytes=block_bytes)


def diagonal_conv(u: torch.Tensor, w: torch.Tensor, dt_lam: torch.Tensor, seq_idx: torch.Tensor | None = None,
                  state: DiagonalState | None = None, context: ContextParallel | None = None,
                  groups: int = 1, backend: str | None = None, *, block_bytes: int) -> torch.Tensor:
    """u (batch, H, L) -> y (batch, H, L) real, the diagonal system (w, dt_lam (H / groups, N) complex, channel c
    using row c mod H / groups) applied from a zero state, or continuing `state` (unless fresh; it is left holding
    the state after the last position), or with `context` entering from the ranks holding the earlier chunks of
    the rows. backend, block_bytes: over_powers' (the kernel's, the state summary's and the entering state's)."""
    L = u.shape[-1]
    y = fft_causal_conv(u, tiled(vandermonde_kernel(w, dt_lam, L, backend, block_bytes=block_bytes), groups),
                        seq_idx=seq_idx)
    if state is None and context is None:
        return y
    with torch.autocast(device_type=u.device.type, enabled=False):
        last, transfer = summary(u, dt_lam, seq_idx, groups, backend, block_bytes=block_bytes)
        h0 = context.entering_state(last, transfer, L) if context is not None else (None if state.fresh else state.ssm)
        if h0 is not None:
            y = y + carried(h0, w, dt_lam, seq_idx, L, groups, backend, block_bytes=block_bytes)
            last = last + transfer * h0
    if state is not None:
        state.ssm, state.fresh = last, False
    return y


def summary(u: torch.Tensor, dt_lam: torch.Tensor, seq_idx: torch.Tensor | None, groups: int = 1,
            backend: str | None = None, *, block_bytes: int):
    """The state after the last position from a zero start (batch, H, N): the inputs of the row's last document,
    each decayed to the end (kernels.vandermonde_summary of the inputs in reverse order, once per distinct
    channel, over_powers); and the transfer (batch, H, N) that carries an entering state to the end
    (exp(dt_lam L), zero where a document starts in the row)."""
    batch, H, L = u.shape
    last_doc = in_last_document(seq_idx, batch, L, u.device).to(u.dtype)
    reversed_inputs = grouped(u * last_doc[:, None], groups).flip(-1)
    last = over_powers(vandermonde_summary, L, reversed_inputs, dt_lam, backend, block_bytes=block_bytes)
    reach = in_first_document(seq_idx, batch, L, u.device)
    return ungrouped(last), tiled(mode_powers(dt_lam, 1, start=L)[..., 0], groups) * reach[:, -1, None, None]


def carried(h0: torch.Tensor, w: torch.Tensor, dt_lam: torch.Tensor, seq_idx: torch.Tensor | None, L: int,
            groups: int = 1, backend: str | None = None, *, block_bytes: int):
    """What an entering state h0 (batch, H, N) adds to the outputs (batch, H, L) over the first document:
    Re(sum_n w_n exp(dt_lam_n (t + 1)) h0_n), a Vandermonde kernel per row (weights w exp(dt_lam) h0), once per
    distinct channel."""
    batch, H, _ = h0.shape
    reach = in_first_document(seq_idx, batch, L, h0.device).to(w.real.dtype)
    weights = grouped(h0, groups) * (w * torch.exp(dt_lam))[:, None, None]
    return ungrouped(vandermonde_kernel(weights, dt_lam, L, backend, block_bytes=block_bytes)) * reach[:, None]


def diagonal_step(u: torch.Tensor, w: torch.Tensor, dt_lam: torch.Tensor, state: DiagonalState,
                  groups: int = 1) -> torch.Tensor:
    """One position: u (batch, H) -> y (batch, H) real, advancing `state` (a new tensor, not in place, so that
    gradients can flow through a run of steps); w, dt_lam (H / groups, N) as in diagonal_conv."""
    state.ssm = tiled(torch.exp(dt_lam), groups) * state.ssm + u[..., None]
    state.fresh = False
    return (state.ssm * tiled(w, groups)).sum(-1).real
