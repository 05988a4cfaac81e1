"""The Triton chunked SSD as a torch.autograd.Function (launch code for `ssd_kernels`).

dt's bias and softplus and the D skip are left to PyTorch around the Function (elementwise, and
autograd differentiates them); the Function maps (x, dt, A, B, C, initial state) to (y, final state)
and computes every gradient with the Triton kernels, plus a reverse cumsum that turns the gradient of
a = cumsum(dt * A) into those of dt and A.
"""
from __future__ import annotations

import torch
import triton

from ..ref import discretize_dt
from .ssd_kernels import (
    chunk_scan_bwd_outputs_kernel,
    chunk_scan_bwd_sources_kernel,
    chunk_scan_fwd_kernel,
    chunk_state_kernel,
    state_passing_kernel,
)

FWD_BLOCK = 64  # steps per tile in the forward (chunk_size if smaller)
BWD_BLOCK = 32  # the backward holds more tiles at once


class _Shape:
    """Sizes of one call, and the launch parameters every kernel shares."""

    def __init__(self, x: torch.Tensor, B: torch.Tensor, chunk: int):
        self.batch, self.L, self.nheads, self.headdim = x.shape
        self.ngroups, self.dstate = B.shape[2], B.shape[3]
        self.chunk = chunk
        self.n_chunks = triton.cdiv(self.L, chunk)
        exact = x.dtype == B.dtype == torch.float32  # fp32 inputs: no tf32 rounding in the matmuls
        self.meta = dict(CHUNK=chunk, BLOCK_P=max(16, triton.next_power_of_2(self.headdim)),
                         BLOCK_N=max(16, triton.next_power_of_2(self.dstate)),
                         PRECISION="ieee" if exact else "tf32")

    @property
    def dims(self):
        return self.L, self.nheads, self.headdim, self.dstate, self.ngroups, self.n_chunks

    def states(self, device) -> torch.Tensor:
        return torch.empty(self.batch, self.n_chunks, self.nheads, self.headdim, self.dstate, device=device,
                           dtype=torch.float32)

    def per_step(self, device) -> torch.Tensor:
        return torch.empty(self.batch, self.nheads, self.n_chunks, self.chunk, device=device, dtype=torch.float32)


def _chunk_state(shape, X, Y, dt, a, from_start: bool) -> torch.Tensor:
    out = shape.states(X.device)
    chunk_state_kernel[(shape.batch * shape.n_chunks, shape.nheads)](
        X, Y, dt, a, out, *shape.dims, FROM_START=from_start, BLOCK_K=min(shape.chunk, FWD_BLOCK), **shape.meta)
    return out


def _state_passing(shape, inputs, a, start, reverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    size = shape.headdim * shape.dstate
    block = min(1024, triton.next_power_of_2(size))
    carried = shape.states(inputs.device)
    last = torch.empty(shape.batch, shape.nheads, shape.headdim, shape.dstate, device=inputs.device,
                       dtype=torch.float32)
    state_passing_kernel[(shape.batch, shape.nheads, triton.cdiv(size, block))](
        inputs, a, start.contiguous() if start is not None else last, carried, last, shape.nheads, shape.n_chunks,
        size, HAS_START=start is not None, REVERSE=reverse, CHUNK=shape.chunk, BLOCK=block)
    return carried, last


def _to_chunks(dt: torch.Tensor, shape: _Shape) -> torch.Tensor:
    """(batch, L, nheads) -> zero-padded (batch, nheads, n_chunks, chunk) fp32."""
    pad = shape.n_chunks * shape.chunk - shape.L
    dt = torch.nn.functional.pad(dt.float(), (0, 0, 0, pad))
    return dt.view(shape.batch, shape.n_chunks, shape.chunk, shape.nheads).permute(0, 3, 1, 2).contiguous()


class _TritonSSD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, initial_state, chunk):
        x, B, C = x.contiguous(), B.contiguous(), C.contiguous()
        shape = _Shape(x, B, chunk)
        dt_chunks = _to_chunks(dt, shape)
        a = (dt_chunks * A[:, None, None].float()).cumsum(dim=-1)
        chunk_states = _chunk_state(shape, x, B, dt_chunks, a, from_start=False)
        entering, last = _state_passing(shape, chunk_states, a, initial_state, reverse=False)
        y = torch.empty(x.shape, device=x.device, dtype=torch.float32)
        block = min(chunk, FWD_BLOCK)
        chunk_scan_fwd_kernel[(shape.batch * shape.n_chunks, shape.nheads, chunk // block)](
            x, B, C, dt_chunks, a, entering, y, *shape.dims, BLOCK_M=block, **shape.meta)
        ctx.save_for_backward(x, B, C, A, dt_chunks, a, entering)
        ctx.shape, ctx.has_initial_state = shape, initial_state is not None
        ctx.set_materialize_grads(False)
        return y, last

    @staticmethod
    def backward(ctx, dy, dlast):
        x, B, C, A, dt_chunks, a, entering = ctx.saved_tensors
        shape = ctx.shape
        f32 = dict(device=x.device, dtype=torch.float32)
        dy = torch.zeros(x.shape, **f32) if dy is None else dy.float().contiguous()
        # gradients of the states: what each chunk's outputs send back, carried from the last chunk down
        from_outputs = _chunk_state(shape, dy, C, dt_chunks, a, from_start=True)
        dleaving, dinitial = _state_passing(shape, from_outputs, a, dlast, reverse=True)

        block = min(shape.chunk, BWD_BLOCK)
        grid = (shape.batch * shape.n_chunks, shape.nheads, shape.chunk // block)
        dx, ddt, da_sources, da_end = torch.empty(x.shape, **f32), shape.per_step(x.device), \
            shape.per_step(x.device), shape.per_step(x.device)
        dB, dC = torch.zeros(B.shape, **f32), torch.zeros(C.shape, **f32)
        da_outputs = shape.per_step(x.device)
        chunk_scan_bwd_sources_kernel[grid](x, B, C, dt_chunks, a, dy, dleaving, dx, ddt, dB, da_sources, da_end,
                                            *shape.dims, BLOCK=block, **shape.meta)
        chunk_scan_bwd_outputs_kernel[grid](x, B, C, dt_chunks, a, dy, entering, dC, da_outputs,
                                            *shape.dims, BLOCK=block, **shape.meta)

        # a_end also decays the carried state: h0[c+1] = exp(a_end) h0[c] + S[c]
        carry = torch.exp(a[..., -1]) * (dleaving * entering).sum((-1, -2)).transpose(1, 2)  # (batch, nheads, n_chunks)
        da = da_sources + da_outputs
        da[..., -1] += da_end.sum(-1) + carry
        d_dA = da.flip(-1).cumsum(-1).flip(-1)  # a_l = dA_1 + ... + dA_l
        ddt = ddt + d_dA * A[:, None, None].float()
        dA = (d_dA * dt_chunks).sum((0, 2, 3))
        ddt = ddt.permute(0, 2, 3, 1).reshape(shape.batch, -1, shape.nheads)[:, : shape.L]
        return (dx.to(x.dtype), ddt, dA.to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
                dinitial if ctx.has_initial_state else None, None)


def ssd_triton(x, dt, A, B, C, chunk_size=256, D=None, dt_bias=None, dt_softplus=False, initial_state=None,
               return_final_state=False):
    """The chunked SSD through the Triton kernels; signature and semantics of `ssmforge.kernels.ssd.ssd_chunked`.

    chunk_size: a power of two >= 16 (the kernels' matmul tiles)."""
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two >= 16 for the triton backend, got {chunk_size}")
    nheads, ngroups = x.shape[2], B.shape[2]
    if nheads % ngroups or C.shape != B.shape:
        raise ValueError(f"nheads ({nheads}) must be a multiple of ngroups ({ngroups}) and C shaped like B")
    with torch.autocast(device_type=x.device.type, enabled=False):
        initial = None if initial_state is None else initial_state.float()
        y, last = _TritonSSD.apply(x, discretize_dt(dt, dt_bias, dt_softplus), A.float(), B, C, initial, chunk_size)
        if D is not None:
            y = y + x.float() * D.float()[:, None]
    y = y.to(x.dtype)
    return (y, last) if return_final_state else y
