"""Sequential reference implementations: the definition every fast path is tested against.

They follow the selective scan of the Mamba paper (Gu & Dao, 2023) step by step, accumulate in
float32 and return outputs in the input dtype. They are slow (a Python loop over L) and store
(batch, d, L, n) intermediates; use them as oracles, not for training.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


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
):
    """Selective scan h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t,  y_t = C_t h_t (+ D u_t) (* silu(z_t)).

    u, delta: (batch, d, L); A: (d, n); B, C: (d, n) fixed, (batch, n, L) input-dependent, or
    (batch, groups, n, L) grouped (d divisible by groups); D, delta_bias: (d,); z: (batch, d, L).
    Returns out (batch, d, L) in u's dtype, and with return_last_state also h_L (batch, d, n) in fp32.
    """
    dtype_in = u.dtype
    u = u.float()
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].float()
    if delta_softplus:
        delta = F.softplus(delta)
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


def selective_state_update_ref(
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
) -> torch.Tensor:
    """One recurrent step of the selective scan, updating `state` (batch, d, n, fp32) in place.

    u, delta, z: (batch, d); B, C: (batch, n); A: (d, n); D, delta_bias: (d,). Returns y (batch, d)
    in u's dtype. Equal to one column of `selective_scan_ref` given the previous state.
    """
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()
    if delta_softplus:
        delta = F.softplus(delta)
    uf = u.float()
    dA = torch.exp(delta[:, :, None] * A.float())
    dBu = (delta * uf)[:, :, None] * B.float()[:, None, :]
    state.mul_(dA).add_(dBu)
    y = torch.einsum("bdn,bn->bd", state, C.float())
    if D is not None:
        y = y + uf * D.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(u.dtype)


def causal_conv1d_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, activation: str | None = None
) -> torch.Tensor:
    """Depthwise causal convolution: x (batch, d, L), weight (d, width), bias (d,) -> (batch, d, L).

    Output t sees inputs t-width+1 .. t (zeros before the start); activation None or "silu".
    """
    if activation not in (None, "silu"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    d, width = weight.shape
    out = F.conv1d(x, weight[:, None, :], bias, padding=width - 1, groups=d)[..., : x.shape[-1]]
    return F.silu(out) if activation == "silu" else out


def causal_conv1d_update_ref(
    conv_state: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """One step of `causal_conv1d_ref`: conv_state (batch, d, width) holds the last inputs and is
    shifted in place; x (batch, d) is the new input. Returns (batch, d)."""
    conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
    conv_state[:, :, -1] = x
    out = (conv_state * weight).sum(-1)
    if bias is not None:
        out = out + bias
    return F.silu(out) if activation == "silu" else out
