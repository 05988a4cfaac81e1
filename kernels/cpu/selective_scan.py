"""Fast CPU selective scan: the fused C kernel (`scan_source`) behind a torch.autograd.Function.

Inputs are converted once to fp32 contiguous layouts the kernel reads with unit stride (B and C
as (batch, groups, L, n)); the kernel accumulates in fp32 and the outputs go back to the input
dtypes. Saved for backward: the inputs and the state entering every chunk, (batch, d, L / chunk, n)
fp32, never the full (batch, d, L, n) states. Falls back to the chunked PyTorch scan when no C
compiler is available.
"""
from __future__ import annotations

import ctypes

import torch

from .build import ScanArgs, load_library
from .chunked import selective_scan_chunked

CHUNK = 64  # steps between saved states: backward recomputes at most this many per row at a time


def num_groups(B: torch.Tensor, C: torch.Tensor) -> int:
    """Groups of the grouped (4-D) B/C, 1 if neither is grouped."""
    groups = {X.shape[1] for X in (B, C) if X.dim() == 4}
    if len(groups) > 1:
        raise ValueError(f"B and C must have the same number of groups, got {sorted(groups)}")
    return groups.pop() if groups else 1


def _bc_layout(X: torch.Tensor, groups: int) -> tuple[torch.Tensor, bool]:
    """(d, n) fixed stays; (batch, n, L) (shared by every group) and (batch, groups, n, L) become
    (batch, groups, L, n) fp32."""
    if X.dim() == 2:
        return X.float().contiguous(), True
    if X.dim() == 3:
        X = X.unsqueeze(1).expand(-1, groups, -1, -1)
    return X.float().transpose(-1, -2).contiguous(), False


def _grad_bc(grad: torch.Tensor, like: tuple[torch.dtype, int], fixed: bool) -> torch.Tensor:
    """Undo `_bc_layout` on a gradient: per-row partials (batch, d, n) sum over batch when fixed."""
    dtype, ndim = like
    if fixed:
        return grad.sum(0).to(dtype)
    grad = grad.transpose(-1, -2)
    return (grad.sum(1) if ndim == 3 else grad).to(dtype)


def _ptr(t: torch.Tensor | None):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float().contiguous()


class _FusedScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk):
        lib = load_library()
        batch, dim, L = u.shape
        n = A.shape[1]
        uf, deltaf, Af, Df, zf, biasf = (_f32(t) for t in (u, delta, A, D, z, delta_bias))
        groups = num_groups(B, C)
        Bf, B_fixed = _bc_layout(B, groups)
        Cf, C_fixed = _bc_layout(C, groups)
        n_chunks = (L + chunk - 1) // chunk
        args = ScanArgs(batch, dim, L, n, groups, chunk, n_chunks, *(
            _ptr(t) for t in (uf, deltaf, Af, Bf, Cf, Df, zf, biasf)), int(B_fixed), int(C_fixed), int(delta_softplus))
        f32 = dict(dtype=torch.float32)
        out = torch.empty(batch, dim, L, **f32)
        chunk_states = torch.empty(batch, dim, n_chunks, n, **f32)
        last_state = torch.empty(batch, dim, n, **f32)
        lib.scan_fwd(ctypes.byref(args), _ptr(out), _ptr(chunk_states), _ptr(last_state), torch.get_num_threads())
        ctx.save_for_backward(uf, deltaf, Af, Bf, Cf, Df, zf, biasf, chunk_states)
        ctx.meta = (args, B_fixed, C_fixed)
        ctx.like = [None if t is None else (t.dtype, t.dim()) for t in (u, delta, A, B, C, D, z, delta_bias)]
        ctx.set_materialize_grads(False)
        return out.to(u.dtype), last_state

    @staticmethod
    def backward(ctx, dout, dlast):
        lib = load_library()
        uf, deltaf, Af, Bf, Cf, Df, zf, biasf, chunk_states = ctx.saved_tensors
        args, B_fixed, C_fixed = ctx.meta
        # the struct holds raw pointers: refresh them from the saved tensors
        for name, t in zip(("u", "delta", "A", "B", "C", "D", "z", "delta_bias"), (uf, deltaf, Af, Bf, Cf, Df, zf, biasf)):
            setattr(args, name, None if t is None else t.data_ptr())
        batch, dim, L = uf.shape
        n = Af.shape[1]
        f32 = dict(dtype=torch.float32)
        dout = torch.zeros(batch, dim, L, **f32) if dout is None else dout.float().contiguous()
        dlast = None if dlast is None else dlast.float().contiguous()
        du, ddelta = torch.empty(batch, dim, L, **f32), torch.empty(batch, dim, L, **f32)
        dz = torch.empty(batch, dim, L, **f32) if zf is not None else None
        dA_rows = torch.empty(batch, dim, n, **f32)
        dB = torch.empty(batch, dim, n, **f32) if B_fixed else torch.zeros_like(Bf)
        dC = torch.empty(batch, dim, n, **f32) if C_fixed else torch.zeros_like(Cf)
        dD_rows, dbias_rows = torch.empty(batch, dim, **f32), torch.empty(batch, dim, **f32)
        lib.scan_bwd(ctypes.byref(args), _ptr(chunk_states), _ptr(dout), _ptr(dlast), _ptr(du), _ptr(ddelta),
                     _ptr(dz), _ptr(dA_rows), _ptr(dB), _ptr(dC), _ptr(dD_rows), _ptr(dbias_rows),
                     torch.get_num_threads())
        u, delta, A, B, C, D, z, delta_bias = ctx.like
        return (
            du.to(u[0]), ddelta.to(delta[0]), dA_rows.sum(0).to(A[0]),
            _grad_bc(dB, B, B_fixed), _grad_bc(dC, C, C_fixed),
            None if D is None else dD_rows.sum(0).to(D[0]),
            None if z is None else dz.to(z[0]),
            None if delta_bias is None else dbias_rows.sum(0).to(delta_bias[0]),
            None, None,
        )


def selective_scan_cpu(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, chunk: int = CHUNK):
    """Selective scan on CPU tensors; signature and semantics of `ssmforge.kernels.ref.selective_scan_ref`.

    chunk: steps between the states saved for backward (small values exercise the carry in tests).
    """
    tensors = [t for t in (u, delta, A, B, C, D, z, delta_bias) if t is not None]
    if any(t.device.type != "cpu" for t in tensors):
        raise ValueError("the 'cpu' selective-scan backend takes CPU tensors only")
    if load_library() is None:
        return selective_scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    out, last_state = _FusedScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk)
    return (out, last_state) if return_last_state else out
