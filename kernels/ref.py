"""Sequential reference implementations: the definition every fast path is tested against.

They follow the selective scan of the Mamba paper (Gu & Dao, 2023) step by step, accumulate in
float32 and return outputs in the input dtype. They are slow (a Python loop over L) and store
(batch, d, L, n) intermediates; use them as oracles, not for training.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .documents import check_seq_idx, document_starts, same_document


def discretize_dt(dt: torch.Tensor, bias: torch.Tensor | None, softplus: bool) -> torch.Tensor:
    """fp32 softplus(dt + bias), each step optional; `bias` must broadcast against dt."""
    dt = dt.float()
    if bias is not None:
        dt = dt + bias.float()
    return F.softplus(dt) if softplus else dt

def _expand_groups(BC: torch.Tensor, d: int) -> torch.Tensor:
    """(batch, groups, n, L) -> (batch, d, n, L): channel c uses group c // (d // groups)."""
    groups = BC.shape[1]
    return BC.repeat_interleave(d // groups, dim=1)


def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    seq_idx: torch.Tensor | None = None,
):
    """Selective scan h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t,  y_t = C_t h_t (+ D u_t) (* silu(z_t)).

    u, delta: (batch, d, L); A: (d, n); B, C: (d, n) fixed, (batch, n, L) input-dependent, or
    (batch, groups, n, L) grouped (d divisible by groups); D, delta_bias: (d,); z: (batch, d, L);
    seq_idx: (batch, L) document index (see kernels.documents): where it changes, h_{t-1} is taken as 0.
    Returns out (batch, d, L) in u's dtype, and with return_last_state also h_L (batch, d, n) in fp32.
    """
    dtype_in = u.dtype
    u = u.float()
    delta = discretize_dt(delta, None if delta_bias is None else delta_bias[..., None], delta_softplus)
    batch, d, L = u.shape
    A = A.float()
    B = B.float()
    C = C.float()
    if B.dim() == 4:
        B = _expand_groups(B, d)
    if C.dim() == 4:
        C = _expand_groups(C, d)

    deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    if B.dim() == 2:
        deltaB_u = torch.einsum("bdl,dn,bdl->bdln", delta, B, u)
    elif B.dim() == 3:
        deltaB_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    else:
        deltaB_u = torch.einsum("bdl,bdnl,bdl->bdln", delta, B, u)

    seq_idx = check_seq_idx(seq_idx, batch, L)
    if seq_idx is not None:  # a reset multiplies the carried state by 0 instead of its decay
        deltaA = deltaA * ~document_starts(seq_idx)[:, None, :, None]
    x = u.new_zeros((batch, d, A.shape[1]))
    ys = []
    for i in range(L):
        x = deltaA[:, :, i] * x + deltaB_u[:, :, i]
        if C.dim() == 2:
            y = torch.einsum("bdn,dn->bd", x, C)
        elif C.dim() == 3:
            y = torch.einsum("bdn,bn->bd", x, C[:, :, i])
        else:
            y = torch.einsum("bdn,bdn->bd", x, C[:, :, :, i])
        ys.append(y)
    out = torch.stack(ys, dim=2)
    if D is not None:
        out = out + u * D.float()[:, None]
    if z is not None:
        out = out * F.silu(z.float())
    out = out.to(dtype_in)
    return (out, x) if return_last_state else out


def selective_state_step(
    state: torch.Tensor,
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One recurrent step of the selective scan from `state` (batch, d, n, fp32): returns y (batch, d) in u's
    dtype and the next state, a new tensor (the given one is left as it was, so that gradients flow through a
    run of steps). u, delta, z: (batch, d); B, C: (batch, n); A: (d, n); D, delta_bias: (d,). Equal to one
    column of `selective_scan_ref` given the previous state.
    """
    delta = discretize_dt(delta, delta_bias, delta_softplus)
    uf = u.float()
    dA = torch.exp(delta[:, :, None] * A.float())
    dBu = (delta * uf)[:, :, None] * B.float()[:, None, :]
    state = state * dA + dBu
    y = torch.einsum("bdn,bn->bd", state, C.float())
    if D is not None:
        y = y + uf * D.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(u.dtype), state


def causal_conv1d_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, activation: str | None = None,
    seq_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """Depthwise causal convolution: x (batch, d, L), weight (d, width), bias (d,) -> (batch, d, L).

    Output t sees inputs t-width+1 .. t (zeros before the start); activation None or "silu". With seq_idx
    (batch, L) (see kernels.documents), only the inputs of t's own document: a tap never crosses a boundary.
    """
    if activation not in (None, "silu"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    d, width = weight.shape
    seq_idx = check_seq_idx(seq_idx, x.shape[0], x.shape[-1])
    if seq_idx is None:
        out = F.conv1d(x, weight[:, None, :], bias, padding=width - 1, groups=d)[..., : x.shape[-1]]
    else:  # tap k reads x_{t-k} where it lies in t's document
        out = sum(weight[:, width - 1 - k, None] * F.pad(x, (k, 0))[..., : x.shape[-1]]
                  * same_document(seq_idx, k)[:, None, :] for k in range(width))
        if bias is not None:
            out = out + bias[:, None]
    return F.silu(out) if activation == "silu" else out


def long_conv_ref(u: torch.Tensor, k: torch.Tensor, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Depthwise causal convolution with a long kernel, as a masked Toeplitz product (O(L^2); the oracle of
    kernels.fftconv): y[b, c, t] = sum_{s <= t, same document} k[c, t - s] u[b, c, s], float32.

    u (batch, channels, L), k (channels, Lk <= L); seq_idx (batch, L) or None (see kernels.documents)."""
    batch, channels, L = u.shape
    lag = torch.arange(L)[:, None] - torch.arange(L)[None, :]  # (t, s)
    taps = F.pad(k.float(), (0, L - k.shape[1]))[:, lag.clamp(min=0)] * (lag >= 0)  # (channels, t, s)
    mask = torch.ones(batch, L, L, dtype=torch.bool)
    seq_idx = check_seq_idx(seq_idx, batch, L)
    if seq_idx is not None:
        mask = seq_idx[:, :, None] == seq_idx[:, None, :]
    return torch.einsum("cts,bts,bcs->bct", taps, mask.float(), u.float())


def mode_powers(dt_lam: torch.Tensor, length: int, start: int = 0) -> torch.Tensor:
    """exp(dt_lam l) for l = start..start+length-1: (H, N, length) complex, from dt_lam (H, N) complex."""
    steps = torch.arange(start, start + length, device=dt_lam.device, dtype=dt_lam.real.dtype)
    return torch.exp(dt_lam[..., None] * steps)


def vandermonde_ref(w: torch.Tensor, dt_lam: torch.Tensor, length: int) -> torch.Tensor:
    """The convolution kernel of a diagonal SSM (S4D, DSS, H3, GSS): K (H, length) real, K_l = Re(sum_n w_n
    exp(dt_lam_n l)), from w, dt_lam (H, N) complex, through the (H, N, length) powers. w may hold several rows
    per channel, (H, ..., N) -> K (H, ..., length): what an entering state adds to each row."""
    return torch.einsum("h...n,hnl->h...l", w, mode_powers(dt_lam, length)).real


def vandermonde_summary_ref(v: torch.Tensor, dt_lam: torch.Tensor) -> torch.Tensor:
    """The Vandermonde product's transpose, a diagonal SSM's state summary: S_n = sum_l v_l exp(dt_lam_n l), from
    v (H, ..., L) real and dt_lam (H, N) complex -> S (H, ..., N) complex, through the (H, N, L) powers. With v
    the inputs in reverse order, S is the state they leave after the last position."""
    powers = mode_powers(dt_lam, v.shape[-1])
    return torch.einsum("h...l,hnl->h...n", v.to(powers.dtype), powers)


def cauchy_ref(numerators: torch.Tensor, poles: torch.Tensor, nodes: torch.Tensor,
               scales: torch.Tensor) -> torch.Tensor:
    """The Cauchy sums of S4's bilinear kernel: out[h, j, k] = sum_n numerators[h, j, n] / (nodes[k] - scales[h, k]
    poles[h, n]), from numerators (H, J, N), poles (H, N), nodes (K,), scales (H, K) complex -> (H, J, K) complex,
    through the (H, K, N) resolvent."""
    resolvent = 1 / (nodes[:, None] - scales[..., None] * poles[:, None, :])
    return torch.einsum("hjn,hkn->hjk", numerators, resolvent)


def _doubling_scan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x_t = a_t x_{t-1} + b_t along dim 1 from x_{-1} = 0: a (batch or 1, L, N), b (batch, L, N) -> x like b.
    Hillis-Steele doubling: after the level of span d, (A_t, x_t) is the composition of the pairs at
    t - 2d + 1 .. t, so ceil(log2 L) levels give every prefix. Positions t < d are already complete."""
    x, A = b.clone(), a.clone()
    L, d = b.shape[1], 1
    while d < L:
        x[:, d:] = A[:, d:] * x[:, :-d] + x[:, d:]  # the right side is evaluated before it is written
        if 2 * d < L:  # the last level's prefix products are not needed
            A[:, d:] = A[:, d:] * A[:, :-d]
        d *= 2
    return x


class _DoublingScan(torch.autograd.Function):
    """x = scan of (a, b) from zero, differentiable in a and b. With PyTorch's complex gradient convention
    (the gradient of a holomorphic w = f(z) is grad_w * conj(f'(z))), the gradient G_t reaching x_t is
    G_t = gx_t + conj(a_{t+1}) G_{t+1}: the same scan backwards in time over conj(a). Then grad b_t = G_t and
    grad a_t = G_t conj(x_{t-1}). Backward keeps only a and the states, not the log2 L levels."""

    @staticmethod
    def forward(ctx, a, b):
        x = _doubling_scan(a, b)
        ctx.save_for_backward(a, x)
        return x

    @staticmethod
    def backward(ctx, gx):
        a, x = ctx.saved_tensors
        following = torch.zeros_like(a)  # conj(a_{t+1}); nothing follows the last position
        following[:, :-1] = a[:, 1:].conj()
        G = _doubling_scan(following.flip(1), gx.flip(1)).flip(1)
        grad_a = None
        if ctx.needs_input_grad[0]:
            before = torch.zeros_like(x)  # x_{t-1}; zero before the first position
            before[:, 1:] = x[:, :-1]
            grad_a = (G * before.conj()).sum_to_size(a.shape)
        return grad_a, G


def linear_scan_operands(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """a and b as the fused linear-scan kernels read them, after checking their shapes: a (batch or 1, L, N) with
    any strides but adjacent states, b (batch, L, N) contiguous, conjugation resolved."""
    if a.dtype != b.dtype or a.dim() != 3 or b.dim() != 3 or a.shape[1:] != b.shape[1:] \
            or a.shape[0] not in (1, b.shape[0]):
        raise ValueError(f"linear_scan takes a (batch or 1, L, N) and b (batch, L, N) of one dtype; got a "
                         f"{tuple(a.shape)} {a.dtype}, b {tuple(b.shape)} {b.dtype}")
    a, b = a.resolve_conj(), b.resolve_conj().contiguous()
    return (a if a.stride(-1) == 1 else a.contiguous()), b


def linear_scan_ref(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The linear recurrence of the LRU, x_t = a_t x_{t-1} + b_t for t = 0..L-1 from a zero state, over dim 1:
    a (batch or 1, L, N), b (batch, L, N), real or complex of one dtype -> x (batch, L, N). A parallel scan
    (Hillis-Steele doubling, ceil(log2 L) levels of O(L N) torch ops) whose backward is the same scan run
    backwards in time over conj(a) (tests/models/test_lru.py checks both against a step-by-step loop)."""
    return _DoublingScan.apply(a, b)


def causal_conv1d_step(
    conv_state: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of `causal_conv1d_ref`: conv_state (batch, d, width) holds the last inputs, oldest first; x
    (batch, d) is the new input. Returns the output (batch, d) and the next conv state, a new tensor."""
    conv_state = torch.cat([conv_state[..., 1:], x[..., None].to(conv_state.dtype)], dim=-1)
    out = (conv_state * weight).sum(-1)
    if bias is not None:
        out = out + bias
    return (F.silu(out) if activation == "silu" else out), conv_state


def _heads_from_groups(BC: torch.Tensor, nheads: int) -> torch.Tensor:
    """(..., groups, n) -> (..., nheads, n): head h reads group h // (nheads // groups)."""
    return BC.repeat_interleave(nheads // BC.shape[-2], dim=-2)


def ssd_scan_ref(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
    seq_idx: torch.Tensor | None = None,
):
    """The SSD layer of Mamba-2 (Dao & Gu, 2024) as its recurrence, one step at a time:

        h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T,   y_t = h_t C_t + D x_t   (per head; A, D scalars)

    x: (batch, L, nheads, headdim); dt: (batch, L, nheads), before dt_bias and softplus; A, D, dt_bias:
    (nheads,); B, C: (batch, L, ngroups, dstate), head h reads group h // (nheads // ngroups);
    initial_state: (batch, nheads, headdim, dstate) or None (zeros); seq_idx: (batch, L) document index
    (see kernels.documents): where it changes, h_{t-1} is taken as 0 (the initial state belongs to the
    first document). Returns y (batch, L, nheads, headdim) in x's dtype, and with return_final_state also
    h_L (batch, nheads, headdim, dstate) fp32.
    """
    batch, L, nheads, headdim = x.shape
    xf = x.float()
    dt = discretize_dt(dt, dt_bias, dt_softplus)
    B = _heads_from_groups(B.float(), nheads)
    C = _heads_from_groups(C.float(), nheads)
    decay = torch.exp(dt * A.float())  # (batch, L, nheads)
    seq_idx = check_seq_idx(seq_idx, batch, L)
    if seq_idx is not None:
        decay = decay * ~document_starts(seq_idx)[..., None]
    if initial_state is None:
        h = xf.new_zeros(batch, nheads, headdim, B.shape[-1])
    else:
        h = initial_state.float()
    ys = []
    for t in range(L):
        h = decay[:, t, :, None, None] * h + (dt[:, t, :, None] * xf[:, t])[..., None] * B[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", h, C[:, t]))
    y = torch.stack(ys, dim=1) if ys else xf.clone()
    if D is not None:
        y = y + xf * D.float()[:, None]
    y = y.to(x.dtype)
    return (y, h) if return_final_state else y


def ssd_state_step(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of `ssd_scan_ref` from `state` (batch, nheads, headdim, dstate; fp32): returns y (batch, nheads,
    headdim) in x's dtype and the next state, a new tensor. x: (batch, nheads, headdim); dt: (batch, nheads);
    B, C: (batch, ngroups, dstate); A, D, dt_bias: (nheads,).
    """
    nheads = x.shape[1]
    xf = x.float()
    dt = discretize_dt(dt, dt_bias, dt_softplus)
    B = _heads_from_groups(B.float(), nheads)
    C = _heads_from_groups(C.float(), nheads)
    state = (state * torch.exp(dt * A.float())[:, :, None, None]
             + (dt[:, :, None] * xf)[..., None] * B[:, :, None, :])
    y = torch.einsum("bhpn,bhn->bhp", state, C)
    if D is not None:
        y = y + xf * D.float()[:, None]
    return y.to(x.dtype), state
