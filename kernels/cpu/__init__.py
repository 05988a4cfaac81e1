"""Fast CPU paths: the selective scan and the causal conv1d as fused C kernels (compiled on first
use), with PyTorch fallbacks (chunked scan, torch's conv)."""
from .chunked import selective_scan_chunked
from .conv1d import causal_conv1d_cpu
from .selective_scan import selective_scan_cpu

__all__ = ["causal_conv1d_cpu", "selective_scan_chunked", "selective_scan_cpu"]
