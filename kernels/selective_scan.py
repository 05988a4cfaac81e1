"""Public entry point of the selective scan: one signature, several backends.

`selective_scan` dispatches on the device of its inputs. The reference backend is the definition
(`ssmforge.kernels.ref.selective_scan_ref`); fast backends register themselves in `SCAN_BACKENDS` and are tested
against it:
- "cpu": the fused C kernel of `ssmforge.kernels.cpu` (chunked PyTorch fallback without a C compiler);
- "triton": the Triton kernels of `ssmforge.kernels.triton`, the default for CUDA tensors. It runs on CPU
  tensors too when TRITON_INTERPRET=1 was set before triton was imported (how the tests run it).
CUDA tensors without triton installed raise `BackendUnavailableError` rather than fall back to the oracle
(about 1000x slower) unless backend="ref" is named.
"""
from __future__ import annotations

from typing import Callable

import torch

from .backends import missing_triton, triton_available
from .cpu import selective_scan_cpu
from .ref import selective_scan_ref


def _selective_scan_triton(*args, **kwargs):
    from .triton import selective_scan_triton  # lazy: `import kernels` must work without triton

    return selective_scan_triton(*args, **kwargs)


SCAN_BACKENDS: dict[str, Callable] = {"ref": selective_scan_ref, "cpu": selective_scan_cpu}
if triton_available():
    SCAN_BACKENDS["triton"] = _selective_scan_triton


def scan_default_backend(device: torch.device) -> str:
    """The backend used when none is named: the fastest one registered for this device. A CUDA device
    without the "triton" backend (triton not installed) raises BackendUnavailableError: its only other
    backend is the sequential oracle, which runs only when named."""
    if device.type == "cuda":
        if "triton" not in SCAN_BACKENDS:
            raise missing_triton("the selective scan", device)
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
    seq_idx: torch.Tensor | None = None,
):
    """Selective scan with the shapes and semantics of `ssmforge.kernels.ref.selective_scan_ref`.

    backend: None picks by device (see `scan_default_backend`); "ref" or a registered name forces one.
    seq_idx: (batch, L) document index of packed rows (see `ssmforge.kernels.documents`), or None; every
    backend restarts the state from zero where it changes.
    """
    name = backend or scan_default_backend(u.device)
    if name not in SCAN_BACKENDS:
        raise ValueError(f"unknown selective-scan backend {name!r}; available: {sorted(SCAN_BACKENDS)}")
    return SCAN_BACKENDS[name](
        u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
        delta_softplus=delta_softplus, return_last_state=return_last_state, seq_idx=seq_idx,
    )
