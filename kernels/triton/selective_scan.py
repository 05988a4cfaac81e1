"""The Triton selective scan as the custom op ssmforge::selective_scan_triton (launch code for `scan_kernels`).

Saved for backward: the inputs (seq_idx too, int32 (batch, L), when given) and the fp32 state entering every chunk
of CHUNK steps, (batch, d, L / CHUNK, n)."""
from __future__ import annotations

import torch
import triton

from .. import deterministic
from ..custom_op import kernel_op
from ..documents import check_seq_idx
from ..fused_scan import SCAN_INPUTS, SCAN_OPTIONS, ScanGrads, num_groups
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


def _launch_config(u, A, B, C, chunk):
    """What both kernels take besides the tensors: the grid, B and C as strided views, their strides,
    the channels per group and the compile-time constants."""
    dim = u.shape[1]
    groups = num_groups(B, C)
    (Bv, sB, B_fixed), (Cv, sC, C_fixed) = _bc_view(B, groups), _bc_view(C, groups)
    meta = dict(BLOCK_D=_block_d(dim // groups), CHUNK=chunk, N=max(triton.next_power_of_2(A.shape[1]), 2),
                B_FIXED=B_fixed, C_FIXED=C_fixed)
    return (u.shape[0], triton.cdiv(dim, meta["BLOCK_D"])), (Bv, Cv), (*sB, *sC), dim // groups, meta


def _contiguous(u, delta, A, z):
    """The layouts the kernels index with plain offsets (B and C go by their strides)."""
    return u.contiguous(), delta.contiguous(), A.contiguous(), None if z is None else z.contiguous()


def _forward(u, delta, A, B, C, D, z, delta_bias, seq_idx, delta_softplus, chunk, launch):
    """-> out (batch, d, L) in u's dtype, last state (batch, d, n) fp32, and the residual: the state
    entering every chunk, (batch, d, cdiv(L, chunk), n) fp32."""
    u, delta, A, z = _contiguous(u, delta, A, z)
    batch, dim, L = u.shape
    n = A.shape[1]
    out = torch.empty_like(u)
    chunk_states = torch.empty(batch, dim, triton.cdiv(L, chunk), n, device=u.device, dtype=torch.float32)
    last_state = torch.empty(batch, dim, n, device=u.device, dtype=torch.float32)
    if launch:
        grid, BC, strides, dims_per_group, meta = _launch_config(u, A, B, C, chunk)
        dummy = chunk_states  # stands in for absent optional pointers; never read
        scan_fwd_kernel[grid](
            u, delta, A, *BC, D if D is not None else dummy, z if z is not None else dummy,
            delta_bias if delta_bias is not None else dummy, seq_idx if seq_idx is not None else dummy,
            out, chunk_states, last_state, dim, L, n, chunk_states.shape[2], dims_per_group, *strides,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
            HAS_SEQ_IDX=seq_idx is not None, **meta,
        )
    return out, last_state, chunk_states


def _input_dependent(B, C) -> list[str]:
    return [name for name, X in (("dB", B), ("dC", C)) if X.dim() != 2]


def _with_partials(result: ScanGrads, u, A, B, C) -> ScanGrads:
    """Deterministic mode: the gradients of input-dependent B/C as one row of partials per program,
    (batch, d / BLOCK_D, L, n) fp32, instead of the (batch, groups, L, n) rows accumulated atomically."""
    batch, dim, L = u.shape
    programs = dim // _block_d(dim // num_groups(B, C))
    return result._replace(**{name: torch.empty(batch, programs, L, A.shape[1], device=u.device, dtype=torch.float32)
                              for name in _input_dependent(B, C)})


def _backward(grads, inputs, residuals, delta_softplus, chunk, launch):
    u, delta, A, B, C, D, z, delta_bias, seq_idx = inputs
    u, delta, A, z = _contiguous(u, delta, A, z)
    dout, dlast = grads
    (chunk_states,) = residuals
    dout = torch.zeros(u.shape, device=u.device, dtype=torch.float32) if dout is None else dout.contiguous()
    result = ScanGrads.allocate(u, A, B, C, z)
    det = deterministic()
    if det:
        result = _with_partials(result, u, A, B, C)
    if launch:
        grid, BC, strides, dims_per_group, meta = _launch_config(u, A, B, C, chunk)
        dummy = chunk_states  # stands in for absent optional pointers; never read
        scan_bwd_kernel[grid](
            u, delta, A, *BC, D if D is not None else dummy, z if z is not None else dummy,
            delta_bias if delta_bias is not None else dummy, seq_idx if seq_idx is not None else dummy,
            chunk_states, dout,
            dlast.contiguous() if dlast is not None else dummy, *(t if t is not None else dummy for t in result),
            u.shape[1], u.shape[2], A.shape[1], chunk_states.shape[2], dims_per_group, *strides,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            SOFTPLUS=delta_softplus, HAS_DLAST=dlast is not None, DETERMINISTIC=det,
            HAS_SEQ_IDX=seq_idx is not None, **meta,
        )
    if det:  # the programs of a group are consecutive: sum their partials, always in the same order
        groups = num_groups(B, C)
        result = result._replace(**{name: getattr(result, name).unflatten(1, (groups, -1)).sum(2)
                                    for name in _input_dependent(B, C)})
    return result.input_grads(*inputs)


selective_scan_triton_op = kernel_op("selective_scan_triton", SCAN_INPUTS, SCAN_OPTIONS, outputs=2, residuals=1,
                                     forward=_forward, backward=_backward)


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False, chunk: int = CHUNK, seq_idx=None):
    """Selective scan through the Triton kernels; signature and semantics of `selective_scan_ref`.

    chunk: steps per scan tile (a power of two); small values exercise the chunk carry in tests.
    """
    # made contiguous here, under autograd, so that the op saves for backward the copies it reads
    u, delta, A, z = _contiguous(u, delta, A, z)
    seq_idx = check_seq_idx(seq_idx, u.shape[0], u.shape[2])  # int32 (batch, L), as the kernels read it
    seq_idx = None if seq_idx is None else seq_idx.contiguous()
    out, last_state, _ = selective_scan_triton_op(u, delta, A, B, C, D, z, delta_bias, seq_idx, delta_softplus,
                                                  chunk)
    return (out, last_state) if return_last_state else out
