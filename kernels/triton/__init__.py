"""Triton kernels (GPU; CPU tensors under TRITON_INTERPRET=1). Importing this package imports triton:
`kernels` reaches it lazily, only when the "triton" backend is asked for."""
from .cauchy import cauchy_triton
from .conv1d import causal_conv1d_triton
from .linear_scan import linear_scan_triton
from .selective_scan import selective_scan_triton
from .vandermonde import vandermonde_triton

__all__ = ["cauchy_triton", "causal_conv1d_triton", "linear_scan_triton", "selective_scan_triton", "vandermonde_triton"]
