"""Public entry point of the causal depthwise conv1d: one signature, several backends.

"ref" is torch's conv1d (`ssmforge.kernels.ref.causal_conv1d_ref`), the definition; "cpu" is the fused C
kernel of `ssmforge.kernels.cpu` (with SiLU), the default on CPU, where torch's depthwise conv backward is
slow; "triton" is the fused Triton kernel (with SiLU), the default on CUDA. Every backend takes seq_idx
(document boundaries of packed rows, see `ssmforge.kernels.documents`): no tap reaches across one.
"""
from __future__ import annotations

from typing import Callable

import torch

from .cpu import causal_conv1d_cpu
from .ref import causal_conv1d_ref
from .backends import triton_available


def _triton_conv1d(*args, **kwargs):
    from .triton import causal_conv1d_triton  # lazy: importing triton is slow and may fail

    return causal_conv1d_triton(*args, **kwargs)


CONV1D_BACKENDS: dict[str, Callable] = {"ref": causal_conv1d_ref, "cpu": causal_conv1d_cpu}
if triton_available():
    CONV1D_BACKENDS["triton"] = _triton_conv1d


def conv1d_default_backend(device: torch.device, width: int = 4) -> str:
    """The backend used when none is named: "triton" for CUDA tensors and a width of 2..4, "cpu" for CPU
    tensors, else "ref" (torch's conv1d, cuDNN on a GPU: a usable fallback where triton is not installed,
    which `describe_backends` reports at start-up)."""
    if device.type == "cuda" and "triton" in CONV1D_BACKENDS and 2 <= width <= 4:
        return "triton"
    if device.type == "cpu" and "cpu" in CONV1D_BACKENDS:
        return "cpu"
    return "ref"


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    backend: str | None = None,
    seq_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """Depthwise causal conv: x (batch, d, L), weight (d, width), bias (d,) -> (batch, d, L).

    Semantics of `ssmforge.kernels.ref.causal_conv1d_ref`; activation None or "silu". backend None picks by
    device and width (see `conv1d_default_backend`); a name forces one. seq_idx (batch, L) integers or None:
    the document of each position (kernels.documents); output t reads only inputs of its own document.
    The output may be laid out channels-last (a transposed view); only values are promised.
    """
    name = backend or conv1d_default_backend(x.device, weight.shape[1])
    if name not in CONV1D_BACKENDS:
        raise ValueError(f"unknown conv1d backend {name!r}; available: {sorted(CONV1D_BACKENDS)}")
    # seq_idx goes to the backend only when given: a backend registered (or patched in) with the older signature
    # keeps working for rows of one document
    extra = {} if seq_idx is None else {"seq_idx": seq_idx}
    return CONV1D_BACKENDS[name](x, weight, bias, activation=activation, **extra)
