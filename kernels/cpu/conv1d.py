"""Fast CPU causal depthwise conv1d (+ SiLU): the C kernel of `conv_source` behind an autograd Function.

torch's depthwise conv1d backward on CPU is slow (seconds for one Mamba layer at batch 4, L 512,
d 512, where the forward takes milliseconds); this path costs a few memory passes either way.
It works channels-last: an input whose channels have unit stride (Mamba's x, a view of the in_proj
output transposed to (batch, d, L)) is read in place, and the output is a (batch, d, L) view of a
(batch, L, d) buffer, so the x_proj matmul that follows reads it without a copy.
"""
from __future__ import annotations

import ctypes

import torch

from ..ref import causal_conv1d_ref
from .build import ConvArgs, load_library


def _ptr(t: torch.Tensor | None):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """x (batch, d, L) -> fp32 (batch, L, d) with unit channel stride, a view when x already is one."""
    xl = x.transpose(1, 2)
    return xl if xl.dtype == torch.float32 and xl.stride(2) == 1 else xl.float().contiguous()


def _args(xl: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, silu: bool) -> ConvArgs:
    batch, L, dim = xl.shape
    return ConvArgs(batch, L, dim, w.shape[0], xl.stride(0), xl.stride(1), _ptr(xl), _ptr(w), _ptr(bias), int(silu))


class _FusedConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, silu):
        xl = _channels_last(x)
        w = weight.float().t().contiguous()  # (width, d): the kernel's loops run over channels
        biasf = None if bias is None else bias.float().contiguous()
        out = torch.empty(xl.shape, dtype=torch.float32)
        load_library().conv_fwd(ctypes.byref(_args(xl, w, biasf, silu)), _ptr(out), torch.get_num_threads())
        ctx.save_for_backward(xl, w, biasf)
        ctx.meta = (silu, x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return out.transpose(1, 2).to(x.dtype)

    @staticmethod
    def backward(ctx, dout):
        xl, w, biasf = ctx.saved_tensors
        silu, x_dtype, w_dtype, b_dtype = ctx.meta
        g = dout.transpose(1, 2).float().contiguous()  # free when dout is channels-last already
        gpre, dx = torch.empty_like(g), torch.empty_like(g)
        dw = torch.empty_like(w)
        dbias = None if biasf is None else torch.empty_like(biasf)
        load_library().conv_bwd(ctypes.byref(_args(xl, w, biasf, silu)), _ptr(g), _ptr(gpre), _ptr(dx), _ptr(dw),
                                _ptr(dbias), torch.get_num_threads())
        return (dx.transpose(1, 2).to(x_dtype), dw.t().to(w_dtype),
                None if dbias is None else dbias.to(b_dtype), None)


def causal_conv1d_cpu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                      activation: str | None = None) -> torch.Tensor:
    """Semantics of `ssmforge.kernels.ref.causal_conv1d_ref` on CPU tensors; torch's conv when the C kernels
    cannot be built."""
    if activation not in (None, "silu"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    if any(t.device.type != "cpu" for t in (x, weight) + ((bias,) if bias is not None else ())):
        raise ValueError("the 'cpu' conv1d backend takes CPU tensors only")
    if load_library() is None:
        return causal_conv1d_ref(x, weight, bias, activation=activation)
    return _FusedConv.apply(x, weight, bias, activation == "silu")
