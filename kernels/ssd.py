"""The SSD layer of Mamba-2 (Dao & Gu, 2024): the chunked algorithm in plain PyTorch, and the public
entry point `ssd_scan` that dispatches between backends.

The chunked algorithm computes exactly the recurrence of `ssmforge.kernels.ref.ssd_scan_ref` with matmuls:
split the sequence into chunks of Q steps; inside a chunk the output is a masked, decayed
"attention" C_l . B_s exp(a_l - a_s) dt_s x_s over s <= l (quadratic in Q, linear in L); between
chunks only the (headdim, dstate) state of each head is carried. a is the cumulative sum of dt * A
within the chunk. All arithmetic is fp32 (autocast is switched off inside) and autograd
differentiates it.

Backends: "torch" (this file, the default on CPU), "triton" (`ssmforge.kernels.triton.ssd`, the default on
CUDA; CPU tensors under TRITON_INTERPRET=1) and "ref" (the sequential oracle).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from .documents import check_seq_idx, document_starts
from .ref import discretize_dt, ssd_scan_ref
from .backends import triton_available


def segment_sums(a: torch.Tensor) -> torch.Tensor:
    """a (..., Q) -> (..., Q, Q) with [l, s] = a[s+1] + ... + a[l] for s <= l and -inf above the diagonal.

    Summed from masked copies rather than as cumsum[l] - cumsum[s], which loses precision when the
    cumulative sums are large and close."""
    Q = a.shape[-1]
    ones = torch.ones(Q, Q, dtype=torch.bool, device=a.device)
    sums = a[..., :, None].expand(*a.shape, Q).masked_fill(~ones.tril(-1), 0.0).cumsum(dim=-2)
    return sums.masked_fill(~ones.tril(0), -math.inf)


def document_numbers(seq_idx: torch.Tensor) -> torch.Tensor:
    """seq_idx (batch, L) -> (batch, L) int32 0, 1, 2, ...: how many resets (neighbours that differ) lie at or
    before each position. Two positions are in one document, with no reset between them, exactly when their
    numbers are equal, whatever integers seq_idx holds (the oracle's reading of it)."""
    return document_starts(seq_idx).cumsum(dim=1, dtype=torch.int32)


def _chunked_scan(x, dt, A, B, C, chunk_size, initial_state, seq_idx=None):
    """fp32 core of `ssd_chunked` without D: returns y (batch, L, nheads, headdim), h_L.

    With seq_idx (batch, L), a reset at step t drops the state before it, so within a chunk step s reaches
    step l only in l's document, a chunk's own state holds only the steps of its last document, the state
    entering a chunk reaches only the steps before its first reset and is not carried past a chunk with a
    reset."""
    batch, L, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    per_group = nheads // ngroups
    Q = max(1, min(chunk_size, L))  # a sequence shorter than a chunk is one chunk of its own length
    n_chunks = max(1, -(-L // Q))
    pad = n_chunks * Q - L  # padded steps have dt = 0: they neither decay nor feed the state

    def chunks(t, *head_dims):  # (batch, L, ...) -> (batch, n_chunks, Q, ...)
        t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
        return t.reshape(batch, n_chunks, Q, *head_dims)

    x = chunks(x, ngroups, per_group, headdim)  # (b, c, Q, g, r, p)
    B, C = chunks(B, ngroups, dstate), chunks(C, ngroups, dstate)  # (b, c, Q, g, n)
    dt = chunks(dt, ngroups, per_group).permute(0, 1, 3, 4, 2)  # (b, c, g, r, Q)
    dA = dt * A.view(ngroups, per_group, 1)
    a = dA.cumsum(dim=-1)
    a_end = a[..., -1:]  # (b, c, g, r, 1)
    sums = segment_sums(dA)  # (b, c, g, r, Q, Q)
    a_from_start, a_to_end = a, a_end - a
    if seq_idx is not None:
        # document numbers per chunk (b, c, 1, 1, Q), padded steps in the last document; `before` is the number
        # of the step before each chunk (the first chunk's initial state belongs to document 0)
        doc = document_numbers(seq_idx)
        doc = torch.cat([doc, doc[:, -1:].expand(batch, pad)], dim=1).view(batch, n_chunks, 1, 1, Q)
        before = torch.cat([torch.zeros_like(doc[:, :1, ..., :1]), doc[:, :-1, ..., -1:]], dim=1)
        # an exponent of -inf is a weight of 0 (masked before exp: no inf * 0 in the gradients)
        sums = sums.masked_fill(doc[..., :, None] != doc[..., None, :], -math.inf)
        a_from_start = a.masked_fill(doc != before, -math.inf)
        a_to_end = a_to_end.masked_fill(doc != doc[..., -1:], -math.inf)
        a_end = a_end.masked_fill(doc[..., -1:] != before, -math.inf)  # a reset in the chunk drops its state

    # inside each chunk: y_l = sum_{s <= l} (C_l . B_s) exp(a_l - a_s) dt_s x_s
    scores = torch.einsum("bclgn,bcsgn->bcgls", C, B)[:, :, :, None]  # (b, c, g, 1, Q, Q)
    weights = scores * torch.exp(sums) * dt[..., None, :]
    y = torch.einsum("bcgrls,bcsgrp->bclgrp", weights, x)

    # the state each chunk leaves behind from its own inputs: sum_s exp(a_end - a_s) dt_s x_s B_s^T
    to_end = torch.exp(a_to_end) * dt  # (b, c, g, r, Q)
    chunk_states = torch.einsum("bcsgn,bcsgrp->bcgrpn", B, x * to_end.permute(0, 1, 4, 2, 3)[..., None])

    # between chunks: carry the state, decayed by each chunk's total exp(a_end)
    if initial_state is None:
        h = x.new_zeros(batch, ngroups, per_group, headdim, dstate)
    else:
        h = initial_state.float().reshape(batch, ngroups, per_group, headdim, dstate)
    entering = []
    for c in range(n_chunks):
        entering.append(h)
        h = torch.exp(a_end[:, c])[..., None] * h + chunk_states[:, c]
    entering = torch.stack(entering, dim=1)  # (b, c, g, r, p, n)

    # contribution of the state entering the chunk: exp(a_l) h C_l (before the chunk's first reset)
    from_start = torch.exp(a_from_start).permute(0, 1, 4, 2, 3)[..., None]
    y = y + torch.einsum("bclgn,bcgrpn->bclgrp", C, entering) * from_start
    y = y.reshape(batch, n_chunks * Q, nheads, headdim)[:, :L]
    return y, h.reshape(batch, nheads, headdim, dstate)


def ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int = 256,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
    seq_idx: torch.Tensor | None = None,
):
    """The chunked SSD in PyTorch; shapes and semantics of `ssmforge.kernels.ref.ssd_scan_ref`.

    chunk_size: steps per chunk (any positive int; L need not be a multiple)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    seq_idx = check_seq_idx(seq_idx, x.shape[0], x.shape[1])
    with torch.autocast(device_type=x.device.type, enabled=False):
        xf = x.float()
        y, last = _chunked_scan(xf, discretize_dt(dt, dt_bias, dt_softplus), A.float(), B.float(), C.float(),
                                chunk_size, initial_state, seq_idx)
        if D is not None:
            y = y + xf * D.float()[:, None]
    y = y.to(x.dtype)
    return (y, last) if return_final_state else y


def _ssd_ref(x, dt, A, B, C, chunk_size=None, **kwargs):
    return ssd_scan_ref(x, dt, A, B, C, **kwargs)  # the recurrence has no chunks


def _ssd_triton(*args, **kwargs):
    from .triton.ssd import ssd_triton  # lazy: `import kernels` must work without triton

    return ssd_triton(*args, **kwargs)


SSD_BACKENDS: dict[str, Callable] = {"ref": _ssd_ref, "torch": ssd_chunked}
if triton_available():
    SSD_BACKENDS["triton"] = _ssd_triton


def ssd_default_backend(device: torch.device) -> str:
    """"triton" for CUDA tensors where triton is installed, else the PyTorch chunked "torch" (matmuls: a
    usable fallback on a GPU, unlike the sequential oracle; `describe_backends` reports it at start-up)."""
    return "triton" if device.type == "cuda" and "triton" in SSD_BACKENDS else "torch"


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int = 256,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
    backend: str | None = None,
    seq_idx: torch.Tensor | None = None,
):
    """SSD with the shapes and semantics of `ssmforge.kernels.ref.ssd_scan_ref`, computed in chunks of
    `chunk_size` steps (a power of two >= 16 for "triton").

    backend: None picks by device (see `ssd_default_backend`); "ref", "torch" or "triton" forces one.
    seq_idx: (batch, L) document index of packed rows (see `ssmforge.kernels.documents`), or None for one
    document per row: where it changes the state restarts from zero.
    """
    name = backend or ssd_default_backend(x.device)
    if name not in SSD_BACKENDS:
        raise ValueError(f"unknown SSD backend {name!r}; available: {sorted(SSD_BACKENDS)}")
    return SSD_BACKENDS[name](x, dt, A, B, C, chunk_size=chunk_size, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus,
                              initial_state=initial_state, return_final_state=return_final_state, seq_idx=seq_idx)
