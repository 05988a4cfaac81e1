"""Which backend each kernel runs on a device, said once at the start of a run, and the error raised when
the fast backend a device needs is not installed.

On CUDA the selective scan's only fallback is the sequential oracle (`ref.selective_scan_ref`, a Python
loop over time steps, about 1000x slower than the Triton kernel): taking it silently would turn a day's run
into years, so `scan_default_backend` raises `BackendUnavailableError` instead, unless backend="ref" is asked
for. The SSD and the causal conv1d have PyTorch fallbacks that stay usable on a GPU (the chunked SSD's
matmuls, torch's depthwise conv): they run, and `describe_backends` says so.
"""
from __future__ import annotations

import functools
import importlib.util

import torch

from ssmforge.errors import SsmforgeError

INSTALL_HINT = "install it with `pip install triton` (Linux), or set model.kernel_backend=ref (backend='ref') to run " \
               "the sequential oracle, about 1000x slower"


class BackendUnavailableError(SsmforgeError):
    """A kernel's fast backend for this device is not installed (Triton for CUDA tensors) and the only other
    one is the sequential oracle, which was not asked for."""


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether triton is installed (checked without importing it, which is slow)."""
    return importlib.util.find_spec("triton") is not None


def missing_triton(kernel: str, device: torch.device) -> BackendUnavailableError:
    """The one-line error of `kernel` on a CUDA `device` without triton."""
    return BackendUnavailableError(f"{kernel} on {device.type} tensors needs triton, which is not installed: "
                                   f"{INSTALL_HINT}")


def describe_backends(device: torch.device | str, backend: str | None = None, conv_width: int = 4) -> str:
    """The backend each kernel runs on `device`, as one line for the start-up log, e.g. "selective scan:
    triton, ssd: triton, causal conv1d: triton, vandermonde: triton, cauchy: triton, linear scan: triton, fft conv:
    torch".

    backend: the name every kernel is forced to (model.kernel_backend other than auto), or None for each
    kernel's default on the device; conv_width: the causal conv's width (the Triton conv takes 2..4)."""
    from .conv1d import CONV1D_BACKENDS, conv1d_default_backend
    from .selective_scan import scan_default_backend
    from .ssd import SSD_BACKENDS, ssd_default_backend
    from .ssm_kernels import (CAUCHY_BACKENDS, LINEAR_SCAN_BACKENDS, VANDERMONDE_BACKENDS, cauchy_default_backend,
                              linear_scan_default_backend, vandermonde_default_backend)

    device = torch.device(device)
    if backend is not None:
        names = dict.fromkeys(("selective scan", "ssd", "causal conv1d", "vandermonde", "cauchy", "linear scan"),
                              backend)
    else:
        try:
            scan = scan_default_backend(device)
        except BackendUnavailableError:
            scan = "none (triton is not installed: the run stops at the first scan)"
        names = {"selective scan": scan, "ssd": ssd_default_backend(device),
                 "causal conv1d": conv1d_default_backend(device, conv_width),
                 "vandermonde": vandermonde_default_backend(device), "cauchy": cauchy_default_backend(device),
                 "linear scan": linear_scan_default_backend(device)}
        if device.type == "cuda":
            if "triton" not in SSD_BACKENDS:
                names["ssd"] += " (triton is not installed: the PyTorch chunked algorithm)"
            if "triton" not in CONV1D_BACKENDS:
                names["causal conv1d"] += " (triton is not installed: torch's conv1d)"
            elif names["causal conv1d"] == "ref":
                names["causal conv1d"] += f" (torch's conv1d: the Triton kernel takes widths 2..4, not {conv_width})"
            for kernel, backends in (("vandermonde", VANDERMONDE_BACKENDS), ("cauchy", CAUCHY_BACKENDS)):
                if "triton" not in backends:
                    names[kernel] += " (triton is not installed: PyTorch's, in blocks of channels)"
            if "triton" not in LINEAR_SCAN_BACKENDS:
                names["linear scan"] += " (triton is not installed: PyTorch's doubling scan)"
    names["fft conv"] = "torch"  # torch.fft on every device (cuFFT on CUDA)
    return ", ".join(f"{kernel}: {name}" for kernel, name in names.items())
