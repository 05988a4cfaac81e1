"""Triton Vandermonde kernel of a diagonal SSM (S4D, DSS, H3, GSS), forward and backward, fused.

K[h, l] = Re(sum_n w[h, n] exp(dt_lam[h, n] l)) for l < length. The PyTorch path (kernels.ref.vandermonde_ref)
materialises the (H, N, length) powers, N times the size of K, and its backward rebuilds them; here each program
makes its tile of powers in registers, so forward and backward keep only what K and the parameters take.
With z^l = exp(a l) (cos(b l) + i sin(b l)) for dt_lam = a + i b and w = wr + i wi:

    K_l      = sum_n e_nl (wr c_nl - wi s_nl)        e = exp(a l), c = cos(b l), s = sin(b l)
    dK/dwr   = e c,    dK/dwi = -e s,    dK/da = l e (wr c - wi s),    dK/db = -l e (wr s + wi c)

The forward's programs cover (one channel, BLOCK_L positions) and sum over the modes in blocks of BLOCK_N; the
backward's cover (one channel, BLOCK_N modes) and sum over the positions. Arithmetic runs in the parameters'
precision (float32 for complex64, float64 for complex128), as the PyTorch path's. The parameters travel as
torch.view_as_real pairs (H, N, 2), so autograd maps the real gradients to the complex ones.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..custom_op import kernel_op

# tiles of (modes, positions) that compile for sm_80 and sm_90 without spills (benchmarks/kernel_resources.py)
BLOCK_L = 64
FWD_BLOCKS, BWD_BLOCKS = (16, BLOCK_L), (32, BLOCK_L)


@triton.jit
def _tile(w_ptr, lam_ptr, row, offs_n, offs_l, N):
    """The (BLOCK_N, BLOCK_L) tile's parameters and powers: wr, wi (BLOCK_N, 1), steps l (1, BLOCK_L), and
    e, c, s (BLOCK_N, BLOCK_L); modes past N carry w = 0, so they add nothing."""
    n_mask = offs_n < N
    pair = (row * N + offs_n) * 2
    wr = tl.load(w_ptr + pair, mask=n_mask, other=0.0)[:, None]
    wi = tl.load(w_ptr + pair + 1, mask=n_mask, other=0.0)[:, None]
    a = tl.load(lam_ptr + pair, mask=n_mask, other=0.0)[:, None]
    b = tl.load(lam_ptr + pair + 1, mask=n_mask, other=0.0)[:, None]
    steps = offs_l.to(wr.dtype)[None, :]
    e = tl.exp(a * steps)
    angle = b * steps
    return wr, wi, steps, e, tl.cos(angle), tl.sin(angle)


@triton.jit
def vandermonde_fwd_kernel(w_ptr, lam_ptr, k_ptr, N, L, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr):
    row, pid_l = tl.program_id(0).to(tl.int64), tl.program_id(1)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    acc = tl.zeros((BLOCK_L,), dtype=k_ptr.dtype.element_ty)
    for start in range(0, N, BLOCK_N):
        wr, wi, steps, e, c, s = _tile(w_ptr, lam_ptr, row, start + tl.arange(0, BLOCK_N), offs_l, N)
        acc += tl.sum(e * (wr * c - wi * s), axis=0)
    tl.store(k_ptr + row * L + offs_l, acc, mask=offs_l < L)


@triton.jit
def vandermonde_bwd_kernel(w_ptr, lam_ptr, dk_ptr, dw_ptr, dlam_ptr, N, L, BLOCK_N: tl.constexpr,
                           BLOCK_L: tl.constexpr):
    row, pid_n = tl.program_id(0).to(tl.int64), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dtype = dw_ptr.dtype.element_ty
    dwr = tl.zeros((BLOCK_N,), dtype=dtype)
    dwi = tl.zeros((BLOCK_N,), dtype=dtype)
    da = tl.zeros((BLOCK_N,), dtype=dtype)
    db = tl.zeros((BLOCK_N,), dtype=dtype)
    for start in range(0, L, BLOCK_L):
        offs_l = start + tl.arange(0, BLOCK_L)
        g = tl.load(dk_ptr + row * L + offs_l, mask=offs_l < L, other=0.0).to(dtype)[None, :]
        wr, wi, steps, e, c, s = _tile(w_ptr, lam_ptr, row, offs_n, offs_l, N)
        ge, gle = g * e, g * e * steps
        dwr += tl.sum(ge * c, axis=1)
        dwi -= tl.sum(ge * s, axis=1)
        da += tl.sum(gle * (wr * c - wi * s), axis=1)
        db -= tl.sum(gle * (wr * s + wi * c), axis=1)
    n_mask = offs_n < N
    pair = (row * N + offs_n) * 2
    tl.store(dw_ptr + pair, dwr, mask=n_mask)
    tl.store(dw_ptr + pair + 1, dwi, mask=n_mask)
    tl.store(dlam_ptr + pair, da, mask=n_mask)
    tl.store(dlam_ptr + pair + 1, db, mask=n_mask)


def _forward(w, lam, length, *, launch):
    H, N, _ = w.shape
    k = torch.empty(H, length, device=w.device, dtype=w.dtype)
    if launch and H and length:
        block_n, block_l = FWD_BLOCKS
        vandermonde_fwd_kernel[(H, triton.cdiv(length, block_l))](w, lam, k, N, length, BLOCK_N=block_n,
                                                                   BLOCK_L=block_l)
    return (k,)


def _backward(grads, inputs, residuals, length, *, launch):
    (dk,) = grads
    w, lam = inputs
    H, N, _ = w.shape
    dw, dlam = torch.zeros_like(w), torch.zeros_like(lam)
    if launch and H and length and dk is not None:
        block_n, block_l = BWD_BLOCKS
        vandermonde_bwd_kernel[(H, triton.cdiv(N, block_n))](w, lam, dk.contiguous(), dw, dlam, N, length,
                                                             BLOCK_N=block_n, BLOCK_L=block_l)
    return dw, dlam


vandermonde_triton_op = kernel_op("vandermonde_triton", "Tensor w, Tensor dt_lam", "int length", outputs=1,
                                  residuals=0, forward=_forward, backward=_backward)


def vandermonde_triton(w: torch.Tensor, dt_lam: torch.Tensor, length: int) -> torch.Tensor:
    """Same signature and semantics as `ssmforge.kernels.ref.vandermonde_ref`: w, dt_lam (H, N) complex ->
    K (H, length) real."""
    pairs = [torch.view_as_real(t.resolve_conj()).contiguous() for t in (w, dt_lam)]
    return vandermonde_triton_op(*pairs, int(length))
