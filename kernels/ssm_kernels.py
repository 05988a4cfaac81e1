"""Public entry points of the survey families' kernels, each one signature over two backends:

- `vandermonde(w, dt_lam, length)`: a diagonal SSM's kernel K_l = Re(sum_n w_n exp(dt_lam_n l)) (S4D, DSS, H3,
  GSS), and `vandermonde_summary(v, dt_lam)` its transpose S_n = sum_l v_l exp(dt_lam_n l), the state that
  inputs leave (a carried state, context parallelism), on the same backends;
- `cauchy(numerators, poles, nodes, scales)`: the Cauchy sums of S4's bilinear kernel and state summaries (S4,
  Liquid-S4);
- `linear_scan(a, b)`: the recurrence x_t = a_t x_{t-1} + b_t from a zero state (LRU).

"ref" is PyTorch's, in `ssmforge.kernels.ref`: the Vandermonde pair and cauchy_ref through an (H, N, length) tensor
of powers or resolvents (the models build it a block of channels at a time, models.layers.recomputed_by_channels),
linear_scan_ref a parallel scan of ceil(log2 L) passes over (batch, L, N) tensors. "triton" is a fused Triton
kernel that materialises none of that, the default on CUDA. Without triton a GPU runs "ref", which is usable
there. The linear scan has a third, "cpu": a C kernel of one sequential pass (`ssmforge.kernels.cpu`), the
default on CPU.
"""
from __future__ import annotations

from typing import Callable

import torch

from .backends import triton_available
from .cpu import linear_scan_cpu
from .ref import cauchy_ref, linear_scan_ref, vandermonde_ref, vandermonde_summary_ref


# One wrapper per kernel, each a plain lazy import (importing triton is slow and may fail): torch.compile traces
# an import statement, but not importlib.import_module, so a shared factory breaks fullgraph compilation
def _triton_vandermonde(*args):
    from .triton.vandermonde import vandermonde_triton

    return vandermonde_triton(*args)


def _triton_vandermonde_summary(*args):
    from .triton.vandermonde import vandermonde_summary_triton

    return vandermonde_summary_triton(*args)


def _triton_cauchy(*args):
    from .triton.cauchy import cauchy_triton

    return cauchy_triton(*args)


def _triton_linear_scan(*args):
    from .triton.linear_scan import linear_scan_triton

    return linear_scan_triton(*args)


VANDERMONDE_BACKENDS: dict[str, Callable] = {"ref": vandermonde_ref}
VANDERMONDE_SUMMARY_BACKENDS: dict[str, Callable] = {"ref": vandermonde_summary_ref}
CAUCHY_BACKENDS: dict[str, Callable] = {"ref": cauchy_ref}
LINEAR_SCAN_BACKENDS: dict[str, Callable] = {"ref": linear_scan_ref, "cpu": linear_scan_cpu}
if triton_available():
    VANDERMONDE_BACKENDS["triton"] = _triton_vandermonde
    VANDERMONDE_SUMMARY_BACKENDS["triton"] = _triton_vandermonde_summary
    CAUCHY_BACKENDS["triton"] = _triton_cauchy
    LINEAR_SCAN_BACKENDS["triton"] = _triton_linear_scan


def _default(backends: dict, device: torch.device) -> str:
    """The device's fused kernel where this kernel has one ("triton" on CUDA, "cpu" on CPU), else "ref"."""
    fused = {"cuda": "triton", "cpu": "cpu"}.get(device.type)
    return fused if fused in backends else "ref"


def _chosen(backends: dict, kernel: str, device: torch.device, backend: str | None) -> Callable:
    name = backend or _default(backends, device)
    if name not in backends:
        raise ValueError(f"unknown {kernel} backend {name!r}; available: {sorted(backends)}")
    return backends[name]


def vandermonde_default_backend(device: torch.device) -> str:
    """"triton" for CUDA tensors where triton is installed, else "ref"."""
    return _default(VANDERMONDE_BACKENDS, device)


def cauchy_default_backend(device: torch.device) -> str:
    """"triton" for CUDA tensors where triton is installed, else "ref"."""
    return _default(CAUCHY_BACKENDS, device)


def linear_scan_default_backend(device: torch.device) -> str:
    """"triton" for CUDA tensors where triton is installed, "cpu" for CPU tensors, else "ref"."""
    return _default(LINEAR_SCAN_BACKENDS, device)


def vandermonde(w: torch.Tensor, dt_lam: torch.Tensor, length: int, backend: str | None = None) -> torch.Tensor:
    """w (H, ..., N), dt_lam (H, N) complex -> K (H, ..., length) real (`ssmforge.kernels.ref.vandermonde_ref`).
    backend None picks by device (`vandermonde_default_backend`); a name forces one."""
    return _chosen(VANDERMONDE_BACKENDS, "vandermonde", w.device, backend)(w, dt_lam, length)


def vandermonde_summary(v: torch.Tensor, dt_lam: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """v (H, ..., L) real, dt_lam (H, N) complex -> S (H, ..., N) complex
    (`ssmforge.kernels.ref.vandermonde_summary_ref`), on the Vandermonde kernel's backends."""
    return _chosen(VANDERMONDE_SUMMARY_BACKENDS, "vandermonde", v.device, backend)(v, dt_lam)


def cauchy(numerators: torch.Tensor, poles: torch.Tensor, nodes: torch.Tensor, scales: torch.Tensor,
           backend: str | None = None) -> torch.Tensor:
    """numerators (H, J, N), poles (H, N), nodes (K,), scales (H, K) complex -> (H, J, K) complex
    (`ssmforge.kernels.ref.cauchy_ref`). backend None picks by device (`cauchy_default_backend`)."""
    return _chosen(CAUCHY_BACKENDS, "cauchy", poles.device, backend)(numerators, poles, nodes, scales)


def linear_scan(a: torch.Tensor, b: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """x_t = a_t x_{t-1} + b_t over dim 1 from a zero state: a (batch or 1, L, N), b (batch, L, N) of one dtype ->
    x (batch, L, N) (`ssmforge.kernels.ref.linear_scan_ref`). backend None picks by device
    (`linear_scan_default_backend`)."""
    return _chosen(LINEAR_SCAN_BACKENDS, "linear scan", b.device, backend)(a, b)
