"""Triton Cauchy sums of S4's bilinear kernel (S4, Liquid-S4), forward and backward, fused.

out[h, j, k] = sum_n num[h, j, n] r[h, k, n],   r = 1 / (nodes[k] - scales[h, k] poles[h, n])

The PyTorch path (kernels.ref.cauchy_ref) materialises the (H, K, N) resolvent r (2.1 GiB in complex128 at
d_model 2048, L 2048, N 64) and its backward keeps it; here each program makes its tile of r in registers.
Complex numbers travel as torch.view_as_real pairs and are multiplied out by hand. With g the output's gradient
and PyTorch's convention for holomorphic maps (grad_x = sum g conj(d out / d x)):

    grad num[h, j, n] = sum_k g[h, j, k] conj(r)
    grad poles[h, n]  = sum_j conj(num[h, j, n]) sum_k g[h, j, k] conj(scales[h, k] r^2)
    grad scales[h, k] = sum_j g[h, j, k] conj(sum_n num[h, j, n] poles[h, n] r^2)

Programs cover one (channel, numerator row) pair: the forward and the scales' gradient a block of nodes each,
summing over the poles; the numerators' and poles' gradients a block of poles each, summing over the nodes. The
sums over the rows j are torch's (the kernels write per-row partials, no atomics). The nodes are constants
(roots of unity): no gradient. Arithmetic in the inputs' precision (float64 for S4, see models.s4).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..custom_op import kernel_op

# tiles (poles, nodes) that compile for sm_80 and sm_90 without spills (benchmarks/kernel_resources.py)
BLOCK_N, BLOCK_K = 16, 32


@triton.jit
def _pair(ptr, offs, mask):
    """(re, im) of complex numbers stored as view_as_real pairs, at element offsets offs."""
    return tl.load(ptr + offs * 2, mask=mask, other=0.0), tl.load(ptr + offs * 2 + 1, mask=mask, other=0.0)


@triton.jit
def _store_pair(ptr, offs, re, im, mask):
    tl.store(ptr + offs * 2, re, mask=mask)
    tl.store(ptr + offs * 2 + 1, im, mask=mask)


@triton.jit
def _program(J, BLOCK: tl.constexpr):
    """This program's numerator row (h * J + j), channel h and block of BLOCK offsets (poles or nodes)."""
    row = tl.program_id(0).to(tl.int64)
    return row, row // J, tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)


@triton.jit
def _zero_pair(BLOCK: tl.constexpr, dtype: tl.constexpr):
    return tl.zeros((BLOCK,), dtype=dtype), tl.zeros((BLOCK,), dtype=dtype)


@triton.jit
def _resolvent(pole_ptr, node_ptr, scale_ptr, h, offs_n, offs_k, N, K):
    """The (BLOCK_N, BLOCK_K) tile of r = 1 / (nodes - scales poles), as (re, im), and the tile's scales
    (sr, si) (1, BLOCK_K) and poles (pr, pi) (BLOCK_N, 1). Poles past N and nodes past K give r = 1 / 1."""
    n_mask, k_mask = offs_n < N, offs_k < K
    pr, pi = _pair(pole_ptr, h * N + offs_n, n_mask)
    ar, ai = _pair(node_ptr, offs_k, k_mask)
    sr, si = _pair(scale_ptr, h * K + offs_k, k_mask)
    pr, pi, ar, ai, sr, si = pr[:, None], pi[:, None], ar[None, :], ai[None, :], sr[None, :], si[None, :]
    dr = ar - (sr * pr - si * pi)
    di = ai - (sr * pi + si * pr)
    valid = (n_mask[:, None] & k_mask[None, :])
    dr = tl.where(valid, dr, 1.0)
    di = tl.where(valid, di, 0.0)
    norm = dr * dr + di * di
    return dr / norm, -di / norm, sr, si, pr, pi


@triton.jit
def _over_poles(num_ptr, pole_ptr, node_ptr, scale_ptr, row, h, start, offs_k, N, K, BLOCK_N: tl.constexpr):
    """For the poles start..start+BLOCK_N against nodes offs_k: r (re, im), the poles and the row's numerators,
    each (BLOCK_N, 1) or (BLOCK_N, BLOCK_K)."""
    offs_n = start + tl.arange(0, BLOCK_N)
    rr, ri, _, _, pr, pi = _resolvent(pole_ptr, node_ptr, scale_ptr, h, offs_n, offs_k, N, K)
    nr, ni = _pair(num_ptr, row * N + offs_n, offs_n < N)
    return rr, ri, pr, pi, nr[:, None], ni[:, None]


@triton.jit
def cauchy_fwd_kernel(num_ptr, pole_ptr, node_ptr, scale_ptr, out_ptr, J, N, K, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    row, h, offs_k = _program(J, BLOCK_K)
    acc_r, acc_i = _zero_pair(BLOCK_K, out_ptr.dtype.element_ty)
    for start in range(0, N, BLOCK_N):
        rr, ri, _, _, nr, ni = _over_poles(num_ptr, pole_ptr, node_ptr, scale_ptr, row, h, start, offs_k, N, K,
                                           BLOCK_N)
        acc_r += tl.sum(nr * rr - ni * ri, axis=0)
        acc_i += tl.sum(nr * ri + ni * rr, axis=0)
    _store_pair(out_ptr, row * K + offs_k, acc_r, acc_i, offs_k < K)


@triton.jit
def cauchy_bwd_poles_kernel(num_ptr, pole_ptr, node_ptr, scale_ptr, grad_ptr, dnum_ptr, dpole_part_ptr, J, N, K,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dnum (H, J, N) and the row's partial of dpoles (H, J, N)."""
    row, h, offs_n = _program(J, BLOCK_N)
    dn_r, dn_i = _zero_pair(BLOCK_N, dnum_ptr.dtype.element_ty)
    u_r, u_i = _zero_pair(BLOCK_N, dnum_ptr.dtype.element_ty)  # sum_k g conj(s r^2)
    for start in range(0, K, BLOCK_K):
        offs_k = start + tl.arange(0, BLOCK_K)
        rr, ri, sr, si, _, _ = _resolvent(pole_ptr, node_ptr, scale_ptr, h, offs_n, offs_k, N, K)
        gr, gi = _pair(grad_ptr, row * K + offs_k, offs_k < K)
        gr, gi = gr[None, :], gi[None, :]
        dn_r += tl.sum(gr * rr + gi * ri, axis=1)  # g conj(r)
        dn_i += tl.sum(gi * rr - gr * ri, axis=1)
        r2r, r2i = rr * rr - ri * ri, 2 * rr * ri
        tr, ti = sr * r2r - si * r2i, sr * r2i + si * r2r  # s r^2
        u_r += tl.sum(gr * tr + gi * ti, axis=1)
        u_i += tl.sum(gi * tr - gr * ti, axis=1)
    n_mask = offs_n < N
    nr, ni = _pair(num_ptr, row * N + offs_n, n_mask)
    _store_pair(dnum_ptr, row * N + offs_n, dn_r, dn_i, n_mask)
    _store_pair(dpole_part_ptr, row * N + offs_n, nr * u_r + ni * u_i, nr * u_i - ni * u_r, n_mask)  # conj(num) u


@triton.jit
def cauchy_bwd_scales_kernel(num_ptr, pole_ptr, node_ptr, scale_ptr, grad_ptr, dscale_part_ptr, J, N, K,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The row's partial of dscales (H, J, K): g conj(sum_n num poles r^2)."""
    row, h, offs_k = _program(J, BLOCK_K)
    v_r, v_i = _zero_pair(BLOCK_K, dscale_part_ptr.dtype.element_ty)
    for start in range(0, N, BLOCK_N):
        rr, ri, pr, pi, nr, ni = _over_poles(num_ptr, pole_ptr, node_ptr, scale_ptr, row, h, start, offs_k, N, K,
                                             BLOCK_N)
        mr, mi = nr * pr - ni * pi, nr * pi + ni * pr  # num poles
        r2r, r2i = rr * rr - ri * ri, 2 * rr * ri
        v_r += tl.sum(mr * r2r - mi * r2i, axis=0)
        v_i += tl.sum(mr * r2i + mi * r2r, axis=0)
    k_mask = offs_k < K
    gr, gi = _pair(grad_ptr, row * K + offs_k, k_mask)
    _store_pair(dscale_part_ptr, row * K + offs_k, gr * v_r + gi * v_i, gi * v_r - gr * v_i, k_mask)  # g conj(v)


def _forward(num, poles, scales, nodes, *, launch):
    H, J, N, _ = num.shape
    K = nodes.shape[0]
    out = torch.empty(H, J, K, 2, device=num.device, dtype=num.dtype)
    if launch and H and J and K:
        cauchy_fwd_kernel[(H * J, triton.cdiv(K, BLOCK_K))](num, poles, nodes, scales, out, J, N, K,
                                                             BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return (out,)


def _backward(grads, inputs, residuals, nodes, *, launch):
    (grad,) = grads
    num, poles, scales = inputs
    H, J, N, _ = num.shape
    K = nodes.shape[0]
    dnum = torch.zeros_like(num)
    dpole_part = torch.zeros(H, J, N, 2, device=num.device, dtype=num.dtype)
    dscale_part = torch.zeros(H, J, K, 2, device=num.device, dtype=num.dtype)
    if launch and H and J and K and grad is not None:
        grad = grad.contiguous()
        cauchy_bwd_poles_kernel[(H * J, triton.cdiv(N, BLOCK_N))](num, poles, nodes, scales, grad, dnum, dpole_part,
                                                                   J, N, K, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
        cauchy_bwd_scales_kernel[(H * J, triton.cdiv(K, BLOCK_K))](num, poles, nodes, scales, grad, dscale_part,
                                                                    J, N, K, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return dnum, dpole_part.sum(1), dscale_part.sum(1)


# nodes is an option, not an input: constants, no gradient
cauchy_triton_op = kernel_op("cauchy_triton", "Tensor numerators, Tensor poles, Tensor scales", "Tensor nodes",
                             outputs=1, residuals=0, forward=_forward, backward=_backward)


def cauchy_triton(numerators: torch.Tensor, poles: torch.Tensor, nodes: torch.Tensor,
                  scales: torch.Tensor) -> torch.Tensor:
    """Same signature and semantics as `ssmforge.kernels.ref.cauchy_ref`: numerators (H, J, N), poles (H, N),
    nodes (K,), scales (H, K) complex -> (H, J, K) complex."""
    num, poles, scales, nodes = (torch.view_as_real(t.resolve_conj()).contiguous()
                                 for t in (numerators, poles, scales, nodes.detach()))
    return torch.view_as_complex(cauchy_triton_op(num, poles, scales, nodes))
