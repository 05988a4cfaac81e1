"""Fast CPU linear scan x_t = a_t x_{t-1} + b_t (the LRU's recurrence): the C kernel of `linear_scan_source`
as the custom op ssmforge::linear_scan_cpu, one sequential pass per (row, block of states) forward and one
backward, where PyTorch's doubling scan makes ceil(log2 L). Backward keeps a and the states x, not b (as the
Triton kernel). complex64 runs in float, complex128 in double; real inputs run as complex ones with zero
imaginary parts (the LRU's recurrence is complex: real ones are for tests). Falls back to PyTorch's doubling
scan when no C compiler is available (`kernels.cpu.build` warns once)."""
from __future__ import annotations

import ctypes

import torch

from ..custom_op import kernel_op
from ..ref import linear_scan_operands, linear_scan_ref
from .build import LinearScanArgs, cpu_kernels_available, load_library, pointer

_REAL = {torch.complex64: "float", torch.complex128: "double"}  # the C type of each complex dtype's parts
_COMPLEX_OF = {torch.float32: torch.complex64, torch.float64: torch.complex128}


def _args(a: torch.Tensor, b: torch.Tensor) -> LinearScanArgs:
    """a's row stride is 0 where one row serves the whole batch; its position stride 0 where it is one value
    expanded over time."""
    batch, L, N = b.shape
    return LinearScanArgs(batch, L, N, 0 if a.shape[0] != batch else a.stride(0), a.stride(1))


def _forward(a, b, *, launch):
    x = torch.empty_like(b)
    if launch and x.numel():
        getattr(load_library(), f"linear_scan_fwd_{_REAL[b.dtype]}")(
            ctypes.byref(_args(a, b)), pointer(a), pointer(b), pointer(x), torch.get_num_threads())
    return (x,)


def _backward(grads, inputs, residuals, *, launch):
    (gx,) = grads
    a, b = inputs
    (x,) = residuals
    if gx is None:
        return torch.zeros_like(a), torch.zeros_like(b)
    gx = gx.resolve_conj().contiguous()
    da, db = torch.empty_like(b), torch.empty_like(b)  # da per batch row
    if launch and b.numel():
        getattr(load_library(), f"linear_scan_bwd_{_REAL[b.dtype]}")(
            ctypes.byref(_args(a, b)), pointer(a), pointer(x), pointer(gx), pointer(da), pointer(db),
            torch.get_num_threads())
    return (da.sum(0, keepdim=True) if a.shape[0] != b.shape[0] else da), db


# backward reads a and x, and only b's shape
linear_scan_cpu_op = kernel_op("linear_scan_cpu", "Tensor a, Tensor b", "", outputs=1, residuals=0,
                               forward=_forward, backward=_backward, saves_outputs=True, shape_only=(1,))


def linear_scan_cpu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Same signature and semantics as `ssmforge.kernels.ref.linear_scan_ref`, on CPU tensors."""
    if a.device.type != "cpu" or b.device.type != "cpu":
        raise ValueError("the 'cpu' linear-scan backend takes CPU tensors only")
    if not cpu_kernels_available():
        return linear_scan_ref(a, b)
    a, b = linear_scan_operands(a, b)
    if b.dtype in _COMPLEX_OF:
        return linear_scan_cpu_op(a.to(_COMPLEX_OF[b.dtype]), b.to(_COMPLEX_OF[b.dtype])).real
    if b.dtype not in _REAL:
        raise ValueError(f"the 'cpu' linear scan takes float32, float64, complex64 or complex128; got {b.dtype}")
    return linear_scan_cpu_op(a, b)
