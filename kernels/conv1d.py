"""Public entry point of the causal depthwise conv1d: one signature, several backends.

"ref" is torch's conv1d (`kernels.ref.causal_conv1d_ref`), the definition; "cpu" is the fused C
kernel of `kernels.cpu` (with SiLU), the default on CPU, where torch's depthwise conv backward is
slow; "triton" is the fused Triton kernel (with SiLU), the default on CUDA.
"""
from __future__ import annotations

from typing import Callable

import torch

from .cpu import causal_conv1d_cpu
from .ref import causal_conv1d_ref
from .selective_scan import triton_available


def _triton_conv1d(*args, **kwargs):
    from .triton import causal_conv1d_triton  # lazy: importing triton is slow and may fail

    return causal_conv1d_triton(*args, **kwargs)


CONV1D_BACKENDS: dict[str, Callable] = {"ref": causal_conv1d_ref, "cpu": causal_conv1d_cpu}
if triton_available():
    CONV1D_BACKENDS["triton"] = _triton_conv1d


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Depthwise causal conv: x (batch, d, L), weight (d, width), bias (d,) -> (batch, d, L).

    Semantics of `kernels.ref.causal_conv1d_ref`; activation None or "silu". backend None picks
    "cpu" for CPU tensors, "triton" for CUDA tensors with a width of 2..4 and "ref" otherwise; a name
    forces one. The output may be laid out channels-last (a transposed view); only values are promised.
    """
    name = backend
    if name is None:
        use_triton = x.device.type == "cuda" and "triton" in CONV1D_BACKENDS and 2 <= weight.shape[1] <= 4
        name = "triton" if use_triton else "cpu" if x.device.type == "cpu" else "ref"
    if name not in CONV1D_BACKENDS:
        raise ValueError(f"unknown conv1d backend {name!r}; available: {sorted(CONV1D_BACKENDS)}")
    return CONV1D_BACKENDS[name](x, weight, bias, activation=activation)
