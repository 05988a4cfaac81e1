"""Fast CPU paths: the selective scan, the causal conv1d and the linear scan as fused C kernels (compiled on
first use), with PyTorch fallbacks (chunked scan, torch's conv, the doubling scan)."""
from .chunked import selective_scan_chunked
from .conv1d import causal_conv1d_cpu
from .linear_scan import linear_scan_cpu
from .selective_scan import selective_scan_cpu

__all__ = ["causal_conv1d_cpu", "linear_scan_cpu", "selective_scan_chunked", "selective_scan_cpu"]
