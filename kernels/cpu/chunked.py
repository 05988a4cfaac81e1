"""Chunked selective scan in plain PyTorch: the CPU fallback when the C kernel cannot be built.

Within a chunk of T steps the states come in parallel from the masked segment sums of delta*A
(exp of differences S_t - S_s, s <= t, never of a positive cumsum, so nothing overflows); the state
is carried from chunk to chunk. Each chunk runs under activation checkpointing, so autograd keeps
only the chunk inputs and the carried (batch, d, n) states; the (batch, d, T, T, n) temporaries
of one chunk are the peak. Slower than the C kernel, but O(L) and exact. Document resets (seq_idx) mask
the pairs (t, s) of a chunk that lie in different documents, and the carried state past a reset.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..documents import check_seq_idx, document_starts

CHUNK = 16


def _bc5(X: torch.Tensor, groups: int) -> torch.Tensor:
    """B or C -> broadcastable (batch|1, groups, d/groups|1, L|1, n) fp32."""
    if X.dim() == 2:  # (d, n)
        d, n = X.shape
        return X.float().reshape(1, groups, d // groups, 1, n)
    if X.dim() == 3:  # (batch, n, L)
        X = X.unsqueeze(1)
    return X.float().transpose(-1, -2).unsqueeze(2)  # (batch, groups, 1, L, n)


def _chunk(h0, u, dt, A, B, C, doc=None):
    """One chunk. h0 (b, g, e, n); u, dt (b, g, e, T); A (1, g, e, 1, n); B, C broadcastable
    (b, g, e, T, n); doc (b, T) or None: the document starts in the chunk up to each step. Returns y
    (b, g, e, T) and the last state (b, g, e, n)."""
    T = u.shape[-1]
    S = torch.cumsum(dt[..., None] * A, dim=3)  # (b, g, e, T, n), non-increasing for A < 0
    x = (dt * u)[..., None] * B
    causal = torch.ones(T, T, dtype=torch.bool, device=u.device).tril()[:, :, None]  # (t, s, 1)
    carried = torch.exp(S) * h0[..., None, :]
    if doc is not None:  # s feeds t only within t's document, h0 only the steps before the chunk's first start
        causal = causal & (doc[:, :, None] == doc[:, None, :])[:, None, None, :, :, None]  # (b, 1, 1, t, s, 1)
        carried = carried * (doc == 0)[:, None, None, :, None]
    seg = torch.where(causal, S[..., :, None, :] - S[..., None, :, :], float("-inf"))  # (b, g, e, t, s, n)
    h = (torch.exp(seg) * x[..., None, :, :]).sum(-2) + carried
    y = (h * C).sum(-1)
    return y, h[..., -1, :]


def selective_scan_chunked(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                           return_last_state=False, chunk: int = CHUNK, seq_idx=None):
    """Same signature and semantics as `ssmforge.kernels.ref.selective_scan_ref`; chunk: steps per chunk."""
    batch, d, L = u.shape
    seq_idx = check_seq_idx(seq_idx, batch, L)
    starts = None if seq_idx is None else document_starts(seq_idx).to(torch.int32)  # (batch, L)
    groups = next((X.shape[1] for X in (B, C) if X.dim() == 4), 1)
    dt = delta.float()
    if delta_bias is not None:
        dt = dt + delta_bias.float()[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    uf = u.float()
    n = A.shape[1]
    shape = (batch, groups, d // groups)
    u5, dt5 = uf.reshape(*shape, L), dt.reshape(*shape, L)
    A5 = A.float().reshape(1, groups, d // groups, 1, n)
    B5, C5 = _bc5(B, groups), _bc5(C, groups)
    h = u.new_zeros(*shape, n, dtype=torch.float32)
    ys = []
    for t0 in range(0, L, chunk):
        window = slice(t0, t0 + chunk)
        Bc = B5[..., window, :] if B5.shape[3] > 1 else B5
        Cc = C5[..., window, :] if C5.shape[3] > 1 else C5
        args = (h, u5[..., window], dt5[..., window], A5, Bc, Cc)
        if starts is not None:
            args += (torch.cumsum(starts[:, window], dim=1),)
        y, h = checkpoint(_chunk, *args, use_reentrant=False) if torch.is_grad_enabled() else _chunk(*args)
        ys.append(y)
    out = torch.cat(ys, dim=-1).reshape(batch, d, L)
    if D is not None:
        out = out + uf * D.float()[:, None]
    if z is not None:
        out = out * F.silu(z.float())
    out = out.to(u.dtype)
    return (out, h.reshape(batch, d, n)) if return_last_state else out
