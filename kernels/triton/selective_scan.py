"""The Triton selective scan as a torch.autograd.Function (launch code for `scan_kernels`)."""
from __future__ import annotations

import torch
import triton

from ..cpu.selective_scan import num_groups
from .scan_kernels import scan_bwd_kernel, scan_fwd_kernel

CHUNK = 16  # steps per associative-scan tile; states are checkpointed once per chunk
MAX_BLOCK_D = 8


def _block_d(dims_per_group: int) -> int:
    """Largest power of two <= MAX_BLOCK_D dividing dims_per_group: a program's channels share a group."""
    block = 1
    while block * 2 <= MAX_BLOCK_D and dims_per_group % (block * 2) == 0:
        block *= 2
    return block


def _bc_view(X: torch.Tensor, groups: int) -> tuple[torch.Tensor, tuple[int, int, int, int], bool]:
    """B or C with the strides the kernel reads: fixed (d, n) -> (s_d, 0, s_n, 0); (batch, n, L)
    (shared by every group: group stride 0) and (batch, groups, n, L) -> (s_batch, s_group, s_n, s_L)."""
    if X.dim() == 2:
        return X, (X.stride(0), 0, X.stride(1), 0), True
    if X.dim() == 3:
        X = X.unsqueeze(1).expand(-1, groups, -1, -1)
    return X, tuple(X.stride()), False


def _config(u, A, B, C, chunk):
    batch, dim, L = u.shape
    n = A.shape[1]
    groups = num_groups(B, C)
    dims_per_group = dim // groups
    block_d = _block_d(dims_per_group)
    meta = dict(BLOCK_D=block_d, CHUNK=chunk, N=max(triton.next_power_of_2(n), 2))
    return batch, dim, L, n, groups, dims_per_group, triton.cdiv(L, chunk), meta


class _TritonScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk):
        u, delta = u.contiguous(), delta.contiguous()
        z = None if z is None else z.contiguous()
        A = A.contiguous()
        batch, dim, L, n, groups, dims_per_group, n_chunks, meta = _config(u, A, B, C, chunk)
        Bv, sB, B_fixed = _bc_view(B, groups)
        Cv, sC, C_fixed = _bc_view(C, groups)
        out = torch.empty_like(u)
        chunk_states = torch.empty(batch, dim, n_chunks, n, device=u.device, dtype=torch.float32)
        last_state = torch.empty(batch, dim, n, device=u.device, dtype=torch.float32)
        dummy = chunk_states  # stands in for absent optional pointers; never read
        grid = (batch, triton.cdiv(dim, meta["BLOCK_D"]))
        scan_fwd_kernel[grid](
            u, delta, A, Bv, Cv, D if D is not None else dummy, z if z is not None else dummy,
            delta_bias if delta_bias is not None else dummy, out, chunk_states, last_state,
            dim, L, n, n_chunks, dims_per_group, *sB, *sC,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
            B_FIXED=B_fixed, C_FIXED=C_fixed, **meta,
        )
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, chunk_states)
        ctx.delta_softplus, ctx.chunk = delta_softplus, chunk
        ctx.set_materialize_grads(False)
        return out, last_state

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, delta_bias, chunk_states = ctx.saved_tensors
        batch, dim, L, n, groups, dims_per_group, n_chunks, meta = _config(u, A, B, C, ctx.chunk)
        Bv, sB, B_fixed = _bc_view(B, groups)
        Cv, sC, C_fixed = _bc_view(C, groups)
        f32 = dict(device=u.device, dtype=torch.float32)
        dout = torch.zeros(batch, dim, L, **f32) if dout is None else dout.contiguous()
        du, ddelta = torch.empty(batch, dim, L, **f32), torch.empty(batch, dim, L, **f32)
        dz = torch.empty(batch, dim, L, **f32) if z is not None else chunk_states
        dA_rows = torch.empty(batch, dim, n, **f32)
        dB = torch.empty(batch, dim, n, **f32) if B_fixed else torch.zeros(batch, groups, L, n, **f32)
        dC = torch.empty(batch, dim, n, **f32) if C_fixed else torch.zeros(batch, groups, L, n, **f32)
        dD_rows, dbias_rows = torch.empty(batch, dim, **f32), torch.empty(batch, dim, **f32)
        dummy = chunk_states
        grid = (batch, triton.cdiv(dim, meta["BLOCK_D"]))
        scan_bwd_kernel[grid](
            u, delta, A, Bv, Cv, D if D is not None else dummy, z if z is not None else dummy,
            delta_bias if delta_bias is not None else dummy, chunk_states, dout,
            dlast.contiguous() if dlast is not None else dummy,
            du, ddelta, dz, dA_rows, dB, dC, dD_rows, dbias_rows,
            dim, L, n, n_chunks, dims_per_group, *sB, *sC,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            SOFTPLUS=ctx.delta_softplus, B_FIXED=B_fixed, C_FIXED=C_fixed, HAS_DLAST=dlast is not None, **meta,
        )

        def bc_grad(grad, like, fixed):
            if fixed:
                return grad.sum(0).to(like.dtype)
            grad = grad.transpose(-1, -2)  # (batch, groups, n, L)
            return (grad.sum(1) if like.dim() == 3 else grad).to(like.dtype)

        return (
            du.to(u.dtype), ddelta.to(delta.dtype), dA_rows.sum(0).to(A.dtype),
            bc_grad(dB, B, B_fixed), bc_grad(dC, C, C_fixed),
            None if D is None else dD_rows.sum(0).to(D.dtype),
            None if z is None else dz.to(z.dtype),
            None if delta_bias is None else dbias_rows.sum(0).to(delta_bias.dtype),
            None, None,
        )


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False, chunk: int = CHUNK):
    """Selective scan through the Triton kernels; signature and semantics of `selective_scan_ref`.

    chunk: steps per scan tile (a power of two); small values exercise the chunk carry in tests.
    """
    out, last_state = _TritonScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk)
    return (out, last_state) if return_last_state else out
