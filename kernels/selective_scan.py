"""Public entry point of the selective scan: one signature, several backends.

`selective_scan` dispatches on the device of its inputs. The reference backend is the definition
(`ssmforge.kernels.ref.selective_scan_ref`); fast backends register themselves in `SCAN_BACKENDS` and are tested
against it:
- "cpu": the fused C kernel of `ssmforge.kernels.cpu` (chunked PyTorch fallback without a C compiler);
- "triton": the Triton kernels of `ssmforge.kernels.triton`, the default for CUDA tensors. It runs on CPU
  tensors too when TRITON_INTERPRET=1 was set before triton was imported (how the tests run it).
"""
from __future__ import annotations

import functools
import importlib.util
from typing import Callable

import torch

from .cpu import selective_scan_cpu
from .ref import selective_scan_ref


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether triton is installed (checked without importing it, which is slow)."""
    return importlib.util.find_spec("triton") is not None


def _selective_scan_triton(*args, **kwargs):
    from .triton import selective_scan_triton  # lazy: `import kernels` must work without triton

    return selective_scan_triton(*args, **kwargs)


SCAN_BACKENDS: dict[str, Callable] = {"ref": selective_scan_ref, "cpu": selective_scan_cpu}
if triton_available():
    SCAN_BACKENDS["triton"] = _selective_scan_triton


def scan_default_backend(device: torch.device) -> str:
    """The backend used when none is named: the fastest one registered for this device."""
    if device.type == "cuda" and "triton" in SCAN_BACKENDS:
        return "triton"
    if device.type == "cpu" and "cpu" in SCAN_BACKENDS:
        return "cpu"
    return "ref"


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    backend: str | None = None,
):
    """Selective scan with the shapes and semantics of `ssmforge.kernels.ref.selective_scan_ref`.

    backend: None picks by device (see `scan_default_backend`); "ref" or a registered name forces one.
    """
    name = backend or scan_default_backend(u.device)
    if name not in SCAN_BACKENDS:
        raise ValueError(f"unknown selective-scan backend {name!r}; available: {sorted(SCAN_BACKENDS)}")
    return SCAN_BACKENDS[name](
        u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
        delta_softplus=delta_softplus, return_last_state=return_last_state,
    )
