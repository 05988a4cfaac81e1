"""Triton kernel of the linear recurrence x_t = a_t x_{t-1} + b_t from a zero state (the LRU's scan,
kernels.ssm_kernels.linear_scan), forward and backward.

One program owns (one batch row, BLOCK_N states) and walks the sequence in tiles of BLOCK_L positions. Inside a
tile the recurrence is an associative scan of the affine maps x -> a x + b (complex products on (re, im) pairs);
the state is carried from tile to tile in registers, so the forward reads a and b once and writes x once, where
PyTorch's doubling scan (kernels.ref.linear_scan_ref) makes ceil(log2 L) passes over (batch, L, N) tensors.

The backward is the adjoint recurrence G_t = gx_t + conj(a_{t+1}) G_{t+1}, walked from the last tile to the
first with each tile's positions loaded last to first, so that it too is a forward scan (compiled Triton's
reverse scans compose a non-commutative combine in the wrong order, triton#4362: no kernel here uses one). Then
grad b_t = G_t and grad a_t = G_t conj(x_{t-1}), from the forward's x: backward keeps a and x, as PyTorch's scan
does, not b. `a` is read through its strides: one row for the whole batch, or one value expanded over time (the
LRU's lambda without document resets), is not copied; its gradient is written per row and summed by torch (no
atomics).
Arithmetic runs in the inputs' precision (float32 for complex64, float64 for complex128). Complex tensors travel
as torch.view_as_real pairs; real ones as they are (COMPLEX false).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..custom_op import kernel_op
from ..ref import linear_scan_operands
from .scan_kernels import _compose

# a tile of (positions, states): compiles for sm_80 and sm_90 without spills (benchmarks/kernel_resources.py)
BLOCK_L, BLOCK_N = 32, 32


@triton.jit
def _compose_complex(ar, ai, xr, xi, br, bi, yr, yi):
    """Compose two affine maps h -> a h + x of complex numbers: first (a, x), then (b, y)."""
    return ar * br - ai * bi, ar * bi + ai * br, br * xr - bi * xi + yr, br * xi + bi * xr + yi


@triton.jit
def _last(tile, steps, BLOCK_L: tl.constexpr):
    """The (BLOCK_L, BLOCK_N) tile's last row, (BLOCK_N,): `steps` are the row indices 0..BLOCK_L-1."""
    return tl.sum(tl.where(steps[:, None] == BLOCK_L - 1, tile, 0.0), axis=0)


@triton.jit
def _program(N, dtype: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr):
    """This program's batch row (int64: offsets through it pass 2^31), states, their mask, a tile's steps, and
    the zero (re, im) to carry into the first tile."""
    row, pid_n = tl.program_id(0).to(tl.int64), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    zero = tl.zeros((BLOCK_N,), dtype=dtype)
    return row, offs_n, offs_n < N, tl.arange(0, BLOCK_L), zero, zero


@triton.jit
def _carried_scan(mr, mi, vr, vi, hr, hi, steps, COMPLEX: tl.constexpr, BLOCK_L: tl.constexpr):
    """The tile's values of the recurrence h -> m h + v along its rows, entered with the carried h = (hr, hi);
    and its last row, the h to carry into the next tile. Real (not COMPLEX): mi, vi, hi are passed through."""
    if COMPLEX:
        Mr, Mi, Vr, Vi = tl.associative_scan((mr, mi, vr, vi), axis=0, combine_fn=_compose_complex)
        xr = Vr + Mr * hr[None, :] - Mi * hi[None, :]
        xi = Vi + Mr * hi[None, :] + Mi * hr[None, :]
        return xr, xi, _last(xr, steps, BLOCK_L), _last(xi, steps, BLOCK_L)
    else:
        Mr, Vr = tl.associative_scan((mr, vr), axis=0, combine_fn=_compose)
        xr = Vr + Mr * hr[None, :]
        return xr, vi, _last(xr, steps, BLOCK_L), hi


@triton.jit
def linear_scan_fwd_kernel(a_ptr, b_ptr, x_ptr, L, N, sa_row, sa_t, sa_n, COMPLEX: tl.constexpr,
                           BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr):
    dtype = x_ptr.dtype.element_ty
    row, offs_n, n_mask, steps, hr, hi = _program(N, dtype, BLOCK_N, BLOCK_L)
    P: tl.constexpr = 2 if COMPLEX else 1
    for start in range(0, L, BLOCK_L):
        offs_t = start + steps
        mask = (offs_t < L)[:, None] & n_mask[None, :]
        cell = (offs_t[:, None] * N + offs_n[None, :]) * P
        own = row * L * N * P + cell
        a_at = a_ptr + row * sa_row + offs_t[:, None] * sa_t + offs_n[None, :] * sa_n
        b_at, x_at = b_ptr + own, x_ptr + own
        # positions past L map x -> x (a = 1, b = 0): the tile's last row is then the state to carry
        ar = tl.load(a_at, mask=mask, other=1.0).to(dtype)
        br = tl.load(b_at, mask=mask, other=0.0).to(dtype)
        ai, bi = ar, br
        if COMPLEX:
            ai = tl.load(a_at + 1, mask=mask, other=0.0).to(dtype)
            bi = tl.load(b_at + 1, mask=mask, other=0.0).to(dtype)
        xr, xi, hr, hi = _carried_scan(ar, ai, br, bi, hr, hi, steps, COMPLEX, BLOCK_L)
        tl.store(x_at, xr, mask=mask)
        if COMPLEX:
            tl.store(x_at + 1, xi, mask=mask)


@triton.jit
def linear_scan_bwd_kernel(a_ptr, x_ptr, gx_ptr, da_ptr, db_ptr, L, N, sa_row, sa_t, sa_n, COMPLEX: tl.constexpr,
                           BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr):
    """G over the tiles from the last, each tile's positions last to first (offs_t descending), as a forward
    scan of G -> conj(a_{t+1}) G + gx_t; then db = G and da (batch rows, L, N) = G conj(x_{t-1})."""
    dtype = db_ptr.dtype.element_ty
    row, offs_n, n_mask, steps, gr, gi = _program(N, dtype, BLOCK_N, BLOCK_L)
    P: tl.constexpr = 2 if COMPLEX else 1
    for done in range(0, L, BLOCK_L):
        offs_t = L - 1 - done - steps  # descending; below 0 past the first position
        valid = (offs_t >= 0)[:, None] & n_mask[None, :]
        following = (offs_t + 1 < L)[:, None] & valid  # a_{t+1} exists: nothing follows the last position
        before = (offs_t >= 1)[:, None] & valid  # x_{t-1} exists: the state before the first is zero
        cell = (offs_t[:, None] * N + offs_n[None, :]) * P
        own = row * L * N * P + cell
        next_a = a_ptr + row * sa_row + (offs_t[:, None] + 1) * sa_t + offs_n[None, :] * sa_n
        prev_x = x_ptr + own - N * P
        # positions before 0 map G -> G (multiplier 1, input 0): the tile's last row is then the G to carry
        mr = tl.where(valid, tl.load(next_a, mask=following, other=0.0).to(dtype), 1.0)
        g_r = tl.load(gx_ptr + own, mask=valid, other=0.0).to(dtype)
        x_r = tl.load(prev_x, mask=before, other=0.0).to(dtype)
        mi, g_i, x_i = mr, g_r, x_r
        if COMPLEX:
            mi = -tl.load(next_a + 1, mask=following, other=0.0).to(dtype)  # conj(a_{t+1})
            g_i = tl.load(gx_ptr + own + 1, mask=valid, other=0.0).to(dtype)
            x_i = tl.load(prev_x + 1, mask=before, other=0.0).to(dtype)
        Gr, Gi, gr, gi = _carried_scan(mr, mi, g_r, g_i, gr, gi, steps, COMPLEX, BLOCK_L)
        tl.store(db_ptr + own, Gr, mask=valid)
        if COMPLEX:
            tl.store(db_ptr + own + 1, Gi, mask=valid)
            tl.store(da_ptr + own, Gr * x_r + Gi * x_i, mask=valid)  # G conj(x_{t-1})
            tl.store(da_ptr + own + 1, Gi * x_r - Gr * x_i, mask=valid)
        else:
            tl.store(da_ptr + own, Gr * x_r, mask=valid)


def _grid(b: torch.Tensor, N: int) -> tuple[int, int]:
    return b.shape[0], triton.cdiv(N, BLOCK_N)


def _a_strides(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int, int]:
    """a's (row, position, state) strides in elements: row 0 where one row serves the whole batch; position 0
    where a is one value expanded over time (the LRU's lambda), which is then read in place, not copied."""
    return (0 if a.shape[0] != b.shape[0] else a.stride(0)), a.stride(1), a.stride(2)


def _forward(a, b, is_complex, *, launch):
    L, N = b.shape[1], b.shape[2]
    x = torch.empty_like(b)
    if launch and x.numel():
        linear_scan_fwd_kernel[_grid(b, N)](a, b, x, L, N, *_a_strides(a, b), COMPLEX=is_complex, BLOCK_L=BLOCK_L,
                                            BLOCK_N=BLOCK_N)
    return (x,)


def _backward(grads, inputs, residuals, is_complex, *, launch):
    (gx,) = grads
    a, b = inputs
    (x,) = residuals
    L, N = b.shape[1], b.shape[2]
    if gx is None:
        return torch.zeros_like(a), torch.zeros_like(b)
    da, db = torch.empty_like(b), torch.empty_like(b)  # da per batch row
    if launch and b.numel():
        linear_scan_bwd_kernel[_grid(b, N)](a, x, gx.contiguous(), da, db, L, N, *_a_strides(a, b),
                                            COMPLEX=is_complex, BLOCK_L=BLOCK_L, BLOCK_N=BLOCK_N)
    return (da.sum(0, keepdim=True) if a.shape[0] != b.shape[0] else da), db


# backward reads a and x, and only b's shape
linear_scan_triton_op = kernel_op("linear_scan_triton", "Tensor a, Tensor b", "bool is_complex", outputs=1,
                                  residuals=0, forward=_forward, backward=_backward, saves_outputs=True,
                                  shape_only=(1,))


def linear_scan_triton(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Same signature and semantics as `ssmforge.kernels.ref.linear_scan_ref`: a (batch or 1, L, N), b (batch, L,
    N), real or complex of one dtype -> x (batch, L, N)."""
    a, b = linear_scan_operands(a, b)
    if not b.is_complex():
        return linear_scan_triton_op(a, b, False)
    # (re, im) pairs: a view_as_real of a stays in place (its states, now pairs, adjacent)
    return torch.view_as_complex(linear_scan_triton_op(torch.view_as_real(a), torch.view_as_real(b), True))
