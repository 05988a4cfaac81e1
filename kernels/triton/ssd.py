"""The Triton chunked SSD as the custom op ssmforge::ssd_triton (launch code for `ssd_kernels`).

dt's bias, softplus and cutting into chunks and the D skip are left to PyTorch around the op
(elementwise or data movement, and autograd differentiates them); the op maps (x, dt in chunks, A, B, C,
initial state) to (y, final state) and computes every gradient with the Triton kernels, plus a reverse
cumsum that turns the gradient of a = cumsum(dt * A) into those of dt and A. Saved for backward: the
inputs, a and the state entering every chunk. Document resets (seq_idx) reach the op as document numbers
per chunk, `documents` (batch, n_chunks, chunk) int32 (see `ssd_kernels`); without them every kernel is
compiled with HAS_SEQ_IDX off.
"""
from __future__ import annotations

import torch
import triton

from .. import deterministic
from ..custom_op import kernel_op
from ..documents import check_seq_idx
from ..ref import discretize_dt
from ..ssd import document_numbers
from .ssd_kernels import (
    chunk_scan_bwd_outputs_kernel,
    chunk_scan_bwd_sources_kernel,
    chunk_scan_fwd_kernel,
    chunk_state_kernel,
    state_passing_kernel,
)

# Steps per tile (chunk_size if smaller), tf32 / ieee: fp32 "ieee" dots are FMAs, whose operands every thread
# holds whole, so its tiles are smaller. All at zero register spills for headdim 64, d_state 128, 8 warps
# (benchmarks/kernel_resources.py).
FWD_BLOCK = dict(tf32=64, ieee=16)
# chunk_scan_fwd with document resets: at 64 its tf32 variant spills 8 bytes on sm_90 (255 registers without resets)
FWD_SCAN_BLOCK_DOCS = dict(tf32=32, ieee=16)
BWD_BLOCK = dict(tf32=32, ieee=16)  # the backward holds more tiles at once
BWD_SLICE = 64  # the backward's programs take d_state in slices of this many (partial sums over d_state)
WARPS = 8  # at 4, 64x128 fp32 state and accumulator tiles exceed 255 registers


class _Shape:
    """Sizes of one call, and the launch parameters every kernel shares. Without `launch` the kernels are
    skipped and only the buffers made (the operators' fake implementations)."""

    def __init__(self, x: torch.Tensor, B: torch.Tensor, dt_chunks: torch.Tensor, documents, launch: bool):
        self.batch, self.L, self.nheads, self.headdim = x.shape
        self.ngroups, self.dstate = B.shape[2], B.shape[3]
        self.n_chunks, self.chunk = dt_chunks.shape[2], dt_chunks.shape[3]
        self.documents = documents
        self.launch = launch
        self.exact = x.dtype == B.dtype == torch.float32  # fp32 inputs: no tf32 rounding in the matmuls

    @property
    def meta(self):
        return dict(CHUNK=self.chunk, BLOCK_P=max(16, triton.next_power_of_2(self.headdim)),
                    BLOCK_N=max(16, triton.next_power_of_2(self.dstate)), PRECISION=self.precision, num_warps=WARPS)

    def doc_ptr(self, stand_in: torch.Tensor) -> torch.Tensor:
        """The kernels' doc pointer: the document numbers, or `stand_in` without resets (never read then)."""
        return stand_in if self.documents is None else self.documents

    @property
    def has_seq_idx(self) -> bool:
        return self.documents is not None

    @property
    def precision(self):
        return "ieee" if self.exact else "tf32"

    def block(self, blocks: dict) -> int:
        return min(self.chunk, blocks[self.precision])

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
    if shape.launch:
        chunk_state_kernel[(shape.batch * shape.n_chunks, shape.nheads)](
            X, Y, dt, a, shape.doc_ptr(a), out, *shape.dims, FROM_START=from_start, HAS_SEQ_IDX=shape.has_seq_idx,
            BLOCK_K=shape.block(FWD_BLOCK), **shape.meta)
    return out


def _state_passing(shape, inputs, a, start, from_the_end: bool) -> tuple[torch.Tensor, torch.Tensor]:
    carried = shape.states(inputs.device)
    last = torch.empty(shape.batch, shape.nheads, shape.headdim, shape.dstate, device=inputs.device,
                       dtype=torch.float32)
    if shape.launch:
        size = shape.headdim * shape.dstate
        block = min(1024, triton.next_power_of_2(size))
        state_passing_kernel[(shape.batch, shape.nheads, triton.cdiv(size, block))](
            inputs, a, shape.doc_ptr(a), start.contiguous() if start is not None else last, carried, last,
            shape.nheads, shape.n_chunks, size, HAS_START=start is not None, HAS_SEQ_IDX=shape.has_seq_idx,
            REVERSE=from_the_end, CHUNK=shape.chunk, BLOCK=block)
    return carried, last


def _to_chunks(dt: torch.Tensor, chunk: int) -> torch.Tensor:
    """(batch, L, nheads) -> zero-padded (batch, nheads, n_chunks, chunk) fp32; autograd maps its gradient back."""
    batch, L, nheads = dt.shape
    n_chunks = triton.cdiv(L, chunk)
    dt = torch.nn.functional.pad(dt.float(), (0, 0, 0, n_chunks * chunk - L))
    return dt.view(batch, n_chunks, chunk, nheads).permute(0, 3, 1, 2).contiguous()


def _forward(x, dt_chunks, A, B, C, initial_state, documents=None, *, launch):
    """-> y (batch, L, nheads, headdim) fp32, the final state (batch, nheads, headdim, dstate) fp32, and the
    residuals: a = cumsum(dt A) per chunk (batch, nheads, n_chunks, chunk) and the state entering every
    chunk (batch, n_chunks, nheads, headdim, dstate), both fp32."""
    x, B, C = x.contiguous(), B.contiguous(), C.contiguous()
    shape = _Shape(x, B, dt_chunks, documents, launch)
    a = (dt_chunks * A[:, None, None].float()).cumsum(dim=-1)
    chunk_states = _chunk_state(shape, x, B, dt_chunks, a, from_start=False)
    entering, last = _state_passing(shape, chunk_states, a, initial_state, from_the_end=False)
    y = torch.empty(x.shape, device=x.device, dtype=torch.float32)
    if launch:
        block = shape.block(FWD_SCAN_BLOCK_DOCS if shape.has_seq_idx else FWD_BLOCK)
        chunk_scan_fwd_kernel[(shape.batch * shape.n_chunks, shape.nheads, shape.chunk // block)](
            x, B, C, dt_chunks, a, shape.doc_ptr(a), entering, y, *shape.dims, HAS_SEQ_IDX=shape.has_seq_idx,
            BLOCK_M=block, **shape.meta)
    return y, last, a, entering


def _backward(grads, inputs, residuals, launch):
    dy, dlast = grads
    x, dt_chunks, A, B, C, initial_state, *documents = inputs  # documents: optional in the schema
    documents = documents[0] if documents else None
    a, entering = residuals
    x, B, C = x.contiguous(), B.contiguous(), C.contiguous()
    shape = _Shape(x, B, dt_chunks, documents, launch)
    f32 = dict(device=x.device, dtype=torch.float32)
    dy = torch.zeros(x.shape, **f32) if dy is None else dy.float().contiguous()
    # gradients of the states: what each chunk's outputs send back, carried from the last chunk down
    from_outputs = _chunk_state(shape, dy, C, dt_chunks, a, from_start=True)
    dleaving, dinitial = _state_passing(shape, from_outputs, a, dlast, from_the_end=True)

    # per slice of d_state, summed below: (batch, n_slices, ...)
    meta = dict(shape.meta, BLOCK_N=min(shape.meta["BLOCK_N"], BWD_SLICE))
    n_slices = triton.cdiv(shape.dstate, meta["BLOCK_N"])
    dx = torch.empty(shape.batch, n_slices, *x.shape[1:], **f32)
    ddt, da_sources, da_end, da_outputs = (torch.empty(shape.batch, n_slices, shape.nheads, shape.n_chunks,
                                                       shape.chunk, **f32) for _ in range(4))
    det = deterministic()
    if det:  # (batch, L, nheads, dstate): a row per head, not the group's row that its heads add into
        dB, dC = (torch.empty(*x.shape[:3], shape.dstate, **f32) for _ in range(2))
    else:
        dB, dC = torch.zeros(B.shape, **f32), torch.zeros(C.shape, **f32)
    if launch:
        block = shape.block(BWD_BLOCK)
        grid = (shape.batch * shape.n_chunks, shape.nheads, shape.chunk // block * n_slices)
        flags = dict(HAS_SEQ_IDX=shape.has_seq_idx, BLOCK=block, DETERMINISTIC=det)
        chunk_scan_bwd_sources_kernel[grid](x, B, C, dt_chunks, a, shape.doc_ptr(a), dy, dleaving, dx, ddt, dB,
                                            da_sources, da_end, *shape.dims, **flags, **meta)
        chunk_scan_bwd_outputs_kernel[grid](x, B, C, dt_chunks, a, shape.doc_ptr(a), dy, entering, dC, da_outputs,
                                            *shape.dims, **flags, **meta)
    dx, ddt, da_sources, da_end, da_outputs = (t.sum(1) for t in (dx, ddt, da_sources, da_end, da_outputs))
    if det:  # the heads of a group are consecutive
        dB, dC = (t.unflatten(2, (shape.ngroups, -1)).sum(3) for t in (dB, dC))

    # a_end also decays the carried state: h0[c+1] = exp(a_end) h0[c] + S[c] (0 h0[c] past a reset)
    carry = torch.exp(a[..., -1]) * (dleaving * entering).sum((-1, -2)).transpose(1, 2)  # (batch, nheads, n_chunks)
    if documents is not None:
        carry = carry * _keeps_state(documents)[:, None]
    da = da_sources + da_outputs
    da[..., -1] += da_end.sum(-1) + carry
    d_dA = da.flip(-1).cumsum(-1).flip(-1)  # a_l = dA_1 + ... + dA_l
    ddt = ddt + d_dA * A[:, None, None].float()
    dA = (d_dA * dt_chunks).sum((0, 2, 3))
    grads = (dx.to(x.dtype), ddt, dA.to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
             dinitial if initial_state is not None else None,
             # integers, no gradient; the op returns one for every tensor given (autograd drops it)
             None if documents is None else torch.zeros_like(documents))
    return grads[:len(inputs)]


def _keeps_state(documents: torch.Tensor) -> torch.Tensor:
    """(batch, n_chunks) bool: the chunk has no reset, so the state entering it is carried through it."""
    before = torch.cat([torch.zeros_like(documents[:, :1, -1]), documents[:, :-1, -1]], dim=1)
    return documents[:, :, -1] == before


def _documents(seq_idx: torch.Tensor, chunk: int) -> torch.Tensor:
    """seq_idx (batch, L) -> document numbers 0, 1, ... per chunk (batch, n_chunks, chunk) int32, the padded
    steps past L in the last document."""
    doc = document_numbers(seq_idx)
    batch, L = doc.shape
    pad = triton.cdiv(L, chunk) * chunk - L
    return torch.cat([doc, doc[:, -1:].expand(batch, pad)], dim=1).view(batch, -1, chunk).contiguous()


ssd_triton_op = kernel_op("ssd_triton", "Tensor x, Tensor dt_chunks, Tensor A, Tensor B, Tensor C, "
                          "Tensor? initial_state, Tensor? documents=None",
                          options="", outputs=2, residuals=2, forward=_forward, backward=_backward)


def ssd_triton(x, dt, A, B, C, chunk_size=256, D=None, dt_bias=None, dt_softplus=False, initial_state=None,
               return_final_state=False, seq_idx=None):
    """The chunked SSD through the Triton kernels; signature and semantics of `ssmforge.kernels.ssd.ssd_chunked`.

    chunk_size: a power of two >= 16 (the kernels' matmul tiles)."""
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two >= 16 for the triton backend, got {chunk_size}")
    nheads, ngroups = x.shape[2], B.shape[2]
    if nheads % ngroups or C.shape != B.shape:
        raise ValueError(f"nheads ({nheads}) must be a multiple of ngroups ({ngroups}) and C shaped like B")
    seq_idx = check_seq_idx(seq_idx, x.shape[0], x.shape[1])
    with torch.autocast(device_type=x.device.type, enabled=False):
        initial = None if initial_state is None else initial_state.float()
        dt_chunks = _to_chunks(discretize_dt(dt, dt_bias, dt_softplus), chunk_size)
        # contiguous here, under autograd, so that the op saves for backward the copies it reads
        documents = None if seq_idx is None else _documents(seq_idx, chunk_size)
        y, last, _, _ = ssd_triton_op(x.contiguous(), dt_chunks, A.float(), B.contiguous(), C.contiguous(), initial,
                                      documents)
        if D is not None:
            y = y + x.float() * D.float()[:, None]
    y = y.to(x.dtype)
    return (y, last) if return_final_state else y
