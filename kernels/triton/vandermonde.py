"""Triton Vandermonde kernel of a diagonal SSM (S4D, DSS, H3, GSS), forward and backward, fused.

K[h, l] = Re(sum_n w[h, n] exp(dt_lam[h, n] l)) for l < length. The PyTorch path (kernels.ref.vandermonde_ref)
materialises the (H, N, length) powers, N times the size of K, and its backward rebuilds them; here each program
makes its tile of powers in registers, so forward and backward keep only what K and the parameters take.
With z^l = exp(a l) (cos(b l) + i sin(b l)) for dt_lam = a + i b and w = wr + i wi:

    K_l      = sum_n e_nl (wr c_nl - wi s_nl)        e = exp(a l), c = cos(b l), s = sin(b l)
    dK/dwr   = e c,    dK/dwi = -e s,    dK/da = l e (wr c - wi s),    dK/db = -l e (wr s + wi c)

The forward's programs cover (one channel, BLOCK_L positions) and sum over the modes in blocks of BLOCK_N; the
backward's cover (one channel, BLOCK_N modes) and sum over the positions.

The backward's first half, sum_l g_l z^l (= dwr - i dwi), is itself the state summary S_n = sum_l v_l z_n^l of
inputs v (a diagonal SSM's state after inputs v in reverse order: what a carried state and context parallelism
need), so `vandermonde_summary_triton` runs the backward kernel without its dt_lam half (LAM_GRAD off) as its
forward, and the two kernels as its backward: dL/dv_l = Re(sum_n conj(G_n) z_n^l) is the forward kernel with
w = conj(G), and dL/d(dt_lam) is the backward kernel's dt_lam half with g = v and w = conj(G).
Weights w (H, ..., N) and inputs v (H, ..., L) may hold several rows per channel (a batch: what an entering
state adds, per row), the channel's dt_lam repeated for each, its gradient summed over them. Arithmetic runs in
the parameters' precision (float32 for complex64, float64 for complex128), as the PyTorch path's. The parameters
travel as torch.view_as_real pairs (H, N, 2), so autograd maps the real gradients to the complex ones.
"""
from __future__ import annotations

import math

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
                           BLOCK_L: tl.constexpr, LAM_GRAD: tl.constexpr):
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
        ge = g * e
        dwr += tl.sum(ge * c, axis=1)
        dwi -= tl.sum(ge * s, axis=1)
        if LAM_GRAD:
            gle = ge * steps
            da += tl.sum(gle * (wr * c - wi * s), axis=1)
            db -= tl.sum(gle * (wr * s + wi * c), axis=1)
    n_mask = offs_n < N
    pair = (row * N + offs_n) * 2
    tl.store(dw_ptr + pair, dwr, mask=n_mask)
    tl.store(dw_ptr + pair + 1, dwi, mask=n_mask)
    if LAM_GRAD:
        tl.store(dlam_ptr + pair, da, mask=n_mask)
        tl.store(dlam_ptr + pair + 1, db, mask=n_mask)


def _kernel_values(w, lam, length: int, launch: bool):
    """K (rows, length) from the (rows, N, 2) pairs w and lam."""
    rows, N, _ = w.shape
    k = torch.empty(rows, length, device=w.device, dtype=w.dtype)
    if launch and rows and length:
        block_n, block_l = FWD_BLOCKS
        vandermonde_fwd_kernel[(rows, triton.cdiv(length, block_l))](w, lam, k, N, length, BLOCK_N=block_n,
                                                                      BLOCK_L=block_l)
    return k


def _kernel_gradients(w, lam, g, lam_grad: bool, launch: bool):
    """From the pairs w, lam (rows, N, 2) and g (rows, L): the pairs of dK/dw against g, sum_l g_l conj(z^l),
    and with lam_grad those of dK/d(dt_lam) against g (else None, and w's values are not used)."""
    rows, N, _ = lam.shape
    dw = torch.zeros_like(lam)
    dlam = torch.zeros_like(lam) if lam_grad else None
    if launch and rows and g.shape[-1]:
        block_n, block_l = BWD_BLOCKS
        vandermonde_bwd_kernel[(rows, triton.cdiv(N, block_n))](
            w, lam, g.contiguous(), dw, lam if dlam is None else dlam, N, g.shape[-1], BLOCK_N=block_n,
            BLOCK_L=block_l, LAM_GRAD=lam_grad)
    return dw, dlam


def _forward(w, lam, length, *, launch):
    return (_kernel_values(w, lam, length, launch),)


def _backward(grads, inputs, residuals, length, *, launch):
    (dk,) = grads
    w, lam = inputs
    if dk is None:
        return torch.zeros_like(w), torch.zeros_like(lam)
    return _kernel_gradients(w, lam, dk, True, launch)


CONJUGATE = (1.0, -1.0)  # the (re, im) signs of a complex conjugate


def _conjugated(pairs: torch.Tensor) -> torch.Tensor:
    return pairs * pairs.new_tensor(CONJUGATE)


def _summary_forward(v, lam, *, launch):
    sums, _ = _kernel_gradients(lam, lam, v, False, launch)  # sum_l v_l conj(z^l); w unused: lam stands in
    return (_conjugated(sums),)


def _summary_backward(grads, inputs, residuals, *, launch):
    (ds,) = grads
    v, lam = inputs
    if ds is None:
        return torch.zeros_like(v), torch.zeros_like(lam)
    weights = _conjugated(ds).contiguous()
    return _kernel_values(weights, lam, v.shape[-1], launch), _kernel_gradients(weights, lam, v, True, launch)[1]


vandermonde_triton_op = kernel_op("vandermonde_triton", "Tensor w, Tensor dt_lam", "int length", outputs=1,
                                  residuals=0, forward=_forward, backward=_backward)


vandermonde_summary_triton_op = kernel_op("vandermonde_summary_triton", "Tensor v, Tensor dt_lam", "", outputs=1,
                                          residuals=0, forward=_summary_forward, backward=_summary_backward)


def _rows(x: torch.Tensor, dt_lam: torch.Tensor):
    """x (H, ..., n) -> (rows, n), and dt_lam (H, N) complex repeated for each row of its channel -> (rows, N, 2)
    pairs (autograd sums its gradient over them)."""
    H, N = dt_lam.shape
    lam = dt_lam.resolve_conj()[:, None, :].expand(H, math.prod(x.shape[1:-1]), N).reshape(-1, N)
    return x.reshape(-1, x.shape[-1]), torch.view_as_real(lam).contiguous()


def vandermonde_triton(w: torch.Tensor, dt_lam: torch.Tensor, length: int) -> torch.Tensor:
    """Same signature and semantics as `ssmforge.kernels.ref.vandermonde_ref`: w (H, ..., N), dt_lam (H, N)
    complex -> K (H, ..., length) real."""
    rows, lam = _rows(w, dt_lam)
    k = vandermonde_triton_op(torch.view_as_real(rows.resolve_conj()).contiguous(), lam, int(length))
    return k.reshape(*w.shape[:-1], int(length))


def vandermonde_summary_triton(v: torch.Tensor, dt_lam: torch.Tensor) -> torch.Tensor:
    """Same signature and semantics as `ssmforge.kernels.ref.vandermonde_summary_ref`: v (H, ..., L) real,
    dt_lam (H, N) complex -> S (H, ..., N) complex."""
    rows, lam = _rows(v, dt_lam)
    sums = vandermonde_summary_triton_op(rows.to(lam.dtype).contiguous(), lam)
    return torch.view_as_complex(sums).reshape(*v.shape[:-1], dt_lam.shape[-1])
