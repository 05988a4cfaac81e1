"""The machine a benchmark ran on, recorded beside its figures in benchmarks/results/*.json."""
from __future__ import annotations

import os
import platform


def describe() -> dict:
    """CPU model, cores, torch threads and versions, and the GPU if one is visible."""
    import torch

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return dict(cpu=cpu, cores=os.cpu_count(), torch_threads=torch.get_num_threads(), torch=torch.__version__,
                python=platform.python_version(), platform=platform.platform(),
                gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None)
