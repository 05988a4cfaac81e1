"""Sequence-mixing kernels: the selective scan (Mamba), the SSD (Mamba-2) and causal depthwise conv1d,
with reference oracles. The fast backends (C and Triton) are torch custom operators, ssmforge::<kernel>
(see `custom_op`), so they run on fake tensors and torch.compile traces them without graph breaks."""
from .ref import (
    causal_conv1d_ref,
    causal_conv1d_update_ref,
    selective_scan_ref,
    selective_state_update_ref,
    ssd_scan_ref,
    ssd_state_update_ref,
)
from .conv1d import CONV1D_BACKENDS, causal_conv1d, conv1d_default_backend
from .selective_scan import SCAN_BACKENDS, scan_default_backend, selective_scan
from .ssd import SSD_BACKENDS, ssd_default_backend, ssd_scan

__all__ = [
    "CONV1D_BACKENDS",
    "SCAN_BACKENDS",
    "SSD_BACKENDS",
    "causal_conv1d",
    "causal_conv1d_ref",
    "causal_conv1d_update_ref",
    "conv1d_default_backend",
    "scan_default_backend",
    "selective_scan",
    "selective_scan_ref",
    "selective_state_update_ref",
    "ssd_default_backend",
    "ssd_scan",
    "ssd_scan_ref",
    "ssd_state_update_ref",
]
