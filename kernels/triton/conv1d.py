"""Triton causal depthwise conv1d (width 2..4, optional SiLU), forward and backward.

out[b, c, t] = act(bias[c] + sum_k weight[c, k] * x[b, c, t - (width - 1) + k]), zeros before t = 0.
One program covers (one batch row, BLOCK_D channels, BLOCK_L steps); the width taps are unrolled.
The backward first forms g = dout * act'(pre) (recomputing pre), with per-block partial sums for
dweight and dbias, then dx[t] = sum_k weight[k] g[t + (width - 1) - k]. The custom op
ssmforge::causal_conv1d_triton saves its inputs for backward, nothing else. Offsets are int64
(through the batch program id): batch * d * L passes 2^31 at real shapes.

Documents (seq_idx (batch, L) int32, kernels.documents): a tap reading x[s] for output t is masked off
where seq_idx[s] != seq_idx[t], in the forward, in dweight and (t, s swapped) in dx. A program reads
WIDTH + 1 int32 rows of BLOCK_L (mostly L1/L2 hits), next to WIDTH BLOCK_D x BLOCK_L activation tiles.
HAS_SEQ_IDX is a constexpr: without documents the kernels compile to what they were (the pointer is unused).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..custom_op import kernel_op
from ..documents import check_seq_idx

BLOCK_D, BLOCK_L = 16, 64


@triton.jit
def _documents(seq_ptr, seq_row, offs_l, L, HAS_SEQ_IDX: tl.constexpr):
    """(BLOCK_L,) int32: the documents of steps offs_l (a placeholder without documents)."""
    docs = offs_l
    if HAS_SEQ_IDX:
        docs = tl.load(seq_ptr + seq_row + offs_l, mask=offs_l < L, other=-1)
    return docs


@triton.jit
def _tap_mask(seq_ptr, seq_row, docs, t, L, HAS_SEQ_IDX: tl.constexpr):
    """(BLOCK_L,) bool: step t exists and, with documents, lies in docs (the document of each step here)."""
    valid = (t >= 0) & (t < L)
    if HAS_SEQ_IDX:
        valid = valid & (tl.load(seq_ptr + seq_row + t, mask=valid, other=-2) == docs)
    return valid


@triton.jit
def _preact(x_ptr, w_ptr, b_ptr, seq_ptr, rows, seq_row, offs_d, offs_l, d_mask, L, HAS_BIAS: tl.constexpr,
            HAS_SEQ_IDX: tl.constexpr, WIDTH: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    """Pre-activation (BLOCK_D, BLOCK_L) fp32."""
    acc = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
    docs = _documents(seq_ptr, seq_row, offs_l, L, HAS_SEQ_IDX)
    for k in tl.static_range(WIDTH):
        t = offs_l - (WIDTH - 1) + k
        tap = _tap_mask(seq_ptr, seq_row, docs, t, L, HAS_SEQ_IDX)
        xv = tl.load(x_ptr + rows[:, None] * L + t[None, :], mask=d_mask[:, None] & tap[None, :],
                     other=0.0).to(tl.float32)
        wk = tl.load(w_ptr + offs_d * WIDTH + k, mask=d_mask, other=0.0).to(tl.float32)
        acc += wk[:, None] * xv
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)[:, None]
    return acc


@triton.jit
def conv1d_fwd_kernel(x_ptr, w_ptr, b_ptr, seq_ptr, out_ptr, dim, L, HAS_BIAS: tl.constexpr, HAS_SEQ_IDX: tl.constexpr,
                      SILU: tl.constexpr, WIDTH: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    pid_b, pid_d, pid_l = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    d_mask = offs_d < dim
    rows = pid_b * dim + offs_d
    pre = _preact(x_ptr, w_ptr, b_ptr, seq_ptr, rows, pid_b * L, offs_d, offs_l, d_mask, L, HAS_BIAS, HAS_SEQ_IDX,
                  WIDTH, BLOCK_D, BLOCK_L)
    out = pre * tl.sigmoid(pre) if SILU else pre
    tl.store(out_ptr + rows[:, None] * L + offs_l[None, :], out.to(out_ptr.dtype.element_ty),
             mask=d_mask[:, None] & (offs_l[None, :] < L))


@triton.jit
def conv1d_grad_pre_kernel(x_ptr, w_ptr, b_ptr, seq_ptr, dout_ptr, g_ptr, dw_part_ptr, db_part_ptr, dim, L, n_lblocks,
                           HAS_BIAS: tl.constexpr, HAS_SEQ_IDX: tl.constexpr, SILU: tl.constexpr,
                           WIDTH: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    """g = dout * act'(pre) (batch, d, L) fp32; dw/db partials (batch, n_lblocks, d, WIDTH) / (batch, n_lblocks, d)."""
    pid_b, pid_d, pid_l = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    d_mask = offs_d < dim
    mask = d_mask[:, None] & (offs_l[None, :] < L)
    rows = pid_b * dim + offs_d
    g = tl.load(dout_ptr + rows[:, None] * L + offs_l[None, :], mask=mask, other=0.0).to(tl.float32)
    if SILU:
        pre = _preact(x_ptr, w_ptr, b_ptr, seq_ptr, rows, pid_b * L, offs_d, offs_l, d_mask, L, HAS_BIAS, HAS_SEQ_IDX,
                      WIDTH, BLOCK_D, BLOCK_L)
        s = tl.sigmoid(pre)
        g = g * s * (1.0 + pre * (1.0 - s))
    tl.store(g_ptr + rows[:, None] * L + offs_l[None, :], g, mask=mask)
    part = (pid_b * n_lblocks + pid_l) * dim + offs_d
    docs = _documents(seq_ptr, pid_b * L, offs_l, L, HAS_SEQ_IDX)
    for k in tl.static_range(WIDTH):
        t = offs_l - (WIDTH - 1) + k
        tap = _tap_mask(seq_ptr, pid_b * L, docs, t, L, HAS_SEQ_IDX)
        xv = tl.load(x_ptr + rows[:, None] * L + t[None, :], mask=d_mask[:, None] & tap[None, :],
                     other=0.0).to(tl.float32)
        tl.store(dw_part_ptr + part * WIDTH + k, tl.sum(g * xv, axis=1), mask=d_mask)
    tl.store(db_part_ptr + part, tl.sum(g, axis=1), mask=d_mask)


@triton.jit
def conv1d_grad_x_kernel(g_ptr, w_ptr, seq_ptr, dx_ptr, dim, L, HAS_SEQ_IDX: tl.constexpr, WIDTH: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    pid_b, pid_d, pid_l = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    d_mask = offs_d < dim
    rows = pid_b * dim + offs_d
    acc = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
    docs = _documents(seq_ptr, pid_b * L, offs_l, L, HAS_SEQ_IDX)
    for k in tl.static_range(WIDTH):
        t = offs_l + (WIDTH - 1) - k  # the outputs that read x[offs_l] through tap k
        tap = _tap_mask(seq_ptr, pid_b * L, docs, t, L, HAS_SEQ_IDX)  # same document: symmetric in (t, offs_l)
        gv = tl.load(g_ptr + rows[:, None] * L + t[None, :], mask=d_mask[:, None] & tap[None, :], other=0.0)
        wk = tl.load(w_ptr + offs_d * WIDTH + k, mask=d_mask, other=0.0).to(tl.float32)
        acc += wk[:, None] * gv
    tl.store(dx_ptr + rows[:, None] * L + offs_l[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=d_mask[:, None] & (offs_l[None, :] < L))


def _forward(x, weight, bias, silu, seq_idx=None, *, launch):
    x, weight = x.contiguous(), weight.contiguous()
    batch, dim, L = x.shape
    out = torch.empty_like(x)
    if launch:
        grid = (batch, triton.cdiv(dim, BLOCK_D), triton.cdiv(L, BLOCK_L))
        conv1d_fwd_kernel[grid](x, weight, bias if bias is not None else weight,
                                seq_idx if seq_idx is not None else x, out, dim, L, HAS_BIAS=bias is not None,
                                HAS_SEQ_IDX=seq_idx is not None, SILU=silu, WIDTH=weight.shape[1],
                                BLOCK_D=BLOCK_D, BLOCK_L=BLOCK_L)
    return (out,)


def _backward(grads, inputs, residuals, silu, seq_idx=None, *, launch):
    (dout,) = grads
    x, weight, bias = (t.contiguous() if t is not None else None for t in inputs)
    batch, dim, L = x.shape
    width = weight.shape[1]
    n_lblocks = triton.cdiv(L, BLOCK_L)
    f32 = dict(device=x.device, dtype=torch.float32)
    g = torch.empty(batch, dim, L, **f32)
    dw_part = torch.empty(batch, n_lblocks, dim, width, **f32)
    db_part = torch.empty(batch, n_lblocks, dim, **f32)
    dx = torch.empty_like(x)
    if launch:
        grid = (batch, triton.cdiv(dim, BLOCK_D), n_lblocks)
        seq = seq_idx if seq_idx is not None else x
        conv1d_grad_pre_kernel[grid](x, weight, bias if bias is not None else weight, seq, dout.contiguous(), g,
                                     dw_part, db_part, dim, L, n_lblocks, HAS_BIAS=bias is not None,
                                     HAS_SEQ_IDX=seq_idx is not None, SILU=silu, WIDTH=width,
                                     BLOCK_D=BLOCK_D, BLOCK_L=BLOCK_L)
        conv1d_grad_x_kernel[grid](g, weight, seq, dx, dim, L, HAS_SEQ_IDX=seq_idx is not None, WIDTH=width,
                                   BLOCK_D=BLOCK_D, BLOCK_L=BLOCK_L)
    dbias = None if bias is None else db_part.sum((0, 1)).to(bias.dtype)
    return dx, dw_part.sum((0, 1)).to(weight.dtype), dbias


# seq_idx is an option, not an input: integers, no gradient (an input's would have to be materialised)
causal_conv1d_triton_op = kernel_op("causal_conv1d_triton", "Tensor x, Tensor weight, Tensor? bias",
                                    "bool silu, Tensor? seq_idx=None", outputs=1, residuals=0, forward=_forward,
                                    backward=_backward)


def causal_conv1d_triton(x, weight, bias=None, activation=None, seq_idx=None):
    """Same signature and semantics as `ssmforge.kernels.ref.causal_conv1d_ref` (seq_idx: kernels.documents)."""
    if activation not in (None, "silu"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    if not 2 <= weight.shape[1] <= 4:
        raise ValueError(f"the Triton conv1d supports widths 2..4, got {weight.shape[1]}")
    seq_idx = check_seq_idx(seq_idx, x.shape[0], x.shape[-1])
    # contiguous here, under autograd, so that the op saves for backward the copies it reads
    return causal_conv1d_triton_op(x.contiguous(), weight.contiguous(), bias, activation == "silu",
                                   None if seq_idx is None else seq_idx.contiguous())
