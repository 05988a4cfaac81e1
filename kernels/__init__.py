"""Sequence-mixing kernels: the selective scan (Mamba), the SSD (Mamba-2), causal depthwise conv1d, the S4
family's Vandermonde and Cauchy kernels and the LRU's linear scan, with reference oracles. The fast backends (C
and Triton) are torch custom operators, ssmforge::<kernel> (see `custom_op`), so they run on fake tensors and
torch.compile traces them without graph breaks."""
from ssmforge import refuse_bare_import

refuse_bare_import(__name__)

import torch

from .ref import (
    cauchy_ref,
    causal_conv1d_ref,
    causal_conv1d_step,
    linear_scan_ref,
    selective_scan_ref,
    selective_state_step,
    ssd_scan_ref,
    ssd_state_step,
    vandermonde_ref,
    vandermonde_summary_ref,
)
from .backends import BackendUnavailableError, describe_backends
from .conv1d import CONV1D_BACKENDS, causal_conv1d, conv1d_default_backend
from .selective_scan import SCAN_BACKENDS, scan_default_backend, selective_scan
from .ssd import SSD_BACKENDS, ssd_default_backend, ssd_scan
from .ssm_kernels import (CAUCHY_BACKENDS, LINEAR_SCAN_BACKENDS, VANDERMONDE_BACKENDS, VANDERMONDE_SUMMARY_BACKENDS,
                          cauchy, cauchy_default_backend, linear_scan, linear_scan_default_backend, vandermonde,
                          vandermonde_default_backend, vandermonde_summary)

_deterministic = False


def set_deterministic(enabled: bool = True) -> None:
    """Make the Triton backwards bitwise reproducible on GPUs (off by default; read at every launch).

    By default the selective scan's and the SSD's backward add the gradients of input-dependent B and C
    over the programs (channels, heads) of a group with atomics, whose order, hence float rounding,
    varies between runs. Enabled, each program writes its own partial and torch sums them in a fixed
    order, at the cost of a transient buffer per B and C (see the README's kernels section).
    torch.use_deterministic_algorithms(True) turns it on too. The CPU kernels are always deterministic."""
    global _deterministic
    _deterministic = bool(enabled)


def deterministic() -> bool:
    """Whether the kernels launched now must be deterministic (see `set_deterministic`)."""
    return _deterministic or torch.are_deterministic_algorithms_enabled()


__all__ = [
    "BackendUnavailableError",
    "CAUCHY_BACKENDS",
    "CONV1D_BACKENDS",
    "LINEAR_SCAN_BACKENDS",
    "SCAN_BACKENDS",
    "SSD_BACKENDS",
    "VANDERMONDE_BACKENDS",
    "VANDERMONDE_SUMMARY_BACKENDS",
    "cauchy",
    "cauchy_default_backend",
    "cauchy_ref",
    "causal_conv1d",
    "causal_conv1d_ref",
    "causal_conv1d_step",
    "conv1d_default_backend",
    "describe_backends",
    "deterministic",
    "linear_scan",
    "linear_scan_default_backend",
    "linear_scan_ref",
    "scan_default_backend",
    "selective_scan",
    "selective_scan_ref",
    "selective_state_step",
    "set_deterministic",
    "ssd_default_backend",
    "ssd_scan",
    "ssd_scan_ref",
    "ssd_state_step",
    "vandermonde",
    "vandermonde_default_backend",
    "vandermonde_ref",
    "vandermonde_summary",
    "vandermonde_summary_ref",
]
