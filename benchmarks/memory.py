"""Peak memory of a block of work above the level it started from: the CUDA allocator's count on a GPU,
the kernel's resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs) on a CPU.

On a CPU the figure is what the process really held, allocator included. glibc keeps freed blocks below
its mmap threshold for reuse, which hides later peaks; MALLOC_ENV (set before the process starts) makes
every large block its own mapping, returned to the system when freed."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 16), "MALLOC_TRIM_THRESHOLD_": str(1 << 16)}


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


class PeakMemory:
    bytes: int = 0  # the peak above the level at entry


@contextlib.contextmanager
def peak_memory(device: torch.device):
    """with peak_memory(device) as peak: ...work...; then peak.bytes."""
    result = PeakMemory()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        start = _status_bytes("VmRSS")
    yield result
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        result.bytes = torch.cuda.max_memory_allocated(device) - start
    else:
        result.bytes = _status_bytes("VmHWM") - start
