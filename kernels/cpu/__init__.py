"""Fast CPU path of the selective scan: a fused C kernel (compiled on first use) with a chunked
PyTorch fallback."""
from .chunked import selective_scan_chunked
from .selective_scan import selective_scan_cpu

__all__ = ["selective_scan_chunked", "selective_scan_cpu"]
