"""Fast CPU selective scan: the fused C kernel (`scan_source`) as the custom op
ssmforge::selective_scan_cpu_channels_last.

The kernel reads u, delta and z with any strides (Mamba hands them over as channels-last views of its
projections) and writes out, du, ddelta and dz channels-last: (batch, d, L) views of (batch, L, d)
buffers, the layout of the projections around the scan, so neither side makes a transposed copy.
Only dtypes are converted (to fp32; the kernel accumulates in fp32 and the outputs go back to the input
dtypes); B and C, small, are laid out as (batch, groups, L, n). Saved for backward: the inputs (as
converted) and the state entering every chunk, (batch, d, L / chunk, n) fp32, never the full
(batch, d, L, n) states. Falls back to the chunked PyTorch scan when no C compiler is available.
"""
from __future__ import annotations

import ctypes

import torch

from ..custom_op import kernel_op
from ..documents import check_seq_idx
from ..fused_scan import SCAN_INPUTS, SCAN_OPTIONS, ScanGrads, num_groups
from .build import ScanArgs, Tensor3, cpu_kernels_available, load_library, pointer
from .chunked import selective_scan_chunked

CHUNK = 64  # steps between saved states: backward recomputes at most this many per row at a time


def _bc_layout(X: torch.Tensor, groups: int) -> tuple[torch.Tensor, bool]:
    """(d, n) fixed stays; (batch, n, L) (shared by every group) and (batch, groups, n, L) become
    (batch, groups, L, n) fp32."""
    if X.dim() == 2:
        return X.float().contiguous(), True
    if X.dim() == 3:
        X = X.unsqueeze(1).expand(-1, groups, -1, -1)
    return X.float().transpose(-1, -2).contiguous(), False


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    """fp32, strides kept where possible: the kernel reads (batch, d, L) tensors in any layout."""
    return None if t is None else t.float()


def _empty_channels_last(batch: int, dim: int, L: int) -> torch.Tensor:
    """An fp32 (batch, d, L) buffer laid out (batch, L, d): what the projections next to the scan read."""
    return torch.empty(batch, L, dim, dtype=torch.float32).transpose(1, 2)


def _kernel_args(u, delta, A, B, C, D, z, delta_bias, seq_idx, delta_softplus, chunk):
    """Make the fp32 copies the kernel reads, where an input is not fp32 already (B and C, small, are laid
    out again in backward); return a builder of the kernel's argument struct, which holds their raw
    pointers (and the copies alive)."""
    groups = num_groups(B, C)
    (Bf, B_fixed), (Cf, C_fixed) = _bc_layout(B, groups), _bc_layout(C, groups)
    uf, deltaf, zf = _f32(u), _f32(delta), _f32(z)
    Af, Df, biasf = (None if t is None else t.float().contiguous() for t in (A, D, delta_bias))
    seq = None if seq_idx is None else seq_idx.to(torch.int32).contiguous()
    batch, dim, L = u.shape

    def args() -> ScanArgs:
        n_chunks = (L + chunk - 1) // chunk
        return ScanArgs(batch, dim, L, A.shape[1], groups, chunk, n_chunks, Tensor3.of(uf), Tensor3.of(deltaf),
                        Tensor3.of(zf), *map(pointer, (Af, Bf, Cf, Df, biasf, seq)), int(B_fixed), int(C_fixed),
                        int(delta_softplus))

    return args


def _forward(u, delta, A, B, C, D, z, delta_bias, seq_idx, delta_softplus, chunk, launch):
    """-> out (batch, d, L) in u's dtype (channels-last), last state (batch, d, n) fp32, and the residual:
    the state entering every chunk, (batch, d, L / chunk, n) fp32."""
    args = _kernel_args(u, delta, A, B, C, D, z, delta_bias, seq_idx, delta_softplus, chunk)
    batch, dim, L = u.shape
    n = A.shape[1]
    out = _empty_channels_last(batch, dim, L)
    chunk_states = torch.empty(batch, dim, (L + chunk - 1) // chunk, n, dtype=torch.float32)
    last_state = torch.empty(batch, dim, n, dtype=torch.float32)
    if launch:
        load_library().scan_fwd(ctypes.byref(args()), ctypes.byref(Tensor3.of(out)), pointer(chunk_states),
                                pointer(last_state), torch.get_num_threads())
    return out.to(u.dtype), last_state, chunk_states


def _backward(grads, inputs, residuals, delta_softplus, chunk, launch):
    u, delta, A, B, C, D, z, delta_bias, seq_idx = inputs
    dout, dlast = grads
    (chunk_states,) = residuals
    args = _kernel_args(*inputs, delta_softplus, chunk)
    dout = torch.zeros(u.shape, dtype=torch.float32) if dout is None else dout.float()
    dlast = None if dlast is None else dlast.float().contiguous()
    batch, dim, L = u.shape
    # du, ddelta and dz channels-last, like out: they feed the conv's backward and the projections' matmuls
    result = ScanGrads.allocate(u, A, B, C, z)._replace(
        du=_empty_channels_last(batch, dim, L), ddelta=_empty_channels_last(batch, dim, L),
        dz=None if z is None else _empty_channels_last(batch, dim, L))
    if launch:
        load_library().scan_bwd(ctypes.byref(args()), pointer(chunk_states), ctypes.byref(Tensor3.of(dout)),
                                pointer(dlast), *(ctypes.byref(Tensor3.of(t)) for t in result[:3]),
                                *map(pointer, result[3:]), torch.get_num_threads())
    return result.input_grads(*inputs)


# The name states the layout of the outputs: graphs that torch.compile cached for an earlier layout of this
# operator (row-major outputs) are keyed by its name, and must not be reused for this one.
selective_scan_cpu_op = kernel_op("selective_scan_cpu_channels_last", SCAN_INPUTS, SCAN_OPTIONS, outputs=2,
                                  residuals=1, forward=_forward, backward=_backward)


def selective_scan_cpu(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, chunk: int = CHUNK, seq_idx=None):
    """Selective scan on CPU tensors; signature and semantics of `ssmforge.kernels.ref.selective_scan_ref`.

    chunk: steps between the states saved for backward (small values exercise the carry in tests).
    """
    tensors = [t for t in (u, delta, A, B, C, D, z, delta_bias, seq_idx) if t is not None]
    if any(t.device.type != "cpu" for t in tensors):
        raise ValueError("the 'cpu' selective-scan backend takes CPU tensors only")
    if not cpu_kernels_available():
        return selective_scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                      seq_idx=seq_idx)
    seq_idx = check_seq_idx(seq_idx, u.shape[0], u.shape[2])  # int32, as the kernel reads it
    seq_idx = None if seq_idx is None else seq_idx.contiguous()
    # The large inputs are converted here, under autograd, so that the op saves the copies it reads and its
    # backward need not convert them again.
    out, last_state, _ = selective_scan_cpu_op(_f32(u), _f32(delta), A, B, C, D, _f32(z), delta_bias, seq_idx,
                                               delta_softplus, chunk)
    out = out.to(u.dtype)
    return (out, last_state) if return_last_state else out
