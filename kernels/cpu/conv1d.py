"""Fast CPU causal depthwise conv1d (+ SiLU): the C kernel of `conv_source` as the custom op
ssmforge::causal_conv1d_cpu.

torch's depthwise conv1d backward on CPU is slow (seconds for one Mamba layer at batch 4, L 512,
d 512, where the forward takes milliseconds); this path costs a few memory passes either way.
It works channels-last: an input whose channels have unit stride (Mamba's x, a view of the in_proj
output transposed to (batch, d, L)) is read in place, and the output is a (batch, d, L) view of a
(batch, L, d) buffer, so the x_proj matmul that follows reads it without a copy. Document boundaries
(seq_idx, kernels.documents) travel to the kernel as an int32 (batch, L) pointer in its argument struct.
"""
from __future__ import annotations

import ctypes

import torch

from ..custom_op import kernel_op
from ..documents import check_seq_idx
from ..ref import causal_conv1d_ref
from .build import ConvArgs, cpu_kernels_available, load_library, pointer


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """x (batch, d, L) -> fp32 (batch, L, d) with unit channel stride, a view when x already is one."""
    xl = x.transpose(1, 2)
    return xl if xl.dtype == torch.float32 and xl.stride(2) == 1 else xl.float().contiguous()


def _args(xl: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, silu: bool,
          seq_idx: torch.Tensor | None) -> ConvArgs:
    batch, L, dim = xl.shape
    return ConvArgs(batch, L, dim, w.shape[0], xl.stride(0), xl.stride(1), pointer(xl), pointer(w), pointer(bias),
                    int(silu), pointer(seq_idx))


def _kernel_inputs(x, weight, bias):
    """What the kernel reads: x channels-last, weight (width, d) (its loops run over channels), bias; fp32."""
    return _channels_last(x), weight.float().t().contiguous(), None if bias is None else bias.float().contiguous()


def _forward(x, weight, bias, silu, seq_idx=None, *, launch):
    xl, w, biasf = _kernel_inputs(x, weight, bias)
    out = torch.empty(xl.shape, dtype=torch.float32)
    if launch:
        load_library().conv_fwd(ctypes.byref(_args(xl, w, biasf, silu, seq_idx)), pointer(out), torch.get_num_threads())
    return (out.transpose(1, 2).to(x.dtype),)


def _backward(grads, inputs, residuals, silu, seq_idx=None, *, launch):
    (dout,) = grads
    x, weight, bias = inputs
    xl, w, biasf = _kernel_inputs(x, weight, bias)
    g = dout.transpose(1, 2).float().contiguous()  # free when dout is channels-last already
    dx = torch.empty_like(g)
    dw = torch.empty_like(w)
    dbias = None if biasf is None else torch.empty_like(biasf)
    if launch:
        load_library().conv_bwd(ctypes.byref(_args(xl, w, biasf, silu, seq_idx)), pointer(g), pointer(dx),
                                pointer(dw), pointer(dbias), torch.get_num_threads())
    return dx.transpose(1, 2).to(x.dtype), dw.t().to(weight.dtype), None if bias is None else dbias.to(bias.dtype)


# seq_idx is an option, not an input: integers, no gradient (an input's would have to be materialised)
causal_conv1d_cpu_op = kernel_op("causal_conv1d_cpu", "Tensor x, Tensor weight, Tensor? bias",
                                 "bool silu, Tensor? seq_idx=None", outputs=1, residuals=0, forward=_forward,
                                 backward=_backward)


def causal_conv1d_cpu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                      activation: str | None = None, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Semantics of `ssmforge.kernels.ref.causal_conv1d_ref` on CPU tensors; torch's conv when the C kernels
    cannot be built. seq_idx (batch, L) or None: document boundaries (kernels.documents)."""
    if activation not in (None, "silu"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    if any(t.device.type != "cpu" for t in (x, weight) + tuple(t for t in (bias, seq_idx) if t is not None)):
        raise ValueError("the 'cpu' conv1d backend takes CPU tensors only")
    if not cpu_kernels_available():
        return causal_conv1d_ref(x, weight, bias, activation=activation, seq_idx=seq_idx)
    seq_idx = check_seq_idx(seq_idx, x.shape[0], x.shape[-1])
    if seq_idx is not None:
        seq_idx = seq_idx.contiguous()
    return causal_conv1d_cpu_op(x, weight, bias, activation == "silu", seq_idx)
